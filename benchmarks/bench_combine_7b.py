"""End to end: ``lata-peft combine`` on Llama-7B-shaped adapters against the I/O floor (issue 14).

Builds once (cached in ``--work``, default ``~/.cache/lata_peft/bench_combine_7b``) three task adapters and
an instruction adapter shaped like LoRAs of Llama-2-7B: 32 blocks x 7 modules (``q/k/v/o_proj``
4096x4096, ``gate/up_proj`` 11008x4096, ``down_proj`` 4096x11008), r = 16, bf16, seeded random factors,
in PEFT's file layout (77 MB each). Then, in one run, times as subprocesses (best of ``--repeats``):

* ``floor``: a Python process that imports torch and safetensors, reads the three inputs and writes one
  output of the size of the rank-16 result (what any combine must at least do);
* ``exact``: ``lata-peft combine A B C -o OUT`` (rank 48, lossless);
* ``rank16``: ``lata-peft combine A B C --rank 16 -o OUT``;
* ``lata``: ``lata-peft combine A B C --method lata --instruction I --rank 16 -o OUT``;
* ``ties``: ``lata-peft combine A B C --method ties --rank 16 -o OUT`` (core space, the default);

and prints each time, its ratio to the floor and the process's peak RSS. The rank-16 combination
(written again in float32 for this, untimed) is checked against an independent reference on
``--check`` modules: the best rank-16 approximation of the dense weighted sum (``torch.linalg.svd``
in float64, Eckart-Young), which the result must equal to 1e-5 relative.

Run (repository root, venv active)::

    python benchmarks/bench_combine_7b.py               # 7B shapes
    python benchmarks/bench_combine_7b.py --hidden 1024 # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MODULES = {"self_attn.q_proj": (1, 1), "self_attn.k_proj": (1, 1), "self_attn.v_proj": (1, 1),
           "self_attn.o_proj": (1, 1), "mlp.gate_proj": (2.6875, 1), "mlp.up_proj": (2.6875, 1),
           "mlp.down_proj": (1, 2.6875)}
"""Module -> (out, in) as multiples of the hidden size (Llama-2-7B: 4096 and 11008 = 2.6875 x 4096)."""
PREFIX = "base_model.model.model.layers"


def make_adapter(folder: Path, hidden: int, blocks: int, rank: int, seed: int) -> None:
    """A PEFT LoRA folder with seeded random bf16 factors (lora_B not zero, so every delta is real)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for block in range(blocks):
        for module, (out_mult, in_mult) in MODULES.items():
            out_features, in_features = int(hidden * out_mult), int(hidden * in_mult)
            key = f"{PREFIX}.{block}.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, in_features, generator=generator)
                                               / in_features ** 0.5).bfloat16()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(out_features, rank, generator=generator) * 0.01).bfloat16()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(
        m.rsplit(".", 1)[1] for m in MODULES), "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
        "task_type": "CAUSAL_LM", "bias": "none", "lora_dropout": 0.0}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def adapters(work: Path, hidden: int, blocks: int) -> dict[str, Path]:
    folders = {name: work / f"h{hidden}_b{blocks}" / name for name in ("a", "b", "c", "instruct")}
    for seed, folder in enumerate(folders.values()):
        if not (folder / "adapter_model.safetensors").is_file():
            make_adapter(folder, hidden, blocks, 16, seed)
    return folders


FLOOR = """
import sys, torch
from safetensors.torch import load_file, save_file
inputs, out, numel = sys.argv[1:-2], sys.argv[-2], int(sys.argv[-1])
total = 0
for path in inputs:
    total += sum(t.numel() for t in load_file(path).values())
save_file({"x": torch.zeros(numel, dtype=torch.bfloat16)}, out)
"""


