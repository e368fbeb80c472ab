"""Reading PEFT LoRA adapter folders (writing them back is ``writing.py``).

An adapter becomes a dict of :class:`LoraModule`, each holding its task vector as a
factored :class:`~lata_peft.lowrank.LowRank` *in weight space*: the delta has the shape
of the base weight it is added to (``(out, in)`` for ``nn.Linear``, ``(in, out)`` for
GPT-2's ``Conv1D`` with ``fan_in_fan_out``, ``(num_embeddings, dim)`` for embeddings,
``(out, in * kh * kw)`` for convolutions). Factors keep their stored dtype; maths
upcasts. Scale per module: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), with
``rank_pattern`` / ``alpha_pattern`` matched by PEFT's own ``get_pattern_key``. A DoRA module
(``use_dora``) also holds its magnitude vector; its task vector needs the base weight
(:mod:`lata_peft.dora`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import regex
import torch

from .adapter_config import DEFAULT_ALPHA, DEFAULT_R, check_config
from .adapter_formats import KEY_PREFIX, normalize
from .adapter_weights import check_factor_values, check_floating, factor_norms, read_pickle, read_safetensors
from .dora import MAGNITUDE_KEY, dora_delta, magnitude_length
from .dtypes import all_finite
from .errors import LataError, first_line, shorten
from .full_weights import parameter_module, parameter_name, saved_modules, saves
from .hub import is_hub_id, snapshot
from .lowrank import LowRank

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
BASE_LAYER_SUFFIX = ".base_layer.weight"  # embedding weights PEFT saves when it targets embeddings
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$"
)
@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its weight-space delta and how to write it back as PEFT tensors.

    ``kind`` is ``linear``, ``linear_t`` (fan_in_fan_out), ``embedding`` or ``conv``;
    ``a_shape`` / ``b_shape`` are the stored tensor shapes (convolutions need them). ``bias``
    is the bias delta of a ``lora_bias`` adapter, scale included: ``s * lora_B.bias``.
    ``magnitude`` is a DoRA module's ``m`` (flattened, one per output feature): its task vector is
    then :func:`~lata_peft.dora.dora_delta`, not ``delta``. ``exact``, on a combined module whose
    factors are a truncation of a dense merge, gives the exact delta from the base weight ``W``
    (a fold adds that, not the factors).
    """

    name: str
    delta: LowRank
    kind: str = "linear"
    a_shape: tuple[int, ...] = ()
    b_shape: tuple[int, ...] = ()
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    exact: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False, repr=False)

    @property
    def needs_base(self) -> bool:
        """True when the task vector depends on the base weight (DoRA, or an exact dense merge)."""
        return self.magnitude is not None or self.exact is not None

    def task_vector(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The exact dense (fp32, weight-space) delta: ``exact(W)``, DoRA's ``m (W + sBA) / ||W + sBA|| - W``
        or ``s B A``; ``weight`` is the base weight ``W``, needed when :attr:`needs_base`."""
        if not self.needs_base:
            return self.delta.dense()
        if weight is None:
            raise LataError(f"module {_name(self.name)}: its task vector needs the base weight (pass --base BASE)")
        if self.exact is not None:
            return self.exact(weight)
        assert self.magnitude is not None
        return dora_delta(weight, self.delta, self.magnitude, self.kind, _name(self.name))


@dataclass
class Adapter:
    """A loaded LoRA adapter: its folder, config, modules and input fingerprint."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    dtype: torch.dtype
    digests: dict[str, Future[str] | str] = field(default_factory=dict)
    """sha256 of each input file by name, hashed in the background (:func:`_hash_in_background`)."""
    base_layers: dict[str, torch.Tensor] = field(default_factory=dict)
    """Full base weights PEFT saved beside the factors (``save_embedding_layers``): carried through."""
    full: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)
    """Full trained parameters by model parameter name (``score.weight``), with their saved key: ``modules_to_save``
    weights and biases trained with ``bias="all"|"lora_only"``; their task vector is ``saved - base``."""
    warnings: tuple[str, ...] = ()
    """What the reader noticed but did not refuse (e.g. trained against a 4-bit base)."""

    @property
    def sha256(self) -> dict[str, str]:
        """sha256 hex digest of each input file by name (waits for the background hashing)."""
        return {name: value.result() if isinstance(value, Future) else value for name, value in self.digests.items()}

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")


# ----------------------------------------------------------------------------- reading


