"""Every number in an adapter validated (issue 13, items 3 and 4, adapter side).

One test per defect an adversarial review found: each bad config value, pickle, dtype,
non-finite value or safetensors header is one :class:`LataError` line naming the file,
never a traceback, never NaN written, the inputs never modified.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lata_peft.adapter import load_adapter
from lata_peft.adapter_config import TASK_TYPES
from lata_peft.errors import LataError, first_line, shorten

LONG = "x" * 10_000


def fingerprint(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def copy_adapter(source: Path, folder: Path, **changes: object) -> Path:
    shutil.copytree(source, folder)
    if changes:
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def refused(folder: Path, names: Path | None = None, allow_pickle: bool = False) -> str:
    """``load_adapter(folder)`` raises one short LataError line naming ``names``; the folder is untouched."""
    before = fingerprint(folder)
    with pytest.raises(LataError) as caught:
        load_adapter(folder, allow_pickle=allow_pickle)
    message = str(caught.value)
    assert "\n" not in message, message
    assert str(names or folder) in message, message
    assert len(message.replace(str(names or folder), "")) < 400, message  # long values are cut
    assert fingerprint(folder) == before
    return message


def run_cli(args: list[str]):
    from typer.testing import CliRunner

    from lata_peft.cli import app

    return CliRunner().invoke(app, args)


# ----------------------------------------------------------------------------- 1. config values


BAD_CONFIGS = {
    "r_string": ({"r": "abc"}, "r must be a positive integer"),
    "r_null": ({"r": None}, "r must be a positive integer"),
    "r_float": ({"r": 8.5}, "r must be a positive integer"),
    "r_integral_float": ({"r": 4.0}, "r must be a positive integer"),
    "r_bool": ({"r": True}, "r must be a positive integer"),
    "r_zero": ({"r": 0}, "r must be a positive integer"),
    "alpha_string": ({"lora_alpha": "16"}, "lora_alpha must be a finite, non-zero number"),
    "alpha_nan": ({"lora_alpha": math.nan}, "lora_alpha must be a finite, non-zero number"),
    "alpha_inf": ({"lora_alpha": -math.inf}, "lora_alpha must be a finite, non-zero number"),
    "alpha_zero": ({"lora_alpha": 0}, "lora_alpha must be a finite, non-zero number"),
    "alpha_bool": ({"lora_alpha": True}, "lora_alpha must be a finite, non-zero number"),
    "alpha_past_float": ({"lora_alpha": 10**400}, "lora_alpha must be a finite, non-zero number"),
    "alpha_pattern_string": ({"alpha_pattern": {"up_proj": "3"}}, "alpha_pattern['up_proj'] must be a finite"),
    "alpha_pattern_nan": ({"alpha_pattern": {"up_proj": math.nan}}, "alpha_pattern['up_proj'] must be a finite"),
    "rank_pattern_bad_regex": ({"rank_pattern": {"(": 4}}, "rank_pattern key '(' is not a valid regex"),
    "rank_pattern_list": ({"rank_pattern": ["q_proj"]}, "rank_pattern must be an object"),
    "rank_pattern_float": ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern['q_proj'] must be a positive integer"),
    "alpha_pattern_global_flag": ({"alpha_pattern": {"(?i)q_proj": 2}}, "is not a valid regex"),
    "use_rslora_string": ({"use_rslora": "yes"}, "use_rslora must be true or false"),
    "fan_in_fan_out_int": ({"fan_in_fan_out": 1}, "fan_in_fan_out must be true or false"),
    "use_dora_string": ({"use_dora": "false"}, "use_dora must be true or false"),
    "target_modules_int": ({"target_modules": 5}, "target_modules must be a string or a list of strings"),
    "target_modules_mixed": ({"target_modules": ["q_proj", 3]}, "target_modules must be a string or a list"),
    "layers_string": ({"layers_to_transform": "1"}, "layers_to_transform must be a layer index"),
    "layers_float": ({"layers_to_transform": [1.5]}, "layers_to_transform must be a layer index"),
    "layers_bool": ({"layers_to_transform": True}, "layers_to_transform must be a layer index"),
    "task_type": ({"task_type": "causal"}, "task_type 'causal' is not one of"),
    "base_model_list": ({"base_model_name_or_path": ["gpt2"]}, "base_model_name_or_path must be a string"),
    "peft_type_huge": ({"peft_type": LONG}, "only LORA adapters"),
    "bias_huge": ({"bias": LONG}, "is not one of none, lora_only, all"),
    "modules_to_save_huge": ({"modules_to_save": LONG}, "modules_to_save must be a list"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_values_are_one_line(tmp_path, adapters, case):
    changes, problem = BAD_CONFIGS[case]
    bad = copy_adapter(adapters["plain"], tmp_path / "bad", **changes)
    message = refused(bad, bad / "adapter_config.json")
    assert problem in message, message


def test_config_that_is_not_an_object_or_too_deep(tmp_path, adapters):
    bad = copy_adapter(adapters["plain"], tmp_path / "bad")
    (bad / "adapter_config.json").write_text("[1, 2]")
    assert "expected a JSON object" in refused(bad, bad / "adapter_config.json")
    (bad / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "not valid JSON" in refused(bad, bad / "adapter_config.json")
    (bad / "adapter_config.json").write_bytes(b'{"r": 4, "peft_type": "LORA\xff"}')
    assert "not valid JSON" in refused(bad, bad / "adapter_config.json")


def test_valid_config_variants_still_load(tmp_path, adapters):
    """Values PEFT itself accepts: a float alpha, null flags, an int layer index, a regex target."""
    ok = copy_adapter(
        adapters["plain"], tmp_path / "ok", lora_alpha=8.0, use_rslora=None, fan_in_fan_out=None,
        layers_to_transform=None, target_modules=".*proj", rank_pattern=None, alpha_pattern={"q_proj": 16},
    )
    adapter = load_adapter(ok)
    assert adapter.config["use_rslora"] is False and adapter.config["rank_pattern"] == {}
    scales = {name: module.delta.scale for name, module in adapter.modules.items()}
    assert scales["model.layers.0.self_attn.q_proj"] == 4.0 and scales["model.layers.0.self_attn.k_proj"] == 2.0
    layers = copy_adapter(adapters["some_layers"], tmp_path / "layers", layers_to_transform=1)
    assert load_adapter(layers).config["layers_to_transform"] == [1]


def test_task_types_agree_with_peft():
    from peft.utils.peft_types import TaskType

    assert set(TASK_TYPES) == {t.value for t in TaskType}


def test_nan_alpha_is_refused_by_the_cli_and_nothing_is_written(tmp_path, adapters):
    bad = copy_adapter(adapters["plain"], tmp_path / "bad", lora_alpha=math.nan)
    assert "NaN" in (bad / "adapter_config.json").read_text()  # Python's json writes (and reads) NaN
    out = tmp_path / "out"
    result = run_cli(["combine", str(bad), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.strip().startswith("error:")
    assert "lora_alpha" in result.output and not out.exists()


# ----------------------------------------------------------------------------- 2. pickles


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ([torch.zeros(2, 2)], "holds a list"),
        (torch.zeros(4, 4), "holds a Tensor"),
        ({"a.lora_A.weight": 1, "a.lora_B.weight": 2}, "entry 'a.lora_A.weight' is of type int"),
        ({3: torch.zeros(2, 2)}, "entry 3 is of type Tensor"),
        ({"a.lora_A.weight": {"nested": torch.zeros(1)}}, "is of type dict"),
    ],
)
def test_pickles_that_are_not_a_dict_of_tensors(tmp_path, adapters, payload, problem):
    pickled = copy_adapter(adapters["plain"], tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").unlink()
    torch.save(payload, pickled / "adapter_model.bin")
    message = refused(pickled, pickled / "adapter_model.bin", allow_pickle=True)
    assert problem in message and "dict of tensor names to tensors" in message


def test_pickled_parameters_load_like_tensors(tmp_path, adapters):
    pickled = copy_adapter(adapters["plain"], tmp_path / "pickled")
    tensors = load_file(pickled / "adapter_model.safetensors")
    (pickled / "adapter_model.safetensors").unlink()
    torch.save({k: torch.nn.Parameter(v) for k, v in tensors.items()}, pickled / "adapter_model.bin")
    adapter = load_adapter(pickled, allow_pickle=True)
    assert not any(m.delta.B.requires_grad for m in adapter.modules.values())


# ----------------------------------------------------------------------------- 3. non-floating factors


@pytest.mark.parametrize("dtype", [torch.int16, torch.int64, torch.uint8, torch.bool, torch.float8_e4m3fn])
def test_non_floating_factors_are_refused(tmp_path, adapters, dtype):
    bad = copy_adapter(adapters["plain"], tmp_path / "bad")
    path = bad / "adapter_model.safetensors"
    save_file({k: (v * 100).to(dtype) for k, v in load_file(path).items()}, path)
    assert "LoRA factors must be floating point" in refused(bad, path)


def test_non_floating_pickled_factors_are_refused(tmp_path, adapters):
    bad = copy_adapter(adapters["plain"], tmp_path / "bad")
    tensors = load_file(bad / "adapter_model.safetensors")
    (bad / "adapter_model.safetensors").unlink()
    torch.save({k: v.to(torch.int16) for k, v in tensors.items()}, bad / "adapter_model.bin")
    assert "is int16; LoRA factors must be dense floating point" in refused(
        bad, bad / "adapter_model.bin", allow_pickle=True
    )


# ----------------------------------------------------------------------------- 4. NaN / Inf


def test_nan_factor_names_its_module(tmp_path, adapters):
    bad = copy_adapter(adapters["plain"], tmp_path / "bad")
    path = bad / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.2.mlp.up_proj.lora_A.weight"
    tensors[key][1, 3] = math.nan
    save_file(tensors, path)
    assert "module model.layers.2.mlp.up_proj has NaN or Inf weights" in refused(bad, path)


def test_finite_weights_too_large_for_float32(tmp_path, adapters):
    bad = copy_adapter(adapters["plain"], tmp_path / "bad")
    path = bad / "adapter_model.safetensors"
    tensors = {k: v.double() for k, v in load_file(path).items()}
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"] *= 1e100
    save_file(tensors, path)
    assert "model.layers.0.mlp.up_proj: its scale" in refused(bad, path)
    tensors = load_file(adapters["plain"] / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"] *= 1e30  # finite, its norm is not
    save_file(tensors, path)
    assert "model.layers.0.mlp.up_proj has weights too large to combine" in refused(bad, path)


def test_huge_alpha_overflowing_float32_is_refused(tmp_path, adapters):
    bad = copy_adapter(adapters["plain"], tmp_path / "bad", lora_alpha=1e300)
    assert "overflows float32; is lora_alpha right?" in refused(bad, bad / "adapter_model.safetensors")


def test_writing_refuses_non_finite_values(tmp_path, adapters):
    from lata_peft.outputs import write_atomically
    from lata_peft.writing import save_adapter_files

    modules = dict(load_adapter(adapters["plain"]).modules)
    name = "model.layers.1.self_attn.v_proj"
    module = modules[name]
    modules[name] = type(module)(name, module.delta.scaled(math.inf), module.kind, module.a_shape, module.b_shape)
    out = tmp_path / "out"
    with pytest.raises(LataError, match=f"refusing to write non-finite values: {name}"):
        write_atomically(out, lambda folder: save_adapter_files(folder, modules, {}, torch.float32))
    assert list(tmp_path.iterdir()) == []


def test_combination_overflowing_float16_is_not_written(tmp_path, adapters):
    out = tmp_path / "out"
    result = run_cli(["combine", str(adapters["plain"]), "--weight", "1e7", "--dtype", "float16", "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error: refusing to write non-finite values")
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 5. safetensors headers


def with_header(data: bytes, header: object, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


GOOD_ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
BAD_FILES = {
    "bad_json": (with_header(b"\0" * 16, b"{not json"), "header is not valid JSON"),
    "not_utf8": (with_header(b"\0" * 16, b'{"\xff": 1}'), "header is not valid JSON"),
    "deep_json": (with_header(b"", b"[" * 50_000 + b"]" * 50_000), "header is not valid JSON"),
    "not_object": (with_header(b"", [1, 2]), "header is not a JSON object"),
    "entry_not_object": (with_header(b"", {"a.lora_A.weight": 5}), "is not an object"),
    "unknown_dtype": (with_header(b"\0" * 16, {"a.lora_A.weight": {**GOOD_ENTRY, "dtype": "Q7"}}), "dtype 'Q7'"),
    "list_dtype": (with_header(b"\0" * 16, {"a.lora_A.weight": {**GOOD_ENTRY, "dtype": ["F32"]}}), "dtype ['F32']"),
    "no_dtype": (with_header(b"\0" * 16, {"a.lora_A.weight": {"shape": [2, 2]}}), "dtype None"),
    "offsets_out_of_range": (
        with_header(b"\0" * 16, {"a.lora_A.weight": {**GOOD_ENTRY, "data_offsets": [0, 1 << 70]}}), "data_offsets"),
    "offsets_not_matching_shape": (
        with_header(b"\0" * 16, {"a.lora_A.weight": {**GOOD_ENTRY, "shape": [2, 3]}}), "don't fit shape"),
    "negative_shape": (with_header(b"\0" * 16, {"a.lora_A.weight": {**GOOD_ENTRY, "shape": [-2, -2]}}), "shape"),
    "huge_shape": (with_header(b"\0" * 16, {"a.lora_A.weight": {**GOOD_ENTRY, "shape": [1 << 62, 1 << 62]}}), "shape"),
    "three_offsets": (with_header(b"\0" * 16, {"a.lora_A.weight": {**GOOD_ENTRY, "data_offsets": [0, 8, 16]}}),
                      "data_offsets"),
    "huge_header_length": (with_header(b"", {}, length=(1 << 64) - 1), "header length"),
    "header_longer_than_file": (with_header(b"", {}, length=1000), "header length"),
    "too_short": (b"\x01\x02\x03", "header length"),
    "empty": (b"", "header length"),
    "overlapping_tensors": (with_header(b"\0" * 16, {"a.lora_A.weight": GOOD_ENTRY, "a.lora_B.weight": GOOD_ENTRY}),
                            "corrupt"),
    "hole_after_tensors": (with_header(b"\0" * 32, {"a.lora_A.weight": GOOD_ENTRY}), "corrupt"),
    "bad_metadata": (with_header(b"\0" * 16, {"__metadata__": [1], "a.lora_A.weight": GOOD_ENTRY}), "corrupt"),
    "long_key": (with_header(b"\0" * 16, {LONG: {**GOOD_ENTRY, "dtype": "I8"}}), "dtype 'I8'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_safetensors_headers(tmp_path, adapters, case):
    content, problem = BAD_FILES[case]
    bad = copy_adapter(adapters["plain"], tmp_path / "bad")
    path = bad / "adapter_model.safetensors"
    path.write_bytes(content)
    assert problem in refused(bad, path)


def test_every_truncation_of_a_real_file(tmp_path, adapters):
    bad = copy_adapter(adapters["plain"], tmp_path / "bad")
    path = bad / "adapter_model.safetensors"
    content = path.read_bytes()
    (length,) = struct.unpack("<Q", content[:8])
    for cut in sorted({0, 4, 8, 9, 8 + length // 2, 8 + length - 1, 8 + length, 8 + length + 1, len(content) - 1}):
        path.write_bytes(content[:cut])
        assert "corrupt or truncated" in refused(bad, path)


# ----------------------------------------------------------------------------- shapes and helpers


def test_factor_shapes_that_are_not_a_lora_pair(tmp_path, adapters):
    bad = copy_adapter(adapters["plain"], tmp_path / "bad")
    path = bad / "adapter_model.safetensors"
    original = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    for broken, problem in [
        (original[key][0], "not a LoRA pair"),  # 1-d A
        (original[key][:, :, None, None].expand(-1, -1, 2, 2).contiguous(), "not a LoRA pair"),  # 4-d A, 2-d B
        (original[key][:0], "not a LoRA pair"),  # empty
    ]:
        save_file({**original, key: broken}, path)
        assert problem in refused(bad, path)
    duplicate = key.removesuffix(".weight")
    save_file({**original, duplicate: original[key].clone()}, path)
    assert "are the same LoRA factor" in refused(bad, path)


def test_message_helpers():
    assert shorten("a" * 1000).endswith("…") and len(shorten("a" * 1000)) == 100
    assert shorten(10**5000) == "<int>"  # past Python's digit limit for str()
    assert first_line(ValueError("first\nsecond")) == "first…"
    assert first_line("b" * 300, limit=50) == "b" * 49 + "…"
