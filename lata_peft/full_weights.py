"""Full trained parameters inside an adapter, and their task vectors ``saved - base``.

PEFT saves whole tensors beside the LoRA factors for ``modules_to_save`` (classification heads,
``lm_head``, ``embed_tokens``) and for biases trained with ``bias="all"`` or ``"lora_only"``
(``peft/utils/save_and_load.py``, ``get_peft_model_state_dict``). They are not low rank: their
task vector is the saved tensor minus the base model's (Ilharco et al. 2023, arXiv 2212.04089),
combined with the same coefficients as the LoRA modules,

    ``W_out = W_base + sum_i c_i (W_i - W_base)``

(inputs without the parameter contribute nothing). Without the base, the saved tensors can only
be carried through, when every input holding one agrees on it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter_formats import KEY_PREFIX
from .errors import LataError, first_line
from .layers import safe_block
from .methods import Method, merge_terms, module_generator
from .models import weight_files
from .shards import TensorFile

__all__ = [
    "BaseWeights", "FullCombination", "combine_full", "parameter_module", "parameter_name", "saved_modules", "saves",
]

_WRAPPERS = re.compile(r"\.(?:base_layer|original_module|modules_to_save\.[^.]+)(?=\.)")


def parameter_name(key: str) -> str:
    """The model's own parameter name for a saved key: ``base_model.model.x.base_layer.bias`` -> ``x.bias``."""
    return _WRAPPERS.sub("", key.removeprefix(KEY_PREFIX))


def parameter_module(name: str) -> str:
    """``score.weight`` -> ``score``."""
    return name.rsplit(".", 1)[0]


HEADS_BY_TASK = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                 "QUESTION_ANS": ("qa_outputs",)}
"""Heads PEFT adds to ``modules_to_save`` for a task type (``peft/peft_model.py``,
``PeftModelForSequenceClassification`` & co.), even when the config saves ``null``."""


def saved_modules(config: dict) -> list[str]:
    """The config's ``modules_to_save`` and the heads its ``task_type`` implies."""
    return [*(config.get("modules_to_save") or []), *HEADS_BY_TASK.get(config.get("task_type") or "", ())]


def saves(module: str, names: list[str]) -> str | None:
    """The entry of ``names`` that saves ``module`` in full, by PEFT's rule: the module, or one it
    lies inside, has a name that *ends with* the entry (``peft/utils/other.py``, ``_set_trainable``:
    ``key.endswith(target_key)``), so ``classifier`` saves ``classifier.out_proj`` and, as in PEFT,
    DistilBERT's ``pre_classifier``."""
    parts = module.split(".")
    prefixes = [".".join(parts[:end]) for end in range(len(parts), 0, -1)]
    return next((name for name in names if any(prefix.endswith(name) for prefix in prefixes)), None)


def holds_delta(weight_shape: Sequence[int], delta_shape: Sequence[int]) -> bool:
    """Whether a base weight of ``weight_shape`` takes a weight-space delta of ``delta_shape`` ``(rows, columns)``
    (see :mod:`lata_peft.adapter`): the same rows and as many entries, so a convolution's ``(out, in, kh, kw)``
    takes ``(out, in * kh * kw)``."""
    rows, columns = delta_shape
    return len(weight_shape) > 0 and weight_shape[0] == rows and math.prod(weight_shape) == rows * columns


