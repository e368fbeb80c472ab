"""Output folders: which ones may be written, and writing them atomically.

Rules (each refusal one :class:`LataError`, checked before any input is read):

* the output may not be, contain, or lie inside any input, the base or the instruction
  vector (paths resolved, symlinks followed);
* an existing output is replaced only with ``overwrite`` and only if it is a folder that
  lata-peft wrote (it holds our ``lata_report.json``): never a file, a device, or a user's folder;
* the first existing ancestor must be a writable folder (not a file), with room for the output.

Writes build the folder in a hidden sibling (``.NAME.tmp-XXXX``) and rename it into place under
a lock, so an interrupted run leaves nothing half-written and concurrent writers never fail
half-way. Staging folders of ours older than a day (a killed run) are removed on the next write.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .errors import LataError

__all__ = ["REPORT_NAME", "check_free_space", "check_not_an_input", "prepare_output", "replace_text",
           "write_atomically"]

REPORT_NAME = "lata_report.json"
STALE_SECONDS = 24 * 3600


def _existing_ancestor(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path("/")


def prepare_output(out: Path, protected: Sequence[Path], overwrite: bool = False) -> Path:
    """The resolved output folder, or a :class:`LataError` if writing there could lose data."""
    target = Path(out).expanduser().resolve()
    check_not_an_input(target, protected)
    _check_replaceable(target, overwrite)
    ancestor = _existing_ancestor(target.parent)
    if not ancestor.is_dir():
        raise LataError(f"{target}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LataError(f"{target}: {ancestor} is not writable")
    return target


def check_not_an_input(target: Path, protected: Sequence[Path]) -> None:
    """Refuse an output (folder or file) that is an input, lies inside one, or contains one."""
    for source in protected:
        source = Path(source).expanduser().resolve()
        if target == source or source in target.parents:
            raise LataError(f"{target}: the output would overwrite the input {source}")
        if target in source.parents:
            raise LataError(f"{target}: the output folder contains the input {source}; replacing it would delete it")


def _check_replaceable(target: Path, overwrite: bool, meanwhile: bool = False) -> None:
    """An existing ``target`` may be replaced only with ``overwrite`` and only if lata-peft wrote it
    (a folder holding ``lata_report.json``); ``meanwhile``: it appeared while this run was writing."""
    if not (target.exists() or target.is_symlink()):
        return
    if not overwrite:
        when = "another run wrote it meanwhile; " if meanwhile else ""
        raise LataError(f"{target}: already exists ({when}pass --overwrite to replace it)")
    if not target.is_dir():
        raise LataError(f"{target}: exists and is not a folder; --overwrite only replaces a lata-peft output")
    if not (target / REPORT_NAME).is_file():
        raise LataError(f"{target}: is not a lata-peft output (no {REPORT_NAME}); --overwrite only replaces "
                        "folders that lata-peft wrote")


def check_free_space(target: Path, needed: int) -> None:
    """Refuse before writing when the output's disk cannot hold about ``needed`` bytes."""
    free = shutil.disk_usage(_existing_ancestor(target.parent)).free
    if needed > free:
        raise LataError(f"{target}: needs about {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free there")


@contextlib.contextmanager
def _locked(parent: Path, name: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``parent/.NAME.lock`` (the lock file is left, empty, for reuse)."""
    with open(parent / f".{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale(parent: Path, name: str) -> None:
    """Staging and trash folders of ours for ``name`` left by a killed run more than a day ago."""
    now = time.time()
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        for path in parent.glob(pattern):
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink() and now - path.stat().st_mtime > STALE_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)


def write_atomically(out: Path, fill: Callable[[Path], None], overwrite: bool = False) -> None:
    """Build the folder ``out`` in a temporary sibling, then rename it into place.

    An interrupted run (any exception, SIGINT, or SIGTERM turned into ``SystemExit`` by the
    CLI) removes its staging folder; an existing ``out`` is replaced only with ``overwrite``
    and only once the new folder is complete.
    """
    out = out.expanduser().resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out.parent, out.name)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise LataError(f"{out}: cannot write there ({exc.strerror or exc})") from None
    try:
        fill(staging)
        with _locked(out.parent, out.name):
            _swap_in(staging, out, overwrite)
    except OSError as exc:
        raise LataError(f"{out}: writing failed ({exc.strerror or exc}); nothing was written") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename ``staging`` to ``out`` (holding the lock); an ``out`` that another run wrote meanwhile
    is replaced with ``overwrite`` when it is ours, else refused."""
    _check_replaceable(out, overwrite, meanwhile=True)
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out)


def replace_text(path: Path, text: str) -> None:
    """Write the file ``path`` atomically: a killed run leaves the previous file (results, a report
    with hand-written parts) whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        staging.write_text(text)
        os.replace(staging, path)
    except OSError as exc:
        staging.unlink(missing_ok=True)
        raise LataError(f"{path}: cannot write ({exc.strerror or exc})") from None
