"""Serving targets: an adapter folder each engine reads the way PEFT does.

PEFT reads every module's rank and alpha (``rank_pattern`` / ``alpha_pattern``). Serving engines read
less (``docs/SERVING.md``; their rules as tests in ``tests/engine_rules.py``):

* vLLM <= 0.31 scales every module by the global ``lora_alpha / r`` and refuses ranks above
  ``--max-lora-rank`` (one of :data:`VLLM_MAX_LORA_RANKS`, ``vllm/config/lora.py``), ``modules_to_save``
  other than ``classifier`` / ``score``, bias terms and DoRA (``vllm/lora/peft_helper.py``);
* llama.cpp's converter writes the one ``lora_alpha`` and llama.cpp scales each tensor by
  ``alpha / rank of that tensor`` (``src/llama-adapter.h``); the converter refuses any tensor that is
  not ``lora_A`` / ``lora_B`` (``convert_lora_to_gguf.py``);
* TGI reads ``r`` and ``lora_alpha``, pads each layer type's ranks for SGMV (<= 8 -> 8, else the next
  multiple of 16), stacks a type's layers (equal ranks), drops a type missing from any layer, and
  applies only ``model.layers.N.{self_attn,mlp}.<type>`` modules (``server/.../adapters/lora.py``).

A non-PEFT target therefore writes one rank ``R`` for every module, ``lora_alpha = R``, no patterns and
no rsLoRA: zero-padded factors ``[B 0] @ [A; 0] = B @ A`` are exact, so every engine computes PEFT's
delta. For TGI, a layer type missing from some layers gets zero factors there (exact too). What an
engine would drop or reject is refused before anything is written, naming the target and the way out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .adapter import LoraModule
from .errors import LataError, shorten
from .full_weights import parameter_module, parameter_name
from .lowrank import LowRank

__all__ = ["TARGETS", "TGI_LAYER_TYPES", "VLLM_MAX_LORA_RANKS", "Serving", "pad", "serve"]

TARGETS = ("peft", "vllm", "llama.cpp", "tgi")
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
TGI_LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                   "c_proj", "c_fc")
"""The layer types TGI applies LoRA to (``server/text_generation_server/models/__init__.py``)."""
_TGI_MODULE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<group>self_attn|mlp)\.(?P<type>\w+)$")
_VLLM_HEADS = ("classifier", "score")
_WAY_OUT = "fold it into the base (--fold-into BASE) or write it for PEFT (--target peft)"


@dataclass(frozen=True)
class Serving:
    """How an output is written for its target: the one rank (``None``: each module its own, PEFT),
    the combination's own ranks, and the zero modules added for TGI."""

    target: str
    rank: int | None
    min_rank: int
    max_rank: int
    zero_modules: int = 0

    @property
    def uniform(self) -> bool:
        """Every module is written with one rank (what every engine reads correctly)."""
        return self.rank is not None or self.min_rank == self.max_rank

    def to_dict(self) -> dict[str, object]:
        return {"target": self.target, "rank": self.rank, "uniform_rank": self.uniform,
                "status": "uniform-rank" if self.uniform else "not uniform-rank", "zero_modules": self.zero_modules}


def pad(delta: LowRank, rank: int) -> LowRank:
    """``delta`` with zero columns of ``B`` and zero rows of ``A`` up to ``rank``: the same ``scale * B @ A``."""
    extra = rank - delta.rank
    if extra < 0:
        raise ValueError(f"can't pad rank {delta.rank} down to {rank}")
    if extra == 0:
        return delta
    B = torch.cat([delta.B, delta.B.new_zeros(delta.B.shape[0], extra)], dim=1)
    A = torch.cat([delta.A, delta.A.new_zeros(extra, delta.A.shape[1])], dim=0)
    return LowRank(B, A, delta.scale)


def _target_rank(target: str, largest: int) -> int:
    if target == "vllm":
        allowed = [rank for rank in VLLM_MAX_LORA_RANKS if rank >= largest]
        if not allowed:
            raise LataError(f"--target vllm: vLLM serves ranks up to {VLLM_MAX_LORA_RANKS[-1]} and this combination "
                            f"has rank {largest}; pass --rank {VLLM_MAX_LORA_RANKS[-1]} (or lower) to truncate it, "
                            "with the error reported")
        return allowed[0]
    if target == "tgi":
        return 8 if largest <= 8 else (largest + 15) // 16 * 16
    return largest


