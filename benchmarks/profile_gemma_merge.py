"""Time the parts of a merged evaluation on Gemma-3-270m (docs/NOTES.md, stop 15): a whole-model state-dict
copy, ``PeftModel.from_pretrained``, ``merge_and_unload`` and the restore, four times.

Needs the Gemma base (``python recipes/prepare_base.py --model gemma3-270m``). Usage:
    python benchmarks/profile_gemma_merge.py
"""

import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel

from lata_peft.evaluate.loading import load_model
from lata_peft.experiment.grid import combine_for, key_of, runs
from lata_peft.experiment.plan import load_plan


def main() -> None:
    plan = load_plan(Path("recipes/experiments/gemma3-270m-methods.yaml"))
    torch.set_num_threads(2)
    model = load_model(Path(plan["base"]).expanduser())
    run = next(r for r in runs(plan) if key_of(r) == "0|math_code|ta|1.0|0")
    with tempfile.TemporaryDirectory() as scratch:
        adapter = combine_for(run, plan, Path(scratch) / "combined")
        for low_memory in (False, True, False, True):
            t0 = time.perf_counter()
            original = {k: v.detach().clone() for k, v in model.state_dict().items()}
            t1 = time.perf_counter()
            wrapped = PeftModel.from_pretrained(model, str(adapter), is_trainable=False,
                                                low_cpu_mem_usage=low_memory)
            t2 = time.perf_counter()
            merged = wrapped.merge_and_unload()
            t3 = time.perf_counter()
            merged.load_state_dict(original)
            t4 = time.perf_counter()
            print(f"low_cpu_mem_usage={low_memory} clone {t1 - t0:.2f} from_pretrained {t2 - t1:.2f} "
                  f"merge {t3 - t2:.2f} restore {t4 - t3:.2f}")
            model = merged


if __name__ == "__main__":
    main()
