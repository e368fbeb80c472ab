"""Reading PEFT LoRA adapter folders (writing them back is ``writing.py``).

An adapter becomes a dict of :class:`LoraModule`, each holding its task vector as a
factored :class:`~lata_peft.lowrank.LowRank` *in weight space*: the delta has the shape
of the base weight it is added to (``(out, in)`` for ``nn.Linear``, ``(in, out)`` for
GPT-2's ``Conv1D`` with ``fan_in_fan_out``, ``(num_embeddings, dim)`` for embeddings,
``(out, in * kh * kw)`` for convolutions). Factors keep their stored dtype; maths
upcasts. Scale per module: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), with
``rank_pattern`` / ``alpha_pattern`` matched by PEFT's own ``get_pattern_key``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import LataError
from .lowrank import LowRank

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
REPORT_NAME = "lata_report.json"
KEY_PREFIX = "base_model.model."
BASE_LAYER_SUFFIX = ".base_layer.weight"  # embedding weights PEFT saves when it targets embeddings
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$"
)
# Fields whose presence means the adapter is more than plain LoRA factors.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA adapters (use_dora=true) are not supported yet",
    "lora_bias": "LoRA bias terms (lora_bias=true) can't be combined as factored deltas",
    "layer_replication": "layer_replication adapters are not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its weight-space delta and how to write it back as PEFT tensors.

    ``kind`` is ``linear``, ``linear_t`` (fan_in_fan_out), ``embedding`` or ``conv``;
    ``a_shape`` / ``b_shape`` are the stored tensor shapes (convolutions need them).
    """

    name: str
    delta: LowRank
    kind: str = "linear"
    a_shape: tuple[int, ...] = ()
    b_shape: tuple[int, ...] = ()


@dataclass
class Adapter:
    """A loaded LoRA adapter: its folder, config, modules and input fingerprint."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    dtype: torch.dtype
    sha256: dict[str, str] = field(default_factory=dict)
    base_layers: dict[str, torch.Tensor] = field(default_factory=dict)
    """Full base weights PEFT saved beside the factors (``save_embedding_layers``): carried through."""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")


# ----------------------------------------------------------------------------- reading


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
    """The first pattern key that matches the end of ``key_to_match`` (PEFT's rule, else the key itself).

    Same rule as ``peft.utils.other.get_pattern_key``, ``re.match(rf"(.*\.)?({key})$", module)``
    (a test checks agreement); kept here so the CLI does not import peft to read a config.
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def resolve_adapter_path(source: str | os.PathLike[str]) -> Path:
    """A local folder as is; a hub id (``owner/name``) downloaded when the hub is reachable."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LataError(f"{path}: not a folder (a PEFT adapter is a folder with {CONFIG_NAME})")
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) and not str(source).startswith("."):
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(
                str(source), allow_patterns=[CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME]
            )
        except Exception as exc:  # offline, unknown repo, auth: one clear line
            raise LataError(
                f"{source}: no such folder, and it could not be fetched from the Hugging Face hub "
                f"({type(exc).__name__}; offline?)"
            ) from None
        return Path(local)
    raise LataError(f"{path}: no such adapter folder")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_config(folder: Path) -> dict[str, Any]:
    """Parse ``adapter_config.json`` and refuse what is not plain LoRA."""
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise LataError(f"{config_path}: missing (not a PEFT adapter folder)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LataError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise LataError(f"{config_path}: expected a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise LataError(f"{config_path}: peft_type is {config.get('peft_type')!r}; only LORA adapters can be combined")
    for key, problem in _UNSUPPORTED_FLAGS.items():
        if config.get(key):
            raise LataError(f"{config_path}: {problem}")
    if config.get("modules_to_save"):
        raise LataError(
            f"{config_path}: modules_to_save={config['modules_to_save']} are full trained weights, "
            "not low-rank task vectors; they can't be combined (remove them from the adapter first)"
        )
    if config.get("bias", "none") != "none":
        raise LataError(f"{config_path}: bias={config['bias']!r} trains bias terms; only bias='none' is supported")
    return config


def read_tensors(folder: Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], Path]:
    """The adapter's tensors from safetensors, or from a pickled ``.bin`` with ``allow_pickle``."""
    safetensors_path = folder / SAFETENSORS_NAME
    pickle_path = folder / PICKLE_NAME
    if safetensors_path.is_file():
        try:
            return load_file(safetensors_path), safetensors_path
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise LataError(f"{safetensors_path}: corrupt or truncated safetensors file ({exc})") from None
    if pickle_path.is_file():
        if not allow_pickle:
            raise LataError(
                f"{pickle_path}: pickled weights can run code when loaded; refused "
                "(convert to safetensors, or pass --allow-pickle to load with weights_only=True)"
            )
        try:
            tensors = torch.load(pickle_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            lines = str(exc).splitlines() or [""]
            reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])
            raise LataError(f"{pickle_path}: could not be read with weights_only=True ({reason})") from None
        return dict(tensors), pickle_path
    raise LataError(f"{folder}: no {SAFETENSORS_NAME} (or {PICKLE_NAME})")


