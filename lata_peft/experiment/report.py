"""The experiment's report: a markdown block (results table, DARE-only spread, verdicts) written
between markers into the report file, and the plots beside it."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ..outputs import replace_text
from .analysis import comparisons, main_records, question, summarise, tally, tuned_lambdas, verdicts, with_selectivity
from .plan import adapter_paths, method_of

__all__ = ["markdown", "write_report"]


def write_plots(summary: dict[str, Any], plan: dict[str, Any], folder: Path, tag: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for setting in plan["settings"]:
        metrics = setting["plot"]
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
        for ax, metric in zip(axes[0], metrics, strict=True):
            for method in plan["methods"]:
                lams = plan["lambdas"][setting["kind"]]
                points = [(lam, summary.get(f"{setting['name']}|{method['name']}|{lam}", {}).get(metric))
                          for lam in lams]
                points = [(lam, v) for lam, v in points if v is not None]
                if points:
                    ax.errorbar([p[0] for p in points], [p[1][0] for p in points], yerr=[p[1][1] for p in points],
                                marker="o", ms=3, capsize=2, label=method["name"])
            base = summary.get("reference|base|0.0", {}).get(metric)
            if base:
                ax.axhline(base[0], color="0.5", ls="--", lw=1, label="base")
            ax.set_xlabel("lambda")
            ax.set_title(metric)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7, frameon=False)
        fig.suptitle(f"{tag} {setting['name']}: {setting['description']}")
        fig.tight_layout()
        path = folder / f"results_{tag}_{setting['name']}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def layer_plot(plan: dict[str, Any], folder: Path, tag: str) -> Path:
    """Per-block cosine with the instruction adapter and LATA weight, first adapter set."""
    adapters = adapter_paths(plan, next(iter(plan["adapter_sets"])))
    tasks = [adapters[name] for name in plan["adapters"] if name != "instruct"]
    path = folder / f"layers_{tag}.png"
    from ..api import inspect

    inspect(tasks, instruction=adapters["instruct"], scheme="linear", plot=path)
    return path


def cell(values: tuple[float, float, int] | None) -> str:
    if values is None:
        return "-"
    mean, spread, n = values
    return f"{mean:.4f} ± {spread:.4f} ({n})" if n > 1 else f"{mean:.4f}"


def markdown(plan: dict[str, Any], records: list[dict[str, Any]], summary: dict[str, Any], plots: list[Path]) -> str:
    """``records`` with selectivity added; ``summary`` is ``summarise(main_records(records))``."""
    main = main_records(records)
    metrics = list(dict.fromkeys(m for r in main for m in r["metrics"]))
    lines = ["Mean ± standard deviation over training seeds (n in brackets; DARE/DARE-TIES seeded by the "
             "training seed). Lower is better except `shout_nll` in forgetting and `selectivity`.", "",
             "| setting | method | lambda | " + " | ".join(metrics) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in metrics) + " |"]
    for key, values in summary.items():
        setting, method, lam = key.split("|")
        lines.append(f"| {setting} | {method} | {lam} | " + " | ".join(cell(values.get(m)) for m in metrics) + " |")

    first = next(iter(plan["adapter_sets"]))
    dare = summarise([r for r in records if r["train_seed"] == first and r["setting"] != "reference"
                      and method_of(plan, r["method"])["method"] in ("dare", "dare_ties")])
    if any(v[next(iter(v))][2] > 1 for v in dare.values()):
        lines += ["", f"DARE-only spread (training seed {first}, DARE seeds {plan.get('dare_seeds')}):", "",
                  "| setting | method | lambda | " + " | ".join(metrics) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in metrics) + " |"]
        for key, values in dare.items():
            setting, method, lam = key.split("|")
            lines.append(f"| {setting} | {method} | {lam} | "
                         + " | ".join(cell(values.get(m)) for m in metrics) + " |")

    split = any("validation" in r for r in main)
    if split:
        lines += ["", *tuned_table(plan, main)]
    tuned = verdicts(main, plan, tuned=True)
    rows = verdicts(main, plan) + tuned
    if rows:
        lines += ["", *verdict_table(plan, rows, split)]
    if tuned:
        lines += ["", *tally_table(plan, tuned)]
    lines += ["", *(f"![{p.stem}]({p.name})" for p in plots)]
    return "\n".join(lines) + "\n"


def tuned_table(plan: dict[str, Any], main: list[dict[str, Any]]) -> list[str]:
    """Each method at the lambda its validation split picks (per goal metric), its *test* value:
    mean ± standard deviation over training seeds, with the picked lambda."""
    best = tuned_lambdas(main, plan)
    by_key: dict[tuple[str, str, float], list[dict[str, float]]] = {}
    for record in main:
        by_key.setdefault((record["setting"], record["method"], record["lambda"]), []).append(record["metrics"])
    lines = ["Test split at the lambda picked on the validation split (probe examples 1, 3, ... pick lambda; "
             "2, 4, ... are reported here), mean ± standard deviation over training seeds, picked lambda in "
             "brackets:", ""]
    for setting in plan["settings"]:
        goals = list(setting["goals"])
        lines += [f"| {setting['name']} | " + " | ".join(f"{g} ({setting['goals'][g]})" for g in goals) + " |",
                  "| --- | " + " | ".join("---" for _ in goals) + " |"]
        for method in (m["name"] for m in plan["methods"]):
            cells = []
            for metric in goals:
                lam = best.get((setting["name"], method, metric))
                values = [m[metric] for m in by_key.get((setting["name"], method, lam), []) if metric in m]
                if not values:
                    cells.append("-")
                    continue
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.fmean(values):.4f} ± {spread:.4f} (λ={lam:g})")
            if any(c != "-" for c in cells):
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def verdict_table(plan: dict[str, Any], rows: list[dict[str, Any]], split: bool) -> list[str]:
    """Win / tie / loss of each compared pair, per setting, lambda and goal metric. A column whose method
    has one baseline shows that verdict and its mean gain; otherwise the counts over its baselines."""
    pairs = comparisons(plan)
    ours = list(dict.fromkeys(a for a, _ in pairs))
    against = {name: [b for a, b in pairs if a == name] for name in ours}
    header = [f"{name} vs {against[name][0]}" if len(against[name]) == 1 else name for name in ours]
    picked = "on the validation split" if split else "by the mean over seeds of the reported values"
    counted = sorted({b for _, b in pairs})
    lines = ["Paired verdicts over the training seeds in the `seeds` column (win: better on every seed by more "
             f"than {plan.get('tie_tolerance', 2e-3):g}; loss: worse on every seed by more than that; else tie; "
             f"mean gain in brackets, positive = better). Lambda `best`: each method at its own best lambda for "
             f"that metric, picked {picked}."
             + ("" if all(len(v) == 1 for v in against.values())
                else " Count of win / tie / loss over the baselines " + ", ".join(counted) + "."), "",
             "| setting | lambda | metric | seeds | " + " | ".join(header) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in header) + " |"]
    groups: dict[tuple[str, Any, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["setting"], row["lambda"], row["metric"]), []).append(row)
    for (setting, lam, metric), group in groups.items():
        seeds = sorted({row["n"] for row in group})
        cells = []
        for name in ours:
            mine = [row for row in group if row["ours"] == name]
            outcomes = [row["outcome"] for row in mine]
            if not mine:
                cells.append("-")
            elif len(against[name]) == 1:
                cells.append(f"{mine[0]['outcome']} ({mine[0]['mean_gain']:+.4f})")
            else:
                cells.append(f"{outcomes.count('win')} / {outcomes.count('tie')} / {outcomes.count('loss')}")
        lines.append(f"| {setting} | {lam} | {metric} | {'-'.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return lines


def tally_table(plan: dict[str, Any], tuned: list[dict[str, Any]]) -> list[str]:
    """The ``best``-lambda verdicts in one table: per question (:func:`~.analysis.question`: ``+lata``,
    ``core vs full``, ...), wins / ties / losses over its pairs, per setting and goal metric."""
    counts = tally(tuned)
    pairs: dict[str, set[tuple[str, str]]] = {}
    for row in tuned:
        pairs.setdefault(question(row["ours"], row["baseline"]), set()).add((row["ours"], row["baseline"]))
    columns = [(s["name"], metric) for s in plan["settings"] for metric in s["goals"]
               if any((s["name"], metric) in cells for cells in counts.values())]
    lines = ["In one table: each question's wins / ties / losses over its pairs (the verdicts at lambda `best` "
             "above; a question groups the pairs whose names differ by the same words).", "",
             "| question | pairs | " + " | ".join(f"{setting}: {metric}" for setting, metric in columns) + " |",
             "| --- | --- | " + " | ".join("---" for _ in columns) + " |"]
    for name, cells in counts.items():
        shown = ["/".join(map(str, cells[column])) if column in cells else "-" for column in columns]
        lines.append(f"| {name} | {len(pairs[name])} | " + " | ".join(shown) + " |")
    return lines


def write_report(plan: dict[str, Any], results_path: Path, out: Path) -> None:
    tag = plan.get("tag", results_path.stem)
    records = with_selectivity(json.loads(results_path.read_text()), plan)
    summary = summarise(main_records(records))
    plots = [*write_plots(summary, plan, out.parent, tag), layer_plot(plan, out.parent, tag)]
    begin, end = f"<!-- results:{tag} -->", f"<!-- /results:{tag} -->"
    block = f"{begin}\n\n{markdown(plan, records, summary, plots)}\n{end}"
    text = out.read_text() if out.exists() else ""
    if begin in text and end in text:
        text = text.split(begin)[0] + block + text.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    replace_text(out, text)
