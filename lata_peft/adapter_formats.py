"""Adapters that are not plain modern PEFT LoRA but convert *exactly* to it (issue 16).

:func:`normalize` runs on the raw JSON config and the raw tensors, before
:func:`~lata_peft.adapter_config.check_config` and :func:`~lata_peft.adapter.parse_modules`, and
returns a plain-LoRA config and tensors whose deltas equal the original's as PEFT computes them:

* **AdaLoRA** (``peft_type: ADALORA``, ``peft/tuners/adalora/layer.py``, ``SVDLinear.get_delta_weight``):
  ``dW = B @ (A * E) * scaling / (ranknum + 1e-5)`` with ``scaling = lora_alpha`` (``float(r)`` when
  ``lora_alpha <= 0``) and ``ranknum = init_r`` for every module, also after loading a pruned
  ``rank_pattern``: ``AdaLoraModel.resize_modules_by_rank_pattern`` copies the old ``ranknum`` back
  ("The scaling is exactly as the previous"). The saved tensors hold the kept rows only
  (``resize_state_dict_by_rank_pattern`` slices A, E, B by the boolean mask). As LoRA:
  ``lora_A' = A * E`` (rows with ``E == 0`` dropped: they add exact zeros), ``lora_B' = B``,
  rank ``r_m`` and ``alpha_m = scaling * r_m / fl32(init_r + 1e-5)``, so ``alpha_m / r_m * B'A'``
  is PEFT's delta. Modules pruned to rank 0 are dropped.
* **PEFT 0.1-0.2 ``enable_lora``** (``MergedLinear`` in ``peft/tuners/lora.py`` of v0.2.0): ``lora_A``
  ``(r k, in)``, ``lora_B`` a grouped ``Conv1d`` weight ``(o k, r k / G, 1)`` (``G = 2`` in PEFT),
  ``zero_pad`` scattering the ``o k`` outputs into the enabled blocks of ``out = o n``; as LoRA the
  same ``lora_A`` and a block-diagonal ``lora_B'`` ``(out, r k)`` with zero rows for disabled blocks,
  rank ``r k``, ``lora_alpha k`` (the same ``alpha / r``).
* **Old key names**: without the ``base_model.model.`` prefix (transformers' integration), with an
  adapter-name infix (``lora_A.default.weight``), without ``.weight``: renamed to today's
  ``base_model.model.<module>.lora_A.weight`` (``lora_embedding_A`` for embeddings; DoRA's
  ``lora_magnitude_vector.default.weight`` to ``base_model.model.<module>.lora_magnitude_vector``).
* A ``base_model_name_or_path`` naming a 4-bit quantised repo (Unsloth's ``...-bnb-4bit``) adds a
  warning: the task vector is relative to the dequantised weights.

Anything else (plain LoRA, other PEFT types, which ``check_config`` refuses) comes back unchanged,
the same objects.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import LataError, first_line, shorten

__all__ = ["Normalized", "normalize"]

KEY_PREFIX = "base_model.model."
"""What PEFT puts before a module name in a saved key (``adapter``, ``writing`` and ``full_weights`` use this one)."""
_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
_MAGNITUDE = "lora_magnitude_vector"  # DoRA's m, saved without ``.weight`` (``lata_peft.dora``)
_ADALORA_PARTS = ("lora_A", "lora_B", "lora_E", "lora_embedding_A", "lora_embedding_B")
_ADALORA_ONLY = (
    "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
    "rank_pattern", "alpha_pattern",
)
_ADALORA_INIT_R = 12  # AdaLoraConfig defaults
_DEFAULT_ALPHA = 8
_DEFAULT_R = 8
_CONV1D_NAMES = ("c_attn", "c_proj", "c_fc", "q_attn")  # GPT-2's transformers.pytorch_utils.Conv1D layers
_QUANTISED_BASE = re.compile(r"bnb[-_]?4bit|(?:^|[-_/.])4bit(?:$|[-_./])", re.IGNORECASE)


@dataclass(frozen=True)
class Normalized:
    """A plain-LoRA view of an adapter: ``config`` and ``tensors`` for ``check_config`` / ``parse_modules``.

    ``warnings`` are one-line notes for the user (nothing refused).
    """

    config: Any
    tensors: dict[str, torch.Tensor]
    warnings: tuple[str, ...] = ()


def normalize(config: Any, tensors: dict[str, torch.Tensor], source: Path) -> Normalized:
    """``config`` (parsed ``adapter_config.json``) and ``tensors`` as plain PEFT LoRA with the same deltas.

    AdaLoRA, PEFT 0.2's ``enable_lora`` and old key names are converted (module docstring, with
    formulas); everything else is returned as is (the same objects). Raises :class:`LataError`
    naming ``source`` when an input claims one of these formats but does not fit it.
    """
    if not isinstance(config, dict):
        return Normalized(config, tensors)  # check_config refuses it
    warnings = _quantised_base(config, source)
    peft_type = config.get("peft_type")
    kind = peft_type.upper() if isinstance(peft_type, str) else None
    if kind == "ADALORA":
        config, tensors = _from_adalora(config, tensors, source)
    elif kind == "LORA":
        tensors = _canonical_keys(tensors, source)
        if config.get("enable_lora") is not None:
            config, tensors, notes = _from_merged_linear(config, tensors, source)
            warnings += notes
    return Normalized(config, tensors, warnings)


# ----------------------------------------------------------------------------- warnings


def _quantised_base(config: dict[str, Any], source: Path) -> tuple[str, ...]:
    """One warning when ``base_model_name_or_path`` names a 4-bit (bitsandbytes) quantised model."""
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not _QUANTISED_BASE.search(base):
        return ()
    return (
        f"{source}: trained against a 4-bit quantised base ({first_line(base, 100)}); its task vector is "
        "relative to the dequantised weights, not the full-precision model's",
    )


# ----------------------------------------------------------------------------- key names


def _split_key(key: str, parts: tuple[str, ...]) -> tuple[str, str, str | None] | None:
    """``(module, part, adapter name or None)`` of a factor key, else None.

    Accepts what PEFT has written: ``[base_model.model.]<module>.<part>[.<adapter>][.weight]``.
    """
    names = key.removeprefix(KEY_PREFIX).split(".")
    for index in range(len(names) - 1, max(len(names) - 4, 0), -1):
        if names[index] in parts:
            tail = names[index + 1:]
            if tail and tail[-1] == "bias":  # lora_B.bias (lora_bias=True): not a factor, and not renamed
                return None
            if tail in ([], ["weight"]):
                adapter = None
            elif len(tail) == 1 or (len(tail) == 2 and tail[1] == "weight"):
                adapter = tail[0]
            else:
                return None
            return ".".join(names[:index]), names[index], adapter
    return None


def _canonical(module: str, part: str) -> str:
    """Today's PEFT key: ``base_model.model.<module>.lora_A.weight``; embeddings' factors and DoRA's
    ``lora_magnitude_vector`` have no ``.weight``."""
    suffix = "" if part.startswith("lora_embedding") or part == _MAGNITUDE else ".weight"
    return f"{KEY_PREFIX}{module}.{part}{suffix}"


def _group(
    tensors: dict[str, torch.Tensor], parts: tuple[str, ...], source: Path
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """``{module: {part: key}}`` of the factor keys, and ``{key: key}`` of the others (left alone).

    Refuses two keys for one factor and factors of more than one adapter name.
    """
    modules: dict[str, dict[str, str]] = {}
    others: dict[str, str] = {}
    adapters: set[str] = set()
    for key in tensors:
        split = _split_key(key, parts)
        if split is None:
            others[key] = key
            continue
        module, part, adapter = split
        if adapter is not None:
            adapters.add(adapter)
        factors = modules.setdefault(module, {})
        if part in factors:
            first = first_line(factors[part], 100)
            raise LataError(f"{source}: tensors {first} and {first_line(key, 100)} are the same LoRA factor")
        factors[part] = key
    if len(adapters) > 1:
        raise LataError(
            f"{source}: holds the factors of several adapters ({shorten(sorted(adapters))}); "
            "save one adapter per folder"
        )
    return modules, others


def _canonical_keys(tensors: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """The tensors under today's key names; the same dict when every key already is one."""
    modules, others = _group(tensors, (*_LORA_PARTS, _MAGNITUDE), source)
    renamed = {key: _canonical(module, part) for module, factors in modules.items() for part, key in factors.items()}
    if all(key == new for key, new in renamed.items()):
        return tensors
    clash = set(renamed.values()) & set(others)
    if clash:
        raise LataError(f"{source}: tensor {first_line(min(clash), 100)} is stored twice, under two names")
    names = {**renamed, **others}
    return {names[key]: tensor for key, tensor in tensors.items()}


