"""Reading an experiment's results: selectivity of forgetting, means and spreads over training
seeds, each method's best lambda (picked on the validation split when the plan has one), and paired
win/tie/loss verdicts of each compared pair of methods (by default LATA against each baseline)."""

from __future__ import annotations

import statistics
from typing import Any

__all__ = ["BASELINES", "comparisons", "main_records", "question", "summarise", "tally", "tuned_lambdas", "verdicts",
           "with_selectivity"]

BASELINES = ("ta", "ties", "dare", "dare_ties")


def with_selectivity(records: list[dict[str, Any]], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Forget settings gain ``selectivity`` = (forgotten NLL - base) / (kept NLL - base): forgetting
    bought per unit of utility lost (higher is better). The setting's ``selectivity: {forgotten, kept}``
    names the two metrics (default ``shout_nll`` and ``instruct_nll``)."""
    base = next((r for r in records if r["method"] == "base"), None)
    forget = {s["name"]: s.get("selectivity", {}) for s in plan["settings"] if s["kind"] == "forget"}
    out = []
    for record in records:
        if base and record["setting"] in forget:
            forgotten = forget[record["setting"]].get("forgotten", "shout_nll")
            kept = forget[record["setting"]].get("kept", "instruct_nll")
            record = dict(record)
            for split in ("metrics", "validation"):
                if split not in record or split not in base:
                    continue
                metrics, reference = record[split], base[split]
                damage = metrics[kept] - reference[kept]
                gained = metrics[forgotten] - reference[forgotten]
                selectivity = gained / damage if damage > 1e-9 else float("nan")
                record[split] = {**metrics, "selectivity": selectivity}
        out.append(record)
    return out


def main_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (training seed, setting, method, lambda): DARE seeded by the training seed."""
    return [r for r in records if r["seed"] == r["train_seed"] or r["method"] == "base"]


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """``{setting|method|lambda: {metric: (mean, std, n)}}`` over the records given."""
    groups: dict[str, list[dict[str, float]]] = {}
    for record in records:
        groups.setdefault(f"{record['setting']}|{record['method']}|{record['lambda']}", []).append(record["metrics"])
    summary = {}
    for key, runs_ in groups.items():
        summary[key] = {}
        for metric in runs_[0]:
            values = [r[metric] for r in runs_ if metric in r]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[key][metric] = (statistics.fmean(values), spread, len(values))
    return summary


def tuned_lambdas(records: list[dict[str, Any]], plan: dict[str, Any]) -> dict[tuple[str, str, str], float]:
    """``{(setting, method, metric): lambda}``: each method's best lambda for each goal metric, by the
    mean over training seeds of the *validation* split where records have one (else of the reported
    metrics), among the lambdas run on as many seeds as that method's best-covered one."""
    best = {}
    for setting in plan["settings"]:
        for method in (m["name"] for m in plan["methods"]):
            runs_ = [r for r in records if r["setting"] == setting["name"] and r["method"] == method]
            by_lambda: dict[float, list[dict[str, float]]] = {}
            for record in runs_:
                by_lambda.setdefault(record["lambda"], []).append(record.get("validation", record["metrics"]))
            if not by_lambda:
                continue
            coverage = max(len(v) for v in by_lambda.values())
            covered = {lam: v for lam, v in by_lambda.items() if len(v) == coverage}
            for metric, goal in setting["goals"].items():
                sign = 1.0 if goal == "max" else -1.0
                best[(setting["name"], method, metric)] = max(
                    covered, key=lambda lam: sign * statistics.fmean(m[metric] for m in covered[lam]))
    return best


def comparisons(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """The plan's ``comparisons`` (``[ours, baseline]`` pairs), else every method that is not a
    baseline against every baseline (``BASELINES``) the plan runs."""
    if "comparisons" in plan:
        return [(ours, baseline) for ours, baseline in plan["comparisons"]]
    names = [m["name"] for m in plan["methods"]]
    return [(ours, other) for ours in names if ours not in BASELINES for other in names if other in BASELINES]


def verdicts(records: list[dict[str, Any]], plan: dict[str, Any], tuned: bool = False) -> list[dict[str, Any]]:
    """Each compared pair (:func:`comparisons`), per setting, lambda and goal metric, paired over
    training seeds: ``win`` if ``ours`` is better on every seed by more than ``tie_tolerance`` (default
    0.002), ``loss`` if worse on every seed by more than that, else ``tie``. With ``tuned``, each
    method runs at its own best lambda for the metric (``tuned_lambdas``, picked on the validation split
    when there is one; lambda reads "best"); the reported values are always the ``metrics`` (test) split."""
    by_key = {(r["train_seed"], r["setting"], r["method"], r["lambda"]): r["metrics"] for r in records}
    best = tuned_lambdas(records, plan) if tuned else {}
    tolerance = plan.get("tie_tolerance", 2e-3)  # bf16 evaluation moves NLLs by <= 0.0015

    def value(train_seed: int, setting: str, method: str, lam: float | str, metric: str) -> float | None:
        at = best.get((setting, method, metric)) if lam == "best" else lam
        return by_key.get((train_seed, setting, method, at), {}).get(metric)

    rows = []
    for setting in plan["settings"]:
        for lam in ["best"] if tuned else plan["lambdas"][setting["kind"]]:
            for metric, goal in setting["goals"].items():
                sign = 1.0 if goal == "max" else -1.0
                for ours, other in comparisons(plan):
                    pairs = [(value(t, setting["name"], ours, lam, metric),
                              value(t, setting["name"], other, lam, metric)) for t in plan["adapter_sets"]]
                    diffs = [sign * (a - b) for a, b in pairs if a is not None and b is not None]
                    if not diffs:
                        continue
                    outcome = ("win" if all(d > tolerance for d in diffs)
                               else "loss" if all(d < -tolerance for d in diffs) else "tie")
                    rows.append({"setting": setting["name"], "lambda": lam, "metric": metric, "ours": ours,
                                 "baseline": other, "outcome": outcome, "n": len(diffs),
                                 "mean_gain": statistics.fmean(diffs)})
    return rows


def question(ours: str, baseline: str) -> str:
    """What a compared pair asks, from the ``_``-separated words of the two names that the other lacks:
    ``ta_lata`` vs ``ta`` and ``tsv_lata`` vs ``tsv`` both ask ``+lata``; ``ties_core`` vs ``ties_full`` and
    ``dare_ties_core`` vs ``dare_ties_full`` ask ``core vs full``; ``tsv`` vs ``ta`` asks ``tsv vs ta``."""
    mine, theirs = ours.split("_"), baseline.split("_")
    only_mine = [word for word in mine if word not in theirs]
    only_theirs = [word for word in theirs if word not in mine]
    if only_mine and only_theirs:
        return f"{'_'.join(only_mine)} vs {'_'.join(only_theirs)}"
    if only_mine:
        return "+" + "_".join(only_mine)
    if only_theirs:
        return "-" + "_".join(only_theirs)
    return f"{ours} vs {baseline}"


def tally(rows: list[dict[str, Any]]) -> dict[str, dict[tuple[str, str], list[int]]]:
    """Verdict rows (:func:`verdicts`) counted per :func:`question`: ``{question: {(setting, metric): [wins,
    ties, losses]}}`` over the question's pairs, lambdas as they come (pass the ``tuned`` rows for the picked
    lambda), in the order first seen."""
    counts: dict[str, dict[tuple[str, str], list[int]]] = {}
    for row in rows:
        cell = counts.setdefault(question(row["ours"], row["baseline"]), {}).setdefault(
            (row["setting"], row["metric"]), [0, 0, 0])
        cell[("win", "tie", "loss").index(row["outcome"])] += 1
    return counts
