"""Provenance and per-layer tables: what ``lata_report.json`` and ``inspect`` contain."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from . import __version__
from .adapter import Adapter
from .combine import Combination
from .instruction import DenseInstruction
from .scoring import score_layers
from .weighting import SCHEMES, LayerWeighting, layer_weights

__all__ = ["build_report", "layer_table", "now"]


def now() -> str:
    """UTC time stamp of a report."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def layer_table(
    task: Adapter,
    instruction: Adapter | DenseInstruction,
    weighting: LayerWeighting,
    granularity: str,
    layer_regex: str | None,
) -> list[dict[str, Any]]:
    """Per scored unit: norms, cosine, the chosen scheme's weight and every scheme's weight."""
    scores = score_layers(task, instruction, granularity, layer_regex)
    cosines = [s.cosine for s in scores]
    every = {name: layer_weights(cosines, replace(weighting, scheme=name)) for name in SCHEMES}
    chosen = every[weighting.scheme]
    return [
        {**s.to_dict(), "weight": chosen[i], "weights": {name: every[name][i] for name in SCHEMES}}
        for i, s in enumerate(scores)
    ]


def build_report(
    tasks: Sequence[Adapter],
    labels: Sequence[str],
    signs: Sequence[float],
    scales: Sequence[float],
    instruction: Adapter | DenseInstruction | None,
    combination: Combination,
    tables: dict[str, list[dict[str, Any]]],
    seconds: float,
    options: dict[str, Any],
) -> dict[str, Any]:
    """``lata_report.json``: provenance (paths, sha256), options, layer weights, per-module errors."""
    inputs = [
        {
            "label": label,
            "path": str(task.path.resolve()),
            "role": "task" if sign > 0 else "forget",
            "weight": scale,
            "base_model": task.base_model,
            "sha256": task.sha256,
        }
        for label, task, sign, scale in zip(labels, tasks, signs, scales, strict=True)
    ]
    if isinstance(instruction, Adapter):
        inputs.append({
            "label": instruction.name, "path": str(instruction.path.resolve()), "role": "instruction",
            "weight": None, "base_model": instruction.base_model, "sha256": instruction.sha256,
        })
    elif instruction is not None:
        inputs.append({"label": instruction.name, "path": f"{instruction.instruct} - {instruction.base}",
                       "role": "instruction", "weight": None, "base_model": None, "sha256": None})
    ranks = [r.rank for r in combination.reports]
    parameters = sum(sum(m.delta.shape) * m.delta.rank for m in combination.modules.values())
    return {
        "lata_peft_version": __version__,
        "created": now(),
        **options,
        "inputs": inputs,
        "layer_weights": tables,
        "summary": {
            "modules": len(combination.modules),
            "parameters": parameters,
            "min_rank": min(ranks),
            "max_rank": max(ranks),
            "max_error": max(r.error for r in combination.reports),
            "max_relative_error": combination.max_relative_error,
            "seconds": round(seconds, 3),
        },
        "modules": [r.to_dict() for r in combination.reports],
    }