def module_scale(config: dict[str, Any], module: str, rank: int) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA; alpha from ``alpha_pattern`` if it matches."""
    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def expected_rank(config: dict[str, Any], module: str) -> int:
    rank_pattern = config.get("rank_pattern") or {}
    return int(rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", 8)))


def _weight_space(kind: str, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (A, B) tensors -> weight-space factors (B_w, A_w) with ``dW = s * B_w @ A_w``."""
    if kind == "linear":
        return B, A  # (out, r), (r, in)
    if kind in ("linear_t", "embedding"):
        return A.T, B.T  # (in|num_embeddings, r), (r, out|dim)
    return B.reshape(B.shape[0], B.shape[1]), A.reshape(A.shape[0], -1)  # conv


def peft_tensors(module: LoraModule, B_w: torch.Tensor, A_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-space factors -> PEFT's (lora_A, lora_B) tensors for ``module.kind``."""
    rank = A_w.shape[0]
    if module.kind == "linear":
        return A_w, B_w
    if module.kind in ("linear_t", "embedding"):
        return B_w.T, A_w.T
    a_shape = (rank, *module.a_shape[1:])
    b_shape = (B_w.shape[0], rank, *module.b_shape[2:])
    return A_w.reshape(a_shape), B_w.reshape(b_shape)


def _module_kind(embedding: bool, A: torch.Tensor, fan_in_fan_out: bool) -> str:
    if embedding:
        return "embedding"
    if A.ndim > 2:
        return "conv"
    return "linear_t" if fan_in_fan_out else "linear"


def parse_modules(config: dict[str, Any], tensors: dict[str, torch.Tensor], source: Path) -> dict[str, LoraModule]:
    """Group ``<module>.lora_A/lora_B`` tensors into :class:`LoraModule` deltas, checking each."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    embeddings: set[str] = set()
    for key, tensor in tensors.items():
        bare = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
        match = _LORA_KEY.match(bare)
        if match is None:
            if "lora_magnitude_vector" in key:
                raise LataError(f"{source}: DoRA magnitude vectors ({key}) are not supported yet")
            raise LataError(
                f"{source}: tensor {key!r} is not a LoRA factor (modules_to_save or bias weights can't be combined)"
            )
        pairs.setdefault(match["module"], {})[match["part"].replace("embedding_", "")] = tensor
        if match["part"].startswith("lora_embedding"):
            embeddings.add(match["module"])
    modules: dict[str, LoraModule] = {}
    for name, parts in sorted(pairs.items()):
        if "lora_A" not in parts or "lora_B" not in parts:
            missing = "lora_A" if "lora_A" not in parts else "lora_B"
            raise LataError(f"{source}: module {name} has no {missing} tensor")
        A, B = parts["lora_A"], parts["lora_B"]
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise LataError(f"{source}: module {name} has NaN or Inf weights")
        kind = _module_kind(name in embeddings, A, bool(config.get("fan_in_fan_out")))
        rank = A.shape[0]
        consistent = B.ndim >= 2 and B.shape[1] == rank and all(d == 1 for d in B.shape[2:])
        if not consistent:
            shapes = f"A{tuple(A.shape)} B{tuple(B.shape)}"
            raise LataError(f"{source}: module {name} has inconsistent factor shapes {shapes}")
        if rank != expected_rank(config, name):
            raise LataError(
                f"{source}: module {name} has rank {rank} but the config (r / rank_pattern) says "
                f"{expected_rank(config, name)}"
            )
        B_w, A_w = _weight_space(kind, A, B)
        delta = LowRank(B_w, A_w, module_scale(config, name, rank))
        modules[name] = LoraModule(name, delta, kind, tuple(A.shape), tuple(B.shape))
    if not modules:
        raise LataError(f"{source}: holds no LoRA tensors")
    return modules


def load_adapter(source: str | os.PathLike[str], allow_pickle: bool = False) -> Adapter:
    """Load a PEFT LoRA adapter folder (or hub id) as factored weight-space deltas.

    Raises :class:`LataError` naming the file for every bad input: missing or corrupt
    files, non-LoRA types, DoRA, NaN/Inf, pickles without ``allow_pickle``, shapes that
    disagree with the config.
    """
    folder = resolve_adapter_path(source)
    config = read_config(folder)
    tensors, weights_path = read_tensors(folder, allow_pickle)
    base_layers = {key: tensors.pop(key) for key in list(tensors) if key.endswith(BASE_LAYER_SUFFIX)}
    modules = parse_modules(config, tensors, weights_path)
    dtypes = {t.dtype for t in tensors.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    fingerprint = {CONFIG_NAME: _sha256(folder / CONFIG_NAME), weights_path.name: _sha256(weights_path)}
    return Adapter(folder, config, modules, dtype, fingerprint, base_layers)
