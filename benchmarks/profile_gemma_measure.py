"""Profile one Gemma-3-270m experiment run (docs/NOTES.md, stop 15): combine, merge, then the measure three
times: with the output layer at scored positions only (``logits_to_keep``), computing every logit, and again.

Needs the Gemma base (``python recipes/prepare_base.py --model gemma3-270m``). Usage:
    python benchmarks/profile_gemma_measure.py ["0|math_code|ties_full|1.0|0"]
"""

import sys
import tempfile
import time
from pathlib import Path

import torch

import lata_peft.evaluate.perplexity as perplexity
from lata_peft.evaluate.loading import load_model, load_tokenizer, prepare_tokenizer, with_adapter
from lata_peft.experiment import probes_for
from lata_peft.experiment.grid import combine_for, key_of, runs
from lata_peft.experiment.plan import load_plan
from lata_peft.experiment.probes import measure, probe_sets


def seconds(start: float) -> str:
    return f"{time.perf_counter() - start:.2f} s"


def main() -> None:
    plan = load_plan(Path("recipes/experiments/gemma3-270m-methods.yaml"))
    torch.set_num_threads(2)
    base = Path(plan["base"]).expanduser()
    start = time.perf_counter()
    model = load_model(base)
    tokenizer = prepare_tokenizer(load_tokenizer(base))
    print("load", seconds(start))
    probes = probe_sets(plan["limits"])
    wanted = sys.argv[1] if len(sys.argv) > 1 else "0|math_code|ties_full|1.0|0"
    run = next(r for r in runs(plan) if key_of(r) == wanted)
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        adapter = combine_for(run, plan, Path(scratch) / "combined")
        print("combine", seconds(start))
        start = time.perf_counter()
        with with_adapter(model, adapter, restore=True, merge=True) as active:
            print("merge", seconds(start))
            chosen = probes_for(plan, run["setting"], probes)
            for label, keep in (("logits_to_keep", True), ("every logit", False), ("logits_to_keep", True)):
                perplexity._takes_logits_to_keep = lambda _model, keep=keep: keep
                start = time.perf_counter()
                metrics = measure(active, tokenizer, chosen, plan["metrics"])["metrics"]
                print("measure", label, seconds(start), metrics)
            start = time.perf_counter()
        print("restore", seconds(start))


if __name__ == "__main__":
    main()
