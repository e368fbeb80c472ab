"""DoRA inputs (issue 16): combined as dense task vectors against the base, written as plain LoRA, folded exactly.

The reference is independent of our code: each input merged by PEFT's own ``merge_and_unload`` on the
base (``W_i``), then ``W = W_base + sum_i c_i (W_i - W_base)`` computed here. Module dims (16 x 16,
8 x 16, 16 x 24) and ranks (DoRA r = 16) are chosen so that the factor-back at ``--rank exact``
(rank = sum of input ranks >= the smaller dim) is lossless; the truncated case is checked against
the reported error.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import perturbed_adapter
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from lata_peft import combine
from lata_peft.adapter import load_adapter
from lata_peft.cli import app
from lata_peft.dora import dora_delta
from lata_peft.errors import LataError
from lata_peft.full_weights import BaseWeights
from lata_peft.scoring import module_norm

TOKENS = torch.tensor([[3, 17, 5, 9, 30, 2, 11, 7]])
runner = CliRunner()


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


make_adapter = perturbed_adapter  # A, B and DoRA's magnitude moved by seeded noise


def merged_state(base: LlamaForCausalLM, adapter: Path) -> dict[str, torch.Tensor]:
    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).merge_and_unload().state_dict()


def reference_state(base: LlamaForCausalLM, adapters: list[Path], coefficients: list[float]) -> dict[str, torch.Tensor]:
    """``W_base + sum_i c_i (W_i - W_base)``, each ``W_i`` from PEFT's ``merge_and_unload``."""
    original = base.state_dict()
    merged = [merged_state(base, adapter) for adapter in adapters]
    return {key: value + sum(c * (m[key] - value) for c, m in zip(coefficients, merged, strict=True))
            for key, value in original.items()}


def logits_of(base: LlamaForCausalLM, state: dict[str, torch.Tensor]) -> torch.Tensor:
    model = copy.deepcopy(base)
    model.load_state_dict(state)
    with torch.no_grad():
        return model(TOKENS).logits


def adapter_logits(base: LlamaForCausalLM, out: Path) -> torch.Tensor:
    with torch.no_grad():
        return PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()(TOKENS).logits


def digests(*folders: Path) -> dict[str, str]:
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in folders for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def dora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A saved tiny Llama base, two DoRA adapters (r = 16, different targets) and a plain LoRA one."""
    root = tmp_path_factory.mktemp("dora")
    base = tiny()
    base.save_pretrained(root / "base")
    return {
        "base": base, "base_folder": root / "base",
        "a": make_adapter(base, root / "a", 1, r=16, lora_alpha=8, use_dora=True,
                          target_modules=["q_proj", "v_proj", "down_proj"]),
        "b": make_adapter(base, root / "b", 2, r=16, lora_alpha=32, use_dora=True, target_modules=["q_proj", "k_proj"]),
        "plain": make_adapter(base, root / "plain", 3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    }


def test_peft_saves_what_we_read(dora):
    """The files hold PEFT's ``<module>.lora_magnitude_vector`` (one per output feature), and each module's
    task vector (and its norm, ``scoring.module_norm``) is PEFT's merge minus the base."""
    keys = load_file(dora["a"] / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector"].shape == (8,)
    adapter, state = load_adapter(dora["a"]), dora["base"].state_dict()
    merged = merged_state(dora["base"], dora["a"])
    base_weights = BaseWeights(dora["base_folder"])
    for name, module in adapter.modules.items():
        weight = state[f"{name}.weight"]
        reference = merged[f"{name}.weight"] - weight
        ours = dora_delta(weight, module.delta, module.magnitude, module.kind)
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
        assert module_norm(adapter, name, base_weights) == pytest.approx(float(reference.double().norm()), rel=1e-5)


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16))


