"""Where evaluation data lives, and reading it.

The default data folder is the shared one next to the repository
(``Path(__file__).parents[3] / "shared" / "data"``, i.e. ``../shared/data`` from the repo root);
the environment variable ``LATA_PEFT_DATA`` overrides it, and ``evaluate(data=...)`` overrides both
(a folder laid out like the shared one, or the task's file itself). A missing file is a
:class:`~lata_peft.errors.LataError` that names the path.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

from ..errors import LataError

ENV_VAR = "LATA_PEFT_DATA"

#: The file each task reads, relative to the data folder.
TASK_FILES: dict[str, str] = {
    "wikitext2": "wikitext2/wiki.test.raw",
    "gsm8k": "gsm8k/test.jsonl",
    "humaneval": "humaneval/HumanEval.jsonl.gz",
}
GSM8K_TRAIN = "gsm8k/train.jsonl"


def data_root() -> Path:
    """The data folder: ``$LATA_PEFT_DATA`` if set, else ``<repo>/../shared/data``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def task_file(task: str, data: str | os.PathLike[str] | None = None) -> Path:
    """The file ``task`` reads: ``data`` itself if it is a file, else ``TASK_FILES[task]`` under
    ``data`` (or under :func:`data_root`). Raises ``LataError`` naming the path if it is missing."""
    if data is not None and not Path(data).expanduser().is_dir():
        return existing(Path(data).expanduser(), task)
    root = Path(data).expanduser() if data is not None else data_root()
    return existing(root / TASK_FILES[task], task)


def existing(path: Path, what: str) -> Path:
    """``path`` if it is a file, else a one-line ``LataError`` naming it."""
    if not path.is_file():
        hint = f" (set {ENV_VAR} or pass data=...)" if what in TASK_FILES else ""
        raise LataError(f"{path}: {what} data file not found{hint}")
    return path


def read_text(path: Path) -> str:
    """The file as UTF-8 text (``.gz`` decompressed); a decoding error is a ``LataError``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                return handle.read()
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise LataError(f"{path}: cannot read text ({type(exc).__name__}: {exc})") from None


def read_jsonl(path: Path, keys: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """One JSON object per non-empty line (``.gz`` decompressed); each must have ``keys``."""
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LataError(f"{path}: line {number} is not JSON ({exc.msg})") from None
        missing = [key for key in keys if not isinstance(row, dict) or key not in row]
        if missing:
            raise LataError(f"{path}: line {number} lacks {', '.join(missing)}")
        rows.append(row)
    return rows


def wikitext_rows(path: Path) -> list[str]:
    """The non-empty rows of a WikiText raw split, each with its trailing ``"\\n"`` as in the
    Hugging Face ``wikitext-2-raw-v1`` ``text`` column.

    The shared copy stores the non-empty rows separated by CRLF; the original Salesforce
    ``wiki.test.raw`` separates lines by ``"\\n"`` with blank ``" \\n"`` lines. Both read the same.
    """
    lines = read_text(path).replace("\r\n", "\n").split("\n")
    return [line + "\n" for line in lines if line.strip()]
