"""LATA block scoring: factored cosines vs the dense reference, on Llama-7B-shaped adapters.

What it measures: the per-block cosine ``cos_l = <tau_l, iota_l> / (|tau_l| |iota_l|)``
of three r=16 task adapters against an r=16 instruction adapter, over ``--blocks``
blocks (default 4) of the 7 Llama-7B modules ``q, k, v, o`` (4096x4096), ``gate, up``
(11008x4096) and ``down`` (4096x11008):

* ours: ``lata_peft.scoring.score_layers(task, instruction)`` for each task, on
  ``Adapter`` objects built in memory from random factors (inner products on the
  factors, r x r Gram matrices, DESIGN.md section 3);
* dense: per block, materialise every module's delta ``(scale * B) @ A`` in float32,
  flatten and concatenate the block, ``torch.nn.functional.cosine_similarity``. The
  instruction's block vector is built once per block and reused for the three tasks.
* dense64 (accuracy reference, timed once): the same cosines from float64 dense
  deltas, accumulated module by module with ``torch.dot`` (one module delta per side
  alive at a time). Its cosines are the "truth" both others are compared with.

Task adapters share part of the instruction adapter's factors (a seeded mixing
coefficient per task and block) so the cosines spread over (0, 1) like real ones.
Memory: the dense side's peak of live dense tensors is estimated
from the element counts (instruction block vector + the task's module deltas + the
task's block vector) and the process's peak RSS growth during the dense run is
measured; ours allocates only float64 copies of two modules' factors at a time.

Timing: ``time.perf_counter``, ours best of ``--repeats`` (3) after one warm-up, dense
best of ``--dense-repeats`` (1) after a one-module warm-up.

Run (from the repository root, venv active)::

    python benchmarks/bench_scoring.py             # full size: 4 blocks x 7 modules
    python benchmarks/bench_scoring.py --blocks 8  # more blocks
    python benchmarks/bench_scoring.py --quick     # smoke size (hidden 1024, 2 blocks)
"""

from __future__ import annotations

import argparse
import math
import platform
import resource
import time
from pathlib import Path

import torch
from torch.nn.functional import cosine_similarity

from lata_peft.adapter import Adapter, LoraModule
from lata_peft.lowrank import LowRank
from lata_peft.scoring import score_layers

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TASKS = ("task0", "task1", "task2")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4, help="number of transformer blocks (default 4)")
    parser.add_argument("--r", type=int, default=16, help="rank of every adapter (default 16)")
    parser.add_argument("--alpha", type=float, default=32.0, help="lora_alpha of every adapter (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats for ours (best of)")
    parser.add_argument("--dense-repeats", type=int, default=1, help="timed repeats for dense (best of)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke size: hidden 1024, intermediate 2752, 2 blocks")
    return parser.parse_args()


def module_shapes(hidden: int, intermediate: int) -> dict[str, tuple[str, tuple[int, int]]]:
    """Suffix -> (parent, (out, in)) for one Llama block."""
    shapes = {name: ("self_attn", (hidden, hidden)) for name in ATTENTION}
    shapes.update(
        {
            "gate_proj": ("mlp", (intermediate, hidden)),
            "up_proj": ("mlp", (intermediate, hidden)),
            "down_proj": ("mlp", (hidden, intermediate)),
        }
    )
    return shapes


