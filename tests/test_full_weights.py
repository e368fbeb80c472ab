"""Adapters with more than LoRA factors (issue 16): ``modules_to_save`` heads, trained biases
(``bias="all"``), ``lora_bias``, and GPT-2 adapters saved with either ``fan_in_fan_out``.

The reference is independent of our code: each input merged by PEFT's own ``merge_and_unload``,
then ``W = W_base + sum_i c_i (W_i - W_base)`` computed densely here, and the logits of that
model against the logits of our output loaded with ``PeftModel.from_pretrained`` (or our fold).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import perturbed_adapter
from peft import PeftModel
from safetensors.torch import load_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForSequenceClassification,
    OPTConfig,
    OPTForCausalLM,
)
from typer.testing import CliRunner

from lata_peft import combine
from lata_peft.cli import app

TOKENS = torch.tensor([[3, 17, 5, 9, 30, 2, 11]])


def llama_cls() -> LlamaForSequenceClassification:
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(config)


def opt() -> OPTForCausalLM:
    config = OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
                       word_embed_proj_dim=16, max_position_embeddings=32)
    return OPTForCausalLM(config)


def gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32))


def save_base(make, folder: Path):
    torch.manual_seed(0)
    model = make().eval()
    model.save_pretrained(folder)
    return model


def make_adapter(make, base_folder: Path, folder: Path, seed: int, **config) -> Path:
    """A PEFT adapter with every trainable tensor (factors, heads, biases) set to seeded random values."""
    return perturbed_adapter(type(make()).from_pretrained(base_folder), folder, seed, **config)


def merged_state(make, base_folder: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = type(make()).from_pretrained(base_folder)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def expected_model(make, base_folder: Path, adapters: list[Path], coefficients: list[float]):
    """``W_base + sum_i c_i (W_i - W_base)`` from PEFT's merges, as a model."""
    model = type(make()).from_pretrained(base_folder).eval()
    base = model.state_dict()
    merged = [merged_state(make, base_folder, a) for a in adapters]
    state = {k: v + sum(c * (m[k] - v) for c, m in zip(coefficients, merged, strict=True)) for k, v in base.items()}
    model.load_state_dict(state)
    return model


def our_logits(make, base_folder: Path, out: Path) -> torch.Tensor:
    model = type(make()).from_pretrained(base_folder).eval()
    with torch.no_grad():
        return PeftModel.from_pretrained(model, out).eval()(TOKENS).logits


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def assert_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert torch.allclose(ours, reference, atol=1e-4, rtol=1e-4), (ours - reference).abs().max()


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """Base LlamaForSequenceClassification and two SEQ_CLS adapters (the ``score`` head saved in full)."""
    root = tmp_path_factory.mktemp("heads")
    save_base(llama_cls, root / "base")
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "SEQ_CLS"}
    a = make_adapter(llama_cls, root / "base", root / "a", 1, **config)
    b = make_adapter(llama_cls, root / "base", root / "b", 2, **{**config, "r": 2})
    return root / "base", a, b


def test_modules_to_save_heads_are_task_vectors_with_base(heads, tmp_path):
    base, a, b = heads
    assert "base_model.model.score.weight" in load_file(a / "adapter_model.safetensors")
    out = tmp_path / "out"
    combine([a, b], out, base=str(base), weights=(1.0, 0.5))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["score"] and config["task_type"] == "SEQ_CLS"
    reference = logits(expected_model(llama_cls, base, [a, b], [1.0, 0.5]))
    assert_close(our_logits(llama_cls, base, out), reference)


def test_modules_to_save_folded(heads, tmp_path):
    base, a, b = heads
    out = tmp_path / "folded"
    combine([a, b], out, fold_into=str(base), weights=(1.0, 0.5))
    folded = LlamaForSequenceClassification.from_pretrained(out).eval()
    assert_close(logits(folded), logits(expected_model(llama_cls, base, [a, b], [1.0, 0.5])))


