"""TIES end to end through the CLI, core space against full space, in one run (issue 15).

The adapters are ``bench_combine_7b.py``'s: three r = 16 LoRAs shaped like Llama-2-7B's (``q/k/v/o_proj``
4096x4096, ``gate/up_proj`` 11008x4096, ``down_proj`` 4096x11008; ``lora_alpha`` 32, bf16, seeded random
factors, PEFT's layout), ``--blocks`` of the 32 blocks (the first blocks are the same tensors whatever the
count). Each of these runs as a subprocess, timed, with its peak RSS (``getrusage`` of the child):

* ``core``: ``lata-peft combine A B C --method ties --rank 16 --space core``;
* ``core-exact``: the same with ``--rank exact`` (core space: rank <= 48, no truncation);
* ``full``: ``lata-peft combine A B C --method ties --rank 16 --space full`` (the dense merge of each module,
  factored back to rank 16: mergekit's and PEFT's full-space rule).

Then, on ``--check`` modules, each written delta is compared with an independent reference: PEFT's own
``peft.utils.merge_utils.ties`` on the dense deltas ``s B_i A_i`` (float32, weights 1, density 0.5, sign
``total``): the full-space TIES result that no rank-48 LoRA holds. It prints the relative Frobenius distance
(float64) of each output to it, and the error each run reported (``relative_error`` in its ``lata_report.json``: the
rank-16 truncation of its own merge).

Run (repository root, venv active; full space costs ~10 s a module on 2 cores)::

    python benchmarks/bench_ties_cli.py --blocks 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent
PEAK = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def _bench_combine_7b():
    spec = importlib.util.spec_from_file_location("bench_combine_7b", HERE / "bench_combine_7b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one run of ``command``."""
    started = time.perf_counter()
    peak = subprocess.run([sys.executable, "-c", PEAK, *command], check=True, capture_output=True, text=True)
    return time.perf_counter() - started, int(peak.stdout.split()[-1]) / 1024


def written_delta(folder: Path, tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """``s B A`` of ``module`` in a written adapter (every written module has ``alpha == r``, scale 1; checked)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    rank = tensors[f"{module}.lora_A.weight"].shape[0]
    alpha = (config.get("alpha_pattern") or {}).get(module.removeprefix("base_model.model."), config["lora_alpha"])
    rank_in_config = (config.get("rank_pattern") or {}).get(module.removeprefix("base_model.model."), config["r"])
    assert rank_in_config == rank, (module, rank_in_config, rank)
    return alpha / rank * tensors[f"{module}.lora_B.weight"].double() @ tensors[f"{module}.lora_A.weight"].double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("~/.cache/lata_peft/bench_combine_7b").expanduser())
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--check", type=int, default=7, help="Modules compared with PEFT's dense TIES.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    from peft.utils.merge_utils import ties

    folders = _bench_combine_7b().adapters(args.work, args.hidden, args.blocks)
    outputs = args.work / f"ties_cli_b{args.blocks}"
    shutil.rmtree(outputs, ignore_errors=True)
    outputs.mkdir(parents=True)
    cli = [shutil.which("lata-peft") or "lata-peft", "combine", *(str(folders[n]) for n in "abc"), "--method", "ties",
           "--dtype", "float32"]
    runs = {"core": ["--rank", "16", "--space", "core"], "core-exact": ["--rank", "exact", "--space", "core"],
            "full": ["--rank", "16", "--space", "full"]}
    measured = {name: timed([*cli, *extra, "-o", str(outputs / name)]) for name, extra in runs.items()}

    inputs = [load_file(folders[n] / "adapter_model.safetensors") for n in "abc"]
    written = {name: load_file(outputs / name / "adapter_model.safetensors") for name in runs}
    reports = {name: {row["module"]: row for row in json.loads((outputs / name / "lata_report.json").read_text())
                      ["modules"]} for name in runs}
    keys = sorted(k.removesuffix(".lora_A.weight") for k in inputs[0] if k.endswith("lora_A.weight"))
    checked = keys[:: max(1, len(keys) // args.check)][: args.check]
    rows = []
    for key in checked:
        deltas = [2.0 * t[f"{key}.lora_B.weight"].float() @ t[f"{key}.lora_A.weight"].float() for t in inputs]
        reference = ties(deltas, torch.ones(3), density=0.5, majority_sign_method="total").double()  # float64 norms:
        # a float32 norm of 45M entries is off by ~1e-3 relative on this CPU
        module = key.removeprefix("base_model.model.")
        row = {"module": module}
        for name in runs:
            got = written_delta(outputs / name, written[name], key)
            row[f"{name} vs full-TIES"] = float((got - reference).norm() / reference.norm())
            row[f"{name} reported"] = reports[name][module]["relative_error"]
            row[f"{name} rank"] = reports[name][module]["rank"]
        rows.append(row)
        del deltas, reference

    modules = len(keys)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"inputs: 3 x r=16 LoRAs, {args.blocks} blocks x 7 modules = {modules} modules, hidden {args.hidden}; "
          "TIES density 0.5, sign total, weights 1, output float32")
    print(f"{'run':<11} {'seconds':>8} {'s/module':>9} {'peak MiB':>9} {'x core':>8}")
    for name, (seconds, peak) in measured.items():
        print(f"{name:<11} {seconds:8.2f} {seconds / modules:9.3f} {peak:9.0f} {seconds / measured['core'][0]:8.1f}")
    print(f"\nper module (of {len(rows)}): relative distance to PEFT's dense full-space TIES | the run's reported "
          "truncation error | rank")
    print(f"{'module':<34}" + "".join(f" {name:>22}" for name in runs))
    for row in rows:
        print(f"{row['module']:<34}" + "".join(
            f"   {row[f'{n} vs full-TIES']:.4f} | {row[f'{n} reported']:.4f} | {row[f'{n} rank']:>2}" for n in runs))
    if args.json:
        args.json.write_text(json.dumps({"blocks": args.blocks, "hidden": args.hidden, "modules": modules,
                                         "seconds": {n: s for n, (s, _) in measured.items()},
                                         "peak_mib": {n: p for n, (_, p) in measured.items()}, "rows": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
