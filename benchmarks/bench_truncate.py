"""Rank-K combine of three r=16 LoRA deltas: factored truncation vs PEFT's dense SVD.

What it measures, per module of a Llama-7B-shaped layer (``q_proj``: 4096x4096,
``up_proj``: 11008x4096):

* ours: ``lata_peft.lowrank.weighted_sum`` (exact, rank 48) then
  ``lata_peft.lowrank.truncate(..., rank=K)`` (QR of the stacked factors + SVD of a
  48x48 core, DESIGN.md section 3);
* PEFT: ``PeftModel.add_weighted_adapter(..., combination_type="svd", svd_rank=K)``
  on a real ``PeftModel`` (a 1-layer ``LlamaForCausalLM`` with three LoRA adapters).
  Its per-module time is the time spent in PEFT's per-module routine
  (``LoraModel._svd_generalized_task_arithmetic_weighted_adapter``: dense deltas,
  weighted sum, full ``torch.linalg.svd``), captured by wrapping that method during the
  one public call; the public call's total wall time is printed too.

Both sides read the same ``lora_A`` / ``lora_B`` tensors and scalings from the PEFT
model. Outside timing, the exact weighted sum is formed densely in float64 and each
result's Frobenius error against it is measured; our reported ``Truncation.error``
must equal our measured error (checked, the script fails otherwise).

Timing: ``time.perf_counter``; ours warmed up once, best of ``--repeats`` (3); PEFT
best of ``--peft-repeats`` (1: one full SVD of an 11008x4096 matrix takes minutes on
a small CPU), its LAPACK path warmed up on a small matrix.

Run (from the repository root, venv active)::

    python benchmarks/bench_truncate.py            # full size, K=16
    python benchmarks/bench_truncate.py --rank 32  # another output rank
    python benchmarks/bench_truncate.py --quick    # smoke size (hidden 1024)
"""

from __future__ import annotations

import argparse
import math
import platform
import time
import warnings
from dataclasses import dataclass

import torch

from lata_peft.lowrank import LowRank, Truncation, truncate, weighted_sum

ADAPTERS = ("t0", "t1", "t2")
ALPHAS = (32, 16, 32)  # different lora_alpha per adapter: scalings 2.0, 1.0, 2.0 at r=16
TARGETS = ("q_proj", "up_proj")


@dataclass
class Row:
    module: str
    shape: tuple[int, int]
    ours_s: float
    peft_s: float
    exact_norm: float
    ours_error: float
    ours_reported: float
    peft_error: float
    ours_vs_peft: float


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=16, help="output rank K (default 16)")
    parser.add_argument("--r", type=int, default=16, help="rank of each input adapter (default 16)")
    parser.add_argument("--weights", type=float, nargs=3, default=[1.0, 0.5, 0.7], help="combination weights")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats for ours (best of)")
    parser.add_argument("--peft-repeats", type=int, default=1, help="timed repeats for PEFT (best of)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke size: hidden 1024, intermediate 2752")
    return parser.parse_args()


def build_peft_model(hidden: int, intermediate: int, heads: int, r: int, seed: int) -> torch.nn.Module:
    """1-layer Llama, three LoRA adapters on q_proj/up_proj, every factor random normal."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=256,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()

    def lora_config(alpha: int) -> LoraConfig:
        return LoraConfig(
            r=r, lora_alpha=alpha, target_modules=list(TARGETS), lora_dropout=0.0, init_lora_weights=False
        )

    peft_model = get_peft_model(model, lora_config(ALPHAS[0]), adapter_name=ADAPTERS[0])
    for name, alpha in zip(ADAPTERS[1:], ALPHAS[1:], strict=True):
        peft_model.add_adapter(name, lora_config(alpha))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in lora_layers(peft_model).values():
            for name in ADAPTERS:
                A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
                A.copy_(torch.randn(A.shape, generator=generator) / math.sqrt(A.shape[1]))
                B.copy_(torch.randn(B.shape, generator=generator) / math.sqrt(B.shape[1]))
    return peft_model


def lora_layers(peft_model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def factors(layer: torch.nn.Module, adapter: str) -> LowRank:
    """The adapter's delta on this layer, exactly as PEFT stores it: ``scaling * B @ A``."""
    return LowRank(
        layer.lora_B[adapter].weight.detach(), layer.lora_A[adapter].weight.detach(), float(layer.scaling[adapter])
    )


def exact_dense(terms: list[tuple[float, LowRank]]) -> torch.Tensor:
    """``sum_i w_i s_i B_i A_i`` densely in float64 (the reference, never timed)."""
    total = None
    for weight, term in terms:
        part = (weight * term.scale) * (term.B.double() @ term.A.double())
        total = part if total is None else total.add_(part)
    assert total is not None
    return total


def frobenius_error(exact: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float) -> float:
    residual = exact - scale * (B.double() @ A.double())
    return float(torch.linalg.matrix_norm(residual))


def time_ours(terms: list[tuple[float, LowRank]], rank: int, repeats: int) -> tuple[float, Truncation]:
    truncate(weighted_sum(terms), rank=rank)  # warm-up
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = truncate(weighted_sum(terms), rank=rank)
        best = min(best, time.perf_counter() - start)
    assert result is not None
    return best, result


