"""Serving engines' own rules for a PEFT LoRA folder, written out from their source (a test helper).

``*_problems(folder)`` lists what the engine refuses (empty list: it loads the adapter);
``engine_scales(folder, engine)`` the factor each applied module's ``B @ A`` gets, and
``engine_delta(folder, engine)`` each module's dense delta as that engine computes it from the files, in
PEFT's orientation (``B @ A``: ``(out, in)``; ``(num_embeddings, dim)`` for embeddings). Silent
differences (a scale read from the wrong place, modules an engine skips) show up only in these two.
Sources, read for this file:

* PEFT 0.21.2: ``peft/tuners/lora/model.py:309-312`` (``rank_pattern`` / ``alpha_pattern`` through
  ``peft.utils.other.get_pattern_key``), ``peft/tuners/lora/layer.py:278-281`` (``alpha / r`` or
  ``alpha / sqrt(r)`` with rsLoRA).
* vLLM 0.33.0 (PyPI sdist): ``vllm/lora/peft_helper.py`` (``_validate_features`` 53-87, ``__post_init__``
  102-115, ``get_rank_and_scaling`` 131-153: per-module rank and alpha since vLLM 0.32.0,
  ``validate_legal`` 188-202), ``vllm/config/lora.py:27`` (``MaxLoRARanks``), ``vllm/lora/utils.py:180-242``
  (``parse_fine_tuned_lora_name``, ``is_base_embedding_weights``), ``vllm/lora/layers/base_linear.py:183``
  (a rank above ``max_lora_rank`` can't be copied into its slot).
* vLLM 0.31.0 and earlier (0.26.0, 0.30.0 read too): ``peft_helper.py`` has no ``rank_pattern`` /
  ``alpha_pattern``; ``vllm_lora_scaling_factor = lora_alpha / r`` (65) is every module's scale
  (``lora_weights.py:58-71`` ``LoRALayerWeights.from_config``); ``validate_legal`` (123-136) checks ``r`` only.
* TGI (huggingface/text-generation-inference db931fc, Jan 2026; in maintenance mode):
  ``server/text_generation_server/adapters/lora.py`` (``LoraConfig.load`` 103-115 reads ``r``,
  ``lora_alpha``, ``use_rslora`` only; ``prepare_weights`` 205-283: a layer type missing from any layer
  is dropped (235-237), the scale is ``lora_alpha / config.r`` (245-249, ``get_scaling_factor`` 598-606),
  ranks padded for SGMV (259-268) and ``config.r`` overwritten with the padded rank of that type
  (270-273), so the next types use it; layers stacked with ``torch.stack`` (147: equal ranks needed)),
  ``server/text_generation_server/models/__init__.py:1869-1880`` (the layer types it loads),
  ``server/text_generation_server/utils/adapter.py:188-233`` (safetensors only; names
  ``model.layers.{i}.self_attn.*`` / ``model.layers.{i}.mlp.*``), SGMV ``pad_rank``
  (``server/text_generation_server/utils/sgmv.py`` before e3252879 moved it to the kernels hub: rank
  <= 8 -> 8, else the next multiple of 16).
* llama.cpp 0c1e57098 (vendored in llama-cpp-python 0.3.36): ``convert_lora_to_gguf.py`` (``get_tensors``
  457-499: other tensors are refused (479), ``.base_layer.weight`` skipped (473); ``alpha =
  lparams["lora_alpha"]`` (528)), ``src/llama-adapter.h:53-57`` (scale ``alpha / rank`` with the rank of
  each tensor), ``src/llama-adapter.cpp:327-367`` (load-time checks), ``src/models/llama.cpp:41-45`` with
  ``src/llama-graph.cpp:1520-1545`` (a tied output *is* ``token_embd.weight``, and LoRAs are found by
  tensor name).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

__all__ = [
    "ENGINES",
    "TGI_LAYER_TYPES",
    "VLLM_MAX_LORA_RANKS",
    "engine_delta",
    "engine_scales",
    "llamacpp_problems",
    "tgi_ignored",
    "tgi_problems",
    "vllm_max_lora_rank",
    "vllm_problems",
]

ENGINES = ("peft", "vllm", "vllm<0.32", "tgi", "llama.cpp")
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py:27
TGI_LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                   "c_proj", "c_fc")  # models/__init__.py:1869-1880, in the order TGI loads them
_VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")  # peft_helper.py:94-100
_PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.(?:(?P<ab>lora_[AB])\.weight|(?P<emb>lora_embedding_[AB]))$")
_TGI_NAME = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<type>\w+)$")


# ----------------------------------------------------------------------------- reading


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "adapter_config.json").read_text())


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors (read once per file version; callers don't modify them)."""
    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        return {}
    stat = path.stat()
    return _load(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int, size: int) -> dict[str, torch.Tensor]:
    return load_file(path)


