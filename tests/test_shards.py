"""Streaming safetensors reads (lata_peft.shards.TensorFile): the bytes safetensors itself reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lata_peft import LataError
from lata_peft.shards import TensorFile

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
