"""A validated view of ``adapter_config.json``: every field lata-peft reads, checked once.

:func:`check_config` refuses what is not plain LoRA and every value of the wrong type or
range with one :class:`LataError` line naming the file and the field, and returns the config
with normalised values, so the rest of the code can trust ``config["r"]``,
``config["lora_alpha"]``, the patterns and the flags without checking them again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import LataError, shorten

__all__ = ["BIAS_MODES", "DEFAULT_ALPHA", "DEFAULT_R", "TASK_TYPES", "check_config"]

DEFAULT_R = 8  # PEFT's LoraConfig defaults
DEFAULT_ALPHA = 8
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
"""``peft.utils.peft_types.TaskType`` values (a test checks agreement; the CLI does not import peft here)."""

# Fields whose presence means the adapter is more than plain LoRA factors.
_UNSUPPORTED_FLAGS = {
    "layer_replication": "layer_replication adapters are not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
}
_BOOLEAN_FLAGS = ("use_dora", "lora_bias")
BIAS_MODES = ("none", "lora_only", "all")
"""PEFT's ``bias``: train no biases, those of the LoRA-adapted modules, or all (saved as full tensors)."""


def check_config(config: Any, path: Path) -> dict[str, Any]:
    """``config`` (parsed JSON from ``path``) checked, with validated and normalised values.

    ``r`` and ``rank_pattern`` values are positive ints; ``lora_alpha`` and ``alpha_pattern``
    values finite non-zero floats; pattern keys valid regexes (as PEFT's ``get_pattern_key``
    embeds them); ``use_rslora`` / ``fan_in_fan_out`` bools; ``target_modules`` a str, a list
    of str or None; ``layers_to_transform`` a list of non-negative ints or None.
    """
    if not isinstance(config, dict):
        raise LataError(f"{path}: expected a JSON object, got {type(config).__name__}")
    _check_plain_lora(config, path)
    checked = dict(config)
    checked["r"] = _positive_int(config.get("r", DEFAULT_R), path, "r")
    checked["lora_alpha"] = _nonzero_real(config.get("lora_alpha", DEFAULT_ALPHA), path, "lora_alpha")
    checked["rank_pattern"] = _pattern(config.get("rank_pattern"), path, "rank_pattern", _positive_int)
    checked["alpha_pattern"] = _pattern(config.get("alpha_pattern"), path, "alpha_pattern", _nonzero_real)
    for key in ("use_rslora", "fan_in_fan_out"):
        checked[key] = _flag(config.get(key), path, key)
    checked["target_modules"] = _target_modules(config.get("target_modules"), path)
    checked["layers_to_transform"] = _layers(config.get("layers_to_transform"), path)
    for key in ("base_model_name_or_path", "task_type"):
        if not isinstance(config.get(key), (str, type(None))):
            raise LataError(f"{path}: {key} must be a string or null, got {shorten(config[key])}")
    if checked.get("task_type") not in (None, *TASK_TYPES):
        raise LataError(f"{path}: task_type {shorten(config['task_type'])} is not one of {', '.join(TASK_TYPES)}")
    return checked


def _check_plain_lora(config: dict[str, Any], path: Path) -> None:
    """Refuse non-LoRA types, replicated layers and DoRA with ``lora_bias``; ``modules_to_save`` and ``bias``
    well typed. (DoRA itself is read: :mod:`lata_peft.dora`.)"""
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise LataError(f"{path}: peft_type is {shorten(peft_type)}; only LORA adapters can be combined")
    for key in _BOOLEAN_FLAGS:
        _flag(config.get(key), path, key)
    for key, problem in _UNSUPPORTED_FLAGS.items():
        if config.get(key):
            raise LataError(f"{path}: {problem}")
    if config.get("use_dora") and config.get("lora_bias"):  # peft/tuners/lora/config.py l.1087-1088
        raise LataError(f"{path}: use_dora and lora_bias are both true, which PEFT refuses to build")
    modules_to_save = config.get("modules_to_save")
    if modules_to_save is not None and not (
            isinstance(modules_to_save, list) and all(isinstance(m, str) for m in modules_to_save)):
        raise LataError(f"{path}: modules_to_save must be a list of module names, got {shorten(modules_to_save)}")
    if config.get("bias", "none") not in BIAS_MODES:
        raise LataError(f"{path}: bias={shorten(config['bias'])} is not one of {', '.join(BIAS_MODES)}")


def _positive_int(value: Any, path: Path, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LataError(f"{path}: {field} must be a positive integer, got {shorten(value)}")
    return value


def _nonzero_real(value: Any, path: Path, field: str) -> float:
    """A finite, non-zero int or float (not a bool, not a string) as a float."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            number = None
    if number is None or not math.isfinite(number) or number == 0.0:
        raise LataError(f"{path}: {field} must be a finite, non-zero number, got {shorten(value)}")
    return number


def _pattern(
    value: Any, path: Path, field: str, check_value: Callable[[Any, Path, str], Any]
) -> dict[str, Any]:
    """``{regex: value}``; each key must compile the way ``get_pattern_key`` uses it."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LataError(f"{path}: {field} must be an object mapping module patterns to values, got {shorten(value)}")
    checked = {}
    for key, item in value.items():
        try:
            re.compile(rf"(.*\.)?({key})$")
        except (re.error, OverflowError, RecursionError, ValueError) as exc:
            raise LataError(f"{path}: {field} key {shorten(key)} is not a valid regex ({exc})") from None
        checked[key] = check_value(item, path, f"{field}[{shorten(key, 60)}]")
    return checked


def _flag(value: Any, path: Path, field: str) -> bool:
    """A JSON boolean; null (or absent) means false."""
    if value is not None and not isinstance(value, bool):
        raise LataError(f"{path}: {field} must be true or false, got {shorten(value)}")
    return bool(value)


def _target_modules(value: Any, path: Path) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise LataError(f"{path}: target_modules must be a string or a list of strings, got {shorten(value)}")


def _layers(value: Any, path: Path) -> list[int] | None:
    """``layers_to_transform``: an index or a list of indices (normalised to a list), or None."""
    if value is None:
        return None
    items = [value] if not isinstance(value, list) else value
    if not all(isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in items):
        raise LataError(
            f"{path}: layers_to_transform must be a layer index or a list of them, got {shorten(value)}"
        )
    return list(items)
