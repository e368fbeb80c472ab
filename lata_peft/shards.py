"""Streaming safetensors: read a model one tensor at a time, write it back in bounded shards.

Peak memory is the tensor in hand, never a shard nor a whole model: each tensor's bytes go to
the shard's data file as it is added, and the shard is assembled file to file. A tensor of
``SHARD_BYTES`` or more that is written unchanged (an 8B model's 1 GB embedding or head) is
copied file to file into a shard of its own, never held in memory. Side files (tokenizer,
generation config, ...) are copied as they are.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from .errors import LataError
from .models import WEIGHT_FILES

__all__ = ["SHARD_BYTES", "ShardWriter", "TensorFile", "copy_side_files", "iter_tensors", "release_memory"]

SHARD_BYTES = 256 * 1024**2  # output shard size (the data of a shard is streamed to disk, not held)
COPY_CHUNK = 64 * 1024**2


class TensorFile:
    """One safetensors file, read one tensor at a time with plain reads, never memory-mapped.

    A mapping of a multi-GB shard leaves every page read through it resident in the process
    (file-backed RSS), and a mapped tensor cloned into memory is held twice while it is copied;
    reading a tensor's bytes straight into its own buffer holds it once.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with safe_open(path, framework="pt") as handle:  # validates the header and the data offsets
                self.keys = set(handle.keys())
                self.nbytes = {key: _nbytes(handle.get_slice(key)) for key in self.keys}
            with path.open("rb") as file:
                length = int.from_bytes(file.read(8), "little")
                self._header = json.loads(file.read(length))
        except (SafetensorError, OSError, ValueError) as exc:
            raise LataError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
        self._data_start = 8 + length

    def location(self, key: str) -> tuple[dict, int]:
        """``({"dtype", "shape", "data_offsets"}, start of the data section)`` of ``key`` from the file's header
        (safetensors format: an 8-byte little-endian header length, the JSON header, then the data)."""
        return self._header[key], self._data_start

    def get_tensor(self, key: str) -> torch.Tensor:
        """``key``'s tensor in a buffer of its own, read from the file with one ``readinto``."""
        entry, data_start = self.location(key)
        begin, end = entry["data_offsets"]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with self.path.open("rb", buffering=0) as file:
            file.seek(data_start + begin)
            view, done = memoryview(buffer.numpy()), 0
            while done < len(view):
                read = file.readinto(view[done:])
                if not read:
                    raise LataError(f"{self.path}: truncated safetensors file ({key} ends past the end of the file)")
                done += read
        return buffer.view(_TORCH_DTYPES[entry["dtype"]]).reshape(entry["shape"])


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
                 "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _nbytes(tensor_slice: object) -> int:
    """Bytes of one stored tensor, from its header (shape and dtype; nothing is read)."""
    count = 1
    for size in tensor_slice.get_shape():  # type: ignore[attr-defined]
        count *= size
    return count * _DTYPE_BYTES.get(tensor_slice.get_dtype(), 1)  # type: ignore[attr-defined]


def iter_tensors(files: list[TensorFile]) -> Iterator[tuple[str, TensorFile]]:
    """``(key, file)`` for every tensor of the base, file by file, in sorted key order."""
    for tensor_file in files:
        for key in sorted(tensor_file.keys):
            yield key, tensor_file


def release_memory() -> None:
    """Give freed heap back to the OS (glibc keeps large freed blocks otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


_WRITE_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
                "BF16", "I32", "U32", "F32", "F64", "I64", "U64")
"""safetensors' ``Dtype`` in declaration order: ``save_file`` lays tensors out by dtype, last first, then by name."""
_SAFETENSORS_DTYPES = {dtype: name for name, dtype in _TORCH_DTYPES.items()}