# ----------------------------------------------------------------------------- AdaLoRA


def _from_adalora(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], source: Path
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """AdaLoRA -> LoRA with per-module rank and alpha (formula in the module docstring).

    Source: ``peft/tuners/adalora/layer.py`` (``SVDLinear.get_delta_weight``, ``update_layer``) and
    ``peft/tuners/adalora/model.py`` (``resize_state_dict_by_rank_pattern``, ``resize_modules_by_rank_pattern``).
    """
    init_r = config.get("init_r", _ADALORA_INIT_R)
    if isinstance(init_r, bool) or not isinstance(init_r, int) or init_r < 1:
        raise LataError(f"{source}: AdaLoRA init_r must be a positive integer, got {shorten(init_r)}")
    lora_alpha = _real(config.get("lora_alpha", _DEFAULT_ALPHA), source, "lora_alpha")
    masks = _rank_masks(config.get("rank_pattern"), init_r, source)
    kept = {key: tensor for key, tensor in tensors.items() if not _is_ranknum(key)}  # PEFT recomputes ranknum
    modules, others = _group(kept, _ADALORA_PARTS, source)
    if others:
        raise LataError(
            f"{source}: tensor {first_line(min(others), 100)} is not an AdaLoRA factor (lora_A, lora_E, lora_B)"
        )
    if not modules:
        raise LataError(f"{source}: holds no AdaLoRA tensors")
    # PEFT's (ranknum + 1e-5), a float32 sum: ranknum is a float32 parameter holding init_r
    denominator = float(torch.tensor(float(init_r), dtype=torch.float32) + 1e-5)
    converted: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    pruned = {module for module, mask in masks.items() if not any(mask)}
    for module, factors in sorted(modules.items()):
        label = first_line(module, 100)
        embedding = next((part for part in factors if part.startswith("lora_embedding")), None)
        if embedding is not None:
            raise LataError(f"{source}: module {label} has {embedding}; AdaLoRA has no embedding layers")
        missing = [part for part in ("lora_A", "lora_E", "lora_B") if part not in factors]
        if missing:
            raise LataError(
                f"{source}: AdaLoRA module {label} has no {missing[0]} tensor (it needs lora_A, lora_E and lora_B)"
            )
        A, E, B = (kept[factors[part]] for part in ("lora_A", "lora_E", "lora_B"))
        rank = A.shape[0] if A.ndim == 2 else -1
        if A.ndim != 2 or B.ndim != 2 or tuple(E.shape) != (rank, 1) or B.shape[1] != rank:
            raise LataError(
                f"{source}: AdaLoRA module {label} has factor shapes A{tuple(A.shape)} E{tuple(E.shape)} "
                f"B{tuple(B.shape)}; expected A (r, in), E (r, 1), B (out, r)"
            )
        mask = masks.get(module)
        expected = sum(mask) if mask is not None else init_r
        if rank != expected:
            said = f"rank_pattern keeps {expected} of init_r={init_r}" if mask is not None else f"init_r is {init_r}"
            raise LataError(f"{source}: AdaLoRA module {label} has rank {rank} but {said}")
        # scaling as update_layer sets it for the module's r (the kept rank after resize_modules_by_rank_pattern)
        scaling = lora_alpha if lora_alpha > 0 else float(expected)
        factors_lora = _fold_singular_values(A, E, B)
        if factors_lora is None:
            pruned.add(module)  # pruned to rank 0, or every singular value zero: an exactly zero delta
            continue
        lora_A, lora_B = factors_lora
        converted[_canonical(module, "lora_A")] = lora_A
        converted[_canonical(module, "lora_B")] = lora_B
        ranks[module] = lora_A.shape[0]
        alphas[module] = scaling * lora_A.shape[0] / denominator
    if not ranks:
        raise LataError(f"{source}: every AdaLoRA module was pruned to rank 0 (or has zero singular values); "
                        "its delta is zero")
    return _lora_config(config, ranks, alphas, pruned), converted