def make_adapters(
    blocks: int, hidden: int, intermediate: int, r: int, alpha: float, seed: int
) -> tuple[Adapter, list[Adapter], torch.Tensor]:
    """The instruction adapter and three task adapters; returns the mixing coefficients too."""
    generator = torch.Generator().manual_seed(seed)
    shapes = module_shapes(hidden, intermediate)
    scale = alpha / r
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": [*ATTENTION, *MLP]}

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    instruction: dict[str, LoraModule] = {}
    tasks: list[dict[str, LoraModule]] = [{} for _ in TASKS]
    mixing = torch.rand((len(TASKS), blocks), generator=generator)
    for block in range(blocks):
        for suffix, (parent, (out, inp)) in shapes.items():
            name = f"model.layers.{block}.{parent}.{suffix}"
            B_i, A_i = randn(out, r) / math.sqrt(r), randn(r, inp) / math.sqrt(inp)
            instruction[name] = LoraModule(name, LowRank(B_i, A_i, scale))
            for t, modules in enumerate(tasks):
                m = float(mixing[t, block])
                rest = math.sqrt(1.0 - m * m)
                B = m * B_i + rest * randn(out, r) / math.sqrt(r)
                A = m * A_i + rest * randn(r, inp) / math.sqrt(inp)
                modules[name] = LoraModule(name, LowRank(B, A, scale))

    def adapter(name: str, modules: dict[str, LoraModule]) -> Adapter:
        return Adapter(path=Path(f"bench/{name}"), config=dict(config), modules=modules, dtype=torch.float32)

    return adapter("instruction", instruction), [adapter(n, m) for n, m in zip(TASKS, tasks, strict=True)], mixing


def blocks_of(adapter: Adapter) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for name in adapter.modules:
        groups.setdefault(int(name.split(".")[2]), []).append(name)
    return groups


def ours(tasks: list[Adapter], instruction: Adapter) -> list[list[float]]:
    return [[s.cosine for s in score_layers(task, instruction)] for task in tasks]


def dense_delta(module: LoraModule) -> torch.Tensor:
    d = module.delta
    return (d.B.float() * d.scale) @ d.A.float()


def block_vector(adapter: Adapter, names: list[str]) -> torch.Tensor:
    return torch.cat([dense_delta(adapter.modules[n]).flatten() for n in names])


def dense(tasks: list[Adapter], instruction: Adapter) -> list[list[float]]:
    """The reference: dense float32 block vectors and torch's cosine."""
    cosines = [[] for _ in tasks]
    for names in blocks_of(instruction).values():
        iota = block_vector(instruction, names)
        for t, task in enumerate(tasks):
            tau = block_vector(task, names)
            cosines[t].append(float(cosine_similarity(tau, iota, dim=0)))
            del tau
        del iota
    return cosines


def dense64(tasks: list[Adapter], instruction: Adapter) -> list[list[float]]:
    """Accuracy reference: float64 dense, accumulated module by module."""
    cosines = [[] for _ in tasks]
    for names in blocks_of(instruction).values():
        dots, task_sq, inst_sq = [0.0] * len(tasks), [0.0] * len(tasks), 0.0
        for n in names:
            d = instruction.modules[n].delta
            iota = (d.B.double() * d.scale) @ d.A.double()
            inst_sq += float(torch.dot(iota.view(-1), iota.view(-1)))
            for t, task in enumerate(tasks):
                e = task.modules[n].delta
                tau = (e.B.double() * e.scale) @ e.A.double()
                dots[t] += float(torch.dot(tau.view(-1), iota.view(-1)))
                task_sq[t] += float(torch.dot(tau.view(-1), tau.view(-1)))
                del tau
            del iota
        for t in range(len(tasks)):
            cosines[t].append(dots[t] / math.sqrt(task_sq[t] * inst_sq))
    return cosines


