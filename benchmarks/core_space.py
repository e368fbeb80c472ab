"""Core-space vs full-space TIES on three r=16 Llama-7B-shaped adapters (224 modules).

Adapters: 3 x r=16 PEFT LoRA adapters (``lora_alpha`` 32, 16, 32), 32 blocks x 7 modules
(q,k,v,o 4096x4096; gate,up 11008x4096; down 4096x11008), random bf16 factors
(``A ~ N(0, 1/in)``, ``B ~ N(0, 0.02^2)``), PEFT key layout, written once to ``--cache``
(default ``~/.cache/lata_peft/bench7b``, ~240 MB) and read with ``lata_peft.adapter.load_adapter``.

Phases, each in a fresh process (so each peak RSS is its own; the 3 adapters in memory are ~240 MB):

1. ``core-all``: ``core_space.merge_in_core`` (TIES, ``--density``, ``--rank``) on all 224 modules
   (``core-all:tsv``, ``:iso_c``, ``:iso_cts``: the same with ``subspace_methods``' rules, their defaults);
2. ``full-subset``: today's full-space path ``combine._combine_dense`` (dense deltas, TIES, rank-K
   factor-back by randomised SVD) on the modules of the first ``--blocks`` blocks only (all 224 do not
   finish in 15 min on 2 cores);
3. ``core-subset``: ``merge_in_core`` on the same modules;
4. ``compare`` (same subset): the relative difference ``|core - full|_F / |full|_F`` between the
   *untruncated* core-space TIES (``U_B M V_A^T``, rank <= 48) and the *untruncated* full-space TIES
   (the dense ``methods.merge_terms`` result, full rank). Core- and full-space TIES are different merges
   (DESIGN.md section 7), so this is how far apart the two rules land, not a numerical error. Also: the
   rank-K relative errors each path reports, and core-space TA vs the exact factored sum.

The CLI has no ``--space`` yet: this calls the library functions directly.

Run (repository root, venv active)::

    python benchmarks/core_space.py              # table
    python benchmarks/core_space.py --json       # one JSON object (``--save FILE`` writes it beside the table)
    python benchmarks/core_space.py --blocks 2 --rank 16 --density 0.5
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, BLOCKS, R = 4096, 11008, 32, 16
ALPHAS = (32, 16, 32)
SHAPES = {  # module -> (out, in) of the base weight
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lata_peft" / "bench7b")
    parser.add_argument("--blocks", type=int, default=1, help="blocks in the full-space subset (default 1: 7 modules)")
    parser.add_argument("--rank", default="16", help="rank policy for both paths (default 16, as `--rank 16`)")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--save", type=Path, help="also write the JSON report to this file")
    return parser.parse_args()


# ----------------------------------------------------------------------------- adapters


def build_adapters(cache: Path) -> list[Path]:
    """Write the three adapters once (PEFT layout, bf16); return their folders."""
    from safetensors.torch import save_file

    folders = [cache / f"t{index}" for index in range(len(ALPHAS))]
    for index, (folder, alpha) in enumerate(zip(folders, ALPHAS, strict=True)):
        if (folder / "adapter_model.safetensors").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(1000 + index)
        tensors = {}
        for block in range(BLOCKS):
            for module, (out, inp) in SHAPES.items():
                key = f"base_model.model.model.layers.{block}.{module}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(R, inp, generator=g) / inp**0.5).bfloat16()
                tensors[f"{key}.lora_B.weight"] = (torch.randn(out, R, generator=g) * 0.02).bfloat16()
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "bench-llama-7b-shaped",
            "r": R, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "target_modules": sorted(name.split(".")[-1] for name in SHAPES), "use_rslora": False,
            "use_dora": False, "init_lora_weights": True,
        }
        tmp = folder / "adapter_model.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
        tmp.rename(folder / "adapter_model.safetensors")
    return folders


def load(folders: list[Path]):
    from lata_peft.adapter import load_adapter

    return [load_adapter(folder) for folder in folders]


def terms_by_module(adapters, blocks: int | None) -> dict[str, list]:
    """``{module: [(1.0, delta_t), ...]}`` (TA weights 1), optionally the first ``blocks`` blocks only."""
    from lata_peft.layers import block_index

    names = sorted(adapters[0].modules)
    if blocks is not None:
        names = [n for n in names if (block_index(n) or 0) < blocks]
    return {n: [(1.0, a.modules[n].delta) for a in adapters] for n in names}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------- phases (one process each)


def phase(name: str, folders: list[str], blocks: int, rank: str, density: float, seed: int) -> dict:
    """``core-all``, ``core-subset``, ``full-subset`` (TIES), ``compare``, or ``core-all:RULE`` (a subspace rule)."""
    from lata_peft.combine import RankPolicy, _combine_dense
    from lata_peft.core_space import merge_in_core
    from lata_peft.methods import METHODS
    from lata_peft.subspace_methods import subspace_method

    name, _, rule = name.partition(":")
    method, policy = subspace_method(rule) if rule else METHODS["ties"], RankPolicy.parse(rank)
    start = time.perf_counter()
    adapters = load([Path(f) for f in folders])
    grouped = terms_by_module(adapters, None if name == "core-all" else blocks)
    name = f"{name}:{rule}" if rule else name
    result = {"phase": name, "modules": len(grouped), "load_s": time.perf_counter() - start,
              "rss_after_load_mib": peak_rss_mib()}
    start = time.perf_counter()
    errors = {}
    if name.startswith(("core-all", "core-subset")):
        for module, terms in grouped.items():
            errors[module] = merge_in_core(terms, method, policy, density, seed, module)[2]
    elif name == "full-subset":
        for module, terms in grouped.items():
            errors[module] = _combine_dense(terms, method, policy, density, seed, module, "total")[2]
    elif name == "compare":
        return {**result, **compare(grouped, density, seed)}
    result.update(merge_s=time.perf_counter() - start, peak_rss_mib=peak_rss_mib(),
                  max_relative_error_at_rank=max(errors.values()), relative_error_at_rank=errors)
    return result


def compare(grouped: dict[str, list], density: float, seed: int) -> dict:
    """Untruncated core-space TIES vs untruncated (dense) full-space TIES, and core TA vs the exact sum."""
    from lata_peft.core_space import core_basis, merge_in_core
    from lata_peft.lowrank import weighted_sum
    from lata_peft.methods import METHODS, merge_terms, module_generator

    def relative(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x - y).norm() / y.norm())

    rows = {}
    for module, terms in grouped.items():
        dense = [(c, delta.dense()) for c, delta in terms]
        full = merge_terms(dense, METHODS["ties"], density, module_generator(seed, module), "total").double()
        del dense
        core_delta = merge_in_core(terms, METHODS["ties"], None, density, seed, module)[0]
        core = core_delta.dense().double()
        ta = merge_in_core(terms, METHODS["ta"])[0].dense().double()
        exact = weighted_sum(terms).dense().double()
        basis = core_basis([delta for _, delta in terms])
        in_span = basis.U_B.T @ full @ basis.V_A  # full-space TIES seen in the inputs' spans (R x R)
        rows[module] = {
            "core_rank": core_delta.rank,
            "core_vs_full": relative(core, full),
            "core_norm_over_full_norm": float(core.norm() / full.norm()),
            "full_in_span": float(in_span.norm() / full.norm()),
            "core_vs_full_in_span": relative(core, basis.U_B @ in_span @ basis.V_A.T),
            "core_vs_ta": relative(core, exact),
            "full_vs_ta": relative(full, exact),
            "ta_core_vs_exact": relative(ta, exact),
        }
        del full, exact, core, ta
    return {"per_module": rows}


def run_phase(*args) -> dict:
    """Run :func:`phase` in a fresh spawned process: its peak RSS is its own."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(phase, *args).result()


