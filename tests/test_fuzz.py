"""Fuzzing the adapter loader and ``lata-peft combine`` with broken configs and weights files.

Every example ends in success or in exactly one :class:`LataError` line naming the file
(CLI: exit code 2, one ``error:`` line, no traceback); nothing written is NaN or Inf and
no input changes. Configs are mutations of the shipped ``math`` adapter's; weights files
are made-up safetensors headers and data, random bytes, and truncated or bit-flipped copies
of the shipped file. Derandomised, so CI sees the same examples every run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from lata_peft.adapter import load_adapter
from lata_peft.errors import LataError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "adapters"
MATH, CODE = EXAMPLES / "math", EXAMPLES / "code"
MATH_CONFIG = json.loads((MATH / "adapter_config.json").read_text())
READ_FIELDS = [
    "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out", "target_modules",
    "layers_to_transform", "peft_type", "use_dora", "lora_bias", "bias", "modules_to_save", "task_type",
    "base_model_name_or_path", "layer_replication", "target_parameters",
]
DELETE = object()
SCALE = float(os.environ.get("LATA_FUZZ_SCALE", "1"))  # e.g. 20 for a long local run; CI keeps 1 (< 60 s)
FUZZ = settings(
    deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 4, 8, 16, 2**31, 2**63, 10**30, 10**300, -(10**400), 10**4000]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, 5e-324, -0.0, 8.0, 8.5]),
    st.text(max_size=20),
    st.sampled_from(["", "LORA", "lora", "none", "all", "CAUSAL_LM", "q_proj", "(", ".*", "x" * 10_000, "é\n" * 3000]),
)
KEYS = st.text(max_size=12) | st.sampled_from(["q_proj", "v_proj", "down_proj", "layers.0", "(", "[a-", "x" * 10_000])
JSON_VALUES = st.recursive(
    LEAVES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=10,
) | st.integers(1, 400).map(nested)
FIELD_VALUES = {  # near-valid values, to get past the first check more often
    "r": st.integers(-2, 20) | st.sampled_from([8.0, "8"]),
    "lora_alpha": st.floats(-1e40, 1e40) | st.integers(-(10**40), 10**40),
    "rank_pattern": st.dictionaries(KEYS, st.integers(0, 16) | LEAVES, max_size=3),
    "alpha_pattern": st.dictionaries(KEYS, st.floats() | LEAVES, max_size=3),
    "target_modules": st.lists(st.text(max_size=10) | LEAVES, max_size=3) | st.text(max_size=30),
    "layers_to_transform": st.lists(st.integers(-3, 40), max_size=3) | st.integers(-3, 40),
}


@st.composite
def configs(draw) -> dict:
    """The math adapter's config with one to three fields replaced by random JSON (or deleted)."""
    config = dict(MATH_CONFIG)
    fields = draw(st.lists(st.sampled_from(READ_FIELDS) | st.sampled_from([*MATH_CONFIG, "extra"]),
                           min_size=1, max_size=3, unique=True))
    for field in fields:
        value = draw(st.just(DELETE) | JSON_VALUES | FIELD_VALUES.get(field, JSON_VALUES))
        if value is DELETE:
            config.pop(field, None)
        else:
            config[field] = value
    return config


# ----------------------------------------------------------------------------- weights files

SAFETENSORS_DTYPES = ["F16", "BF16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL",
                      "F8_E4M3", "F8_E5M2", "C64", "f32", ""]
ITEM_SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "U8": 1, "BOOL": 1}
TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


@st.composite
def entry_data(draw, dtype: str, shape: list[int]) -> bytes:
    """Bytes for a tensor: small normal values (loadable) or raw random bytes (NaN, Inf, huge)."""
    size = math.prod(shape) * ITEM_SIZES.get(dtype, 1)
    if dtype in TORCH_DTYPES and draw(st.booleans()):
        generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        values = (torch.randn(shape, generator=generator) * 0.05).to(TORCH_DTYPES[dtype])
        return values.reshape(-1).view(torch.uint8).numpy().tobytes()
    return draw(st.binary(min_size=size, max_size=size))


def often(draw, usual, rare, odds: int = 5):
    """``usual`` in all but one draw out of ``odds``, else ``rare``: mostly well-formed, sometimes not."""
    return draw(rare) if draw(st.integers(0, odds - 1)) == 0 else usual


@st.composite
def safetensors_files(draw) -> bytes:
    """A header of a LoRA module pair (one of the real module names, or a new one) with random damage."""
    rank = draw(st.sampled_from([8, 8, 4]))  # the math config says r=8
    module = draw(st.sampled_from(["fuzz.m", "model.layers.0.self_attn.q_proj"]))
    pair = {
        f"base_model.model.{module}.lora_A.weight": [rank, draw(st.integers(1, 6))],
        f"base_model.model.{module}.lora_B.weight": [draw(st.integers(1, 6)), rank],
    }
    header: dict = {}
    data = b""
    for key, shape in pair.items():
        dtype = often(draw, draw(st.sampled_from(["F32", "BF16", "F16", "F64"])), st.sampled_from(SAFETENSORS_DTYPES))
        key = often(draw, key, st.text(max_size=30) | st.sampled_from(["fuzz.lora_A", "x" * 5000]))
        shape = often(draw, shape, st.lists(st.integers(0, 9), max_size=4))
        offsets = [len(data), len(data) + math.prod(shape) * ITEM_SIZES.get(dtype, 1)]
        data += draw(entry_data(dtype, shape))
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if draw(st.integers(0, 7)) == 0:  # damage one field
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = draw(JSON_VALUES)
        header[key] = entry
    header["__metadata__"] = often(draw, {"format": "pt"}, JSON_VALUES)
    raw = json.dumps(header).encode()
    length = often(draw, len(raw), st.integers(0, 2**64 - 1), odds=10)
    return struct.pack("<Q", length) + raw + data + often(draw, b"", st.binary(max_size=4), odds=10)