PATTERN_TIMEOUT_S = 1.0
"""Longest time one rank/alpha pattern may take to match one module name (a crafted regex can
backtrack for hours; PEFT's ``re`` has no time limit, ``regex`` has)."""


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
    """The first pattern key that matches the end of ``key_to_match`` (PEFT's rule, else the key itself).

    Same rule as ``peft.utils.other.get_pattern_key``, ``re.match(rf"(.*\.)?({key})$", module)``
    (a test checks agreement); kept here so the CLI does not import peft to read a config. Matched
    with ``regex`` (``re``-compatible) under :data:`PATTERN_TIMEOUT_S`: catastrophic backtracking
    is a :class:`LataError`, not a hang.
    """
    for key in pattern_keys:
        try:
            if regex.match(rf"(.*\.)?({key})$", key_to_match, timeout=PATTERN_TIMEOUT_S):
                return key
        except TimeoutError:
            raise LataError(f"pattern {shorten(key, 60)} takes over {PATTERN_TIMEOUT_S:g} s to match module "
                            f"{_name(key_to_match)} (catastrophic backtracking)") from None
        except regex.error as exc:
            raise LataError(f"pattern {shorten(key, 60)} is not a valid regex ({exc})") from None
    return key_to_match


def resolve_adapter_path(source: str | os.PathLike[str]) -> Path:
    """A local folder as is; a hub id (``owner/name``) downloaded when the hub is reachable."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LataError(f"{path}: not a folder (a PEFT adapter is a folder with {CONFIG_NAME})")
        return path
    if is_hub_id(str(source)):
        return snapshot(str(source), [CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME])
    raise LataError(f"{path}: no such adapter folder")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_HASHING = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lata-peft-sha256")


def _hash_in_background(path: Path) -> Future[str]:
    """``path``'s sha256 on a worker thread: hashlib releases the GIL on 1 MiB updates and the factored maths
    runs on one thread, so on a second core the report's fingerprints cost no wall time (0.13 s of a 7B
    rank-16 combine's 3 s, ``benchmarks/bench_combine_7b.py``)."""
    return _HASHING.submit(_sha256, path)


def read_config_json(folder: Path) -> Any:
    """``adapter_config.json`` parsed, not yet checked (a missing or unreadable file is one line)."""
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise LataError(f"{config_path}: missing (not a PEFT adapter folder)")
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, ints past the digit limit, deep nesting
        raise LataError(f"{config_path}: not valid JSON ({first_line(exc)})") from None
    except OSError as exc:
        raise LataError(f"{config_path}: can't be read ({first_line(exc)})") from None


def read_tensors(folder: Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], Path]:
    """The adapter's tensors from safetensors, or from a pickled ``.bin`` with ``allow_pickle``.

    Every tensor is dense floating point (float16, bfloat16, float32 or float64), else one
    :class:`LataError` line; so is every malformed file (see ``adapter_weights``).
    """
    safetensors_path = folder / SAFETENSORS_NAME
    pickle_path = folder / PICKLE_NAME
    if safetensors_path.is_file():
        tensors, path = read_safetensors(safetensors_path), safetensors_path
    elif pickle_path.is_file():
        if not allow_pickle:
            raise LataError(
                f"{pickle_path}: pickled weights can run code when loaded; refused "
                "(convert to safetensors, or pass --allow-pickle to load with weights_only=True)"
            )
        tensors, path = read_pickle(pickle_path), pickle_path
    else:
        raise LataError(f"{folder}: no {SAFETENSORS_NAME} (or {PICKLE_NAME})")
    check_floating(tensors, path)
    return tensors, path


