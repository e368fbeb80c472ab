"""Reading and writing PEFT LoRA adapter folders: the only code that touches adapter files.

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
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

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


# ----------------------------------------------------------------------------- writing


def write_atomically(out: Path, fill: Callable[[Path], None], overwrite: bool = False) -> None:
    """Build the folder ``out`` in a temporary sibling, then rename it into place.

    An interrupted run leaves no half-written ``out``; an existing ``out`` is replaced
    only with ``overwrite`` and only once the new folder is complete.
    """
    out = out.expanduser().resolve()
    if out.exists() and not overwrite:
        raise LataError(f"{out}: already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(staging)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(staging, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def adapter_tensors(modules: dict[str, LoraModule], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT state-dict tensors (``base_model.model.<module>.lora_A.weight`` ...) in ``dtype``."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in sorted(modules.items()):
        B_w, A_w = module.delta.balanced()
        lora_A, lora_B = peft_tensors(module, B_w, A_w)
        if module.kind == "embedding":
            a_key, b_key = f"{KEY_PREFIX}{name}.lora_embedding_A", f"{KEY_PREFIX}{name}.lora_embedding_B"
        else:
            a_key, b_key = f"{KEY_PREFIX}{name}.lora_A.weight", f"{KEY_PREFIX}{name}.lora_B.weight"
        tensors[a_key] = lora_A.to(dtype).contiguous()
        tensors[b_key] = lora_B.to(dtype).contiguous()
    return tensors


def shared_base_layers(adapters: list[Adapter]) -> dict[str, torch.Tensor]:
    """The union of the inputs' saved base layers; the same key must hold the same tensor everywhere."""
    merged: dict[str, tuple[Adapter, torch.Tensor]] = {}
    for adapter in adapters:
        for key, tensor in adapter.base_layers.items():
            if key in merged and not torch.equal(merged[key][1], tensor):
                raise LataError(f"{adapter.path}: its saved {key} differs from the one in {merged[key][0].path} "
                                "(resized vocabularies?); these adapters can't share one output")
            merged.setdefault(key, (adapter, tensor))
    return {key: tensor for key, (_, tensor) in merged.items()}


def save_adapter_files(
    folder: Path,
    modules: dict[str, LoraModule],
    config: dict[str, Any],
    dtype: torch.dtype,
    report: dict[str, Any] | None = None,
    base_layers: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``adapter_config.json``, ``adapter_model.safetensors`` and the report into ``folder``."""
    metadata = {"format": "pt", "producer": "lata-peft"}
    tensors = {**adapter_tensors(modules, dtype), **(base_layers or {})}
    save_file(tensors, folder / SAFETENSORS_NAME, metadata=metadata)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if report is not None:
        (folder / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")


def output_config(adapters: list[Adapter], modules: dict[str, LoraModule]) -> dict[str, Any]:
    """The ``adapter_config.json`` for what is written, never a copy of an input's.

    Factors carry their scale, so every module has ``alpha == r`` (scale 1): ``r`` and
    ``lora_alpha`` are the most common rank, ``rank_pattern`` / ``alpha_pattern`` list the
    modules of other ranks by full name. ``target_modules`` is the list of module suffixes
    when the inputs target by suffix and every input module is written; otherwise a regex
    that matches exactly the written modules (PEFT ``fullmatch``es a string).
    """
    from peft import LoraConfig

    ranks = {name: module.delta.rank for name, module in modules.items()}
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: rank for name, rank in ranks.items() if rank != common}
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in modules})
    inputs_cover = {name for a in adapters for name in a.modules} == set(modules)
    by_suffix = all(_targets_by_suffix(a) and a.config.get("layers_to_transform") is None for a in adapters)
    if inputs_cover and by_suffix:
        target_modules: list[str] | str = suffixes
    else:
        target_modules = "^(?:" + "|".join(re.escape(name) for name in sorted(modules)) + ")$"
    first = adapters[0].config
    config = LoraConfig(
        r=common,
        lora_alpha=common,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=target_modules,
        fan_in_fan_out=bool(first.get("fan_in_fan_out", False)),
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
        task_type=first.get("task_type"),
        inference_mode=True,
    )
    config.base_model_name_or_path = adapters[0].base_model
    return _json_ready(config.to_dict())


def _targets_by_suffix(adapter: Adapter) -> bool:
    """True when the adapter's own ``target_modules`` is a list of names (not a regex)."""
    return isinstance(adapter.config.get("target_modules"), list)


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        items = [_json_ready(v) for v in value]
        return sorted(items) if isinstance(value, set) else items
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):
        return value.value  # enums such as TaskType / PeftType
    return value
