"""``export_gguf`` writes what llama.cpp's converter writes, and the deltas llama.cpp computes from it are
PEFT's (every module, mixed ranks included). The GGUF is read back with ``gguf.GGUFReader``; the
expected deltas come from the safetensors and config directly, or from PEFT's own merge."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BASE_ID, make_adapter, peft_delta_weights
from engine_rules import engine_delta
from safetensors.torch import load_file, save_file

import lata_peft
from lata_peft.errors import LataError
from lata_peft.gguf_export import export_gguf

gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[1]
MATH = ROOT / "examples" / "adapters" / "math"
SMOLLM2 = Path("~/.cache/lata_peft/SmolLM2-135M-Instruct").expanduser()
REFERENCE = json.loads((ROOT / "tests" / "data" / "llamacpp_converter_math.json").read_text())
needs_base = pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file(),
                                reason="SmolLM2 base not prepared (python recipes/prepare_base.py)")

GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # llama's tensor names


def gguf_name(module: str) -> str:
    """HF module -> llama.cpp tensor name, written out for the Llama modules the tests use."""
    if module == "model.embed_tokens":
        return "token_embd.weight"
    if module == "lm_head":
        return "output.weight"
    match = re.fullmatch(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)", module)
    assert match, module
    return f"blk.{match[1]}.{GGUF_NAMES[match[2]]}.weight"


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo the converter's q/k permutation: within each head, HF row ``t`` (first half ``t < d/2``,
    second half ``d/2 + i``) was written at row ``2t`` resp. ``2i + 1``."""
    head_dim = rows.shape[0] // heads
    half = head_dim // 2
    order = [h * head_dim + (2 * t if t < half else 2 * (t - half) + 1) for h in range(heads) for t in range(head_dim)]
    return rows[order]


