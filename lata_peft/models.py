"""transformers model folders (a base to fold into, or the two models of ``--instruction-from``):
found locally or on the hub, recognised, and their weight files and config read."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import LataError
from .hub import is_hub_id, snapshot

__all__ = ["WEIGHT_FILES", "is_model_folder", "read_model_config", "resolve_model", "weight_files"]

WEIGHT_FILES = re.compile(r"^(model|diffusion_pytorch_model)(-\d{5}-of-\d{5})?\.safetensors$")
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def is_model_folder(path: Path) -> bool:
    """A folder with a ``config.json`` (what transformers loads)."""
    return (path / "config.json").is_file()


def weight_files(folder: Path) -> list[Path]:
    """The folder's ``model*.safetensors`` files (one, or the shards), sorted."""
    return sorted(p for p in folder.iterdir() if WEIGHT_FILES.match(p.name))


def resolve_model(source: str | os.PathLike[str]) -> Path:
    """A local transformers model folder with safetensors weights, or a hub id downloaded when
    the hub is reachable; anything else is one :class:`LataError` naming the folder."""
    path = Path(source).expanduser()
    if not path.exists() and is_hub_id(str(source)):
        path = snapshot(str(source), MODEL_FILES)
    if not is_model_folder(path):
        raise LataError(f"{path}: not a transformers model folder (no config.json)")
    if not weight_files(path):
        pickles = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found pickled {pickles[0]}; convert it to safetensors)" if pickles else ""
        raise LataError(f"{path}: no model*.safetensors weights{hint}")
    return path


def read_model_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a model folder as a dict."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LataError(f"{folder / 'config.json'}: unreadable ({exc})") from None
    if not isinstance(config, dict):
        raise LataError(f"{folder / 'config.json'}: expected a JSON object")
    return config