def time_peft(
    peft_model: torch.nn.Module, weights: list[float], rank: int, repeats: int, names: dict[int, str]
) -> tuple[dict[str, float], float, str]:
    """Best-of-``repeats`` per-module and total times of ``add_weighted_adapter(svd)``."""
    lora_model = peft_model.base_model
    original = lora_model._svd_generalized_task_arithmetic_weighted_adapter
    per_module: dict[str, float] = {}
    best_total = math.inf
    merged = ""

    def timed(*args, **kwargs):
        target = args[4] if len(args) > 4 else kwargs["target"]
        start = time.perf_counter()
        out = original(*args, **kwargs)
        elapsed = time.perf_counter() - start
        key = names[id(target)]
        per_module[key] = min(per_module.get(key, math.inf), elapsed)
        return out

    torch.linalg.svd(torch.randn(64, 64), full_matrices=True)  # warm the LAPACK path
    lora_model._svd_generalized_task_arithmetic_weighted_adapter = timed
    try:
        for attempt in range(repeats):
            if merged:
                peft_model.delete_adapter(merged)
            merged = f"merged{attempt}"
            start = time.perf_counter()
            peft_model.add_weighted_adapter(list(ADAPTERS), weights, merged, combination_type="svd", svd_rank=rank)
            best_total = min(best_total, time.perf_counter() - start)
    finally:
        del lora_model._svd_generalized_task_arithmetic_weighted_adapter
    return per_module, best_total, merged


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1.0 else f"{seconds:.2f} s"


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(args.seed)
    hidden, intermediate, heads = (1024, 2752, 8) if args.quick else (4096, 11008, 32)
    print(f"bench_truncate: 3 adapters r={args.r} (alphas {ALPHAS}), weights {args.weights}, output rank K={args.rank}")
    print(f"shapes: q_proj {hidden}x{hidden}, up_proj {intermediate}x{hidden}{'  (--quick)' if args.quick else ''}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.machine()}, seed {args.seed}")

    started = time.perf_counter()
    peft_model = build_peft_model(hidden, intermediate, heads, args.r, args.seed)
    layers = lora_layers(peft_model)
    names = {id(layer): name.split(".")[-1] for name, layer in layers.items()}
    print(f"built PeftModel in {time.perf_counter() - started:.1f} s; LoRA layers: {', '.join(names.values())}")

    # Our side: same tensors, same scalings, read from the PEFT model before the merge.
    inputs = {
        names[id(layer)]: [(w, factors(layer, a)) for w, a in zip(args.weights, ADAPTERS, strict=True)]
        for layer in layers.values()
    }
    ours: dict[str, tuple[float, Truncation]] = {
        module: time_ours(terms, args.rank, args.repeats) for module, terms in inputs.items()
    }
    print("ours done; running PEFT add_weighted_adapter(combination_type='svd') ...", flush=True)
    peft_times, peft_total, merged = time_peft(peft_model, args.weights, args.rank, args.peft_repeats, names)

    rows: list[Row] = []
    for layer in layers.values():
        module = names[id(layer)]
        terms = inputs[module]
        exact = exact_dense(terms)
        seconds, result = ours[module]
        d = result.delta
        ours_error = frobenius_error(exact, d.B, d.A, d.scale)
        pB, pA = layer.lora_B[merged].weight.detach(), layer.lora_A[merged].weight.detach()
        p_scale = float(layer.scaling[merged])
        peft_error = frobenius_error(exact, pB, pA, p_scale)
        difference = d.scale * (d.B.double() @ d.A.double()) - p_scale * (pB.double() @ pA.double())
        rows.append(
            Row(
                module,
                tuple(exact.shape),
                seconds,
                peft_times[module],
                float(torch.linalg.matrix_norm(exact)),
                ours_error,
                result.error,
                peft_error,
                float(torch.linalg.matrix_norm(difference)),
            )
        )
        del exact, difference

    print()
    header = (
        f"{'module':<8} {'shape':>11} {'ours':>9} {'PEFT svd':>9} {'PEFT/ours':>10} "
        f"{'|exact|_F':>10} {'err ours':>10} {'err reported':>12} {'err PEFT':>10} {'rel err':>8} "
        f"{'|ours-PEFT|/|exact|':>19}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.module:<8} {row.shape[0]:>5}x{row.shape[1]:<5} {fmt_time(row.ours_s):>9} "
            f"{fmt_time(row.peft_s):>9} {row.peft_s / row.ours_s:>9.0f}x "
            f"{row.exact_norm:>10.4f} {row.ours_error:>10.6f} {row.ours_reported:>12.6f} {row.peft_error:>10.6f} "
            f"{row.ours_error / row.exact_norm:>8.4f} {row.ours_vs_peft / row.exact_norm:>19.2e}"
        )
    ours_total = sum(r.ours_s for r in rows)
    peft_modules = sum(r.peft_s for r in rows)
    print("-" * len(header))
    print(
        f"{'total':<8} {'':>11} {fmt_time(ours_total):>9} {fmt_time(peft_modules):>9} "
        f"{peft_modules / ours_total:>9.0f}x   (PEFT public call incl. adapter injection: {fmt_time(peft_total)}, "
        f"{peft_total / ours_total:.0f}x ours)"
    )

    print()
    for row in rows:
        gap = abs(row.ours_error - row.ours_reported) / row.ours_error
        excess = (row.peft_error - row.ours_error) / row.ours_error
        print(
            f"{row.module}: reported vs measured error rel. diff {gap:.1e}; "
            f"PEFT error - ours error = {excess:+.1e} (relative)"
        )
        if gap > 1e-4:
            raise SystemExit(f"{row.module}: Truncation.error {row.ours_reported} != measured {row.ours_error}")
    print(f"timing: ours best of {args.repeats} after one warm-up; PEFT best of {args.peft_repeats}")


if __name__ == "__main__":
    main()