REAL_BYTES = (CODE / "adapter_model.safetensors").read_bytes()
HEADER_END = 8 + struct.unpack("<Q", REAL_BYTES[:8])[0]


@st.composite
def damaged_real_files(draw) -> bytes:
    """The shipped code adapter's weights, truncated or with one byte changed (mostly in the header)."""
    if draw(st.integers(0, 2)) == 0:
        return REAL_BYTES[: draw(st.integers(0, len(REAL_BYTES) - 1))]
    where = often(draw, draw(st.integers(0, len(REAL_BYTES) - 1)), st.integers(0, HEADER_END + 64), odds=3)
    return REAL_BYTES[:where] + bytes([draw(st.integers(0, 255))]) + REAL_BYTES[where + 1:]


# ----------------------------------------------------------------------------- checks


def digests(*folders: Path) -> dict[str, str]:
    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in folders for path in sorted(folder.iterdir()) if path.is_file()
    }


def assert_one_line(message: str, folder: Path, names_file: bool = True) -> None:
    assert "\n" not in message and "Traceback" not in message, message
    if names_file:  # loader errors name the file; some combine errors name only the module
        assert str(folder) in message, message
    assert len(message.replace(str(folder), "").replace(str(CODE), "")) < 500, message  # long values cut


def check_load(folder: Path) -> None:
    """``load_adapter`` succeeds with finite factors, or raises one LataError line; the input is unchanged."""
    before = digests(folder)
    try:
        adapter = load_adapter(folder)
    except LataError as exc:
        assert_one_line(str(exc), folder)
        event("refused: " + str(exc).replace(str(folder), "")[:40])
    else:
        event("loaded")
        for module in adapter.modules.values():
            assert math.isfinite(module.delta.scale)
            assert torch.isfinite(module.delta.B).all() and torch.isfinite(module.delta.A).all()
    assert digests(folder) == before


def check_cli(folder: Path, scratch: Path) -> None:
    """``lata-peft combine FUZZED code -o OUT``: exit 0 with finite tensors, or exit 2 with one error line."""
    from typer.testing import CliRunner

    from lata_peft.cli import app

    before = digests(folder, CODE)
    out = scratch / "out"
    result = CliRunner().invoke(app, ["combine", str(folder), str(CODE), "-o", str(out)])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    event(f"exit {result.exit_code}")
    if result.exit_code == 0:
        written = load_file(out / "adapter_model.safetensors")
        assert all(bool(torch.isfinite(t).all()) for t in written.values())
    else:
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert sum(line.startswith("error:") for line in lines) == 1 and lines[-1].startswith("error:"), lines
        assert_one_line(lines[-1], folder, names_file=False)
        assert not out.exists()
    leftovers = [p for p in scratch.iterdir() if p.name.startswith(".out") and p.name != ".out.lock"]
    assert not leftovers  # no staging folder left (the empty lock file stays by design, see outputs.py)
    assert digests(folder, CODE) == before


@pytest.fixture(scope="module")
def math_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the math adapter's weights, linked into every fuzzed folder."""
    path = tmp_path_factory.mktemp("math") / "adapter_model.safetensors"
    path.write_bytes((MATH / "adapter_model.safetensors").read_bytes())
    return path


def config_folder(root: Path, config: dict, weights: Path) -> Path:
    folder = root / "fuzzed"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    os.symlink(weights, folder / "adapter_model.safetensors")
    return folder


def weights_folder(root: Path, content: bytes) -> Path:
    folder = root / "fuzzed"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(MATH_CONFIG))
    (folder / "adapter_model.safetensors").write_bytes(content)
    return folder


# ----------------------------------------------------------------------------- the fuzz tests


@settings(FUZZ, max_examples=int(300 * SCALE))
@given(config=configs())
def test_fuzzed_configs_load_or_fail_in_one_line(math_weights, config):
    with tempfile.TemporaryDirectory() as root:
        check_load(config_folder(Path(root), config, math_weights))


@settings(FUZZ, max_examples=int(60 * SCALE))
@given(config=configs())
def test_fuzzed_configs_through_the_cli(math_weights, config):
    with tempfile.TemporaryDirectory() as root:
        check_cli(config_folder(Path(root), config, math_weights), Path(root))


@settings(FUZZ, max_examples=int(500 * SCALE))
@given(content=safetensors_files() | st.binary(max_size=64))
def test_fuzzed_safetensors_load_or_fail_in_one_line(content):
    with tempfile.TemporaryDirectory() as root:
        check_load(weights_folder(Path(root), content))


@settings(FUZZ, max_examples=int(80 * SCALE))
@given(content=damaged_real_files())
def test_damaged_real_weights_load_or_fail_in_one_line(content):
    with tempfile.TemporaryDirectory() as root:
        check_load(weights_folder(Path(root), content))


@settings(FUZZ, max_examples=int(60 * SCALE))
@given(content=safetensors_files() | damaged_real_files())
def test_fuzzed_safetensors_through_the_cli(content):
    with tempfile.TemporaryDirectory() as root:
        check_cli(weights_folder(Path(root), content), Path(root))