KINDS = {  # model, LoRA targets, how lata-peft lays the weight out (lata_peft.dora's table)
    "conv1d_fan_in_fan_out": (_gpt2, {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}, "linear_t"),
    "embedding": (tiny, {"target_modules": ["embed_tokens"]}, "embedding"),
    "conv2d": (_ConvNet, {"target_modules": ["conv"]}, "conv"),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_task_vector_is_peft_merge_for_every_layer_kind(tmp_path, kind):
    """The norm runs over a different weight axis per layer kind; each agrees with PEFT's merge."""
    make, config, layout = KINDS[kind]
    base = make().eval()
    folder = make_adapter(base, tmp_path / "a", 5, r=2, lora_alpha=4, use_dora=True, **config)
    adapter, state, merged = load_adapter(folder), base.state_dict(), merged_state(base, folder)
    assert {module.kind for module in adapter.modules.values()} == {layout}
    for name, module in adapter.modules.items():
        weight = state[f"{name}.weight"]
        ours = module.task_vector(weight.reshape(module.delta.shape)).reshape(weight.shape)
        torch.testing.assert_close(ours, merged[f"{name}.weight"] - weight, rtol=0, atol=1e-6)


CASES = {
    "weights": (["a", "b"], [], {"weights": (1.0, 0.5)}, [1.0, 0.5]),
    "forget": (["a"], ["b"], {}, [1.0, -1.0]),
    "dora_and_lora": (["a", "plain"], [], {"weights": (1.0, 0.5)}, [1.0, 0.5]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_combination_loads_in_peft_with_the_dense_reference_logits(dora, tmp_path, case):
    tasks, forget, options, coefficients = CASES[case]
    out = tmp_path / "out"
    result = combine([str(dora[t]) for t in tasks], out, forget=[str(dora[f]) for f in forget],
                     base=str(dora["base_folder"]), **options)
    config = json.loads((out / "adapter_config.json").read_text())
    assert not config.get("use_dora")
    assert not [key for key in load_file(out / "adapter_model.safetensors") if "magnitude" in key]
    assert result.combination.max_relative_error < 1e-5  # rank sum >= the smaller dim: lossless
    expected = logits_of(dora["base"], reference_state(dora["base"], [dora[n] for n in tasks + forget], coefficients))
    before = logits_of(dora["base"], dora["base"].state_dict())
    assert (expected - before).abs().max() > 1e-2
    torch.testing.assert_close(adapter_logits(dora["base"], out), expected, rtol=1e-4, atol=1e-4)


def test_truncated_factor_back_reports_its_exact_error(dora, tmp_path):
    """At ``--rank 2`` the written factors are a truncation: the report gives ``|dW_ref - B'A'|_F`` exactly."""
    out = tmp_path / "out"
    result = combine([str(dora["a"])], out, base=str(dora["base_folder"]), rank="2")
    reference, original = merged_state(dora["base"], dora["a"]), dora["base"].state_dict()
    written = load_adapter(out)
    reports = {r.module: r for r in result.combination.reports}
    assert set(reports) == set(written.modules)
    for name, module in written.modules.items():
        exact = (reference[f"{name}.weight"] - original[f"{name}.weight"]).double()
        error = float((exact - module.delta.dense().double()).norm())
        assert module.delta.rank == 2 and error > 1e-3
        assert reports[name].error == pytest.approx(error, rel=1e-4)
        assert reports[name].relative_error == pytest.approx(error / float(exact.norm()), rel=1e-4)


def test_fold_into_is_exact_whatever_the_rank(dora, tmp_path):
    """``--fold-into`` adds the exact dense merge, not the rank-1 factors written for an adapter."""
    out = tmp_path / "folded"
    combine([str(dora["a"]), str(dora["plain"])], out, fold_into=str(dora["base_folder"]), weights=(1.0, 0.5),
            rank="1")
    folded = load_file(out / "model.safetensors")
    expected = reference_state(dora["base"], [dora["a"], dora["plain"]], [1.0, 0.5])
    for key, value in expected.items():
        torch.testing.assert_close(folded[key], value, rtol=0, atol=1e-5)


def test_fold_verb_equals_peft_merge_and_unload(dora, tmp_path):
    out = tmp_path / "folded"
    result = runner.invoke(app, ["fold", str(dora["a"]), "--base", str(dora["base_folder"]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    folded, merged = load_file(out / "model.safetensors"), merged_state(dora["base"], dora["a"])
    assert set(folded) == set(merged)
    for key, value in merged.items():
        torch.testing.assert_close(folded[key], value, rtol=0, atol=1e-5)


@pytest.mark.parametrize("verb", ["combine", "inspect"])
def test_without_base_is_one_line_and_nothing_written(dora, tmp_path, verb):
    inputs = [dora["plain"], dora["b"]]
    before = digests(*inputs)
    out = tmp_path / "out"
    args = [verb, *map(str, inputs), *(["-o", str(out)] if verb == "combine" else [])]
    result = runner.invoke(app, args, terminal_width=400)
    message = result.output.strip()
    assert result.exit_code == 2, result.output
    assert len(message.splitlines()) == 1 and "Traceback" not in result.output, message
    assert str(dora["b"]) in message and "DoRA" in message and "--base BASE" in message, message
    assert not out.exists() and not list(tmp_path.iterdir())
    assert digests(*inputs) == before


def _short_magnitude(tensors: dict[str, torch.Tensor], config: dict) -> None:
    key = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    tensors[key] = tensors[key][:3]


def _no_flag(tensors: dict[str, torch.Tensor], config: dict) -> None:
    config["use_dora"] = False


@pytest.mark.parametrize("change", [_short_magnitude, _no_flag])
def test_magnitude_that_does_not_fit_is_one_line(dora, tmp_path, change):
    """A magnitude vector of the wrong length, or one without use_dora, names the file."""
    from safetensors.torch import save_file

    tensors = load_file(dora["a"] / "adapter_model.safetensors")
    config = json.loads((dora["a"] / "adapter_config.json").read_text())
    change(tensors, config)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LataError, match="DoRA magnitude vector") as caught:
        load_adapter(tmp_path)
    assert str(tmp_path / "adapter_model.safetensors") in str(caught.value)
