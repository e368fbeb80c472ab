"""The runs of an experiment: every (training seed, setting, method, lambda, seed), the references
first, lambda = 1 for every training seed before the rest, so a cut-short run is still a complete
comparison at lambda = 1; and the combine each run evaluates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..api import combine
from .plan import adapter_paths, method_of, setting_of

__all__ = ["combine_for", "key_of", "runs"]


def runs(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (training seed, setting, method, lambda, seed) to evaluate, plus the references
    (base, single adapters), lambda = 1 first (within each setting, with ``order: setting``)."""
    train_seeds = list(plan["adapter_sets"])
    grid = [{"train_seed": train_seeds[0], "setting": "reference", "method": "base", "lambda": 0.0, "seed": 0}]
    grid += [{"train_seed": t, "setting": "reference", "method": f"only:{name}", "lambda": 1.0, "seed": t}
             for t in train_seeds for name in plan["adapters"]]
    combos = [{"train_seed": t, "setting": s["name"], "method": m["name"], "lambda": lam, "seed": t}
              for t in train_seeds for s in plan["settings"] for m in plan["methods"]
              for lam in plan["lambdas"][s["kind"]]]
    dare_only = [{**c, "seed": extra} for c in combos if c["train_seed"] == train_seeds[0]
                 and method_of(plan, c["method"])["method"] in ("dare", "dare_ties")
                 for extra in plan.get("dare_seeds", []) if extra != c["seed"]]
    # lambda = 1 for every training seed first, then the first seed's lambda grid, then the rest;
    # with ``order: setting``, one setting at a time (each complete over seeds and lambdas before the next).
    settings = [s["name"] for s in plan["settings"]]
    by_setting = plan.get("order") == "setting"
    combos.sort(key=lambda c: (settings.index(c["setting"]) if by_setting else 0, c["lambda"] != 1.0,
                               c["train_seed"] != train_seeds[0]))
    return grid + combos + dare_only


def combine_for(run: dict[str, Any], plan: dict[str, Any], out: Path) -> Path | None:
    adapters = adapter_paths(plan, run["train_seed"])
    if run["method"] == "base":
        return None
    if run["method"].startswith("only:"):
        return adapters[run["method"][5:]]
    setting = setting_of(plan, run["setting"])
    method = dict(method_of(plan, run["method"]))
    method.pop("name")
    if method.get("method") == "lata" or method.get("lata"):
        method["instruction"] = adapters["instruct"]
    combine([adapters[a] for a in setting.get("add", [])], out,
                      forget=[adapters[a] for a in setting.get("forget", [])], lam=run["lambda"], seed=run["seed"],
                      overwrite=True, **method)
    return out


def key_of(run: dict[str, Any]) -> str:
    return f"{run['train_seed']}|{run['setting']}|{run['method']}|{run['lambda']}|{run['seed']}"
