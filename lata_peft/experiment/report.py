"""The experiment's report: a markdown block (results table, DARE-only spread, verdicts) written
between markers into the report file, and the plots beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..outputs import replace_text
from .analysis import BASELINES, main_records, summarise, verdicts, with_selectivity
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

    rows = verdicts(main, plan) + verdicts(main, plan, tuned=True)
    if rows:
        baselines = [m["name"] for m in plan["methods"] if m["name"] in BASELINES]
        ours = [m["name"] for m in plan["methods"] if m["name"] not in BASELINES]
        lines += ["", "LATA against each baseline, paired over the training seeds in the `seeds` column (win: "
                  f"better on every seed by more than {plan.get('tie_tolerance', 2e-3):g}; loss: worse on every seed "
                  "by more than that; else tie). Lambda `best`: each method at its own best lambda for that "
                  "metric (mean over seeds), as merge methods are usually compared. Count of win / tie / loss "
                  "over the baselines " + ", ".join(baselines) + ":", "",
                  "| setting | lambda | metric | seeds | " + " | ".join(ours) + " |",
                  "| --- | --- | --- | --- | " + " | ".join("---" for _ in ours) + " |"]
        groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault((row["setting"], row["lambda"], row["metric"]), []).append(row)
        for (setting, lam, metric), group in groups.items():
            seeds = sorted({row["n"] for row in group})
            cells = []
            for name in ours:
                outcomes = [row["outcome"] for row in group if row["lata"] == name]
                cells.append(f"{outcomes.count('win')} / {outcomes.count('tie')} / {outcomes.count('loss')}"
                             if outcomes else "-")
            lines.append(f"| {setting} | {lam} | {metric} | {'-'.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    lines += ["", *(f"![{p.stem}]({p.name})" for p in plots)]
    return "\n".join(lines) + "\n"


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