PEAK = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); " \
       "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def timed(command: list[str], repeats: int) -> tuple[float, float]:
    """Best wall time of ``repeats`` runs, and the command's peak RSS in MiB (one more run, in a wrapper)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - started)
    peak = subprocess.run([sys.executable, "-c", PEAK, *command], check=True, capture_output=True, text=True)
    return best, int(peak.stdout.split()[-1]) / 1024


def check_rank16(folders: dict[str, Path], out: Path, count: int) -> float:
    """Largest relative difference, over ``count`` modules, between the written rank-16 delta and the best
    rank-16 approximation of the dense weighted sum (float64 SVD): both are the truncated SVD."""
    inputs = [load_file(folders[name] / "adapter_model.safetensors") for name in ("a", "b", "c")]
    result = load_file(out / "adapter_model.safetensors")
    worst = 0.0
    keys = sorted(k for k in inputs[0] if k.endswith("lora_A.weight"))
    for key in keys[:: max(1, len(keys) // count)][:count]:
        module = key.removesuffix(".lora_A.weight")
        dense = sum(2.0 * t[f"{module}.lora_B.weight"].double() @ t[f"{module}.lora_A.weight"].double()
                    for t in inputs)
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        best = (U[:, :16] * S[:16]) @ Vh[:16]
        ours = result[f"{module}.lora_B.weight"].double() @ result[f"{module}.lora_A.weight"].double()
        worst = max(worst, float((ours - best).norm() / best.norm()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("~/.cache/lata_peft/bench_combine_7b").expanduser())
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check", type=int, default=6, help="Modules checked against the dense SVD reference.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    folders = adapters(args.work, args.hidden, args.blocks)
    outputs = args.work / "outputs"
    shutil.rmtree(outputs, ignore_errors=True)
    outputs.mkdir(parents=True)
    cli = [shutil.which("lata-peft") or "lata-peft"]
    abc = [str(folders[name]) for name in ("a", "b", "c")]
    runs = {
        "exact": [*cli, "combine", *abc, "-o", str(outputs / "exact"), "--overwrite"],
        "rank16": [*cli, "combine", *abc, "--rank", "16", "-o", str(outputs / "rank16"), "--overwrite"],
        "lata": [*cli, "combine", *abc, "--method", "lata", "--instruction", str(folders["instruct"]), "--rank", "16",
                 "-o", str(outputs / "lata"), "--overwrite"],
        "ties": [*cli, "combine", *abc, "--method", "ties", "--rank", "16", "-o", str(outputs / "ties"),
                 "--overwrite"],  # core space, the default; full space takes ~10 s per module (core_space.py)
    }
    subprocess.run(runs["rank16"], check=True, stdout=subprocess.DEVNULL)  # warm the page cache, make the size known
    written = load_file(outputs / "rank16" / "adapter_model.safetensors")
    numel = sum(t.numel() for t in written.values())
    floor = [sys.executable, "-c", FLOOR, *(str(folders[n] / "adapter_model.safetensors") for n in ("a", "b", "c")),
             str(outputs / "floor.safetensors"), str(numel)]
    measured = {"floor": timed(floor, args.repeats)}
    for name, command in runs.items():
        measured[name] = timed(command, args.repeats)
    times = {name: seconds for name, (seconds, _) in measured.items()}
    check = [*runs["rank16"][:-3], "--dtype", "float32", "-o", str(outputs / "rank16_fp32"), "--overwrite"]
    subprocess.run(check, check=True, stdout=subprocess.DEVNULL)  # not timed: float32 factors for the check
    error = check_rank16(folders, outputs / "rank16_fp32", args.check)
    size = sum((folders[n] / "adapter_model.safetensors").stat().st_size for n in ("a", "b", "c"))
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"inputs: 3 x {size / 3 / 1e6:.0f} MB ({args.blocks} blocks x 7 modules, hidden {args.hidden}, r=16, bf16); "
          f"rank-16 output {numel * 2 / 1e6:.0f} MB; best of {args.repeats}")
    print(f"{'run':<8} {'seconds':>8} {'x floor':>8} {'peak MiB':>9}")
    for name, (seconds, peak) in measured.items():
        print(f"{name:<8} {seconds:8.2f} {seconds / times['floor']:8.2f} {peak:9.0f}")
    print(f"rank-16 result vs float64 SVD of the dense sum ({args.check} modules): max relative difference "
          f"{error:.2e}")
    if args.json:
        args.json.write_text(json.dumps({"times": times, "peak_mib": {n: p for n, (_, p) in measured.items()},
                                         "rank16_vs_svd": error, "hidden": args.hidden,
                                         "blocks": args.blocks}, indent=2))
    if error > 1e-5:
        raise SystemExit(f"rank-16 result differs from the SVD reference by {error:.2e} (> 1e-5)")


if __name__ == "__main__":
    main()
