"""An experiment plan: its YAML, its schema checked up front, and its inputs checked before any run.

```yaml
tag: smollm2                      # names the plots and the report block
base: ~/.cache/lata_peft/SmolLM2-135M-Instruct
results: docs/results/smollm2.json   # appended to as runs finish (the run resumes)
report: docs/RESULTS.md
adapters: [instruct, math, code, shout]    # one folder per name in every adapter set
adapter_sets: {0: examples/adapters}        # training seed -> folder
settings: [{name, kind: add|forget, add|forget: [names], goals: {metric: min|max}, plot: [metrics]}]
methods: [{name, method, ...combine options}]
lambdas: {add: [0.5, 1.0], forget: [1.0]}
limits: {math: 24, code: 16, instruct: 16}
metrics: {wikitext_tokens: 2048}
# optional:
#   metrics.validation: alternate   -> probe examples 1, 3, ... pick lambda; 2, 4, ... are reported
#   metrics.apply: merged           -> adapters merged into the weights for evaluation (default: LoRA layers)
#   metrics.measure: goals          -> combinations measure only their setting's goal probes (default: all)
#   order: setting                  -> run one setting at a time over all seeds (default: lambda = 1 first)
#   comparisons: [[ours, baseline]] -> the paired verdicts (default: every non-baseline method against
#                                      ta, ties, dare and dare_ties)
```
Relative paths are taken from the current folder; ``${VAR}`` expands environment variables.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..errors import LataError, first_line
from ..models import is_model_folder
from ..specs import CombineSpec
from .probes import BUILT_IN, VALIDATION_SPLITS, custom_probes

__all__ = ["adapter_paths", "check_inputs", "check_metrics", "check_schema", "load_plan", "method_of", "setting_of"]

REQUIRED = {"base": str, "results": str, "report": str, "adapters": list, "adapter_sets": dict, "settings": list,
            "methods": list, "lambdas": dict, "limits": dict, "metrics": dict}


def _need(condition: bool, path: Path | str, message: str) -> None:
    if not condition:
        raise LataError(f"{path}: {message}")


def check_schema(plan: Any, path: Path | str) -> None:
    """Types and names of every plan entry; each method's options checked by :class:`CombineSpec`."""
    _need(isinstance(plan, dict), path, "a plan is a YAML mapping")
    for key, kind in REQUIRED.items():
        _need(isinstance(plan.get(key), kind), path, f"{key!r} must be a {kind.__name__}")
    _need(all(isinstance(name, str) for name in plan["adapters"]), path, "'adapters' must be a list of names")
    for setting in plan["settings"]:
        _need(isinstance(setting, dict) and isinstance(setting.get("name"), str), path, "every setting needs a name")
        _need(setting.get("kind") in plan["lambdas"], path,
              f"setting {setting['name']!r}: its kind must be a key of 'lambdas' ({', '.join(plan['lambdas'])})")
        goals = setting.get("goals")
        _need(isinstance(goals, dict) and all(g in ("min", "max") for g in goals.values()), path,
              f"setting {setting['name']!r}: goals must map metrics to min or max")
        named = [*setting.get("add", []), *setting.get("forget", [])]
        unknown = sorted(set(named) - set(plan["adapters"]))
        _need(not unknown, path, f"setting {setting['name']!r} names adapters not in 'adapters': {unknown}")
        lambdas = plan["lambdas"].get(setting["kind"])
        _need(isinstance(lambdas, list) and all(isinstance(x, (int, float)) for x in lambdas), path,
              f"lambdas.{setting['kind']} must be a list of numbers")
    metrics = plan["metrics"]
    _need(metrics.get("validation") in (None, *VALIDATION_SPLITS), path,
          f"metrics.validation must be one of {', '.join(VALIDATION_SPLITS)}")
    _need(metrics.get("apply") in (None, "lora", "merged"), path, "metrics.apply must be lora or merged")
    _need(metrics.get("measure") in (None, "all", "goals"), path, "metrics.measure must be all or goals")
    _need(plan.get("order") in (None, "lambda", "setting"), path, "order must be lambda or setting")
    names = [m.get("name") for m in plan["methods"] if isinstance(m, dict)]
    for pair in plan.get("comparisons", []):
        _need(isinstance(pair, list) and len(pair) == 2 and all(n in names for n in pair), path,
              f"comparison {pair!r} must be two of the plan's method names")
    for method in plan["methods"]:
        _need(isinstance(method, dict) and isinstance(method.get("name"), str), path, "every method needs a name")
        options = {k: v for k, v in method.items() if k != "name"}
        lata = options.get("method") == "lata" or options.get("lata")
        try:
            stand_in = {"adapters": ["x"], "out": "x", **({"instruction": "x"} if lata else {})}
            CombineSpec.from_mapping({**options, **stand_in}, source=f"method {method['name']!r}")
        except LataError as exc:
            raise LataError(f"{path}: {exc}") from None