def module_scale(config: dict[str, Any], module: str, rank: int) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA; alpha from ``alpha_pattern`` if it matches."""
    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", DEFAULT_ALPHA))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def expected_rank(config: dict[str, Any], module: str) -> int:
    """The rank the config gives ``module``: ``rank_pattern`` if a key matches, else ``r``."""
    rank_pattern = config.get("rank_pattern") or {}
    return int(rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", DEFAULT_R)))


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


CONV1D_MODULE = re.compile(r"(?:^|\.)h\.\d+\.(?:attn|crossattention|mlp)\.(?:c_attn|q_attn|c_proj|c_fc)$")
"""GPT-2-style ``transformers.pytorch_utils.Conv1D`` layers (GPT-2, DistilGPT-2, DialoGPT, ImageGPT...)."""


def _module_kind(name: str, embedding: bool, A: torch.Tensor) -> str:
    """How PEFT applies the module, from the architecture, not the config flag.

    PEFT forces ``fan_in_fan_out`` on for ``Conv1D`` and off for ``nn.Linear`` when it loads
    (``peft/tuners/lora/layer.py``, ``dispatch_default``), whatever the saved config says, so
    adapters of one GPT-2 saved with ``fan_in_fan_out: false`` and ``true`` hold the same deltas.
    """
    if embedding:
        return "embedding"
    if A.ndim > 2:
        return "conv"
    return "linear_t" if CONV1D_MODULE.search(name) else "linear"


def _name(name: str) -> str:
    """A module or tensor name for a message, cut to 100 characters."""
    return first_line(name, 100)


def _pair_factors(tensors: dict[str, torch.Tensor], source: Path) -> tuple[dict[str, dict[str, str]], set[str]]:
    """``{module: {"lora_A": key, "lora_B": key}}`` and the embedding modules, from the tensor keys."""
    pairs: dict[str, dict[str, str]] = {}
    embeddings: set[str] = set()
    for key in tensors:
        bare = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
        match = _LORA_KEY.match(bare)
        if match is None:
            raise LataError(
                f"{source}: tensor {shorten(key)} is not a LoRA factor, and the config names no "
                "modules_to_save or bias training that would explain it"
            )
        part = match["part"].replace("embedding_", "")
        parts = pairs.setdefault(match["module"], {})
        if part in parts:
            raise LataError(f"{source}: tensors {_name(parts[part])} and {_name(key)} are the same LoRA factor")
        parts[part] = key
        if match["part"].startswith("lora_embedding"):
            embeddings.add(match["module"])
    return pairs, embeddings


def split_saved_tensors(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], source: Path
) -> tuple[dict[str, tuple[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Take out of ``tensors`` what is not a LoRA factor but PEFT saves on purpose.

    Returns ``{parameter name: (saved key, tensor)}`` of full trained parameters (the
    ``modules_to_save`` modules' tensors; biases with ``bias="all"|"lora_only"``) and
    ``{module: lora_B.bias}`` (``lora_bias=True``). What is left should be LoRA factors.
    """
    saved = saved_modules(config)
    trains_bias = config.get("bias", "none") != "none"
    full: dict[str, tuple[str, torch.Tensor]] = {}
    lora_biases: dict[str, torch.Tensor] = {}
    for key in list(tensors):
        bare = key.removeprefix(KEY_PREFIX)
        if bare.endswith(".lora_B.bias") and config.get("lora_bias"):
            lora_biases[bare.removesuffix(".lora_B.bias")] = tensors.pop(key)
            continue
        if _LORA_KEY.match(bare) or MAGNITUDE_KEY in key:
            continue
        name = parameter_name(key)
        module = parameter_module(name)
        if saves(module, saved) is not None or (trains_bias and name.endswith(".bias")):
            if name in full:
                raise LataError(f"{source}: tensors {_name(full[name][0])} and {_name(key)} are the same parameter")
            full[name] = (key, tensors.pop(key))
    return full, lora_biases


def _load_module(config: dict[str, Any], name: str, factors: tuple[torch.Tensor, torch.Tensor], embedding: bool,
                 norms: tuple[float, float], source: Path) -> LoraModule:
    """One module's factors checked (shapes, rank, values) and turned into a weight-space delta."""
    A, B = factors
    label = _name(name)
    shapes = f"A{tuple(A.shape)} B{tuple(B.shape)}"
    if A.ndim < 2 or B.ndim != A.ndim or (embedding and A.ndim != 2) or 0 in (*A.shape, *B.shape):
        raise LataError(f"{source}: module {label} has factor shapes {shapes}, not a LoRA pair")
    kind = _module_kind(name, embedding, A)
    rank = A.shape[0]
    try:
        wanted, scale = expected_rank(config, name), module_scale(config, name, rank)
    except LataError as exc:  # a pattern that can't be matched: name the file
        raise LataError(f"{source.parent / CONFIG_NAME}: {exc}") from None
    if B.shape[1] != rank or any(d != 1 for d in B.shape[2:]):
        raise LataError(f"{source}: module {label} has inconsistent factor shapes {shapes}")
    if rank != wanted:
        raise LataError(f"{source}: module {label} has rank {rank} but the config (r / rank_pattern) says {wanted}")
    check_factor_values(_name(name), (A, B), norms, scale, source)
    B_w, A_w = _weight_space(kind, A, B)
    return LoraModule(name, LowRank(B_w, A_w, scale), kind, tuple(A.shape), tuple(B.shape))


