"""Checks across inputs (same base model, same shapes); each failure is one :class:`LataError` line.

Output paths are checked in :mod:`lata_peft.outputs`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from .adapter import CONFIG_NAME, Adapter
from .errors import LataError, shorten
from .full_weights import BaseWeights, holds_delta

__all__ = ["check_against_base", "check_compatible"]


def check_compatible(adapters: Sequence[Adapter], strict: bool = False) -> None:
    """Same base model (a warning, an error with ``strict``) and identical shapes per module.

    Two adapters that adapt the same module must agree on its weight-space shape and on
    how it is stored (``fan_in_fan_out``, embedding, convolution).
    """
    if not adapters:
        raise LataError("no adapters given")
    first = adapters[0]
    for other in adapters[1:]:
        if other.base_model != first.base_model:
            message = (
                f"{other.path / CONFIG_NAME}: base_model_name_or_path is {shorten(other.base_model)} but "
                f"{first.path / CONFIG_NAME} says {shorten(first.base_model)}"
            )
            if strict:
                raise LataError(message + " (--strict)")
            warnings.warn(message + "; combining anyway (use --strict to refuse)", stacklevel=2)
    seen: dict[str, tuple[Adapter, tuple[int, int], str]] = {}
    for adapter in adapters:
        for name, module in adapter.modules.items():
            if name not in seen:
                seen[name] = (adapter, module.delta.shape, module.kind)
                continue
            owner, shape, kind = seen[name]
            if module.delta.shape != shape or module.kind != kind:
                raise LataError(
                    f"{adapter.path}: module {name} is {module.kind} {module.delta.shape} but in "
                    f"{owner.path} it is {kind} {shape}: the adapters are not for the same base model"
                )



def check_against_base(adapters: Sequence[Adapter], base: BaseWeights, folding: bool = False) -> None:
    """Every adapted module that ``base`` has a weight for has it in the module's weight-space shape (read from
    the files' headers, before any merge); with ``folding`` every module must have one. An adapter for another
    model is refused in one line naming both.

    Without a fold a missing weight is let through: transformers may store a model under other names than its
    modules carry (its checkpoint conversion mappings, e.g. ViT's ``encoder.layer.N.attention.attention.query``
    for ``layers.N.attention.q_proj``), and loading the adapter maps them; a fold writes the base's own names.
    """
    for adapter in adapters:
        for name, module in adapter.modules.items():
            shape = base.stored_shape(f"{name}.weight")
            if shape is None:
                if folding:
                    raise LataError(f"{adapter.path}: adapts {name}, but the base model {base.folder} has no weight "
                                    f"{name}.weight: the adapter is not for this base model")
                continue
            delta = tuple(module.delta.shape)
            if module.kind == "linear_t" and base.quantized(f"{name}.weight"):
                delta = delta[::-1]  # transformers quantises a Conv1D weight transposed
            if not holds_delta(shape, delta):
                raise LataError(f"{adapter.path}: module {name} is {delta} but {name}.weight in the base model "
                                f"{base.folder} is {shape}: the adapter is not for this base model")
