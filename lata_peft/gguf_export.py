"""Export a PEFT LoRA adapter as a llama.cpp LoRA GGUF (``llama-server --lora``, Ollama's ``ADAPTER``).

The file holds what llama.cpp's own converter writes for the same adapter: ggml-org/llama.cpp
``convert_lora_to_gguf.py`` with ``conversion/base.py`` and ``conversion/llama.py`` (read at commit
0c1e57098, the copy vendored in llama-cpp-python 0.3.36; ``tests/data/llamacpp_converter_math.json``
records its output for ``examples/adapters/math``):

* keys ``general.architecture``, ``general.type = "adapter"``, ``adapter.type = "lora"``, the model
  card's ``general.name`` (``gguf.Metadata`` of the adapter folder), ``adapter.lora.alpha`` (float32),
  ``adapter.alora.invocation_tokens`` when the config has them, ``general.quantization_version``;
* per adapted weight ``<gguf name>.lora_a`` = PEFT's ``lora_A`` ``(r, in)`` and ``<gguf name>.lora_b``
  = ``lora_B`` ``(out, r)``, F32 (the converter's default ``--outtype f32``), in the order of the
  adapter's sorted tensor keys; ``token_embd.weight.lora_a`` is ``lora_embedding_A`` transposed;
* Llama-family ``q_proj`` / ``k_proj``: ``lora_b``'s rows permuted as ``LlamaModel.permute`` permutes the
  base weight (``conversion/llama.py``), so the delta lines up with the permuted GGUF base weight.

Scale. llama.cpp multiplies each pair by ``adapter.lora.alpha / rank`` with the rank of *that* tensor
(``src/llama-adapter.h``, ``llama_adapter_lora_weight::get_scale``: ``rank = b->ne[0]``), and the
converter writes the config's one ``lora_alpha``. That is PEFT's scale only when every module's scale
is ``lora_alpha / r_module``; with ``alpha_pattern``, rsLoRA, or lata-peft's own mixed-rank outputs
(``alpha == r`` per module) the converter's file is wrong. Here such adapters get their scale folded
into ``lora_b``: ``lora_b = B * s_m * r_m / alpha`` with ``alpha`` = the largest rank, so
``alpha / r_m * lora_b @ lora_a = s_m * B @ A`` exactly (up to float32 rounding) for every module,
with no padding. Adapters the converter already handles are written unchanged (bit-identical to it).

Refused (one :class:`LataError` line, nothing written): what ``load_adapter`` refuses; DoRA (llama.cpp has
no magnitude vector), ``modules_to_save``, bias terms; architectures not in :data:`ARCHITECTURES`; fan-in-fan-out
(``Conv1D``) and convolution LoRA; modules with no GGUF tensor; factor shapes that differ from the base's
weights; saved embedding weights of another shape than the base's (the converter drops them, which is
right only for the base's own); an embedding or ``lm_head`` LoRA on a base with tied embeddings: llama.cpp
has no ``output.weight`` there, and its tied output *is* ``token_embd.weight`` (``src/models/llama.cpp``),
so ``build_lora_mm`` (``src/llama-graph.cpp``, LoRAs found by tensor name) would apply an embedding
LoRA to the output too.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapter import Adapter, LoraModule, load_adapter
from .errors import LataError, first_line, shorten
from .full_weights import parameter_name
from .hub import is_hub_id, snapshot
from .models import is_model_folder, read_model_config, weight_files
from .outputs import check_not_an_input

__all__ = ["ARCHITECTURES", "export_gguf", "llama_permute"]

ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("LLAMA", True),  # conversion/llama.py LlamaModel (undo_permute = True)
    "MistralForCausalLM": ("LLAMA", True),  # registered on LlamaModel
    "GraniteForCausalLM": ("GRANITE", True),  # conversion/granite.py GraniteModel(LlamaModel)
    "Qwen2ForCausalLM": ("QWEN2", False),  # conversion/qwen.py Qwen2Model
    "Qwen3ForCausalLM": ("QWEN3", False),  # conversion/qwen.py Qwen3Model(Qwen2Model)
    "GemmaForCausalLM": ("GEMMA", False),  # conversion/gemma.py: only norms change (+1)
    "Gemma2ForCausalLM": ("GEMMA2", False),
    "Gemma3ForCausalLM": ("GEMMA3", False),
    "Phi3ForCausalLM": ("PHI3", False),  # conversion/phi.py Phi3MiniModel: fused qkv_proj / gate_up_proj as is
}
"""HF architecture -> (``gguf.MODEL_ARCH`` member, Llama q/k permutation), for the converter classes whose
``modify_tensors`` does nothing to a linear LoRA but rename it (and permute q/k). Each was checked
against the real converter on a tiny model of that architecture."""

_NO_EMBEDDING_LORA = {"Gemma3ForCausalLM"}  # Gemma3Model.modify_tensors slices token_embd rows (vocab)
_FILTERED_LM_HEAD = {"GemmaForCausalLM", "Gemma2ForCausalLM"}  # filter_tensors drops lm_head.weight


@dataclass(frozen=True)
class _Pair:
    """One module's GGUF tensors: ``name.lora_a`` and ``name.lora_b`` (numpy, row-major as PEFT)."""

    name: str
    lora_a: np.ndarray
    lora_b: np.ndarray


