"""``lata_report.json``: renders what a run did (spec, inputs with sha256, layer weights,
per-module ranks and errors) from the pipeline's typed results. It computes nothing."""

from __future__ import annotations

import datetime as _dt
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .adapter import Adapter
from .combine import Combination
from .spec import Spec

if TYPE_CHECKING:
    import torch

    from .pipeline import Inputs
    from .serving import Serving
    from .specs import CombineSpec
    from .weighting import LayerWeights

__all__ = ["adapter_entry", "combine_report", "header", "now", "space_note"]


def now() -> str:
    """UTC time stamp of a report."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def header(spec: Spec) -> dict[str, Any]:
    """Version, time, verb, and every option of the spec under its recipe key."""
    return {"lata_peft_version": __version__, "created": now(), "verb": spec.verb, **spec.record()}


def space_note(report: dict[str, Any]) -> str:
    """`` in core space`` / `` in full space`` for a method that merges in a space (not TA / LATA), else ``""``."""
    return f" in {report['space']} space" if report["method"] not in ("ta", "lata") else ""


def adapter_entry(adapter: Adapter, label: str, role: str, weight: float | None) -> dict[str, Any]:
    """One input: where it was read from, its role and weight, its base model and file hashes."""
    return {"label": label, "path": str(adapter.path.resolve()), "role": role, "weight": weight,
            "base_model": adapter.base_model, "sha256": adapter.sha256}


def _inputs(inputs: Inputs) -> list[dict[str, Any]]:
    entries = [adapter_entry(task, label, "task" if sign > 0 else "forget", scale)
               for label, task, sign, scale in zip(inputs.labels, inputs.tasks, inputs.signs, inputs.scales,
                                                   strict=True)]
    instruction = inputs.instruction
    if isinstance(instruction, Adapter):
        entries.append(adapter_entry(instruction, instruction.name, "instruction", None))
    elif instruction is not None:
        entries.append({"label": instruction.name, "path": f"{instruction.instruct} - {instruction.base}",
                        "role": "instruction", "weight": None, "base_model": None, "sha256": None})
    return entries


def combine_report(spec: CombineSpec, inputs: Inputs, weights: LayerWeights | None, combination: Combination,
                   serving: Serving, dtype: torch.dtype, seconds: float) -> dict[str, Any]:
    """The report of one ``combine``: the spec (as resolved), inputs, layer weights, per-module results,
    and how the output is written for its serving target."""
    ranks = [r.rank for r in combination.reports]
    return {
        **header(spec),
        "lata": spec.uses_lata,
        "scheme": spec.scheme if spec.uses_lata else None,
        "rank": str(spec.rank_policy),
        "method_parameters": spec.method_parameters,
        "dtype": str(dtype).removeprefix("torch."),
        "inputs": _inputs(inputs),
        "layer_weights": weights.table() if weights is not None else {},
        "summary": {
            "modules": len(combination.modules),
            "parameters": combination.parameters,
            "min_rank": min(ranks),
            "max_rank": max(ranks),
            "max_error": max(r.error for r in combination.reports),
            "max_relative_error": combination.max_relative_error,
            "serving": serving.to_dict()["status"] if spec.fold_into is None else "folded model",
            "seconds": round(seconds, 3),
        },
        "serving": serving.to_dict() if spec.fold_into is None else None,
        "modules": [r.to_dict() for r in combination.reports],
        "full_weights": combination.full.reports,
    }
