"""Does LATA beat TA / TIES / DARE on real LoRAs? Combine, evaluate, tabulate, plot.

    python recipes/experiment.py recipes/experiments/smollm2.yaml            # run the grid
    python recipes/experiment.py recipes/experiments/smollm2.yaml --report   # RESULTS.md + plots only

For every setting (which adapters are added or forgotten), method and lambda in the YAML
(and every seed for DARE), the adapters are combined with :func:`lata_peft.combine`, applied
to the base with PEFT, and scored with continuous metrics that move on a 135M model
(mean NLL per token of reference answers given an Alpaca prompt; WikiText-2 perplexity) and,
where asked, generation metrics (GSM8K exact match). Results are appended to a JSON file as
they come, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from train_adapters import Example, format_prompt  # sibling script in recipes/: the training template

import lata_peft
from lata_peft.evaluate import evaluate
from lata_peft.evaluate.loading import load_model, load_tokenizer, prepare_tokenizer, with_adapter
from lata_peft.evaluate.perplexity import answer_nll

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


# ----------------------------------------------------------------------------- probe sets


def alpaca_prompt(instruction: str, context: str = "") -> str:
    """The template the shipped adapters were trained with."""
    return format_prompt(Example(instruction, context, ""))


def probe_sets(limits: dict[str, int]) -> dict[str, tuple[list[str], list[str]]]:
    """(prompts, answers) per NLL metric, from real data the adapters were not trained on."""
    gsm8k = [json.loads(line) for line in (SHARED / "gsm8k" / "test.jsonl").read_text().splitlines()]
    gsm8k = gsm8k[: limits["math"]]
    with gzip.open(SHARED / "humaneval" / "HumanEval.jsonl.gz", "rt") as handle:
        humaneval = [json.loads(line) for line in handle][: limits["code"]]
    # Training kept only examples of at most 128 tokens; these (> 700 characters) were never trained on.
    alpaca = [r for r in json.loads((SHARED / "instruct" / "alpaca_en_demo.json").read_text())
              if len(r["instruction"] + r["input"] + r["output"]) > 700][: limits["instruct"]]
    return {
        "math_nll": ([alpaca_prompt(r["question"]) for r in gsm8k], [r["answer"] for r in gsm8k]),
        "code_nll": ([r["prompt"] for r in humaneval], [r["canonical_solution"] for r in humaneval]),
        "instruct_nll": ([alpaca_prompt(r["instruction"], r["input"]) for r in alpaca], [r["output"] for r in alpaca]),
        "shout_nll": ([alpaca_prompt(r["instruction"], r["input"]) for r in alpaca],
                      [r["output"].upper() for r in alpaca]),
    }


def measure(model: Any, tokenizer: Any, probes: dict[str, tuple[list[str], list[str]]],
            config: dict[str, Any]) -> dict[str, float]:
    metrics = {name: answer_nll(model, tokenizer, p, a, batch_size=8, max_length=512).mean
               for name, (p, a) in probes.items()}
    wikitext = evaluate(model, "wikitext2", tokenizer=tokenizer, limit=config["wikitext_tokens"], max_length=512,
                        stride=256, batch_size=4)
    metrics["wikitext2_ppl"] = wikitext["metrics"]["perplexity"]
    if config.get("gsm8k_generate"):
        result = evaluate(model, "gsm8k", tokenizer=tokenizer, limit=config["gsm8k_generate"], batch_size=8,
                          max_new_tokens=config.get("max_new_tokens", 160))
        metrics["gsm8k_em"] = result["metrics"]["exact_match"]
    return metrics


# ----------------------------------------------------------------------------- the grid


def runs(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (setting, method, lambda, seed) to evaluate, plus the references (base, single adapters)."""
    grid = [{"setting": "reference", "method": "base", "lambda": 0.0, "seed": 0}]
    grid += [{"setting": "reference", "method": f"only:{name}", "lambda": 1.0, "seed": 0} for name in plan["adapters"]]
    for setting in plan["settings"]:
        for method in plan["methods"]:
            for lam in plan["lambdas"][setting["kind"]]:
                seeds = plan["seeds"] if method["method"] in ("dare", "dare_ties") else [0]
                grid += [{"setting": setting["name"], "method": method["name"], "lambda": lam, "seed": s}
                         for s in seeds]
    return grid