def adapter_paths(plan: dict[str, Any], train_seed: int) -> dict[str, Path]:
    folder = Path(plan["adapter_sets"][train_seed]).expanduser()
    return {name: folder / name for name in plan["adapters"]}


def method_of(plan: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in plan["methods"] if m["name"] == name)


def setting_of(plan: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in plan["settings"] if s["name"] == name)


def check_metrics(plan: dict[str, Any]) -> None:
    """Every metric a setting's goals, plot or selectivity names is one the plan measures."""
    measured = {*BUILT_IN, *plan.get("probes", {})}
    measured |= {"gsm8k_em"} if plan.get("metrics", {}).get("gsm8k_generate") else set()
    measured |= {"humaneval_pass1"} if plan.get("metrics", {}).get("humaneval_generate") else set()
    for setting in plan["settings"]:
        named = {*setting["goals"], *setting.get("plot", []), *setting.get("selectivity", {}).values()}
        unknown = sorted(named - measured - ({"selectivity"} if setting["kind"] == "forget" else set()))
        if unknown:
            raise LataError(f"setting {setting['name']!r} names metrics the plan does not measure: "
                            f"{', '.join(unknown)} (measured: {', '.join(sorted(measured))})")


def check_inputs(plan: dict[str, Any]) -> None:
    """Every adapter folder and the base the plan names exist, before hours of runs start."""
    check_metrics(plan)
    problems = []
    base = Path(plan["base"]).expanduser()
    if not is_model_folder(base):
        problems.append(f"base {base}: no config.json (see the plan's first lines for how to build it)")
    for train_seed in plan["adapter_sets"]:
        folders = adapter_paths(plan, train_seed)
        missing = [name for name, folder in folders.items() if not (folder / "adapter_config.json").is_file()]
        if missing:
            where = next(iter(folders.values())).parent
            problems.append(f"training seed {train_seed}: {where} lacks the adapter(s) {', '.join(missing)}")
    try:
        custom_probes(plan.get("probes", {}))
    except LataError as exc:
        problems.append(str(exc))
    if problems:
        raise LataError("; ".join(problems))


def load_plan(path: Path) -> dict[str, Any]:
    """The YAML plan with ``$VARS`` in its strings expanded (an unset variable is an error),
    its schema checked (:func:`check_schema`)."""

    def expand(value: Any) -> Any:
        if isinstance(value, str):
            expanded = os.path.expandvars(value)
            if "$" in expanded:
                raise LataError(f"{path}: {value!r} names an environment variable that is not set")
            return expanded
        if isinstance(value, dict):
            return {k: expand(v) for k, v in value.items()}
        if isinstance(value, list):
            return [expand(v) for v in value]
        return value

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise LataError(f"{path}: unreadable plan ({first_line(exc)})") from None
    plan = expand(document)
    check_schema(plan, path)
    return plan