def _factors(folder: Path) -> dict[str, dict[str, Any]]:
    """``{module: {"A": tensor, "B": tensor, "embedding": bool}}`` from the LoRA tensors (others ignored)."""
    modules: dict[str, dict[str, Any]] = {}
    for key, tensor in _tensors(folder).items():
        match = _FACTOR.match(key.removeprefix(_PREFIX))
        if match is None:
            continue
        part = match["ab"] or match["emb"]
        entry = modules.setdefault(match["module"], {"embedding": match["emb"] is not None})
        entry[part[-1]] = tensor
    return modules


def _dense(entry: dict[str, Any], scale: float) -> torch.Tensor:
    product = entry["B"].double() @ entry["A"].double()
    return scale * (product.T if entry["embedding"] else product)


def _rank(entry: dict[str, Any]) -> int:
    return int(entry["A"].shape[0])


# ----------------------------------------------------------------------------- vLLM


def vllm_max_lora_rank(folder: Path) -> int | None:
    """The smallest ``--max-lora-rank`` value vLLM accepts that admits every module of ``folder`` (None: none)."""
    needed = max(_rank(entry) for entry in _factors(folder).values())
    config = _config(folder)
    needed = max(needed, config.get("r", 0), *(config.get("rank_pattern") or {}).values())
    return next((value for value in VLLM_MAX_LORA_RANKS if value >= needed), None)


