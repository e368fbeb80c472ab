"""The last stage: every output folder is written here, atomically, with its report, recipe and card.

An output folder holds its payload (a PEFT adapter, or a model with the combination folded
in), ``lata_report.json`` (what was done, to what), ``lata_recipe.yaml`` (the spec it was
made from, with absolute input paths: ``lata-peft run OUT/lata_recipe.yaml -o OUT2`` makes it again)
and ``README.md``, the model card (:mod:`lata_peft.model_card`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError

from .adapter import LoraModule
from .combine import Combination
from .errors import LataError
from .fold import QuantOptions, check_disk_space, fold_modules
from .model_card import CARD_NAME, card_license, model_card
from .outputs import REPORT_NAME, check_free_space, write_atomically
from .pipeline import Inputs
from .progress import Progress
from .spec import Spec
from .writing import output_config, save_adapter_files, shared_base_layers

__all__ = ["RECIPE_NAME", "command_text", "emit_adapter", "emit_folded", "recipe_text"]

RECIPE_NAME = "lata_recipe.yaml"
NOT_RECORDED = ("out", "overwrite", "dry_run")


def recipe_text(spec: Spec) -> str:
    """The YAML recipe of ``spec``: its options (absolute paths), without where it was written."""
    header = "# Made by lata-peft. Re-run with: lata-peft run lata_recipe.yaml -o OUT\n"
    return header + yaml.safe_dump({spec.verb: spec.to_mapping(skip=NOT_RECORDED, absolute=True)}, sort_keys=False)


def command_text(spec: Spec) -> str:
    """The one ``lata-peft`` command that makes the output again (absolute paths, ``-o OUT``)."""
    return spec.command_line(skip=NOT_RECORDED, absolute=True) + " -o OUT"


def _write(target: Path, spec: Spec, report: dict[str, Any], overwrite: bool,
           payload: Callable[[Path], dict[str, Any] | None]) -> None:
    """Write ``payload`` then the report (updated with what the payload returns) and the recipe."""

    def fill(folder: Path) -> None:
        try:
            report.update(payload(folder) or {})
        except SafetensorError as exc:  # e.g. the disk filled up while serialising
            raise LataError(f"{target}: writing failed ({exc}); nothing was written") from None
        (folder / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        (folder / RECIPE_NAME).write_text(recipe_text(spec))
        card = folder / CARD_NAME  # a folded model's holds the base's card, copied with its side files
        license_name = card_license(card.read_text(errors="replace")) if card.is_file() else None
        card.write_text(model_card(report, command_text(spec), license_name))

    write_atomically(target, fill, overwrite=overwrite)


def emit_adapter(spec: Spec, inputs: Inputs, combination: Combination, dtype: torch.dtype,
                 report: dict[str, Any], overwrite: bool) -> None:
    """The combination as a PEFT adapter folder at ``inputs.target``."""
    assert inputs.target is not None
    full = combination.full.tensors
    config = output_config(inputs.tasks, combination.modules, full)
    base_layers = shared_base_layers(inputs.tasks)
    full_bytes = sum(t.numel() * t.element_size() for t in full.values())
    check_free_space(inputs.target, combination.parameters * dtype.itemsize + full_bytes + (1 << 20))
    _write(inputs.target, spec, report, overwrite,
           lambda folder: save_adapter_files(folder, combination.modules, config, dtype, base_layers, full))


def emit_folded(spec: Spec, modules: dict[str, LoraModule], base: Path, target: Path, four_bit: bool,
                report: dict[str, Any], overwrite: bool, quant: QuantOptions | None = None,
                progress: Progress | None = None, started: float | None = None,
                dense: dict[str, torch.Tensor] | None = None, device: torch.device | str = "cpu") -> None:
    """``base`` with ``modules`` (and ``dense`` deltas by tensor name) folded in (full precision or
    NF4, the maths on ``device``) as a model folder at ``target``; the report gains a ``fold`` entry
    (counts, bytes, the 4-bit error)."""
    check_disk_space(base, target, four_bit)
    started = time.perf_counter() if started is None else started

    def payload(folder: Path) -> dict[str, Any]:
        result = fold_modules(modules, base, folder, four_bit=four_bit, quant=quant or QuantOptions(),
                              progress=progress, dense=dense, device=device)
        return {"fold": {**result.to_dict(), "out": str(target), "base": str(base),
                         "seconds": round(time.perf_counter() - started, 3)}}

    _write(target, spec, report, overwrite, payload)
