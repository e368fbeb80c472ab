"""Streaming safetensors reads (lata_peft.shards.TensorFile): the bytes safetensors itself reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lata_peft import LataError
from lata_peft.shards import ShardWriter, TensorFile

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def test_every_dtype_and_shape_reads_as_safetensors_reads_it(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for index, dtype in enumerate(DTYPES):
        values = torch.randn(3, 5, 2, generator=generator) * 10
        tensors[f"t{index}"] = values > 0 if dtype == torch.bool else values.to(dtype)
    tensors |= {"scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "row": torch.arange(7, dtype=torch.int64)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    expected = load_file(path)
    handle = TensorFile(path)
    assert handle.keys == set(expected)
    for key, tensor in expected.items():
        got = handle.get_tensor(key)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, key
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), key
        assert handle.nbytes[key] == tensor.numel() * tensor.element_size(), key


def test_a_read_is_a_buffer_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4, 4)}, path)
    first = TensorFile(path).get_tensor("w")
    first.add_(1.0)  # writable, and never the file's bytes
    assert torch.equal(load_file(path)["w"], torch.ones(4, 4))


def test_a_file_cut_short_after_opening_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(64), "b": torch.ones(64)}, path)
    handle = TensorFile(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LataError, match=r"model\.safetensors: truncated"):
        handle.get_tensor("b")


def _tensors() -> dict[str, torch.Tensor]:
    """Every dtype safetensors writes, shapes from 0-d to 3-d and empty, names out of order."""
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for index, dtype in enumerate([torch.float32, torch.bfloat16, torch.uint8, torch.float16, torch.int64,
                                   torch.bool, torch.float64, torch.int8, torch.int32, torch.int16,
                                   torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32]):
        values = torch.randn(3, 5, 2, generator=generator) * 7
        tensors[f"z.{index}.weight"] = values.to(dtype)
        tensors[f"a.{index}.bias"] = values[0, :, 0].to(dtype).clone(memory_format=torch.contiguous_format)
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["m.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b'{"quant_type": "nf4"}'), dtype=torch.uint8)
    return tensors


def test_streamed_shard_is_save_file_byte_for_byte(tmp_path: Path, monkeypatch) -> None:
    """The writer streams each tensor to disk as it comes and lays the shard out as ``save_file`` does."""
    tensors = _tensors()
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    for kernel_copy in (True, False):
        if not kernel_copy:  # a file system without copy_file_range: the user-space copy
            monkeypatch.setattr("os.copy_file_range", lambda *args: (_ for _ in ()).throw(OSError(95, "no")))
        folder = tmp_path / f"out{kernel_copy}"
        folder.mkdir()
        writer = ShardWriter(folder, {"format": "pt"})
        for key, tensor in tensors.items():
            writer.add(key, tensor)
        writer.finish()
        assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]
        assert (folder / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_streamed_shards_split_and_index(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("lata_peft.shards.SHARD_BYTES", 100)
    tensors = _tensors()
    writer = ShardWriter(tmp_path, {"format": "pt"})
    for key, tensor in tensors.items():
        writer.add(key, tensor)
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 3 and set(index["weight_map"].values()) == set(files)
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob("*.tmp"))
    loaded = {key: value for name in files for key, value in load_file(tmp_path / name).items()}
    assert loaded.keys() == tensors.keys() and index["weight_map"].keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and loaded[key].shape == tensor.shape
        assert torch.equal(loaded[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