def llama_permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """``LlamaModel.permute`` of llama.cpp ``conversion/llama.py``: the rotary halves of each head
    interleaved, on the rows (dim 0) of a q/k weight or of its ``lora_b``."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise LataError("writing GGUF needs the gguf package: pip install gguf") from None
    return gguf


def _resolve_base(adapter: Adapter, base: str | os.PathLike[str] | None) -> Path:
    """The base model folder (only its ``config.json`` is needed, as for the converter's ``--base``)."""
    source = base if base is not None else adapter.base_model
    if source is None:
        raise LataError(f"{adapter.path / 'adapter_config.json'}: no base_model_name_or_path; pass the base "
                        "model folder (--base BASE)")
    path = Path(source).expanduser()
    if not path.exists() and is_hub_id(str(source)):
        path = snapshot(str(source), ["config.json"])
    if not is_model_folder(path):
        hint = "" if base is not None else " (from the adapter's base_model_name_or_path; pass --base BASE)"
        raise LataError(f"{path}: not a transformers model folder (no config.json){hint}")
    return path


def _text_hparams(base: Path) -> tuple[str, dict[str, Any]]:
    """The HF architecture name and the hyperparameters the converter reads (``conversion/base.py``
    ``get_model_architecture`` and ``TextModel.__init__``: ``text_config`` moved to the root)."""
    config = read_model_config(base)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    arches = text.get("architectures") or config.get("architectures")
    if not isinstance(arches, list) or not arches or not isinstance(arches[0], str):
        raise LataError(f"{base / 'config.json'}: no architectures entry")
    hparams = {**config, **text} if text else dict(config)
    return arches[0], hparams


def _find(hparams: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((hparams[key] for key in keys if key in hparams), None)


def _tied(base: Path) -> bool:
    """Whether the base ties its output to the token embeddings (transformers' default per model type)."""
    from transformers import AutoConfig

    try:
        return bool(AutoConfig.from_pretrained(base).tie_word_embeddings)
    except Exception as exc:  # unknown model type, bad config: one line
        raise LataError(f"{base / 'config.json'}: can't be read by transformers ({first_line(exc)})") from None


def _base_shapes(base: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the base's weights from the safetensors headers (empty when the folder has none)."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(base):
        try:
            with safe_open(path, framework="pt") as handle:
                keys = list(handle.keys())
                for key in keys:
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except (SafetensorError, OSError) as exc:
            raise LataError(f"{path}: corrupt or truncated safetensors file ({first_line(exc)})") from None
    return shapes


def _check_saved_layers(adapter: Adapter, shapes: dict[str, tuple[int, ...]]) -> None:
    """PEFT saves the full embedding weights beside an embedding LoRA (``save_embedding_layers``); the
    converter skips them (``.base_layer.weight``), which is right only when they are the base's own.
    Refused when their shape differs from the base's weight (a resized vocabulary)."""
    for key, tensor in sorted(adapter.base_layers.items()):
        hf_name = parameter_name(key)
        expected = shapes.get(hf_name)
        if expected is not None and tuple(tensor.shape) != expected:
            raise LataError(f"{adapter.path}: saved {shorten(hf_name)} is {tuple(tensor.shape)} but the base's is "
                            f"{expected} (resized vocabulary); a llama.cpp LoRA GGUF can't carry it")


def _native(adapter: Adapter) -> bool:
    """True when llama.cpp's ``lora_alpha / rank`` already is PEFT's scale for every module."""
    alpha = adapter.config["lora_alpha"]
    return all(module.delta.scale == alpha / module.delta.rank for module in adapter.modules.values())


def _key(module: LoraModule) -> str:
    part = "lora_embedding_A" if module.kind == "embedding" else "lora_A.weight"
    return f"{module.name}.{part}"


def _pairs(adapter: Adapter, base: Path, shapes: dict[str, tuple[int, ...]], hf_arch: str,
           hparams: dict[str, Any], gguf: Any, alpha: float, native: bool) -> list[_Pair]:
    """Every module's GGUF name and tensors, in the converter's order; refusals before any work."""
    source = adapter.path
    arch_name, permute = ARCHITECTURES[hf_arch]
    blocks = _find(hparams, ("n_layers", "num_hidden_layers", "n_layer", "num_layers"))
    if not isinstance(blocks, int):
        raise LataError(f"{base / 'config.json'}: no num_hidden_layers")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch_name], blocks)
    n_head = _find(hparams, ("n_heads", "num_attention_heads"))
    n_kv = _find(hparams, ("n_kv_heads", "num_key_value_heads")) or n_head
    touches_embeddings = any(m.kind == "embedding" or m.name.endswith("lm_head") for m in adapter.modules.values())
    tied = touches_embeddings and _tied(base)
    pairs: list[_Pair] = []
    for module in sorted(adapter.modules.values(), key=_key):
        label = shorten(module.name)
        if module.kind in ("linear_t", "conv"):
            kind = "fan_in_fan_out (Conv1D)" if module.kind == "linear_t" else "convolution"
            raise LataError(f"{source}: module {label} is a {kind} LoRA; llama.cpp's LoRA format has no such "
                            "layout")
        hf_name = f"{module.name}.weight"
        name = names.get_name(key=hf_name, try_suffixes=(".weight", ".bias"))
        if name is None or (module.name.endswith("lm_head") and hf_arch in _FILTERED_LM_HEAD):
            raise LataError(f"{source}: module {label} has no tensor in a {arch_name.lower()} GGUF "
                            "(llama.cpp would not apply it)")
        if module.kind == "embedding" or module.name.endswith("lm_head"):
            if tied:
                raise LataError(f"{source}: module {label}: the base ties its output to the token embeddings, "
                                "and llama.cpp can't apply an embedding or lm_head LoRA to a tied model")
            if module.kind == "embedding" and (hf_arch in _NO_EMBEDDING_LORA or name != "token_embd.weight"):
                raise LataError(f"{source}: module {label}: llama.cpp's converter can't carry an embedding LoRA "
                                f"for {hf_arch}")
        expected = shapes.get(hf_name)
        if expected is not None and tuple(module.delta.shape) != expected:
            raise LataError(f"{source}: module {label} changes a {tuple(module.delta.shape)} weight but the "
                            f"base's {hf_name} is {expected} (wrong base model?)")
        pairs.append(_pair(module, name, alpha, native, permute, n_head, n_kv, source))
    return pairs


def _pair(module: LoraModule, name: str, alpha: float, native: bool, permute: bool, n_head: Any, n_kv: Any,
          source: Path) -> _Pair:
    """``(lora_a, lora_b)`` in float32: PEFT's factors, the scale folded into ``lora_b`` unless ``native``."""
    delta = module.delta
    if module.kind == "embedding":  # converter: lora_a = lora_embedding_A.T (vocab, r), lora_b = lora_embedding_B
        lora_a, lora_b = delta.B, delta.A.T
    else:
        lora_a, lora_b = delta.A, delta.B
    lora_a = lora_a.to(torch.float32)
    if native:
        lora_b = lora_b.to(torch.float32)
    else:
        factor = delta.scale * delta.rank / alpha
        lora_b = (lora_b.to(torch.float64) * factor).to(torch.float32)
    if permute and module.name.endswith(("q_proj", "k_proj")):
        heads = n_head if module.name.endswith("q_proj") else n_kv
        if not isinstance(n_head, int) or not isinstance(heads, int) or lora_b.shape[0] % (2 * heads):
            raise LataError(f"{source}: module {shorten(module.name)}: {lora_b.shape[0]} rows can't be split "
                            f"into the base's attention heads ({n_head}, {n_kv} kv)")
        lora_b = llama_permute(lora_b, n_head, n_kv if module.name.endswith("k_proj") else n_head)
    return _Pair(name, lora_a.contiguous().numpy(), lora_b.contiguous().numpy())


def _alora_tokens(adapter: Adapter) -> list[int] | None:
    """``alora_invocation_tokens`` as the converter writes them; an ``invocation_string`` alone needs the
    base's tokenizer (the converter tokenizes it), which this exporter does not load: refused."""
    tokens = adapter.config.get("alora_invocation_tokens")
    if not tokens and adapter.config.get("invocation_string"):
        raise LataError(f"{adapter.path / 'adapter_config.json'}: invocation_string without "
                        "alora_invocation_tokens; tokenize it into alora_invocation_tokens first")
    if tokens and not (isinstance(tokens, list) and all(isinstance(t, int) and 0 <= t < 2**32 for t in tokens)):
        raise LataError(f"{adapter.path / 'adapter_config.json'}: alora_invocation_tokens must be token ids, "
                        f"got {shorten(tokens)}")
    return list(tokens) if tokens else None


def _is_gguf(path: Path) -> bool:
    """A regular file that starts with GGUF's magic bytes (what ``--overwrite`` may replace)."""
    try:
        with path.open("rb") as handle:
            return path.is_file() and handle.read(4) == b"GGUF"
    except OSError:
        return False


def _check_out(out: Path, overwrite: bool, inputs: list[Path]) -> Path:
    target = Path(out).expanduser().resolve()
    check_not_an_input(target, [path for path in inputs if path.exists()])
    if target.is_dir():
        raise LataError(f"{target}: is a folder; give the .gguf file to write")
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise LataError(f"{target}: already exists (pass --overwrite to replace it)")
    if target.is_symlink() or (target.exists() and not _is_gguf(target)):
        raise LataError(f"{target}: exists and is not a GGUF file; --overwrite only replaces a .gguf file")
    ancestor = next((p for p in target.parents if p.exists()), Path("/"))
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise LataError(f"{target}: {ancestor} is not a writable folder")
    return target


def _write(target: Path, arch_name: str, pairs: list[_Pair], alpha: float, adapter: Adapter, base: Path,
           alora: list[int] | None, gguf: Any) -> None:
    """The GGUF in the converter's order (``ModelBase.write``: tensors, then metadata), written to a temp
    file beside ``target`` and renamed onto it."""
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch_name]])
    for pair in pairs:
        writer.add_tensor(f"{pair.name}.lora_a", pair.lora_a, raw_dtype=gguf.GGMLQuantizationType.F32)
        writer.add_tensor(f"{pair.name}.lora_b", pair.lora_b, raw_dtype=gguf.GGMLQuantizationType.F32)
    counts = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, adapter.path, None, counts[0])  # dir_model_card = the adapter folder
    if metadata.name is None:
        metadata.name = base.name
    if metadata.size_label is None and counts[0] > 0:
        metadata.size_label = gguf.size_label(*counts)
    writer.add_type(gguf.GGUFType.ADAPTER)  # LoraModel.set_type
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    metadata.set_gguf_meta_model(writer)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)  # LoraModel.set_gguf_parameters
    if alora:
        writer.add_key_value(gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, alora, gguf.GGUFValueType.ARRAY,
                             gguf.GGUFValueType.UINT32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"  # opened "wb": umask applies
    try:
        writer.write_header_to_file(path=temp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(temp, target)
    except BaseException as exc:
        writer.close()
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise LataError(f"{target}: writing failed ({first_line(exc)}); nothing was written") from None
        raise


PathLike = str | os.PathLike[str]


def export_gguf(adapter: PathLike, out: PathLike, base: PathLike | None = None, *,
                overwrite: bool = False) -> dict[str, Any]:
    """Write ``adapter`` (a PEFT LoRA folder or hub id) as a llama.cpp LoRA GGUF at ``out``.

    ``base`` is the base model folder or hub id (only its ``config.json`` is read, plus its safetensors
    headers to check shapes when present); default: the adapter's ``base_model_name_or_path``. Returns
    ``{"path", "architecture", "tensors", "modules", "rank", "alpha", "scale_folded", "bytes"}``.
    Every refusal is one :class:`LataError` line and leaves nothing at ``out``; ``out`` may not be, lie
    inside or contain the adapter or base folder (the rule of every lata-peft output).
    """
    gguf = _gguf()
    target = _check_out(Path(out), overwrite, [Path(adapter), *([Path(base)] if base is not None else [])])
    loaded = load_adapter(adapter)
    if any(module.needs_base for module in loaded.modules.values()):
        raise LataError(f"{loaded.path}: a DoRA adapter (use_dora); llama.cpp's LoRA format has no magnitude "
                        "vector: fold it (lata-peft fold), or combine it with --base BASE into plain LoRA first")
    if loaded.full or any(module.bias is not None for module in loaded.modules.values()):
        what = sorted(loaded.full)[0] if loaded.full else "a LoRA bias (lora_bias)"
        raise LataError(f"{loaded.path}: holds {shorten(what)}, a trained weight beside the LoRA factors, which "
                        "llama.cpp's LoRA format can't carry: fold it into the base (lata-peft fold) instead")
    alora = _alora_tokens(loaded)
    base_path = _resolve_base(loaded, base)
    shapes = _base_shapes(base_path)
    _check_saved_layers(loaded, shapes)
    hf_arch, hparams = _text_hparams(base_path)
    if hf_arch not in ARCHITECTURES or not hasattr(gguf.MODEL_ARCH, ARCHITECTURES[hf_arch][0]):
        raise LataError(f"{base_path / 'config.json'}: architecture {shorten(hf_arch)} is not supported for GGUF "
                        f"export (supported: {', '.join(ARCHITECTURES)}); llama.cpp's convert_lora_to_gguf.py "
                        "may handle it")
    native = _native(loaded)
    ranks = [module.delta.rank for module in loaded.modules.values()]
    alpha = float(loaded.config["lora_alpha"]) if native else float(max(ranks))
    pairs = _pairs(loaded, base_path, shapes, hf_arch, hparams, gguf, alpha, native)
    _write(target, ARCHITECTURES[hf_arch][0], pairs, alpha, loaded, base_path, alora, gguf)
    return {
        "path": str(target),
        "architecture": gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[ARCHITECTURES[hf_arch][0]]],
        "tensors": 2 * len(pairs),
        "modules": len(pairs),
        "rank": max(ranks),
        "alpha": alpha,
        "scale_folded": not native,
        "bytes": target.stat().st_size,
    }
