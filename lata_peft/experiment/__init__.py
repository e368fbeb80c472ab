"""``lata-peft compare PLAN.yaml``: does LATA beat TA / TIES / DARE on *your* LoRAs?

For every training seed (one adapter set each), setting (which adapters are added or
forgotten), method and lambda in the plan (:mod:`.plan`), the adapters are combined with
:func:`lata_peft.combine`, applied to the base with PEFT, and scored with continuous metrics that
move on small models (:mod:`.probes`). DARE and DARE-TIES use the training seed as their seed, so
the spread over training seeds covers both sources of randomness; ``dare_seeds`` adds DARE-only
repeats on the first adapter set. Results are appended to a JSON file as they come (atomically),
so an interrupted run resumes where it stopped (:mod:`.grid`). The report (:mod:`.report`) holds
means and spreads, paired verdicts (:mod:`.analysis`) and plots.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..evaluate.loading import load_model, load_tokenizer, prepare_tokenizer, with_adapter
from ..outputs import replace_text
from ..progress import Progress
from ..specs import CompareSpec
from .grid import combine_for, key_of, runs
from .plan import check_inputs, load_plan, setting_of
from .probes import custom_probes, measure, probe_sets
from .report import write_report

__all__ = ["run_compare", "run_grid"]


def run_compare(spec: CompareSpec, progress: Progress | None = None) -> dict[str, Any]:
    """Run the plan's grid (unless ``report_only``), then write its report and plots; returns where."""
    plan = load_plan(Path(spec.plan))
    results = Path(plan["results"]).expanduser()
    if not spec.report_only:
        check_inputs(plan)
        run_grid(plan, results, list(spec.lambdas) or None, progress)
    elif not results.is_file():
        from ..errors import LataError

        raise LataError(f"{spec.plan}: no results to report yet ({results}); run the plan first")
    report = Path(plan["report"]).expanduser()
    write_report(plan, results, report)
    return {"plan": spec.plan, "runs": len(json.loads(results.read_text())), "results": str(results),
            "report": str(report)}


def probes_for(plan: dict[str, Any], setting: str, probes: dict[str, Any]) -> dict[str, Any]:
    """The probes a run measures: all of them, or with ``metrics.measure: goals`` only those a
    combination's setting scores (its goals and its selectivity's two metrics); references measure all."""
    if plan["metrics"].get("measure", "all") == "all" or setting == "reference":
        return probes
    chosen = setting_of(plan, setting)
    needed = set(chosen["goals"])
    if chosen["kind"] == "forget":  # selectivity's two metrics (analysis.with_selectivity's defaults)
        selectivity = chosen.get("selectivity", {})
        needed |= {selectivity.get("forgotten", "shout_nll"), selectivity.get("kept", "instruct_nll")}
    return {name: pair for name, pair in probes.items() if name in needed}


def run_grid(plan: dict[str, Any], results_path: Path, lambdas: list[float] | None = None,
             progress: Progress | None = None) -> None:
    """Evaluate every run not yet in ``results_path``, appending each result atomically as it finishes."""
    torch.manual_seed(0)
    torch.set_num_threads(plan.get("threads", 2))
    done = {key_of(r): r for r in json.loads(results_path.read_text())} if results_path.exists() else {}
    base = Path(plan["base"]).expanduser()
    model = load_model(base, device=plan.get("device"), dtype=plan.get("dtype"))
    tokenizer = prepare_tokenizer(load_tokenizer(base))
    probes = {**probe_sets(plan["limits"]), **custom_probes(plan.get("probes", {}))}
    grid = [r for r in runs(plan) if lambdas is None or r["setting"] == "reference" or r["lambda"] in lambdas]
    if progress is not None:
        progress.start(sum(key_of(r) not in done for r in grid), "compare")
    with tempfile.TemporaryDirectory() as scratch:
        for index, run in enumerate(grid):
            if key_of(run) in done:
                continue
            started = time.perf_counter()
            adapter = combine_for(run, plan, Path(scratch) / "combined")
            merge = plan["metrics"].get("apply") == "merged"
            with with_adapter(model, adapter, restore=True, merge=merge) as active:
                active.eval()
                measured = measure(active, tokenizer, probes_for(plan, run["setting"], probes), plan["metrics"])
            record = {**run, **measured, "seconds": round(time.perf_counter() - started, 1)}
            done[key_of(run)] = record
            replace_text(results_path, json.dumps(list(done.values()), indent=1))
            if progress is not None:
                progress.advance()
            values = " ".join(f"{k}={v:.4g}" for k, v in record["metrics"].items())
            print(f"[{index + 1}/{len(grid)}] {key_of(run)} {values} ({record['seconds']}s)", file=sys.stderr,
                  flush=True)
