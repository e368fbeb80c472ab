"""Does LATA beat TA / TIES / DARE on real LoRAs? Combine, evaluate, tabulate, plot.

    python recipes/experiment.py recipes/experiments/smollm2.yaml            # run the grid
    python recipes/experiment.py recipes/experiments/smollm2.yaml --report   # RESULTS.md + plots only

For every training seed (one adapter set each), setting (which adapters are added or
forgotten), method and lambda in the YAML, the adapters are combined with
:func:`lata_peft.combine`, applied to the base with PEFT, and scored with continuous metrics
that move on small models (mean NLL per token of reference answers given an Alpaca prompt;
WikiText-2 perplexity) and, where asked, generation metrics (GSM8K exact match, HumanEval
pass@1). DARE and DARE-TIES use the training seed as their seed, so the spread over training
seeds covers both sources of randomness; ``dare_seeds`` adds DARE-only repeats on the first
adapter set. Results are appended to a JSON file as they come, so an interrupted run resumes
where it stopped; the grid runs lambda = 1 for every seed first, so a cut-short run is still
a complete comparison at lambda = 1.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from train_adapters import (  # sibling script in recipes/: the training template
    PROBES,
    Example,
    autocast,
    format_prompt,
    probe_records,
)

import lata_peft
from lata_peft.evaluate import evaluate
from lata_peft.evaluate.data import data_root
from lata_peft.evaluate.loading import load_model, load_tokenizer, prepare_tokenizer, with_adapter
from lata_peft.evaluate.perplexity import answer_nll

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("ta", "ties", "dare", "dare_ties")


class PlanError(ValueError):
    """A plan that cannot be run; ``main`` reports it in one line with exit code 2."""


# ----------------------------------------------------------------------------- probe sets


def alpaca_prompt(instruction: str, context: str = "") -> str:
    """The template the adapters were trained with."""
    return format_prompt(Example(instruction, context, ""))


def probe_sets(limits: dict[str, int]) -> dict[str, tuple[list[str], list[str]]]:
    """(prompts, answers) per NLL metric, from real data the adapters were not trained on."""
    shared = data_root()
    gsm8k = [json.loads(line) for line in (shared / "gsm8k" / "test.jsonl").read_text().splitlines()]
    gsm8k = gsm8k[: limits["math"]]
    with gzip.open(shared / "humaneval" / "HumanEval.jsonl.gz", "rt") as handle:
        humaneval = [json.loads(line) for line in handle][: limits["code"]]
    # train_adapters.py reserves these long Alpaca records (probe_records): no adapter was trained on them.
    if limits["instruct"] > PROBES:
        raise SystemExit(f"limits.instruct is {limits['instruct']}; only {PROBES} probe records are reserved")
    alpaca = probe_records(json.loads((shared / "instruct" / "alpaca_en_demo.json").read_text()))[: limits["instruct"]]
    return {
        "math_nll": ([alpaca_prompt(r["question"]) for r in gsm8k], [r["answer"] for r in gsm8k]),
        "code_nll": ([r["prompt"] for r in humaneval], [r["canonical_solution"] for r in humaneval]),
        "instruct_nll": ([alpaca_prompt(r["instruction"], r["input"]) for r in alpaca], [r["output"] for r in alpaca]),
        "shout_nll": ([alpaca_prompt(r["instruction"], r["input"]) for r in alpaca],
                      [r["output"].upper() for r in alpaca]),
    }


def custom_probes(spec: dict[str, dict[str, Any]]) -> dict[str, tuple[list[str], list[str]]]:
    """The plan's ``probes``: your own behaviours, each a JSONL file of records measured as the mean
    NLL of ``record[answer]`` given ``record[prompt]`` (wrapped in the Alpaca template with
    ``template: alpaca``), over the first ``limit`` records.

    ``{metric: {file, prompt, answer, template: raw|alpaca, limit}}``; ``file`` is relative to the
    repo root unless absolute. A missing file or field is a :class:`PlanError`.
    """
    probes = {}
    for metric, entry in spec.items():
        path = ROOT / Path(entry["file"]).expanduser()
        try:
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as exc:
            raise PlanError(f"probe {metric!r}: {path}: {exc}") from exc
        records = records[: entry.get("limit", len(records))]
        fields = (entry.get("prompt", "prompt"), entry.get("answer", "answer"))
        bad = next((i for i, r in enumerate(records) if not all(isinstance(r.get(f), str) for f in fields)), None)
        if bad is not None or not records:
            where = f"record {bad + 1}" if bad is not None else "no records"
            raise PlanError(f"probe {metric!r}: {path}: {where} lacks the text fields {fields[0]!r}, {fields[1]!r}")
        wrap = alpaca_prompt if entry.get("template", "raw") == "alpaca" else str
        probes[metric] = ([wrap(r[fields[0]]) for r in records], [r[fields[1]] for r in records])
    return probes


def measure(model: Any, tokenizer: Any, probes: dict[str, tuple[list[str], list[str]]],
            config: dict[str, Any]) -> dict[str, float]:
    device = next(model.parameters()).device
    with autocast(device, config.get("autocast")):
        batch = config.get("nll_batch", 8)  # a 262k vocabulary (Gemma) makes 8 x 512 fp32 logits 4 GB
        metrics = {name: answer_nll(model, tokenizer, p, a, batch_size=batch, max_length=512).mean
                   for name, (p, a) in probes.items()}
        wikitext = evaluate(model, "wikitext2", tokenizer=tokenizer, limit=config["wikitext_tokens"],
                            max_length=512, stride=256, batch_size=4)
        metrics["wikitext2_ppl"] = wikitext["metrics"]["perplexity"]
        if config.get("gsm8k_generate"):
            result = evaluate(model, "gsm8k", tokenizer=tokenizer, limit=config["gsm8k_generate"],
                              batch_size=config.get("generate_batch", 8),
                              max_new_tokens=config.get("max_new_tokens", 256))
            metrics["gsm8k_em"] = result["metrics"]["exact_match"]
        if config.get("humaneval_generate"):
            result = evaluate(model, "humaneval", tokenizer=tokenizer, limit=config["humaneval_generate"],
                              batch_size=config.get("generate_batch", 8))
            metrics["humaneval_pass1"] = result["metrics"]["pass@1"]
    return metrics


# ----------------------------------------------------------------------------- the grid


def adapter_paths(plan: dict[str, Any], train_seed: int) -> dict[str, Path]:
    folder = Path(plan["adapter_sets"][train_seed]).expanduser()
    return {name: ROOT / folder / name for name in plan["adapters"]}


def runs(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (training seed, setting, method, lambda, seed) to evaluate, plus the references
    (base, single adapters), lambda = 1 first."""
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
    # lambda = 1 for every training seed first, then the first seed's lambda grid, then the rest.
    combos.sort(key=lambda c: (c["lambda"] != 1.0, c["train_seed"] != train_seeds[0]))
    return grid + combos + dare_only