def combine_for(run: dict[str, Any], plan: dict[str, Any], out: Path) -> Path | None:
    adapters = {k: ROOT / v for k, v in plan["adapters"].items()}
    if run["method"] == "base":
        return None
    if run["method"].startswith("only:"):
        return adapters[run["method"][5:]]
    setting = next(s for s in plan["settings"] if s["name"] == run["setting"])
    method = dict(next(m for m in plan["methods"] if m["name"] == run["method"]))
    method.pop("name")
    if method.get("method") == "lata" or method.get("lata"):
        method["instruction"] = adapters["instruct"]
    lata_peft.combine([adapters[a] for a in setting.get("add", [])], out,
                      forget=[adapters[a] for a in setting.get("forget", [])], lam=run["lambda"], seed=run["seed"],
                      overwrite=True, **method)
    return out


def key_of(run: dict[str, Any]) -> str:
    return f"{run['setting']}|{run['method']}|{run['lambda']}|{run['seed']}"


def run_grid(plan: dict[str, Any], results_path: Path) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    done = {key_of(r): r for r in json.loads(results_path.read_text())} if results_path.exists() else {}
    base = Path(plan["base"]).expanduser()
    model = load_model(base)
    tokenizer = prepare_tokenizer(load_tokenizer(base))
    probes = probe_sets(plan["limits"])
    grid = runs(plan)
    with tempfile.TemporaryDirectory() as scratch:
        for index, run in enumerate(grid):
            if key_of(run) in done:
                continue
            started = time.perf_counter()
            adapter = combine_for(run, plan, Path(scratch) / "combined")
            with with_adapter(model, adapter, restore=True) as active:
                active.eval()
                metrics = measure(active, tokenizer, probes, plan["metrics"])
            record = {**run, "metrics": metrics, "seconds": round(time.perf_counter() - started, 1)}
            done[key_of(run)] = record
            results_path.write_text(json.dumps(list(done.values()), indent=1))
            print(f"[{index + 1}/{len(grid)}] {key_of(run)} "
                  + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()) + f" ({record['seconds']}s)", flush=True)


# ----------------------------------------------------------------------------- report


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """``{setting|method|lambda: {metric: (mean, std, n)}}`` over seeds."""
    groups: dict[str, list[dict[str, float]]] = {}
    for record in records:
        groups.setdefault(f"{record['setting']}|{record['method']}|{record['lambda']}", []).append(record["metrics"])
    summary = {}
    for key, runs_ in groups.items():
        summary[key] = {}
        for metric in runs_[0]:
            values = [r[metric] for r in runs_]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[key][metric] = (statistics.fmean(values), spread, len(values))
    return summary


def write_plots(records: list[dict[str, Any]], plan: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(records)
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
        fig.suptitle(f"{setting['name']}: {setting['description']}")
        fig.tight_layout()
        path = folder / f"results_{setting['name']}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(plan: dict[str, Any], results_path: Path, out: Path) -> None:
    records = json.loads(results_path.read_text())
    summary = summarise(records)
    plots = write_plots(records, plan, out.parent)
    metrics = list(records[0]["metrics"])
    lines = ["| setting | method | lambda | " + " | ".join(metrics) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in metrics) + " |"]
    for key, values in summary.items():
        setting, method, lam = key.split("|")
        cells = []
        for metric in metrics:
            mean, spread, n = values.get(metric, (float("nan"), 0.0, 0))
            cells.append(f"{mean:.4f} ± {spread:.4f}" if n > 1 else f"{mean:.4f}")
        lines.append(f"| {setting} | {method} | {lam} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    images = "\n".join(f"![{p.stem}]({p.name})" for p in plots)
    out.write_text(out.read_text().split("<!-- results -->")[0] + "<!-- results -->\n\n" + table + "\n\n" + images
                   + "\n" if out.exists() and "<!-- results -->" in out.read_text() else table + "\n\n" + images + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", type=Path)
    parser.add_argument("--report", action="store_true", help="only rewrite the tables and plots")
    args = parser.parse_args()
    plan = yaml.safe_load(args.plan.read_text())
    results = ROOT / plan["results"]
    results.parent.mkdir(parents=True, exist_ok=True)
    if not args.report:
        run_grid(plan, results)
    write_report(plan, results, ROOT / plan["report"])


if __name__ == "__main__":
    main()