def _refuse_full(target: str, full: Mapping[str, torch.Tensor]) -> None:
    """Full trained parameters: vLLM takes ``classifier`` / ``score`` heads, nothing else takes any."""
    for key in sorted(full):
        name = parameter_name(key)
        head = target == "vllm" and parameter_module(name).rsplit(".", 1)[-1] in _VLLM_HEADS
        if head and name.endswith(".weight"):
            continue
        what = "a trained bias" if name.endswith(".bias") else "a full trained weight (modules_to_save)"
        raise LataError(f"--target {target}: the output holds {what}, {shorten(name)}, which {target} does not "
                        f"load; {_WAY_OUT}")


def _refuse_modules(target: str, modules: Mapping[str, LoraModule]) -> None:
    for name, module in sorted(modules.items()):
        if module.bias is not None:
            raise LataError(f"--target {target}: module {shorten(name)} has a LoRA bias (lora_bias), which {target} "
                            f"does not load; {_WAY_OUT}")
        if target == "llama.cpp" and module.kind in ("linear_t", "conv"):
            kind = "GPT-2 Conv1D (fan_in_fan_out)" if module.kind == "linear_t" else "convolution"
            raise LataError(f"--target llama.cpp: module {shorten(name)} is a {kind} LoRA, which llama.cpp's "
                            f"LoRA format has no tensor for; {_WAY_OUT}")
        if target == "tgi" and (module.kind != "linear" or _tgi_type(name) is None):
            raise LataError(f"--target tgi: TGI applies LoRA only to model.layers.N.self_attn|mlp."
                            f"{{{','.join(TGI_LAYER_TYPES)}}} linear modules and would silently skip "
                            f"{shorten(name)}; {_WAY_OUT}")


def _tgi_type(name: str) -> tuple[int, str, str] | None:
    match = _TGI_MODULE.match(name)
    if match is None or match["type"] not in TGI_LAYER_TYPES:
        return None
    return int(match["layer"]), match["group"], match["type"]


def _tgi_fill(modules: dict[str, LoraModule], layers: int, rank: int) -> int:
    """Zero modules for the layers a type misses (TGI drops a type missing from any layer); returns
    how many were added. ``layers``: the model's layer count."""
    by_type: dict[str, dict[int, LoraModule]] = {}
    for name, module in modules.items():
        layer, group, kind = _tgi_type(name)  # type: ignore[misc]  (checked by _refuse_modules)
        by_type.setdefault(f"{group}.{kind}", {})[layer] = module
    added = 0
    for suffix, present in by_type.items():
        shapes = {module.delta.shape for module in present.values()}
        if len(shapes) > 1:
            raise LataError(f"--target tgi: {suffix} has different shapes across layers ({sorted(shapes)}); "
                            "TGI stacks a type's layers, so they must match; use --target peft")
        out_features, in_features = shapes.pop()
        template = next(iter(present.values())).delta
        for layer in range(layers):
            if layer not in present:
                name = f"model.layers.{layer}.{suffix}"
                zero = LowRank(template.B.new_zeros(out_features, rank), template.A.new_zeros(rank, in_features))
                modules[name] = LoraModule(name, zero, "linear")
                added += 1
    return added


def serve(target: str, modules: Mapping[str, LoraModule], full: Mapping[str, torch.Tensor] | None = None,
          layers: int | None = None) -> tuple[dict[str, LoraModule], Serving]:
    """The modules to write for ``target`` and how (:class:`Serving`); refuses what the engine can't run.

    ``peft``: unchanged. Otherwise every module padded to one rank ``R`` (vLLM: the smallest
    ``--max-lora-rank`` value that holds the largest rank; TGI: 8 or a multiple of 16; llama.cpp: the
    largest rank), and for TGI a zero module wherever a layer type is missing among ``layers`` layers.
    """
    if target not in TARGETS:
        raise LataError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    ranks = [module.delta.rank for module in modules.values()]
    lowest, largest = min(ranks), max(ranks)
    if target == "peft":
        return dict(modules), Serving(target, None, lowest, largest)
    _refuse_full(target, full or {})
    _refuse_modules(target, modules)
    rank = _target_rank(target, largest)
    written = {name: LoraModule(m.name, pad(m.delta, rank), m.kind, m.a_shape, m.b_shape, m.bias)
               for name, m in modules.items()}
    added = 0
    if target == "tgi":
        count = layers if layers is not None else 1 + max(_tgi_type(name)[0] for name in written)  # type: ignore[index]
        added = _tgi_fill(written, count, rank)
    return dict(sorted(written.items())), Serving(target, rank, lowest, largest, added)