def test_differing_heads_without_base_are_refused_naming_base(heads, tmp_path):
    _base, a, b = heads
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["combine", str(a), str(b), "-o", str(out)])
    assert result.exit_code == 2 and "--base" in result.output and "score.weight" in result.output, result.output
    assert not out.exists()


def test_one_head_is_carried_without_base(heads, tmp_path):
    """One input holds the head: it is carried through, as PEFT's add_weighted_adapter does."""
    _base, a, _ = heads
    out = tmp_path / "out"
    combine([a], out, weights=(0.5,))
    written = load_file(out / "adapter_model.safetensors")
    assert torch.equal(written["base_model.model.score.weight"],
                       load_file(a / "adapter_model.safetensors")["base_model.model.score.weight"])


@pytest.fixture(scope="module")
def opt_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("opt")
    save_base(opt, root / "base")
    return root, root / "base"


@pytest.mark.parametrize("kind", ["lora_bias", "bias_all"])
def test_bias_terms_combine_like_peft_merges(opt_base, tmp_path, kind):
    _root, base = opt_base
    extra = {"lora_bias": True} if kind == "lora_bias" else {"bias": "all"}
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], **extra}
    a = make_adapter(opt, base, tmp_path / "a", 3, **config)
    b = make_adapter(opt, base, tmp_path / "b", 4, **config)
    out = tmp_path / "out"
    combine([a, b], out, base=str(base), weights=(1.0, -0.5) if kind == "bias_all" else (1.0, 0.5))
    written = json.loads((out / "adapter_config.json").read_text())
    assert written.get("lora_bias", False) is (kind == "lora_bias")  # left out when false (older PEFT)
    assert written["bias"] == ("all" if kind == "bias_all" else "none")
    coefficients = [1.0, -0.5] if kind == "bias_all" else [1.0, 0.5]
    assert_close(our_logits(opt, base, out), logits(expected_model(opt, base, [a, b], coefficients)))


def test_gpt2_adapters_saved_with_either_fan_in_fan_out_combine(tmp_path):
    """PEFT forces fan_in_fan_out on for Conv1D when it loads, whatever the saved config says."""
    base = tmp_path / "base"
    save_base(gpt2, base)
    a = make_adapter(gpt2, base, tmp_path / "a", 5, r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    b = make_adapter(gpt2, base, tmp_path / "b", 6, r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    config = json.loads((b / "adapter_config.json").read_text())
    (b / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": False}))  # as older PEFT saved
    out = tmp_path / "out"
    combine([a, b], out)
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert_close(our_logits(gpt2, base, out), logits(expected_model(gpt2, base, [a, b], [1.0, 1.0])))


def test_inspect_reports_full_weights(heads):
    from lata_peft import inspect

    base, a, _ = heads
    result = inspect([a], base=str(base))
    rows = result.adapters["a"]["full_weights"]
    assert [r["parameter"] for r in rows] == ["score.weight"]
    saved = load_file(a / "adapter_model.safetensors")["base_model.model.score.weight"]
    original = load_file(base / "model.safetensors")["score.weight"]
    assert rows[0]["delta_norm"] == pytest.approx(float((saved - original).double().norm()), rel=1e-6)


def test_base_without_the_head_or_with_another_shape_is_one_line(heads, tmp_path):
    """--base must hold each full weight at the saved shape: else exit 2, one line, nothing written."""
    from safetensors.torch import save_file

    base, a, b = heads
    for name, change in (("no_head", lambda t: t.pop("score.weight")),
                         ("wide_head", lambda t: t.update({"score.weight": torch.zeros(5, 32)}))):
        other = tmp_path / name
        other.mkdir()
        (other / "config.json").write_text((base / "config.json").read_text())
        tensors = load_file(base / "model.safetensors")
        change(tensors)
        save_file(tensors, other / "model.safetensors")
        out = tmp_path / f"out_{name}"
        result = CliRunner().invoke(app, ["combine", str(a), str(b), "--base", str(other), "-o", str(out)])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and "score.weight" in lines[0], result.output
        assert ("not in the base" if name == "no_head" else "resized vocabulary") in lines[0]
        assert not out.exists()