def method_of(plan: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in plan["methods"] if m["name"] == name)


def setting_of(plan: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in plan["settings"] if s["name"] == name)


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
    lata_peft.combine([adapters[a] for a in setting.get("add", [])], out,
                      forget=[adapters[a] for a in setting.get("forget", [])], lam=run["lambda"], seed=run["seed"],
                      overwrite=True, **method)
    return out


def key_of(run: dict[str, Any]) -> str:
    return f"{run['train_seed']}|{run['setting']}|{run['method']}|{run['lambda']}|{run['seed']}"


def replace_text(path: Path, text: str) -> None:
    """Write ``path`` atomically: a killed run leaves the previous file (results, report) whole."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


def check_metrics(plan: dict[str, Any]) -> None:
    """Every metric a setting's goals, plot or selectivity names is one the plan measures."""
    measured = {"math_nll", "code_nll", "instruct_nll", "shout_nll", "wikitext2_ppl", *plan.get("probes", {})}
    measured |= {"gsm8k_em"} if plan.get("metrics", {}).get("gsm8k_generate") else set()
    measured |= {"humaneval_pass1"} if plan.get("metrics", {}).get("humaneval_generate") else set()
    for setting in plan["settings"]:
        named = {*setting["goals"], *setting.get("plot", []), *setting.get("selectivity", {}).values()}
        unknown = sorted(named - measured - ({"selectivity"} if setting["kind"] == "forget" else set()))
        if unknown:
            raise PlanError(f"setting {setting['name']!r} names metrics the plan does not measure: "
                            f"{', '.join(unknown)} (measured: {', '.join(sorted(measured))})")