class BaseWeights:
    """The base model's tensors by name, read one at a time from its safetensors files (never
    the whole model). Names are tried as given, then with or without a leading ``model.``
    (a base saved as ``LlamaModel`` vs ``LlamaForCausalLM``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files = {key: handle for handle in map(TensorFile, weight_files(folder)) for key in handle.keys}

    def key_for(self, name: str) -> str | None:
        """The base's own key for parameter ``name``, or ``None``."""
        for candidate in (name, name.removeprefix("model."), f"model.{name}"):
            if candidate in self._files:
                return candidate
        return None

    def stored_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of parameter ``name`` from its file's header (a 4-bit weight's from its bitsandbytes
        quant state: a GPT-2 ``Conv1D`` weight's transposed, as transformers quantises it), without reading
        the tensor; ``None`` if the base lacks it."""
        key = self.key_for(name)
        if key is None:
            return None
        handle, state = self._files[key], self._quant_state(key)
        if state is not None:  # bitsandbytes' QuantState.as_dict(packed=True): a JSON dict stored as bytes
            try:
                return tuple(json.loads(bytes(handle.get_tensor(state).numpy()))["shape"])
            except (ValueError, KeyError, TypeError) as exc:
                raise LataError(f"{handle.path}: unreadable 4-bit quant state of {key} ({first_line(exc)})") from None
        return tuple(handle.location(key)[0]["shape"])

    def quantized(self, name: str) -> bool:
        """True if the base stores parameter ``name`` in bitsandbytes 4-bit."""
        key = self.key_for(name)
        return key is not None and self._quant_state(key) is not None

    def _quant_state(self, key: str) -> str | None:
        from .fold import QUANT_STATE_PARTS

        keys = self._files[key].keys
        return next((f"{key}.{part}" for part in QUANT_STATE_PARTS
                     if part.startswith("quant_state.") and f"{key}.{part}" in keys), None)

    def get(self, name: str) -> torch.Tensor | None:
        """The tensor of parameter ``name`` (see :meth:`key_for`), or ``None`` if the base lacks it."""
        key = self.key_for(name)
        return self._files[key].get_tensor(key) if key is not None else None

    def module_weight(self, module: str, shape: tuple[int, int]) -> torch.Tensor:
        """The base weight ``<module>.weight`` of a LoRA module, in its weight-space ``shape`` (see
        :mod:`lata_peft.adapter`); a missing, quantised or differently shaped weight is one :class:`LataError`."""
        name = f"{module}.weight"
        key = self.key_for(name)
        if key is None:
            raise LataError(f"{self.folder}: has no weight {name} (the adapter's module {module} needs it)")
        tensor = self._files[key].get_tensor(key)
        if not tensor.is_floating_point() or not holds_delta(tensor.shape, shape):
            kind = str(tensor.dtype).removeprefix("torch.")
            raise LataError(f"{self.folder}: {name} is {kind} {tuple(tensor.shape)} but the adapter's module is "
                            f"{shape}: pass the full-precision base model the adapter was trained on (--base BASE)")
        return tensor.reshape(shape)


@dataclass
class FullCombination:
    """What the full parameters become: ``tensors`` to write in the adapter (by saved key),
    ``deltas`` against the base (by the base's tensor name, for a fold; empty without the base), and
    one report row per parameter."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    reports: list[dict] = field(default_factory=list)


def combine_full(
    holdings: Sequence[tuple[Path, Mapping[str, tuple[str, torch.Tensor]]]],
    coefficient: Callable[[int, str], float],
    method: Method,
    base: BaseWeights | None,
    density: float = 0.5,
    seed: int = 0,
    sign_method: str = "total",
) -> FullCombination:
    """Combine every full parameter held by any input.

    ``holdings[i]`` is input ``i``'s path and ``{parameter name: (saved key, tensor)}``;
    ``coefficient(i, module)`` its signed coefficient. With ``base``: ``W_base + merge(c_i, W_i -
    W_base)`` by ``method`` (task arithmetic, or TIES/DARE/magnitude on the dense differences).
    Without: the saved tensor, when every input holding it agrees and none is subtracted.
    """
    result = FullCombination()
    names = sorted({name for _, held in holdings for name in held})
    for name in names:
        module = parameter_module(name)
        terms = [(index, coefficient(index, module), *held[name])
                 for index, (_, held) in enumerate(holdings) if name in held]
        key = terms[0][2]
        if base is None:
            result.tensors[key] = _carried(name, terms, holdings)
            result.reports.append({"parameter": name, "inputs": len(terms), "mode": "carried"})
            continue
        base_key = base.key_for(name)
        if base_key is None:
            raise LataError(f"{holdings[terms[0][0]][0]}: {name} is not in the base {base.folder} (a newly "
                            "initialised head has no task vector); combine adapters that share the head without "
                            "--base, or use a base that has it")
        reference = base.get(base_key)
        for index, _, _, tensor in terms:
            if tensor.shape != reference.shape:
                raise LataError(f"{holdings[index][0]}: {name} has shape {tuple(tensor.shape)} but the base "
                                f"{base.folder} has {tuple(reference.shape)} (resized vocabulary?)")
        live = [(c, tensor.double() - reference.double()) for _, c, _, tensor in terms if c != 0.0]
        delta = (merge_terms(live, method, density, module_generator(seed, name), sign_method)
                 if live else torch.zeros_like(reference, dtype=torch.float64))
        result.deltas[base_key] = delta.float()
        result.tensors[key] = (reference.double() + delta).to(terms[0][3].dtype)
        block = safe_block(module)
        result.reports.append({"parameter": name, "block": block, "inputs": len(terms), "mode": "task vector",
                               "coefficients": [c for _, c, _, _ in terms],
                               "norm": float(delta.norm()), "base_norm": float(reference.double().norm())})
    return result


def _carried(name: str, terms: list[tuple[int, float, str, torch.Tensor]],
             holdings: Sequence[tuple[Path, Mapping[str, tuple[str, torch.Tensor]]]]) -> torch.Tensor:
    """The one saved value every input agrees on; differing or subtracted ones need the base."""
    first_index, _, _, first = terms[0]
    for index, c, _, tensor in terms:
        if c < 0:
            raise LataError(f"{holdings[index][0]}: subtracting its full trained {name} needs the base model: "
                            "pass --base BASE (the task vector is saved - base)")
        if tensor.shape != first.shape or not torch.equal(tensor, first):
            raise LataError(f"{holdings[index][0]}: its trained {name} differs from the one in "
                            f"{holdings[first_index][0]}; pass --base BASE to combine them as task vectors "
                            "(saved - base)")
    return first
