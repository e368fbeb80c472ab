"""Every bad input: exit code 2, one line naming the file, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lata_peft.cli import app

runner = CliRunner()


def copy_adapter(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


def edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def edit_tensors(folder: Path, change) -> Path:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    return folder


def assert_refused(tmp_path: Path, args: list[str], names: str) -> str:
    out = tmp_path / "combined"
    result = runner.invoke(app, ["combine", *args, "-o", str(out)])
    message = result.output.strip()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(message.splitlines()) == 1, message
    assert message.startswith("error:")
    assert names in message, message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".combined")]  # no temp folder left
    return message


def _nan(tensors):
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")


def _inf(tensors):
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key][0, 0] = float("inf")


def _dora(tensors):
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key.replace("lora_B.weight", "lora_magnitude_vector")] = torch.ones(4)


def _modules_to_save(tensors):
    tensors["base_model.model.lm_head.modules_to_save.weight"] = torch.zeros(96, 32)


def _wrong_shape(tensors):
    key = next(k for k in tensors if "q_proj.lora_B" in k)
    tensors[key] = torch.zeros(40, tensors[key].shape[1])


def _missing_b(tensors):
    del tensors[next(k for k in tensors if "lora_B" in k)]


BROKEN_TENSORS = {
    "nan": (_nan, "NaN or Inf"),
    "inf": (_inf, "NaN or Inf"),
    "dora_tensor": (_dora, "DoRA"),
    "extra_weights": (_modules_to_save, "not a LoRA factor"),
    "missing_b": (_missing_b, "no lora_B"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_TENSORS))
def test_broken_tensors(tmp_path, adapters, case):
    change, problem = BROKEN_TENSORS[case]
    bad = edit_tensors(copy_adapter(adapters["plain"], tmp_path / "bad"), change)
    message = assert_refused(tmp_path, [str(adapters["rank8"]), str(bad)], str(bad))
    assert problem in message


BROKEN_CONFIGS = {
    "not_lora": ({"peft_type": "IA3"}, "only LORA"),
    "dora": ({"use_dora": True}, "DoRA"),
    "modules_to_save": ({"modules_to_save": "lm_head"}, "modules_to_save must be a list"),
    "bias": ({"bias": "some"}, "bias='some' is not one of none, lora_only, all"),
    "rank_mismatch": ({"r": 5}, "rank 4 but the config"),
    "layer_replication": ({"layer_replication": [[0, 1], [0, 1]]}, "layer_replication"),
    "target_parameters": ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CONFIGS))
def test_broken_configs(tmp_path, adapters, case):
    changes, problem = BROKEN_CONFIGS[case]
    bad = edit_config(copy_adapter(adapters["plain"], tmp_path / "bad"), **changes)
    message = assert_refused(tmp_path, [str(bad)], str(bad))
    assert problem in message


def test_missing_folder_and_files(tmp_path, adapters):
    assert_refused(tmp_path, [str(tmp_path / "nowhere")], "nowhere")
    no_config = copy_adapter(adapters["plain"], tmp_path / "no_config")
    (no_config / "adapter_config.json").unlink()
    assert_refused(tmp_path, [str(no_config)], str(no_config / "adapter_config.json"))
    no_weights = copy_adapter(adapters["plain"], tmp_path / "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    assert_refused(tmp_path, [str(no_weights)], str(no_weights))
    bad_json = copy_adapter(adapters["plain"], tmp_path / "bad_json")
    (bad_json / "adapter_config.json").write_text("{not json")
    assert "not valid JSON" in assert_refused(tmp_path, [str(bad_json)], str(bad_json / "adapter_config.json"))


def test_truncated_and_corrupt_safetensors(tmp_path, adapters):
    truncated = copy_adapter(adapters["plain"], tmp_path / "truncated")
    path = truncated / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "corrupt or truncated" in assert_refused(tmp_path, [str(truncated)], str(path))
    garbage = copy_adapter(adapters["plain"], tmp_path / "garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    assert_refused(tmp_path, [str(garbage)], str(garbage / "adapter_model.safetensors"))


def test_shapes_that_disagree(tmp_path, adapters):
    other = edit_tensors(copy_adapter(adapters["plain"], tmp_path / "other"), _wrong_shape)
    message = assert_refused(tmp_path, [str(adapters["rank8"]), str(other)], str(other))
    assert "q_proj" in message


def test_pickled_weights_need_allow_pickle(tmp_path, adapters):
    pickled = copy_adapter(adapters["plain"], tmp_path / "pickled")
    tensors = load_file(pickled / "adapter_model.safetensors")
    (pickled / "adapter_model.safetensors").unlink()
    torch.save(tensors, pickled / "adapter_model.bin")
    assert "--allow-pickle" in assert_refused(tmp_path, [str(pickled)], str(pickled / "adapter_model.bin"))
    out = tmp_path / "ok"
    result = runner.invoke(app, ["combine", str(pickled), "--allow-pickle", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "adapter_model.safetensors").is_file()


def test_pickle_with_code_is_refused_even_with_allow_pickle(tmp_path, adapters):
    pickled = copy_adapter(adapters["plain"], tmp_path / "evil")
    (pickled / "adapter_model.safetensors").unlink()
    torch.save({"x": shutil.rmtree}, pickled / "adapter_model.bin")  # not loadable with weights_only=True
    assert_refused(tmp_path, [str(pickled), "--allow-pickle"], str(pickled / "adapter_model.bin"))


def test_different_base_models_warn_or_refuse_with_strict(tmp_path, adapters):
    other = edit_config(copy_adapter(adapters["plain"], tmp_path / "other_base"), base_model_name_or_path="gpt2")
    message = assert_refused(tmp_path, [str(adapters["rank8"]), str(other), "--strict"], str(other))
    assert "base_model_name_or_path" in message
    out = tmp_path / "lenient"
    result = runner.invoke(app, ["combine", str(adapters["rank8"]), str(other), "-o", str(out)])
    assert result.exit_code == 0
    assert "warning:" in result.output and "gpt2" in result.output


def test_output_exists_or_is_an_input(tmp_path, adapters):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["combine", str(adapters["plain"]), "-o", str(existing)])
    assert result.exit_code == 2 and "already exists" in result.output and str(existing) in result.output
    assert (existing / "keep.txt").read_text() == "mine"
    result = runner.invoke(app, ["combine", str(adapters["plain"]), "-o", str(existing), "--overwrite"])
    assert result.exit_code == 2 and "not a lata-peft output" in result.output  # a user's folder is never replaced
    assert (existing / "keep.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    assert runner.invoke(app, ["combine", str(adapters["plain"]), "-o", str(ours)]).exit_code == 0
    result = runner.invoke(app, ["combine", str(adapters["rank8"]), "-o", str(ours), "--overwrite"])
    assert result.exit_code == 0 and "rank8" in (ours / "lata_report.json").read_text()
    target = copy_adapter(adapters["plain"], tmp_path / "input")
    before = (target / "adapter_model.safetensors").read_bytes()
    result = runner.invoke(app, ["combine", str(target), "-o", str(target), "--overwrite"])
    assert result.exit_code == 2 and "would overwrite the input" in result.output
    assert (target / "adapter_model.safetensors").read_bytes() == before


def test_bad_options(tmp_path, adapters):
    for args, problem in [
        (["--rank", "energy:2"], "--rank"),
        (["--method", "slerp"], "--method"),
        (["--method", "lata"], "instruction"),
        (["--dtype", "int8"], "--dtype"),
        (["--weight", "1", "--weight", "2", "--weight", "3"], "--weight"),
    ]:
        out = tmp_path / "o"
        result = runner.invoke(app, ["combine", str(adapters["plain"]), str(adapters["rank8"]), *args, "-o", str(out)])
        assert result.exit_code == 2, (args, result.output)
        assert problem in result.output and not out.exists()


def test_interrupted_write_leaves_nothing(tmp_path, adapters, monkeypatch):
    import lata_peft.writing as adapter_io

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(adapter_io, "save_file", explode)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        import lata_peft

        lata_peft.combine([adapters["plain"]], out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_hub_id_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = assert_refused(tmp_path, ["some-user/some-lora"], "some-user/some-lora")
    assert "Hugging Face hub" in message


def test_combining_adapters_whose_saved_embeddings_differ(tmp_path, adapters):
    other = copy_adapter(adapters["embedding"], tmp_path / "resized")

    def resize(tensors):
        key = next(k for k in tensors if k.endswith("base_layer.weight"))
        tensors[key] = tensors[key] + 1.0

    edit_tensors(other, resize)
    assert_refused(tmp_path, [str(adapters["embedding"]), str(other)], "base_layer.weight")


def test_catastrophic_rank_pattern_is_refused_not_a_hang(tmp_path, adapters):
    """``(.|.)*[0-9]{9}`` backtracks exponentially on a module name (Python's ``re`` runs for
    hours; PEFT would hang loading this config): refused after the pattern time limit."""
    bad = edit_config(copy_adapter(adapters["plain"], tmp_path / "bad"), rank_pattern={r"(.|.)*[0-9]{9}": 4})
    message = assert_refused(tmp_path, [str(bad)], str(bad / "adapter_config.json"))
    assert "catastrophic backtracking" in message


def test_module_without_block_index_names_its_adapter(tmp_path, adapters):
    def rename(tensors):
        for key in [k for k in tensors if ".layers.0." in k]:
            tensors[key.replace("model.layers.0.", "model.stack0.")] = tensors.pop(key)

    bad = edit_tensors(copy_adapter(adapters["plain"], tmp_path / "bad"), rename)
    edit_config(bad, target_modules=None)
    message = assert_refused(tmp_path, [str(adapters["plain"]), str(bad)], str(bad))
    assert "no transformer block index" in message and "--layer-regex" in message


@pytest.mark.parametrize("errno_name", ["EROFS", "ENOSPC", "EACCES"])
def test_write_failures_are_one_line_and_leave_nothing(tmp_path, adapters, monkeypatch, errno_name):
    """A read-only, full or forbidden disk found while writing (root ignores permissions, so the
    failure is injected where the bytes are written)."""
    import errno
    import os

    import lata_peft.writing as writing

    def fail(*args, **kwargs):
        code = getattr(errno, errno_name)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(writing, "save_file", fail)
    message = assert_refused(tmp_path, [str(adapters["plain"])], str(tmp_path / "combined"))
    assert os.strerror(getattr(errno, errno_name)) in message and "nothing was written" in message
