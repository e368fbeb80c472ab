"""Hugging Face hub ids: the one place that downloads (adapters and model folders alike)."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import LataError

__all__ = ["is_hub_id", "snapshot"]

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def is_hub_id(source: str) -> bool:
    """``owner/name`` that is not a relative path (``./x/y``, ``../x``)."""
    return bool(_HUB_ID.fullmatch(source)) and not source.startswith(".")


def snapshot(source: str, patterns: list[str]) -> Path:
    """The local folder of hub repo ``source`` with the files matching ``patterns``, downloaded
    when the hub is reachable; offline, unknown repo or auth failures are one :class:`LataError`."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, auth: one clear line
        raise LataError(f"{source}: no such folder, and it could not be fetched from the Hugging Face hub "
                        f"({type(exc).__name__}; offline?)") from None
