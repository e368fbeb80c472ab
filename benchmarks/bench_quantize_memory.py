"""Peak memory of bitsandbytes' NF4 quantisation on the CPU, for the fold's largest 8B module.

Prints the peak-RSS rise of ``bitsandbytes.functional.quantize_4bit`` (blocksize 64, double quant) on one
bf16 tensor of Llama-3-8B's MLP shape (4096 x 14336, 112 MiB), as a multiple of the tensor's size, and of
``dequantize_4bit`` after it. Each step runs in a fresh process so one peak does not hide the next.

    python benchmarks/bench_quantize_memory.py [--rows 4096 --cols 14336]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, torch, bitsandbytes.functional as bnbf
rows, cols, step = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
packed, state = (None, None)
if step == "dequantize":
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    del weight
before = peak()
if step == "quantize":
    bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
else:
    bnbf.dequantize_4bit(packed, state)
print(json.dumps({"rise_mib": peak() - before}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=14336)
    args = parser.parse_args()
    size = args.rows * args.cols * 2 / 2**20
    print(f"bf16 tensor {args.rows} x {args.cols}: {size:,.0f} MiB")
    for step in ("quantize", "dequantize"):
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.rows), str(args.cols), step],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rise = json.loads(out)["rise_mib"]
        print(f"{step}_4bit: peak RSS rise {rise:,.0f} MiB = {rise / size:.1f}x the bf16 tensor")


if __name__ == "__main__":
    main()