def _is_ranknum(key: str) -> bool:
    """``<module>.ranknum`` or ``<module>.ranknum.<adapter>``: AdaLoRA's rank counter, not a factor."""
    names = key.split(".")
    return "ranknum" in names[-2:]


def _real(value: Any, source: Path, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LataError(f"{source}: {field} must be a finite number, got {shorten(value)}")
    return float(value)


def _rank_masks(pattern: Any, init_r: int, source: Path) -> dict[str, list[bool]]:
    """AdaLoRA's saved ``rank_pattern``, ``{"<module>.lora_E": [bool] * init_r}``, as ``{module: mask}``.

    The keys are ``RankAllocator.mask_to_budget``'s parameter names with the adapter name removed
    (``get_peft_model_state_dict``); PEFT strips the last one or two name parts to find the module.
    """
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise LataError(f"{source}: AdaLoRA rank_pattern must be an object of boolean masks, got {shorten(pattern)}")
    masks: dict[str, list[bool]] = {}
    for key, mask in pattern.items():
        names = str(key).removeprefix(KEY_PREFIX).split(".")
        if len(names) >= 2 and names[-1] == "lora_E":
            module = ".".join(names[:-1])
        elif len(names) >= 3 and names[-2] == "lora_E":
            module = ".".join(names[:-2])
        else:
            raise LataError(f"{source}: AdaLoRA rank_pattern key {shorten(key)} is not a <module>.lora_E name")
        if not isinstance(mask, list) or not all(isinstance(item, bool) for item in mask):
            raise LataError(
                f"{source}: AdaLoRA rank_pattern[{shorten(key, 60)}] must be a list of true/false "
                f"(PEFT's mask of kept ranks), got {shorten(mask)}"
            )
        if len(mask) != init_r:
            raise LataError(
                f"{source}: AdaLoRA rank_pattern[{shorten(key, 60)}] has {len(mask)} entries but init_r is {init_r}"
            )
        masks[module] = mask
    return masks


def _fold_singular_values(
    A: torch.Tensor, E: torch.Tensor, B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A * E, B)`` in float32 (float64 kept), without the ranks whose singular value is exactly zero.

    A zero ``E_i`` makes ``B[:, i] (A_i * E_i)`` an exact zero, so dropping it changes no value; ranks
    with non-finite factors stay, for ``parse_modules`` to refuse. None when no rank is left.
    """
    wide = torch.float64 if torch.float64 in (A.dtype, E.dtype, B.dtype) else torch.float32
    lora_A = A.to(wide) * E.to(wide)
    lora_B = B.to(wide)
    finite = torch.isfinite(A).all(dim=1) & torch.isfinite(B).all(dim=0)
    keep = (E[:, 0] != 0) | ~finite
    if not bool(keep.any()):
        return None
    if not bool(keep.all()):
        lora_A, lora_B = lora_A[keep], lora_B[:, keep]
    return lora_A.contiguous(), lora_B.contiguous()


def _lora_config(
    config: dict[str, Any], ranks: dict[str, int], alphas: dict[str, float], pruned: set[str]
) -> dict[str, Any]:
    """The AdaLoRA config as LoRA: ``r`` / ``lora_alpha`` of the most common rank, the others by full module name.

    Modules pruned to rank 0 join ``exclude_modules``, so PEFT does not give them a fresh LoRA layer; a null
    ``target_modules`` (AdaLoRA's default per model type, not LoRA's) becomes the adapted module names' suffixes.
    """
    r = Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = Counter(alphas[name] for name, rank in ranks.items() if rank == r).most_common(1)[0][0]
    converted = {key: value for key, value in config.items() if key not in _ADALORA_ONLY}
    converted.update(
        peft_type="LORA",
        r=r,
        lora_alpha=lora_alpha,
        rank_pattern={name: rank for name, rank in ranks.items() if rank != r},
        alpha_pattern={name: alpha for name, alpha in alphas.items() if alpha != lora_alpha},
        use_rslora=False,  # AdaLoRA ignores it: its scale is lora_alpha / ranknum
    )
    if converted.get("target_modules") is None:
        converted["target_modules"] = sorted({name.rsplit(".", 1)[-1] for name in (*ranks, *pruned)})
    if pruned:
        converted["exclude_modules"] = _excluding(config.get("exclude_modules"), sorted(pruned - set(ranks)))
    return converted


def _excluding(exclude: Any, modules: list[str]) -> Any:
    """``exclude_modules`` (None, a list of names or a fullmatch regex, as PEFT reads it) plus ``modules``."""
    if not modules:
        return exclude
    if not exclude:
        return modules
    if isinstance(exclude, list):
        return [*exclude, *(module for module in modules if module not in exclude)]
    if isinstance(exclude, str):
        return "|".join([f"(?:{exclude})", *(re.escape(module) for module in modules)])
    return exclude  # not a PEFT value: left as it was


# ----------------------------------------------------------------------------- PEFT 0.1-0.2 MergedLinear


def _from_merged_linear(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], source: Path
) -> tuple[dict[str, Any], dict[str, torch.Tensor], tuple[str, ...]]:
    """PEFT 0.2's ``enable_lora`` (``MergedLinear``) factors as plain LoRA (formula in the module docstring).

    Source: ``src/peft/tuners/lora.py`` at v0.2.0, ``MergedLinear.__init__`` / ``zero_pad`` / ``forward``.
    """
    enable = config["enable_lora"]
    if not isinstance(enable, list) or not enable or not all(isinstance(item, bool) for item in enable):
        raise LataError(f"{source}: enable_lora must be a list of true/false, got {shorten(enable)}")
    if not any(enable):
        raise LataError(f"{source}: enable_lora={shorten(enable)} enables no block, yet the adapter has weights")
    for key in ("rank_pattern", "alpha_pattern", "use_rslora"):
        if config.get(key):
            raise LataError(f"{source}: enable_lora (PEFT 0.2) together with {key} is not a layout PEFT wrote")
    r = config.get("r", _DEFAULT_R)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LataError(f"{source}: r must be a positive integer, got {shorten(r)}")
    lora_alpha = _real(config.get("lora_alpha", _DEFAULT_ALPHA), source, "lora_alpha")
    enabled = sum(enable)
    modules, _ = _group(tensors, _LORA_PARTS, source)
    converted = dict(tensors)
    for module, factors in sorted(modules.items()):
        if set(factors) != {"lora_A", "lora_B"}:
            continue  # parse_modules names what is missing or extra
        A, B = tensors[factors["lora_A"]], tensors[factors["lora_B"]]
        converted[factors["lora_B"]] = _merged_lora_B(module, A, B, enable, r, source)
    notes: tuple[str, ...] = ()
    result = {key: value for key, value in config.items() if key not in ("enable_lora", "merge_weights")}
    result.update(r=r * enabled, lora_alpha=lora_alpha * enabled)  # the same alpha / r for rank r * enabled
    names = {module.rsplit(".", 1)[-1] for module in modules}
    if config.get("fan_in_fan_out") and not names & set(_CONV1D_NAMES):
        # PEFT 0.2 set fan_in_fan_out with enable_lora for any single target module, then ignored it on nn.Linear
        result["fan_in_fan_out"] = False
        notes = (
            f"{source}: enable_lora adapter with fan_in_fan_out=true on {shorten(sorted(names), 60)}, "
            "not GPT-2 Conv1D layers: read as nn.Linear (fan_in_fan_out=false), as PEFT 0.2 did",
        )
    return result, converted, notes


def _merged_lora_B(
    module: str, A: torch.Tensor, B: torch.Tensor, enable: list[bool], r: int, source: Path
) -> torch.Tensor:
    """MergedLinear's grouped ``Conv1d`` ``lora_B`` ``(o k, r k / G, 1)`` as a dense ``(o n, r k)`` LoRA B.

    Group ``g`` of the convolution maps ranks ``[g c, (g + 1) c)`` to outputs ``[g o k / G, (g + 1) o k / G)``
    (``c = r k / G``); ``zero_pad`` puts the ``o k`` outputs at the enabled blocks' rows, zeros elsewhere.
    """
    enabled = sum(enable)
    shapes = f"A{tuple(A.shape)} B{tuple(B.shape)}"
    label = first_line(module, 100)
    if A.ndim != 2 or B.ndim != 3 or B.shape[2] != 1 or A.shape[0] != r * enabled or 0 in B.shape:
        raise LataError(
            f"{source}: module {label} has factor shapes {shapes}; enable_lora={shorten(enable)} with r={r} "
            f"(PEFT 0.2 MergedLinear) needs A ({r * enabled}, in) and B (o*{enabled}, {r * enabled}/groups, 1)"
        )
    groups, rest = divmod(A.shape[0], B.shape[1])
    if rest or B.shape[0] % groups or B.shape[0] % enabled:
        raise LataError(f"{source}: module {label} has factor shapes {shapes}, not a grouped MergedLinear pair")
    rows = B.shape[0] // groups
    block_diagonal = torch.block_diag(*(B[g * rows:(g + 1) * rows, :, 0] for g in range(groups)))
    per_block = B.shape[0] // enabled
    positions = torch.zeros(len(enable), per_block, dtype=torch.bool)
    positions[torch.tensor(enable)] = True
    dense = B.new_zeros(len(enable) * per_block, A.shape[0])
    dense[positions.view(-1)] = block_diagonal
    return dense