# ----------------------------------------------------------------------------- report


def machine() -> dict:
    busy = subprocess.run(["ps", "-eo", "pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "loadavg_start": os.getloadavg(),
            "busiest_at_start": [line[:100] for line in busy.splitlines()[1:6] if "benchmarks/core_space.py" not in line
                                 and " ps -eo" not in line][:3]}


def table(report: dict) -> str:
    info = {k: v for k, v in report["machine"].items() if k != "busiest_at_start"}
    lines = [f"machine: {info}", "busiest other processes at start (%cpu, elapsed, command):",
             *(f"  {line}" for line in report["machine"]["busiest_at_start"]), f"settings: {report['settings']}", "",
             f"{'phase':<16} {'modules':>7} {'load s':>7} {'merge s':>8} {'s/module':>9} {'RSS after load':>14} "
             f"{'peak RSS MiB':>12} {'max rel err @rank':>17}"]
    for row in report["phases"]:
        lines.append(f"{row['phase']:<16} {row['modules']:>7} {row['load_s']:>7.1f} {row['merge_s']:>8.2f} "
                     f"{row['merge_s'] / row['modules']:>9.3f} {row['rss_after_load_mib']:>14.0f} "
                     f"{row['peak_rss_mib']:>12.0f} {row['max_relative_error_at_rank']:>17.4f}")
    at_rank = {row["phase"]: row["relative_error_at_rank"] for row in report["phases"]}
    lines += ["", "subset, per module. @rank: relative error each path reports at --rank. Untruncated merges:",
              "core = core-space TIES (U_B M V_A^T), full = dense full-space TIES, TA = exact sum;",
              "in span = |U_B^T full V_A| / |full| (full-space TIES inside the inputs' spans, the most any rank-48 "
              "LoRA in that basis can hold)", "",
              f"{'module':<26} {'full@rank':>9} {'core@rank':>9} {'rank':>4} {'core-full':>9} {'|core|/|full|':>13} "
              f"{'in span':>7} {'core-proj':>9} {'core-TA':>7} {'full-TA':>7} {'TA core':>8}"]
    for module, row in report["compare"].items():
        short = module.removeprefix("base_model.model.").removeprefix("model.layers.")
        lines.append(f"{short:<26} {at_rank['full-subset'][module]:>9.4f} {at_rank['core-subset'][module]:>9.4f} "
                     f"{row['core_rank']:>4} {row['core_vs_full']:>9.4f} {row['core_norm_over_full_norm']:>13.4f} "
                     f"{row['full_in_span']:>7.4f} {row['core_vs_full_in_span']:>9.4f} {row['core_vs_ta']:>7.4f} "
                     f"{row['full_vs_ta']:>7.4f} {row['ta_core_vs_exact']:>8.1e}")
    lines += ["", "core-full, core-proj, core-TA, full-TA: |x - y|_F / |y|_F (core-proj: y = full projected on the",
              "spans); TA core: core-space TA vs the exact factored sum"]
    lines.append(f"\nloadavg at end: {report['loadavg_end']}, total wall {report['wall_s']:.0f} s")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    folders = [str(f) for f in build_adapters(args.cache.expanduser())]
    report = {"machine": machine(), "settings": {"method": "ties", "rank": args.rank, "density": args.density,
                                                 "seed": args.seed, "subset_blocks": args.blocks,
                                                 "adapters": "3 x r=16, alpha 32/16/32, bf16, 224 modules"},
              "phases": []}
    for name in ("core-all", "core-subset", "full-subset", "core-all:tsv", "core-all:iso_c", "core-all:iso_cts"):
        report["phases"].append(run_phase(name, folders, args.blocks, args.rank, args.density, args.seed))
    report["compare"] = run_phase("compare", folders, args.blocks, args.rank, args.density, args.seed)["per_module"]
    report["loadavg_end"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - start
    if args.save:
        args.save.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2) if args.json else table(report))


if __name__ == "__main__":
    main()
