"""DoRA task vectors: what a DoRA module adds to its base weight (dense, not low rank).

DoRA (Liu et al. 2024, arXiv 2402.09353) trains a LoRA pair and a magnitude vector ``m``. PEFT merges
a DoRA module into its base weight ``W`` as

    ``W' = m / ||W + s B A|| * (W + s B A)``

with the norm of each *output feature* taken over the input features (PEFT 0.21,
``peft/tuners/lora/variants.py``: ``DoraLinearVariant.merge_safe`` l.170-194,
``DoraEmbeddingVariant.merge_safe`` l.277-301, ``_DoraConvNdVariant.merge_safe`` l.382-405; the norms
in ``peft/tuners/lora/dora.py``: ``DoraLinearLayer.get_weight_norm`` l.86-91, ``torch.linalg.norm(W +
s B A, dim=1)`` after transposing ``fan_in_fan_out`` weights to (out, in), and
``_DoraConvNdLayer.get_weight_norm`` l.207-213, over every dim but the output channels). So the
task vector of a DoRA module is

    ``dW = W' - W = m * (W + s B A) / ||W + s B A|| - W``,

a function of the base weight. In weight space (the layout of :mod:`lata_peft.adapter`):

=============  ============================  =========  ============================
kind           weight space                  norm over  ``m`` (one per)
=============  ============================  =========  ============================
``linear``     (out, in)                     dim 1      row (output feature)
``conv``       (out, in * kh * kw)           dim 1      row (output channel)
``linear_t``   (in, out), GPT-2 ``Conv1D``   dim 0      column (output feature)
``embedding``  (num_embeddings, dim)         dim 0      column (embedding dim)
=============  ============================  =========  ============================

PEFT saves ``m`` as ``<module>.lora_magnitude_vector`` (``LoraModel._get_adapter_state_dict`` strips the
``.weight`` of the in-memory ``lora_magnitude_vector.<adapter>.weight``; ``peft/tuners/lora/model.py``
l.1108-1123), shaped ``(out,)`` for linear layers and embeddings, ``(1, out, 1, 1)`` for ``Conv2d``.
"""

from __future__ import annotations

import torch

from .errors import LataError
from .lowrank import LowRank

__all__ = ["MAGNITUDE_KEY", "NORM_AXIS", "dora_delta", "dora_weight", "magnitude_length"]

MAGNITUDE_KEY = "lora_magnitude_vector"
NORM_AXIS = {"linear": 1, "conv": 1, "linear_t": 0, "embedding": 0}
"""Per module kind: the weight-space axis the DoRA norm runs over (the other axis holds ``m``)."""


def magnitude_length(kind: str, shape: tuple[int, int]) -> int:
    """How many entries the magnitude vector of a ``kind`` module with weight-space ``shape`` has."""
    return shape[1 - NORM_AXIS[kind]]


def dora_weight(weight: torch.Tensor, lora: LowRank, magnitude: torch.Tensor, kind: str,
                name: str = "module") -> torch.Tensor:
    """PEFT's merged DoRA weight ``W' = m * (W + s B A) / ||W + s B A||`` (fp64, weight space).

    ``weight`` is the base weight ``W`` in weight space (any shape with ``lora.shape``'s numel and rows);
    the result has ``lora.shape``, on ``weight``'s device. A zero norm (a row or column of ``W + s B A``
    that is all zeros) would give NaN in PEFT too: refused.
    """
    axis = NORM_AXIS[kind]
    device = weight.device
    exact = LowRank(lora.B.to(device, torch.float64), lora.A.to(device, torch.float64), lora.scale)
    direction = weight.to(torch.float64).reshape(lora.shape) + exact.dense()  # W + s B A
    norms = torch.linalg.vector_norm(direction, dim=axis, keepdim=True)  # (out, 1) or (1, out)
    if not bool((norms > 0).all()):
        line = "row" if axis == 1 else "column"
        raise LataError(f"DoRA module {name}: W + s B A has an all-zero {line}, so its direction (and PEFT's merge) "
                        "is undefined")
    scale = magnitude.to(device, torch.float64).reshape(norms.shape) / norms
    return direction * scale


def dora_delta(weight: torch.Tensor, lora: LowRank, magnitude: torch.Tensor, kind: str,
               name: str = "module") -> torch.Tensor:
    """The DoRA task vector ``dW = m * (W + s B A) / ||W + s B A|| - W`` (fp32, weight space; see
    :func:`dora_weight`)."""
    base = weight.to(torch.float64).reshape(lora.shape)
    return (dora_weight(weight, lora, magnitude, kind, name) - base).to(torch.float32)