def check_inputs(plan: dict[str, Any]) -> None:
    """Every adapter folder and the base the plan names exist, before hours of runs start."""
    check_metrics(plan)
    problems = []
    base = Path(plan["base"]).expanduser()
    if not (base / "config.json").is_file():
        problems.append(f"base {base}: no config.json (see the plan's first lines for how to build it)")
    for train_seed in plan["adapter_sets"]:
        folders = adapter_paths(plan, train_seed)
        missing = [name for name, folder in folders.items() if not (folder / "adapter_config.json").is_file()]
        if missing:
            where = next(iter(folders.values())).parent
            problems.append(f"training seed {train_seed}: {where} lacks the adapter(s) {', '.join(missing)}")
    try:
        custom_probes(plan.get("probes", {}))
    except PlanError as exc:
        problems.append(str(exc))
    if problems:
        raise PlanError("; ".join(problems))


def run_grid(plan: dict[str, Any], results_path: Path, lambdas: list[float] | None = None) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(plan.get("threads", 2))
    done = {key_of(r): r for r in json.loads(results_path.read_text())} if results_path.exists() else {}
    base = Path(plan["base"]).expanduser()
    model = load_model(base, device=plan.get("device"), dtype=plan.get("dtype"))
    tokenizer = prepare_tokenizer(load_tokenizer(base))
    probes = {**probe_sets(plan["limits"]), **custom_probes(plan.get("probes", {}))}
    grid = [r for r in runs(plan) if lambdas is None or r["setting"] == "reference" or r["lambda"] in lambdas]
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
            replace_text(results_path, json.dumps(list(done.values()), indent=1))
            print(f"[{index + 1}/{len(grid)}] {key_of(run)} "
                  + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()) + f" ({record['seconds']}s)", flush=True)


# ----------------------------------------------------------------------------- analysis