def read_gguf(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    return fields, {t.name: np.array(t.data) for t in reader.tensors}


def llamacpp_deltas(path: Path, n_head: int, n_kv: int) -> dict[str, torch.Tensor]:
    """Each weight's delta as llama.cpp applies it (``alpha / rank`` of that tensor, ``llama-adapter.h``),
    un-permuted back to the HF layout; keyed by GGUF weight name. float32, as llama.cpp computes."""
    fields, tensors = read_gguf(path)
    alpha = float(fields["adapter.lora.alpha"])
    deltas = {}
    for name in [n.removesuffix(".lora_a") for n in tensors if n.endswith(".lora_a")]:
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        assert a.dtype == b.dtype == np.float32
        rank = b.shape[1]  # ggml b->ne[0]
        if name == "token_embd.weight":  # llm_build_inp_embd: delta row t = b @ a[t]
            deltas[name] = alpha / rank * (torch.from_numpy(a) @ torch.from_numpy(b).T)
            continue
        if ".attn_q." in name or ".attn_k." in name:
            b = unpermute(b, n_head if ".attn_q." in name else n_kv)
        deltas[name] = alpha / rank * (torch.from_numpy(np.ascontiguousarray(b)) @ torch.from_numpy(a))
    return deltas


def assert_deltas(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    """Every module, both ways: the same weights, each delta within ``rtol`` of its largest entry."""
    assert set(got) == {gguf_name(module) for module in expected}
    for module, want in expected.items():
        want = want.float()
        err = float((got[gguf_name(module)] - want).abs().max())
        assert err <= rtol * float(want.abs().max()) + 1e-12, (module, err)


def file_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """``s * B @ A`` straight from adapter_model.safetensors, ``s = lora_alpha / r`` from the config
    (the shipped adapter has no patterns and no rsLoRA)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    assert not config["rank_pattern"] and not config["alpha_pattern"] and not config["use_rslora"]
    tensors = load_file(folder / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    return {key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"):
            scale * tensors[key.replace("lora_A", "lora_B")].float() @ tensors[key].float()
            for key in tensors if key.endswith(".lora_A.weight")}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, base: torch.nn.Module) -> Path:
    folder = tmp_path_factory.mktemp("tiny_base") / BASE_ID
    base.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- the shipped adapter


@needs_base
def test_math_is_the_converters_file(tmp_path: Path) -> None:
    """Byte for byte what llama.cpp's convert_lora_to_gguf.py wrote (tests/data/llamacpp_converter_math.json)."""
    out = tmp_path / "math.gguf"
    summary = export_gguf(MATH, out, SMOLLM2)
    reader = gguf.GGUFReader(out)
    assert {key: {"type": gguf.GGUFValueType(f.types[0]).name, "value": f.contents()}
            for key, f in reader.fields.items() if not key.startswith("GGUF.")} == REFERENCE["metadata"]
    assert [{"name": t.name, "type": t.tensor_type.name, "ne": [int(n) for n in t.shape],
             "sha256": hashlib.sha256(t.data.tobytes()).hexdigest()} for t in reader.tensors] == REFERENCE["tensors"]
    assert out.stat().st_size == REFERENCE["file_bytes"] == summary["bytes"]
    assert hashlib.sha256(out.read_bytes()).hexdigest() == REFERENCE["file_sha256"]
    assert summary == {"path": str(out), "architecture": "llama", "tensors": 420, "modules": 210, "rank": 8,
                       "alpha": 16.0, "scale_folded": False, "bytes": REFERENCE["file_bytes"]}


@needs_base
def test_math_deltas_are_peft_deltas(tmp_path: Path) -> None:
    export_gguf(MATH, tmp_path / "math.gguf", SMOLLM2)
    config = json.loads((SMOLLM2 / "config.json").read_text())
    got = llamacpp_deltas(tmp_path / "math.gguf", config["num_attention_heads"], config["num_key_value_heads"])
    assert_deltas(got, file_deltas(MATH))


def test_mixed_rank_combination_is_exact_where_the_converter_is_not(tmp_path: Path, base: torch.nn.Module,
                                                                    adapters: dict[str, Path],
                                                                    tiny_base: Path) -> None:
    folder = tmp_path / "energy"
    lata_peft.combine(adapters=[adapters["plain"], adapters["rank8"]], out=folder, rank="energy:0.9")
    config = json.loads((folder / "adapter_config.json").read_text())
    ranks = {config["r"], *config["rank_pattern"].values()}
    assert len(ranks) > 1 and config["alpha_pattern"] == config["rank_pattern"]
    summary = export_gguf(folder, tmp_path / "energy.gguf", tiny_base)
    assert summary["scale_folded"] and summary["alpha"] == summary["rank"] == max(ranks)
    _, tensors = read_gguf(tmp_path / "energy.gguf")
    assert {t.shape[1] for n, t in tensors.items() if n.endswith(".lora_b")} == ranks  # no padding
    got = llamacpp_deltas(tmp_path / "energy.gguf", base.config.num_attention_heads, base.config.num_key_value_heads)
    merged = {key.removesuffix(".weight"): delta for key, delta in peft_delta_weights(base, folder).items()}
    assert_deltas(got, merged, rtol=1e-4)  # PEFT's own merge of the PEFT folder
    peft, converter = engine_delta(folder, "peft"), engine_delta(folder, "llama.cpp")  # the converter's alpha
    assert any(not torch.allclose(converter[m], peft[m]) for m in peft)


# ----------------------------------------------------------------------------- tiny adapters vs PEFT's merge


@pytest.mark.parametrize("name", ["plain", "patterns", "rslora", "embedding"])
def test_tiny_adapters_equal_peft_merge(name: str, tmp_path: Path, base: torch.nn.Module,
                                        adapters: dict[str, Path], tiny_base: Path) -> None:
    summary = export_gguf(adapters[name], tmp_path / "a.gguf", tiny_base)
    assert summary["scale_folded"] == (name in ("patterns", "rslora"))
    merged = {key.removesuffix(".weight"): delta for key, delta in peft_delta_weights(base, adapters[name]).items()}
    got = llamacpp_deltas(tmp_path / "a.gguf", base.config.num_attention_heads, base.config.num_key_value_heads)
    assert_deltas(got, merged, rtol=1e-4)  # PEFT merges in float32


def test_embeddings_and_lm_head_of_an_untied_base(tmp_path: Path, base: torch.nn.Module, tiny_base: Path) -> None:
    folder = make_adapter(tmp_path / "head", base, 9, target_modules=["embed_tokens", "lm_head", "k_proj"])
    export_gguf(folder, tmp_path / "head.gguf", tiny_base)
    _, tensors = read_gguf(tmp_path / "head.gguf")
    assert list(tensors)[:4] == ["output.weight.lora_a", "output.weight.lora_b", "token_embd.weight.lora_a",
                                 "token_embd.weight.lora_b"]  # the converter's order: sorted adapter keys
    merged = {key.removesuffix(".weight"): delta for key, delta in peft_delta_weights(base, folder).items()}
    got = llamacpp_deltas(tmp_path / "head.gguf", base.config.num_attention_heads, base.config.num_key_value_heads)
    assert_deltas(got, merged, rtol=1e-4)


# ----------------------------------------------------------------------------- refusals


def _refused(call, folder: Path, match: str) -> None:
    before = sorted(p.name for p in folder.rglob("*"))
    with pytest.raises(LataError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in folder.rglob("*")) == before


def test_refusals_write_nothing(tmp_path: Path, adapters: dict[str, Path], tiny_base: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    plain = adapters["plain"]
    _refused(lambda: export_gguf(plain, out / "a.gguf"), out, "not a transformers model folder")  # no base
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    config = json.loads((tiny_base / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    _refused(lambda: export_gguf(plain, out / "a.gguf", gpt2), out, "GPT2LMHeadModel.*not supported")
    tied = tmp_path / "tied"
    tied.mkdir()
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    _refused(lambda: export_gguf(adapters["embedding"], out / "a.gguf", tied), out, "ties its output")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    shutil.copy(tiny_base / "config.json", wrong / "config.json")
    save_file({"model.layers.0.mlp.down_proj.weight": torch.zeros(32, 32)}, wrong / "model.safetensors")
    _refused(lambda: export_gguf(plain, out / "a.gguf", wrong), out, "wrong base model")
    _refused(lambda: export_gguf(plain, out, tiny_base), out, "is a folder")
    (out / "a.gguf").write_bytes(b"mine")
    _refused(lambda: export_gguf(plain, out / "a.gguf", tiny_base), out, "already exists")
    assert (out / "a.gguf").read_bytes() == b"mine"
    _refused(lambda: export_gguf(plain, out / "a.gguf", tiny_base, overwrite=True), out, "is not a GGUF file")
    assert (out / "a.gguf").read_bytes() == b"mine"  # --overwrite replaces only a GGUF file
    (out / "a.gguf").write_bytes(b"GGUF and an old export")
    export_gguf(plain, out / "a.gguf", tiny_base, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["a.gguf"]  # no temporary file left