class ShardWriter:
    """Writes ``model-XXXXX.safetensors`` shards plus the index, streaming: each tensor's bytes go to the
    shard's data file as they are added (nothing is buffered), and :meth:`flush` writes the shard, header
    then data in ``safetensors.torch.save_file``'s layout and bytes, the data copied file to file in the
    kernel (``os.copy_file_range``)."""

    def __init__(self, folder: Path, metadata: dict[str, str]) -> None:
        self.folder, self.metadata = folder, metadata
        self.pending: dict[str, tuple[str, list[int], int, int]] = {}  # key: (dtype, shape, start, end) in _data
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.bytes_written = 0
        self._data: BinaryIO | None = None

    def _data_path(self) -> Path:
        return self.folder / f"shard-{len(self.shards):05d}.data"

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if self._data is None:
            self._data = self._data_path().open("wb")
        tensor = tensor.detach().cpu().contiguous()
        size = tensor.numel() * tensor.element_size()
        if size:
            self._data.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self.pending[key] = (_SAFETENSORS_DTYPES[tensor.dtype], list(tensor.shape), self.pending_bytes,
                             self.pending_bytes + size)
        self.pending_bytes += size
        if self.pending_bytes >= SHARD_BYTES:
            self.flush()

    def copy(self, key: str, source: TensorFile) -> None:
        """``key`` of ``source``, unchanged, as a shard of its own: header written, bytes copied in chunks."""
        self.flush()
        entry, data_start = source.location(key)
        begin, end = entry["data_offsets"]
        header = {key: {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [0, end - begin]},
                  "__metadata__": self.metadata}
        with source.path.open("rb") as reader, (self.folder / f"shard-{len(self.shards):05d}.tmp").open("wb") as out:
            out.write(_header_bytes(header))
            out.flush()
            _copy_range(reader, data_start + begin, out, end - begin, source.path, key)
        self.shards.append([key])
        self.bytes_written += end - begin

    def flush(self) -> None:
        """The pending tensors as one shard: ``save_file``'s order (dtype, last declared first, then name),
        its compact JSON header padded with spaces to 8 bytes, then the data."""
        if not self.pending:
            return
        assert self._data is not None
        self._data.close()
        order = sorted(self.pending, key=lambda key: (-_WRITE_ORDER.index(self.pending[key][0]), key))
        header: dict[str, object] = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for key in order:
            dtype, shape, start, end = self.pending[key]
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + end - start]}
            offset += end - start
        data = self._data_path()
        with data.open("rb") as reader, (self.folder / f"shard-{len(self.shards):05d}.tmp").open("wb") as out:
            out.write(_header_bytes(header))
            out.flush()
            for key in order:
                _, _, start, end = self.pending[key]
                _copy_range(reader, start, out, end - start, data, key)
        data.unlink()
        self.shards.append(list(self.pending))
        self.bytes_written += self.pending_bytes
        self.pending, self.pending_bytes, self._data = {}, 0, None

    def finish(self) -> None:
        self.flush()
        if len(self.shards) == 1:
            os.replace(self.folder / "shard-00000.tmp", self.folder / "model.safetensors")
            return
        weight_map = {}
        for index, keys in enumerate(self.shards):
            name = f"model-{index + 1:05d}-of-{len(self.shards):05d}.safetensors"
            os.replace(self.folder / f"shard-{index:05d}.tmp", self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index_file = {"metadata": {"total_size": self.bytes_written}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))


def _header_bytes(header: dict[str, object]) -> bytes:
    """The 8-byte little-endian length and the compact JSON header, padded with spaces so the data starts
    8-byte aligned, as safetensors writes it."""
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _copy_range(reader: BinaryIO, start: int, out: BinaryIO, count: int, source: Path, key: str) -> None:
    """``count`` bytes of ``reader`` from ``start`` appended to ``out``: in the kernel where it can
    (``os.copy_file_range``), else read and written ``COPY_CHUNK`` at a time."""
    done = 0
    try:
        while done < count:
            copied = os.copy_file_range(reader.fileno(), out.fileno(), count - done, start + done)
            if not copied:
                break
            done += copied
    except (AttributeError, OSError):  # not Linux, or a file system without it: copy in user space
        out.seek(0, os.SEEK_END)
    reader.seek(start + done)
    while done < count:
        chunk = reader.read(min(COPY_CHUNK, count - done))
        if not chunk:
            raise LataError(f"{source}: truncated safetensors file (tensor {key})")
        out.write(chunk)
        done += len(chunk)


def copy_side_files(base: Path, folder: Path) -> None:
    """Tokenizer, generation config, chat template...: every small non-weight file of the base."""
    for path in base.iterdir():
        if path.is_file() and not WEIGHT_FILES.match(path.name) and path.name != "model.safetensors.index.json" \
                and path.suffix not in (".bin", ".pt", ".pth", ".gguf") and not path.name.startswith("."):
            shutil.copy2(path, folder / path.name)