def with_selectivity(records: list[dict[str, Any]], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Forget settings gain ``selectivity`` = (forgotten NLL - base) / (kept NLL - base): forgetting
    bought per unit of utility lost (higher is better). The setting's ``selectivity: {forgotten, kept}``
    names the two metrics (default ``shout_nll`` and ``instruct_nll``)."""
    base = next((r["metrics"] for r in records if r["method"] == "base"), None)
    forget = {s["name"]: s.get("selectivity", {}) for s in plan["settings"] if s["kind"] == "forget"}
    out = []
    for record in records:
        if base and record["setting"] in forget:
            metrics = record["metrics"]
            forgotten = forget[record["setting"]].get("forgotten", "shout_nll")
            kept = forget[record["setting"]].get("kept", "instruct_nll")
            damage = metrics[kept] - base[kept]
            gained = metrics[forgotten] - base[forgotten]
            selectivity = gained / damage if damage > 1e-9 else float("nan")
            record = {**record, "metrics": {**metrics, "selectivity": selectivity}}
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
    mean over training seeds, among the lambdas run on as many seeds as that method's best-covered one."""
    best = {}
    for setting in plan["settings"]:
        for method in (m["name"] for m in plan["methods"]):
            runs_ = [r for r in records if r["setting"] == setting["name"] and r["method"] == method]
            by_lambda: dict[float, list[dict[str, float]]] = {}
            for record in runs_:
                by_lambda.setdefault(record["lambda"], []).append(record["metrics"])
            if not by_lambda:
                continue
            coverage = max(len(v) for v in by_lambda.values())
            covered = {lam: v for lam, v in by_lambda.items() if len(v) == coverage}
            for metric, goal in setting["goals"].items():
                sign = 1.0 if goal == "max" else -1.0
                best[(setting["name"], method, metric)] = max(
                    covered, key=lambda lam: sign * statistics.fmean(m[metric] for m in covered[lam]))
    return best


def verdicts(records: list[dict[str, Any]], plan: dict[str, Any], tuned: bool = False) -> list[dict[str, Any]]:
    """Each LATA method against each baseline, per setting, lambda and goal metric, paired over
    training seeds: ``win`` if LATA is better on every seed by more than ``tie_tolerance`` (default
    0.002), ``loss`` if worse on every seed by more than that, else ``tie``. With ``tuned``, each
    method runs at its own best lambda for the metric (``tuned_lambdas``; lambda reads "best")."""
    by_key = {(r["train_seed"], r["setting"], r["method"], r["lambda"]): r["metrics"] for r in records}
    best = tuned_lambdas(records, plan) if tuned else {}
    lata = [m["name"] for m in plan["methods"] if m["name"] not in BASELINES]
    tolerance = plan.get("tie_tolerance", 2e-3)  # bf16 evaluation moves NLLs by <= 0.0015

    def value(train_seed: int, setting: str, method: str, lam: float | str, metric: str) -> float | None:
        at = best.get((setting, method, metric)) if lam == "best" else lam
        return by_key.get((train_seed, setting, method, at), {}).get(metric)

    rows = []
    for setting in plan["settings"]:
        for lam in ["best"] if tuned else plan["lambdas"][setting["kind"]]:
            for metric, goal in setting["goals"].items():
                sign = 1.0 if goal == "max" else -1.0
                for ours in lata:
                    for other in (m["name"] for m in plan["methods"] if m["name"] in BASELINES):
                        pairs = [(value(t, setting["name"], ours, lam, metric),
                                  value(t, setting["name"], other, lam, metric)) for t in plan["adapter_sets"]]
                        diffs = [sign * (a - b) for a, b in pairs if a is not None and b is not None]
                        if not diffs:
                            continue
                        outcome = ("win" if all(d > tolerance for d in diffs)
                                   else "loss" if all(d < -tolerance for d in diffs) else "tie")
                        rows.append({"setting": setting["name"], "lambda": lam, "metric": metric, "lata": ours,
                                     "baseline": other, "outcome": outcome, "n": len(diffs),
                                     "mean_gain": statistics.fmean(diffs)})
    return rows


# ----------------------------------------------------------------------------- report


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
    lata_peft.inspect(tasks, instruction=adapters["instruct"], scheme="linear", plot=path)
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


def load_plan(path: Path) -> dict[str, Any]:
    """The YAML plan with ``$VARS`` in its strings expanded; an unset variable is an error."""

    def expand(value: Any) -> Any:
        if isinstance(value, str):
            expanded = os.path.expandvars(value)
            if "$" in expanded:
                raise PlanError(f"{path}: {value!r} names an environment variable that is not set")
            return expanded
        if isinstance(value, dict):
            return {k: expand(v) for k, v in value.items()}
        if isinstance(value, list):
            return [expand(v) for v in value]
        return value

    return expand(yaml.safe_load(path.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", type=Path)
    parser.add_argument("--report", action="store_true", help="only rewrite the tables and plots")
    parser.add_argument("--lambdas", type=float, nargs="+", help="run only these lambdas now (the rest later)")
    args = parser.parse_args()
    try:
        plan = load_plan(args.plan)
    except (OSError, yaml.YAMLError, PlanError) as exc:
        parser.error(f"{args.plan}: {exc}" if not isinstance(exc, PlanError) else str(exc))
    results = ROOT / plan["results"]
    if not args.report:
        try:
            check_inputs(plan)
        except PlanError as exc:
            parser.error(f"{args.plan}: {exc}")
        results.parent.mkdir(parents=True, exist_ok=True)
        run_grid(plan, results, args.lambdas)
    elif not results.is_file():
        parser.error(f"{args.plan}: no results to report yet ({results}); run the plan first")
    write_report(plan, results, ROOT / plan["report"])


if __name__ == "__main__":
    main()
