"""Issue 13's output and recipe defects, each as its repro: nothing lost, nothing half-written,
one line and exit 2 for every bad value."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lata_peft import LataError
from lata_peft.cli import _terminate, app
from lata_peft.outputs import write_atomically

runner = CliRunner()


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(result, *words: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for word in words:
        assert word in result.output
    return result.output


def test_output_that_contains_an_input_is_refused_with_overwrite(tmp_path: Path, adapters) -> None:
    """The data-loss repro: -o pointing at the folder holding the input, with --overwrite."""
    parent = tmp_path / "p"
    shutil.copytree(adapters["plain"], parent / "math")
    (parent / "keep.txt").write_text("x")
    before = tree_digest(parent)
    refused(runner.invoke(app, ["combine", str(parent / "math"), "-o", str(parent), "--overwrite"]),
            "contains the input")
    assert tree_digest(parent) == before
    link = tmp_path / "link"
    link.symlink_to(parent)  # symlinks are followed
    refused(runner.invoke(app, ["combine", str(parent / "math"), "-o", str(link), "--overwrite"]))
    assert tree_digest(parent) == before


def test_overwrite_never_replaces_a_file_a_fifo_or_a_users_folder(tmp_path: Path, adapters) -> None:
    plain = tmp_path / "notes.txt"
    plain.write_text("mine")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for target in (plain, fifo):
        refused(runner.invoke(app, ["combine", str(adapters["plain"]), "-o", str(target), "--overwrite"]),
                "not a folder")
    assert plain.read_text() == "mine" and fifo.exists() and not fifo.is_dir()
    refused(runner.invoke(app, ["combine", str(adapters["plain"]), "-o", str(plain / "sub")]), "is a file")


def test_a_full_disk_is_refused_before_writing(tmp_path: Path, adapters, monkeypatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
    refused(runner.invoke(app, ["combine", str(adapters["plain"]), "-o", str(tmp_path / "out")]), "GB are free")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_sigterm_during_a_write_leaves_nothing(tmp_path: Path) -> None:
    previous = signal.signal(signal.SIGTERM, _terminate)  # what the console script installs
    try:
        def fill(folder: Path) -> None:
            (folder / "half.bin").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

        with pytest.raises(SystemExit):
            write_atomically(tmp_path / "out", fill)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_stale_staging_folders_are_removed_fresh_ones_kept(tmp_path: Path) -> None:
    stale, fresh = tmp_path / ".out.tmp-old1", tmp_path / ".out.tmp-new1"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "x").write_text("x")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(stale, (two_days_ago, two_days_ago))
    write_atomically(tmp_path / "out", lambda folder: (folder / "lata_report.json").write_text("{}"))
    assert not stale.exists() and fresh.exists() and (tmp_path / "out" / "lata_report.json").is_file()


def test_two_first_writers_finishing_at_once_never_error_half_way(tmp_path: Path) -> None:
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def writer(tag: str) -> None:
        def fill(folder: Path) -> None:
            (folder / "lata_report.json").write_text(tag)
            barrier.wait()

        try:
            write_atomically(tmp_path / "out", fill)
            outcomes.append("written")
        except LataError as exc:
            outcomes.append("refused: " + str(exc))

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(o.split(":")[0] for o in outcomes) == ["refused", "written"], outcomes
    assert "already exists" in next(o for o in outcomes if o.startswith("refused"))
    assert (tmp_path / "out" / "lata_report.json").read_text() in ("a", "b")
    assert not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize("flags", [["--lambda", "nan"], ["--weight", "inf"], ["--low", "nan"],
                                   ["--high", "-inf"], ["--threshold", "nan"]])
def test_non_finite_numbers_are_refused(tmp_path: Path, adapters, flags: list[str]) -> None:
    args = ["combine", str(adapters["plain"]), "-o", str(tmp_path / "out"), "--method", "lata", "--instruction",
            str(adapters["instruct"]), *flags]
    refused(runner.invoke(app, args), flags[0], "finite")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("body", "words"), [
    ("combine: null\n", ["no output folder"]),
    ("combine: {adapters: 5, out: o}\n", ["adapters"]),
    ("combine: {adapters: [a], lambda: abc, out: o}\n", ["--lambda", "finite number", "abc"]),
    ("combine: {adapters: [a], out: 123}\n", ["--out", "string"]),
    ("combine: {adapters: [a], out: o, method: {x: 1}}\n", ["--method"]),
    ("combine: [1, 2]\n", ["mapping"]),
    ("combine: {adapters: [a], out: o, rank: 8.5}\n", ["--rank"]),
])
def test_recipe_values_are_checked_by_the_spec(tmp_path: Path, body: str, words: list[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(body)
    refused(runner.invoke(app, ["run", str(recipe)]), str(recipe), *words)


def test_recipe_that_is_not_utf8_or_a_billion_laughs(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"combine: {adapters: [\xff\xfe], out: o}\n")
    refused(runner.invoke(app, ["run", str(recipe)]), "UTF-8")
    levels = ["&a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"&{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    recipe.write_text("combine: {adapters: [a], out: o, method: [" + ", ".join(levels) + "]}\n")  # 9^9 leaves
    started = time.perf_counter()
    message = refused(runner.invoke(app, ["run", str(recipe)]), "--method")
    assert len(message) < 400 and time.perf_counter() - started < 10


def test_a_single_adapter_string_is_one_adapter_not_its_characters(tmp_path: Path, adapters) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"combine: {{adapters: {adapters['plain']}, dry_run: true}}\n")
    result = runner.invoke(app, ["run", str(recipe), "--json"])
    assert result.exit_code == 0, result.output
    assert '"adapters": [' in result.output and str(adapters["plain"]) in result.output


def test_every_output_carries_its_recipe_and_rerunning_it_is_byte_identical(tmp_path: Path, adapters,
                                                                            monkeypatch) -> None:
    out = tmp_path / "out"
    args = ["combine", str(adapters["plain"]), str(adapters["rank8"]), "--forget", str(adapters["patterns"]),
            "--method", "lata", "--instruction", str(adapters["instruct"]), "--rank", "energy:0.9",
            "--lambda", "0.7", "-o", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    recipe = (out / "lata_recipe.yaml").read_text()
    assert "lambda: 0.7" in recipe and "out:" not in recipe and str(adapters["plain"]) in recipe
    monkeypatch.chdir(tmp_path)  # the recorded paths are absolute: it runs from anywhere
    result = runner.invoke(app, ["run", str(out / "lata_recipe.yaml"), "-o", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    for name in ("adapter_model.safetensors", "adapter_config.json", "lata_recipe.yaml"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