def vllm_problems(folder: Path, max_lora_rank: int = 512, legacy: bool = False) -> list[str]:
    """What vLLM 0.33.0 (``legacy``: 0.31.0) refuses in ``folder`` when served with ``--max-lora-rank``."""
    config = _config(folder)
    problems: list[str] = []
    missing = {"r", "lora_alpha", "target_modules"} - set(config)  # PEFTHelper.from_dict, 155-169
    if missing:
        return [f"Missing required configuration fields: {sorted(missing)}"]
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        problems.append(f"--max-lora-rank {max_lora_rank} is not one of {VLLM_MAX_LORA_RANKS}")
    r, patterns = config["r"], config.get("rank_pattern") or {}
    if r <= 0:
        problems.append(f"LoRA rank `r` must be a positive integer, got {r}.")
    unsupported = [m for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if unsupported:
        problems.append(f"Unsupported modules_to_save: {unsupported}")
    if config.get("use_dora"):
        problems.append("vLLM does not yet support DoRA.")
    if not legacy:
        if any(not isinstance(rank, int) or rank <= 0 for rank in patterns.values()):
            problems.append("rank_pattern values must be positive integers")
        init = config.get("init_lora_weights", True)
        flags = {"lora_bias": "LoRA bias (lora_bias)", "alora_invocation_tokens": "Activated LoRA (aLoRA)",
                 "layer_replication": "layer_replication", "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
                 "use_qalora": "QALoRA"}
        problems += [f"vLLM does not support {text}." for key, text in flags.items() if config.get(key)]
        if isinstance(init, str) and init.lower() not in _VLLM_INITS:
            problems.append(f"vLLM does not support init_lora_weights={init!r}.")
    checked = r if legacy else max([r, *patterns.values()])  # validate_legal
    if checked > max_lora_rank:
        problems.append(f"LoRA rank {checked} is greater than max_lora_rank {max_lora_rank}.")
    if config.get("bias", "none") != "none":
        problems.append("Adapter bias is not supported.")
    for key in _tensors(folder):  # utils.parse_fine_tuned_lora_name
        name = key.removeprefix(_PREFIX)
        parts = name.split(".")
        base_embedding = name.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight"))
        head = len(parts) >= 2 and parts[-1] in ("weight", "bias") and parts[-2] in ("score", "classifier")
        if not (_FACTOR.match(name) or base_embedding or head):
            problems.append(f"{name} is unsupported LoRA weight")
    biggest = max((_rank(entry) for entry in _factors(folder).values()), default=0)
    if biggest > max_lora_rank and biggest > checked:  # layers/base_linear.py:183: no room in its slot
        problems.append(f"a module has rank {biggest}, more than max_lora_rank {max_lora_rank} (set_lora fails)")
    return problems


# ----------------------------------------------------------------------------- TGI


def _pad_sgmv(rank: int) -> int:
    """SGMV ``pad_rank`` with one GPU: up to 8, else to the next multiple of 16."""
    return 8 if rank <= 8 else (rank + 15) // 16 * 16


def _tgi_layers(folder: Path, num_layers: int | None) -> tuple[dict[str, dict[int, dict[str, Any]]], int]:
    """``{layer type: {layer: factors}}`` for the modules TGI can map, and the model's layer count."""
    by_type: dict[str, dict[int, dict[str, Any]]] = {}
    seen = -1
    for module, entry in _factors(folder).items():
        match = _TGI_NAME.match(module)
        if match is None or entry["embedding"]:
            continue
        seen = max(seen, int(match["layer"]))
        if match["type"] in TGI_LAYER_TYPES:
            by_type.setdefault(match["type"], {})[int(match["layer"])] = entry
    return by_type, num_layers if num_layers is not None else seen + 1


def _tgi_module(layer_type: str, layer: int) -> str:
    group = "self_attn" if layer_type in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj") else "mlp"
    return f"model.layers.{layer}.{group}.{layer_type}"


def tgi_ignored(folder: Path, num_layers: int | None = None) -> list[str]:
    """Modules TGI loads without applying (it only logs "unused adapter weights"): names it does not map,
    embeddings, ``lm_head``, and every layer of a type that some layer lacks (``prepare_weights`` 235-237)."""
    by_type, layers = _tgi_layers(folder, num_layers)
    kept = {_tgi_module(layer_type, layer) for layer_type, entries in by_type.items()
            if set(entries) >= set(range(layers)) for layer in range(layers)}
    return sorted(set(_factors(folder)) - kept)


def tgi_problems(folder: Path, sgmv: bool = True, num_layers: int | None = None) -> list[str]:
    """What TGI refuses: a config PEFT can't read as LoRA, no safetensors, ranks that can't be stacked."""
    folder = Path(folder)
    problems: list[str] = []
    try:
        from peft import LoraConfig

        LoraConfig.from_pretrained(str(folder))
    except Exception as exc:  # what LoraConfig.load raises
        problems.append(f"adapter_config.json is not a PEFT LoraConfig ({type(exc).__name__})")
    if not any(folder.glob("*.safetensors")):
        problems.append("No adapter weights found (TGI reads .safetensors only)")
        return problems
    by_type, layers = _tgi_layers(folder, num_layers)
    for layer_type in TGI_LAYER_TYPES:
        entries = by_type.get(layer_type, {})
        if not set(entries) >= set(range(layers)):
            continue  # dropped, not refused
        ranks = [_rank(entries[layer]) for layer in range(layers)]
        padded = {_pad_sgmv(rank) if sgmv else rank for rank in ranks}
        if len(padded) > 1:
            problems.append(f"{layer_type}: ranks {sorted(set(ranks))} across layers can't be stacked "
                            f"(torch.stack of ranks {sorted(padded)})")
    return problems


# ----------------------------------------------------------------------------- llama.cpp


def llamacpp_problems(folder: Path, base: Path | None = None) -> list[str]:
    """What ``convert_lora_to_gguf.py`` refuses in ``folder`` and, with ``base`` (a model folder), what
    llama.cpp then refuses or misapplies at load time for a tied-embedding base."""
    folder = Path(folder)
    config = _config(folder)
    problems: list[str] = []
    if not (folder / "adapter_model.safetensors").is_file() and not (folder / "adapter_model.bin").is_file():
        problems.append("no adapter_model.safetensors or adapter_model.bin")
    if "lora_alpha" not in config:
        problems.append("adapter_config.json has no lora_alpha (KeyError in the converter)")
    if base is None and "base_model_name_or_path" not in config:
        problems.append("'base_model_name_or_path' is not found in adapter_config.json (pass --base)")
    for key in _tensors(folder):
        name = key.removeprefix(_PREFIX)
        if _FACTOR.match(name) or ".base_layer.weight" in name or "_layernorm" in name or ".norm" in name:
            continue
        problems.append(f"Unexpected name '{key}': Not a lora_A or lora_B tensor")
    factors = _factors(folder)
    problems += [f"{module}: LoRA pair is missing one component" for module, entry in factors.items()
                 if "A" not in entry or "B" not in entry]
    if base is not None:
        base_config = json.loads((Path(base) / "config.json").read_text())
        from transformers import AutoConfig

        tied = AutoConfig.for_model(**base_config).tie_word_embeddings
        for module, entry in factors.items():
            if tied and module.endswith("lm_head"):
                problems.append(f"{module}: LoRA tensor 'output.weight' does not exist in base model (tied)")
            if tied and entry["embedding"]:
                problems.append(f"{module}: the tied output is token_embd.weight, which would get this LoRA too")
    return problems


# ----------------------------------------------------------------------------- deltas


def _peft_scales(folder: Path, modules: list[str]) -> dict[str, float]:
    """PEFT's own per-module scale: its config class and ``get_pattern_key``."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    config = LoraConfig.from_pretrained(str(folder))
    scales = {}
    for module in modules:
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scales[module] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    return scales


def _vllm_scales(folder: Path, modules: list[str]) -> dict[str, float]:
    """vLLM >= 0.32 ``PEFTHelper.get_rank_and_scaling``: the first pattern key whose regex matches wins."""
    config = _config(folder)

    def match(pattern: dict[str, Any], name: str, default: Any) -> Any:
        return next((value for key, value in pattern.items() if re.match(rf"(.*\.)?({key})$", name)), default)

    scales = {}
    for module in modules:
        r = match(config.get("rank_pattern") or {}, module, config["r"])
        alpha = match(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scales[module] = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return scales


def _global_scale(config: dict[str, Any], r: int) -> float:
    return config["lora_alpha"] / math.sqrt(r) if config.get("use_rslora") else config["lora_alpha"] / r


def _tgi_scales(folder: Path, sgmv: bool, num_layers: int | None) -> dict[str, float]:
    config = _config(folder)
    by_type, layers = _tgi_layers(folder, num_layers)
    r = config["r"]
    scales: dict[str, float] = {}
    for layer_type in TGI_LAYER_TYPES:
        entries = by_type.get(layer_type, {})
        if not set(entries) >= set(range(layers)):
            continue  # return None at the first layer without it: no padding, no change of config.r
        scales.update(dict.fromkeys((_tgi_module(layer_type, layer) for layer in range(layers)),
                                    _global_scale(config, r)))
        padded = {_pad_sgmv(_rank(entries[layer])) if sgmv else _rank(entries[layer]) for layer in range(layers)}
        if len(padded) > 1:
            raise ValueError(f"TGI refuses {folder}: {layer_type} ranks can't be stacked")
        r = _pad_sgmv(_rank(entries[0])) if sgmv else _rank(entries[0])  # config.r = padded_rank (270-273)
    return scales


def engine_scales(folder: Path, engine: str, *, sgmv: bool = True, num_layers: int | None = None) -> dict[str, float]:
    """``{module: scale}``: the factor ``engine`` multiplies ``B @ A`` by, for the modules it applies.

    ``peft``: per-module rank and alpha (patterns), rsLoRA. ``vllm``: vLLM >= 0.32, the same rule.
    ``vllm<0.32``: the global ``lora_alpha / r`` for every module. ``tgi``: the global scale with ``config.r``
    replaced by the padded rank of each loaded layer type for the next ones (``sgmv``: CUDA's SGMV
    padding), only the modules it applies (see ``tgi_ignored``). ``llama.cpp``: the converter's global
    ``lora_alpha`` over each tensor's own rank (no rsLoRA).
    """
    folder = Path(folder)
    factors = _factors(folder)
    config = _config(folder)
    if engine == "peft":
        return _peft_scales(folder, list(factors))
    if engine == "vllm":
        return _vllm_scales(folder, list(factors))
    if engine == "vllm<0.32":
        return dict.fromkeys(factors, _global_scale(config, config["r"]))
    if engine == "llama.cpp":
        return {module: config["lora_alpha"] / _rank(entry) for module, entry in factors.items()}
    if engine == "tgi":
        return _tgi_scales(folder, sgmv, num_layers)
    raise ValueError(f"engine {engine!r}: expected one of {ENGINES}")


def engine_delta(folder: Path, engine: str, *, sgmv: bool = True, num_layers: int | None = None,
                 modules: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """``{module: dense delta (float64)}`` as ``engine`` computes it from ``folder``'s files
    (:func:`engine_scales` times ``B @ A``), for every module it applies or those of ``modules``."""
    factors = _factors(Path(folder))
    scales = engine_scales(folder, engine, sgmv=sgmv, num_layers=num_layers)
    wanted = set(scales) if modules is None else set(modules) & set(scales)
    return {module: _dense(factors[module], scale) for module, scale in scales.items() if module in wanted}