def best_of(repeats: int, fn, *args) -> tuple[float, list[list[float]]]:
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    assert result is not None
    return best, result


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1.0 else f"{seconds:.2f} s"


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    hidden, intermediate = (1024, 2752) if args.quick else (4096, 11008)
    blocks = 2 if args.quick and args.blocks == 4 else args.blocks
    shapes = module_shapes(hidden, intermediate)
    block_numel = sum(o * i for _, (o, i) in shapes.values())
    factor_numel = sum((o + i) * args.r for _, (o, i) in shapes.values())
    print(
        f"bench_scoring: {len(TASKS)} task adapters vs 1 instruction adapter, r={args.r}, "
        f"{blocks} blocks x {len(shapes)} modules{'  (--quick)' if args.quick else ''}"
    )
    print(
        f"shapes: q,k,v,o {hidden}x{hidden}; gate,up {intermediate}x{hidden}; down {hidden}x{intermediate}; "
        f"{block_numel / 1e6:.1f} M weights per block"
    )
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.machine()}, seed {args.seed}")

    instruction, tasks, mixing = make_adapters(blocks, hidden, intermediate, args.r, args.alpha, args.seed)
    rss_before = max_rss_bytes()

    ours(tasks, instruction)  # warm-up
    ours_s, ours_cos = best_of(args.repeats, ours, tasks, instruction)
    rss_ours = max_rss_bytes()

    first = next(iter(instruction.modules.values()))  # one-module warm-up of the dense path
    cosine_similarity(dense_delta(first).flatten(), dense_delta(first).flatten(), dim=0)
    print("ours done; running the dense reference ...", flush=True)
    dense_s, dense_cos = best_of(args.dense_repeats, dense, tasks, instruction)
    rss_dense = max_rss_bytes()
    start = time.perf_counter()
    truth = dense64(tasks, instruction)
    dense64_s = time.perf_counter() - start

    print()
    print(
        f"{'task':<6} {'block':>5} {'mix':>5} {'cos ours':>12} {'cos dense32':>12} {'cos dense64':>12} "
        f"{'|ours-d32|':>10} {'|ours-d64|':>10}"
    )
    diff_dense, diff_truth, diff_dense_truth = 0.0, 0.0, 0.0
    for t, name in enumerate(TASKS):
        for b in range(blocks):
            o, d, x = ours_cos[t][b], dense_cos[t][b], truth[t][b]
            diff_dense, diff_truth = max(diff_dense, abs(o - d)), max(diff_truth, abs(o - x))
            diff_dense_truth = max(diff_dense_truth, abs(d - x))
            print(
                f"{name:<6} {b:>5} {float(mixing[t, b]):>5.2f} {o:>12.8f} {d:>12.8f} {x:>12.8f} "
                f"{abs(o - d):>10.1e} {abs(o - x):>10.1e}"
            )

    # Dense peak of live tensors: instruction block vector + task module deltas + task block vector.
    dense_peak = 3 * block_numel * 4
    dense_total = blocks * (1 + len(tasks)) * 2 * block_numel * 4  # module deltas + concatenated copies
    largest = max(o + i for _, (o, i) in shapes.values()) * args.r
    dense64_peak = 2 * max(o * i for _, (o, i) in shapes.values()) * 8  # one module delta per side
    dense64_total = blocks * (1 + len(tasks)) * block_numel * 8
    ours_peak = 2 * largest * 8  # float64 copies of one module's factors on each side
    print()
    header = (
        f"{'method':<7} {'time':>9} {'vs ours':>8} {'peak extra mem (est.)':>22} {'peak RSS growth':>16} "
        f"{'dense bytes made':>17} {'max |cos - dense64|':>20}"
    )
    print(header)
    print("-" * len(header))
    print(
        f"{'ours':<7} {fmt_time(ours_s):>9} {'1x':>8} {gib(ours_peak):>22} "
        f"{gib(max(rss_ours - rss_before, 0)):>16} {'0':>17} {diff_truth:>20.1e}"
    )
    print(
        f"{'dense':<7} {fmt_time(dense_s):>9} {dense_s / ours_s:>7.0f}x {gib(dense_peak):>22} "
        f"{gib(max(rss_dense - rss_ours, 0)):>16} {gib(dense_total):>17} {diff_dense_truth:>20.1e}"
    )
    print(
        f"{'dense64':<7} {fmt_time(dense64_s):>9} {dense64_s / ours_s:>7.0f}x {gib(dense64_peak):>22} "
        f"{'n/a':>16} {gib(dense64_total):>17} {0.0:>20.1e}"
    )
    print("-" * len(header))
    print(f"max |cos ours - cos dense32| = {diff_dense:.1e} over {len(TASKS) * blocks} (task, block) pairs")
    print(f"adapter factors held in memory (all 4 adapters): {gib(4 * blocks * factor_numel * 4)}")
    print(f"timing: ours best of {args.repeats} after one warm-up; dense best of {args.dense_repeats}")


if __name__ == "__main__":
    main()