def take_magnitudes(config: dict[str, Any], tensors: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Take DoRA's ``<module>.lora_magnitude_vector`` tensors out of ``tensors`` (keys as
    ``adapter_formats.normalize`` leaves them): ``{module: m}``. Refused unless the config sets ``use_dora``."""
    suffix = f".{MAGNITUDE_KEY}"
    keys = [key for key in tensors if key.endswith(suffix)]
    if keys and not config.get("use_dora"):
        raise LataError(f"{source}: tensor {_name(keys[0])} is a DoRA magnitude vector but {CONFIG_NAME} "
                        "does not set use_dora")
    return {key.removeprefix(KEY_PREFIX).removesuffix(suffix): tensors.pop(key) for key in keys}


def _attach_magnitudes(config: dict[str, Any], modules: dict[str, LoraModule], magnitudes: dict[str, torch.Tensor],
                       source: Path) -> None:
    """Give each DoRA module its magnitude vector (checked: one per output feature); with ``use_dora``
    every module has one, as PEFT makes them."""
    for name, magnitude in sorted(magnitudes.items()):
        module = modules.get(name)
        if module is None:
            raise LataError(f"{source}: DoRA magnitude vector of {_name(name)} has no lora_A / lora_B beside it")
        length = magnitude_length(module.kind, module.delta.shape)
        if magnitude.numel() != length:
            raise LataError(f"{source}: DoRA magnitude vector of {_name(name)} has shape {tuple(magnitude.shape)}; "
                            f"the module has {length} output features")
        modules[name] = replace(module, magnitude=magnitude.reshape(-1))
    if config.get("use_dora"):
        missing = [name for name, module in modules.items() if module.magnitude is None]
        if missing:
            raise LataError(f"{source}: DoRA module {_name(missing[0])} has no {MAGNITUDE_KEY} (use_dora is true in "
                            f"{CONFIG_NAME}; {len(missing)} modules lack one)")


def parse_modules(config: dict[str, Any], tensors: dict[str, torch.Tensor], source: Path,
                  lora_biases: dict[str, torch.Tensor] | None = None,
                  magnitudes: dict[str, torch.Tensor] | None = None) -> dict[str, LoraModule]:
    """Group ``<module>.lora_A/lora_B`` tensors into :class:`LoraModule` deltas, checking each.

    ``config`` is a checked config (:func:`~lata_peft.adapter_config.check_config`);
    ``lora_biases`` the ``lora_B.bias`` tensors by module (``lora_bias=True``); ``magnitudes`` DoRA's
    magnitude vectors by module (:func:`take_magnitudes`).
    """
    pairs, embeddings = _pair_factors(tensors, source)
    norms = factor_norms(tensors)
    modules: dict[str, LoraModule] = {}
    for name, parts in sorted(pairs.items()):
        if "lora_A" not in parts or "lora_B" not in parts:
            missing = "lora_A" if "lora_A" not in parts else "lora_B"
            raise LataError(f"{source}: module {_name(name)} has no {missing} tensor")
        keys = (parts["lora_A"], parts["lora_B"])
        factors = (tensors[keys[0]], tensors[keys[1]])
        modules[name] = _load_module(
            config, name, factors, name in embeddings, (norms[keys[0]], norms[keys[1]]), source
        )
    for name, bias in (lora_biases or {}).items():
        module = modules.get(name)
        rows = module.delta.shape[1 if module.kind == "linear_t" else 0] if module is not None else None
        if module is None or bias.shape != (rows,):
            raise LataError(f"{source}: {_name(name)}.lora_B.bias has no matching lora_B of {tuple(bias.shape)} rows")
        modules[name] = replace(module, bias=module.delta.scale * bias.float())
    if not modules:
        raise LataError(f"{source}: holds no LoRA tensors")
    _attach_magnitudes(config, modules, magnitudes or {}, source)
    return modules


def load_adapter(source: str | os.PathLike[str], allow_pickle: bool = False) -> Adapter:
    """Load a PEFT LoRA adapter folder (or hub id) as factored weight-space deltas.

    Raises :class:`LataError` naming the file for every bad input: missing or corrupt
    files, non-LoRA types, config values of the wrong type or range, NaN/Inf,
    non-floating-point weights, pickles without ``allow_pickle``, shapes that disagree
    with the config, DoRA magnitude vectors that do not fit their modules (or the config).
    """
    folder = resolve_adapter_path(source)
    raw_config = read_config_json(folder)
    tensors, weights_path = read_tensors(folder, allow_pickle)
    normalized = normalize(raw_config, tensors, weights_path)  # AdaLoRA, PEFT 0.2 layouts, old key names
    config, tensors = check_config(normalized.config, folder / CONFIG_NAME), normalized.tensors
    base_layers = {key: tensors.pop(key) for key in list(tensors) if key.endswith(BASE_LAYER_SUFFIX)}
    full, lora_biases = split_saved_tensors(config, tensors, weights_path)
    magnitudes = take_magnitudes(config, tensors, weights_path)
    for key, tensor in [*base_layers.items(), *full.values(), *lora_biases.items(), *magnitudes.items()]:
        if not all_finite(tensor):
            raise LataError(f"{weights_path}: tensor {_name(key)} has NaN or Inf weights")
    modules = parse_modules(config, tensors, weights_path, lora_biases, magnitudes)
    dtypes = {t.dtype for t in tensors.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    fingerprint = {CONFIG_NAME: _sha256(folder / CONFIG_NAME), weights_path.name: _hash_in_background(weights_path)}
    return Adapter(folder, config, modules, dtype, fingerprint, base_layers, full, normalized.warnings)
