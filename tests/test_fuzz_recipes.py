"""Fuzzing ``lata-peft run RECIPE.yaml`` with broken recipes (issue 13).

A recipe is one verb's spec written out, so every value in it must meet the spec's checks:
each example ends in exit 0 (a written adapter with finite tensors) or exit 2 with exactly one
``error:`` line, never a traceback, never a hang or unbounded memory (YAML aliases), and the
inputs never change. Recipes are mutations of a valid ``combine`` / ``inspect`` recipe on the
shipped adapters, YAML-specific values (anchors, tags, dates, multi-document streams) and raw
text or bytes. Derandomised: CI sees the same examples every run.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from safetensors.torch import load_file
from test_fuzz import CODE, FUZZ, JSON_VALUES, MATH, SCALE, digests
from typer.testing import CliRunner

from lata_peft.cli import app
from lata_peft.recipe import VERBS

INSTRUCT = MATH.parent / "instruct"
VALID = {
    "combine": {"adapters": [str(MATH), str(CODE)], "method": "ta", "out": "out"},
    "inspect": {"adapters": [str(MATH)], "instruction": str(INSTRUCT)},
}
NEAR_VALUES = st.sampled_from([
    "lata", "ties", "dare", "exact", "energy:0.9", "energy:2", "8", 0, -1, 1e309, float("nan"), "nan", "inf",
    str(MATH), [str(MATH)], [str(MATH), 5], str(MATH) + "/adapter_config.json", "/", ".", "", "a/b", "x" * 5000,
    {"nested": [1, 2]}, True, None, "2026-11-24", "linear", "log", "block", "module",
])
YAML_SPECIALS = [
    "!!python/object/apply:os.system ['echo pwned']\n",  # safe_load refuses tags that run code
    "combine: !!binary aGVsbG8=\n",
    "combine: &a {adapters: *a}\n",  # a recursive alias
    "combine:\n  adapters: [" + str(MATH) + "]\n---\ninspect: {}\n",  # two documents
    "? [complex, key]\n: 1\n",
    "combine:\n  method: 2026-11-24\n",
    "\ufeffcombine: {}\n",
    "a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\n"
    + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
              f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n" for i in range(8))
    + "combine:\n  method: *i\n",  # billion laughs: 9^9 strings if expanded
]


@st.composite
def mutated_recipes(draw) -> str:
    """A valid recipe with one to three keys replaced (by near-valid or random values), removed or added."""
    verb = draw(st.sampled_from(sorted(VALID)))
    options = dict(VALID[verb])
    keys = sorted({key for spec in VERBS.values() for key in spec.keys()} | {"extra", "lambda", "4bit"})  # noqa: SIM118 (a classmethod)
    for key in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True)):
        choice = draw(st.integers(0, 4))
        if choice == 0:
            options.pop(key, None)
        else:
            options[key] = draw(NEAR_VALUES if choice < 3 else JSON_VALUES)
    document = {verb: options}
    if draw(st.integers(0, 9)) == 0:
        document = {draw(st.sampled_from(["fold", "compare", "eval", "Combine", ""])): options}
    return yaml.safe_dump(document, allow_unicode=True, width=10**6)


RECIPES = (
    mutated_recipes()
    | st.sampled_from(YAML_SPECIALS)
    | st.text(max_size=200)
    | st.binary(max_size=200)
)


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[None]:
    """Run in ``folder``: relative paths a recipe names (``out: x``) land in the scratch folder."""
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def note(text: str) -> None:
    """Hypothesis statistics, when called from a hypothesis test."""
    with contextlib.suppress(InvalidArgument):
        event(text)


def check_run(recipe: str | bytes, scratch: Path) -> None:
    path = scratch / "recipe.yaml"
    path.write_bytes(recipe if isinstance(recipe, bytes) else recipe.encode("utf-8", "surrogatepass"))
    before = digests(MATH, CODE, INSTRUCT)
    with inside(scratch):
        result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    note(f"exit {result.exit_code}")
    if result.exit_code == 0:
        for written in scratch.rglob("adapter_model.safetensors"):
            assert all(bool(torch.isfinite(t).all()) for t in load_file(written).values())
    else:
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert sum(line.startswith("error:") for line in lines) == 1 and lines[-1].startswith("error:"), lines
        assert len(lines[-1]) < 700, lines[-1]  # values are cut, never printed whole
        note("refused: " + lines[-1].replace(str(scratch), "")[:40])
        written = [p for p in scratch.rglob("*") if p.is_file() and p.name not in ("recipe.yaml",)
                   and not p.name.endswith(".lock")]
        assert not written, written
    assert digests(MATH, CODE, INSTRUCT) == before


@pytest.fixture(scope="module", autouse=True)
def offline() -> Iterator[None]:
    """A recipe may name ``owner/name`` hub ids: fail fast instead of waiting on the network."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        yield


@settings(FUZZ, max_examples=int(150 * SCALE))
@given(recipe=RECIPES)
def test_fuzzed_recipes_run_or_fail_in_one_line(recipe):
    with tempfile.TemporaryDirectory() as root:
        check_run(recipe, Path(root))


@pytest.mark.parametrize("recipe", YAML_SPECIALS, ids=range(len(YAML_SPECIALS)))
def test_yaml_specials_are_refused_in_one_line(recipe, tmp_path):
    check_run(recipe, tmp_path)
