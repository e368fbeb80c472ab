"""Writing PEFT adapter files: tensors in PEFT's layout and a config true to what was written.

The folder around them (atomic write, report, recipe) is :mod:`lata_peft.emit`'s job.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .adapter import CONFIG_NAME, KEY_PREFIX, SAFETENSORS_NAME, Adapter, LoraModule, peft_tensors
from .dtypes import all_finite
from .errors import LataError
from .full_weights import parameter_module, parameter_name, saved_modules, saves

__all__ = ["adapter_tensors", "output_config", "save_adapter_files", "shared_base_layers"]


def adapter_tensors(modules: dict[str, LoraModule], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT state-dict tensors (``base_model.model.<module>.lora_A.weight`` ...) in ``dtype``."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in sorted(modules.items()):
        B_w, A_w = module.delta.balanced()
        lora_A, lora_B = peft_tensors(module, B_w, A_w)
        if module.kind == "embedding":
            a_key, b_key = f"{KEY_PREFIX}{name}.lora_embedding_A", f"{KEY_PREFIX}{name}.lora_embedding_B"
        else:
            a_key, b_key = f"{KEY_PREFIX}{name}.lora_A.weight", f"{KEY_PREFIX}{name}.lora_B.weight"
        tensors[a_key] = lora_A.to(dtype).contiguous()
        tensors[b_key] = lora_B.to(dtype).contiguous()
        if module.bias is not None:  # lora_bias: written at scale 1, as the factors are
            tensors[f"{KEY_PREFIX}{name}.lora_B.bias"] = module.bias.to(dtype).contiguous()
    return tensors


def shared_base_layers(adapters: list[Adapter]) -> dict[str, torch.Tensor]:
    """The union of the inputs' saved base layers; the same key must hold the same tensor everywhere."""
    merged: dict[str, tuple[Adapter, torch.Tensor]] = {}
    for adapter in adapters:
        for key, tensor in adapter.base_layers.items():
            if key in merged and not torch.equal(merged[key][1], tensor):
                raise LataError(f"{adapter.path}: its saved {key} differs from the one in {merged[key][0].path} "
                                "(resized vocabularies?); these adapters can't share one output")
            merged.setdefault(key, (adapter, tensor))
    return {key: tensor for key, (_, tensor) in merged.items()}


def save_adapter_files(
    folder: Path,
    modules: dict[str, LoraModule],
    config: dict[str, Any],
    dtype: torch.dtype,
    base_layers: dict[str, torch.Tensor] | None = None,
    full: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``folder``; ``full``:
    full trained parameters by saved key (``modules_to_save``, trained biases), in their own dtype."""
    metadata = {"format": "pt"}  # one key: safetensors writes metadata in hash order, so two keys are not reproducible
    tensors = {**adapter_tensors(modules, dtype), **(base_layers or {}), **(full or {})}
    _check_finite(tensors)
    save_file(tensors, folder / SAFETENSORS_NAME, metadata=metadata)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse to write NaN or Inf: the last guard against a combination that overflowed its dtype."""
    for key, tensor in tensors.items():
        if not all_finite(tensor):
            raise LataError(
                f"refusing to write non-finite values: {key.removeprefix(KEY_PREFIX)} "
                f"(the combination overflows {str(tensor.dtype).removeprefix('torch.')})"
            )


def output_config(adapters: list[Adapter], modules: dict[str, LoraModule],
                  full: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` for what is written, never a copy of an input's.

    Factors carry their scale, so every module has ``alpha == r`` (scale 1): ``r`` and
    ``lora_alpha`` are the most common rank, ``rank_pattern`` / ``alpha_pattern`` list the
    modules of other ranks by full name. ``target_modules`` is the list of module suffixes
    when the inputs target by suffix and every input module is written; otherwise a regex
    that matches exactly the written modules (PEFT ``fullmatch``es a string). ``modules_to_save``
    and ``bias`` are the inputs' (for the ``full`` tensors written), ``lora_bias`` true when a
    bias delta is written, ``fan_in_fan_out`` true for GPT-2 ``Conv1D`` modules, ``task_type``
    the inputs' common one (else none).

    Only the keys PEFT needs (``peft/tuners/lora/config.py``; the rest take PEFT's defaults) and none
    that depend on the installed PEFT version, so the file is the same wherever it is written, older
    PEFT versions load it, and writing it does not import peft.
    """
    ranks = {name: module.delta.rank for name, module in modules.items()}
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: rank for name, rank in sorted(ranks.items()) if rank != common}
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in modules})
    inputs_cover = {name for a in adapters for name in a.modules} == set(modules)
    by_suffix = all(_targets_by_suffix(a) and a.config.get("layers_to_transform") is None for a in adapters)
    if inputs_cover and by_suffix:
        target_modules: list[str] | str = suffixes
    else:
        target_modules = "^(?:" + "|".join(re.escape(name) for name in sorted(modules)) + ")$"
    task_types = {a.config.get("task_type") for a in adapters}
    saved = sorted({entry for a in adapters for name in map(parameter_name, full or {})
                    if (entry := saves(parameter_module(name), saved_modules(a.config))) is not None})
    bias_modes = [a.config.get("bias", "none") for a in adapters]
    bias = "all" if "all" in bias_modes else "lora_only" if "lora_only" in bias_modes else "none"
    config: dict[str, Any] = {
        "alpha_pattern": dict(pattern),
        "base_model_name_or_path": adapters[0].base_model,
        "bias": bias,
        "fan_in_fan_out": any(m.kind == "linear_t" for m in modules.values()),
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": common,
        "lora_dropout": 0.0,
        "modules_to_save": saved or None,
        "peft_type": "LORA",
        "r": common,
        "rank_pattern": pattern,
        "revision": None,
        "target_modules": target_modules,
        "task_type": task_types.pop() if len(task_types) == 1 else None,
        "use_dora": False,
        "use_rslora": False,
    }
    if any(m.bias is not None for m in modules.values()):
        config["lora_bias"] = True  # PEFT >= 0.14; left out otherwise, so older PEFT versions load the file
    return config


def _targets_by_suffix(adapter: Adapter) -> bool:
    """True when the adapter's own ``target_modules`` is a list of plain names (not a regex, and not
    dotted like ``attn.c_proj``, which a suffix list would widen to ``mlp.c_proj``)."""
    targets = adapter.config.get("target_modules")
    return isinstance(targets, list) and all("." not in target for target in targets)
