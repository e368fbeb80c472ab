"""Combined adapters load in PEFT and give the logits of the dense weighted sum.

The reference never uses our code: each input's dense delta is what PEFT's own
``merge_and_unload`` adds to the base, summed densely with the same coefficients.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import logits_with_adapter, logits_with_deltas, peft_delta_weights
from peft import PeftModel
from safetensors.torch import load_file

import lata_peft


def expected_logits(base, tokens, terms):
    """Base logits with ``sum_i c_i * (merge_and_unload(adapter_i) - W)`` added densely."""
    total: dict[str, torch.Tensor] = {}
    for coefficient, folder in terms:
        for name, delta in peft_delta_weights(base, folder).items():
            total[name] = total.get(name, 0) + coefficient * delta
    return logits_with_deltas(base, total, tokens)


@pytest.mark.parametrize(
    ("tasks", "weights", "forget", "lam"),
    [
        (["plain", "rank8"], [1.0, 0.5], [], 1.0),  # mixed ranks and alphas
        (["rslora", "patterns"], [0.7, 1.3], [], 1.0),  # rsLoRA, rank_pattern, alpha_pattern
        (["plain", "attention_only"], None, ["patterns"], 0.8),  # different target modules, forgetting
        (["embedding", "some_layers"], [1.0, 2.0], ["plain"], 1.0),  # embedding LoRA, layers_to_transform
    ],
)
def test_exact_combination_matches_dense_sum(tmp_path, base, adapters, tokens, tasks, weights, forget, lam):
    out = tmp_path / "out"
    lata_peft.combine([adapters[t] for t in tasks], out, forget=[adapters[f] for f in forget],
                      weights=weights, lam=lam)
    coefficients = [lam * w for w in (weights or [1.0] * len(tasks))]
    terms = [(c, adapters[t]) for c, t in zip(coefficients, tasks, strict=True)]
    terms += [(-lam, adapters[f]) for f in forget]
    want = expected_logits(base, tokens, terms)
    got = logits_with_adapter(base, out, tokens)
    assert (got - want).abs().max() < 1e-5 * max(1.0, want.abs().max())
    # and it really moved the model
    with torch.no_grad():
        assert (base(tokens).logits - got).abs().max() > 1e-3


def test_output_config_describes_what_was_written(tmp_path, adapters):
    out = tmp_path / "out"
    lata_peft.combine([adapters["plain"], adapters["patterns"]], out)
    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(out / "adapter_model.safetensors")
    for key, tensor in tensors.items():
        if key.endswith("lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            rank = config["rank_pattern"].get(module, config["r"])
            assert tensor.shape[0] == rank
            assert config["alpha_pattern"].get(module, config["lora_alpha"]) == rank  # scale 1
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                "v_proj"]
    assert config["base_model_name_or_path"] == "tiny-llama-for-tests"
    report = json.loads((out / "lata_report.json").read_text())
    assert [i["role"] for i in report["inputs"]] == ["task", "task"]
    assert all(len(i["sha256"]["adapter_model.safetensors"]) == 64 for i in report["inputs"])
    assert report["summary"]["max_error"] == 0.0


def test_truncated_combination_is_the_best_rank_k_approximation(tmp_path, base, adapters):
    out = tmp_path / "out"
    result = lata_peft.combine([adapters["plain"], adapters["rank8"]], out, rank=3)
    dense = {name: d for name, d in peft_delta_weights(base, adapters["plain"]).items()}
    for name, delta in peft_delta_weights(base, adapters["rank8"]).items():
        dense[name] = dense[name] + delta
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).merge_and_unload()
    weights = dict(merged.named_parameters())
    original = dict(base.named_parameters())
    reports = {r.module: r for r in result.combination.reports}
    for name, exact in dense.items():
        written = (weights[name] - original[name]).detach().double()
        S = torch.linalg.svdvals(exact)
        best_error = float(S[3:].square().sum().sqrt())
        assert float((written - exact).norm()) == pytest.approx(best_error, rel=1e-3, abs=1e-5)
        assert reports[name.removesuffix(".weight")].error == pytest.approx(best_error, rel=1e-3, abs=1e-5)
        assert torch.linalg.matrix_rank(written.float(), rtol=1e-4) <= 3


def test_matches_peft_cat_and_shows_peft_linear_is_not_the_sum(tmp_path, base, adapters, tokens):
    """PEFT's ``cat`` is exact like ours; its ``linear`` averages factors, which is not the weighted sum."""
    weights = [0.6, 0.4]
    out = tmp_path / "out"
    lata_peft.combine([adapters["plain"], adapters["instruct"]], out, weights=weights)
    ours = logits_with_adapter(base, out, tokens)

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapters["plain"]), adapter_name="a")
    model.load_adapter(str(adapters["instruct"]), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], weights, "cat", combination_type="cat")
    model.add_weighted_adapter(["a", "b"], weights, "linear", combination_type="linear")
    model.eval()
    with torch.no_grad():
        model.set_adapter("cat")
        peft_cat = model(tokens).logits
        model.set_adapter("linear")
        peft_linear = model(tokens).logits
    want = expected_logits(base, tokens, [(0.6, adapters["plain"]), (0.4, adapters["instruct"])])
    torch.testing.assert_close(ours, peft_cat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    assert (peft_linear - want).abs().max() > 100 * (ours - want).abs().max() + 1e-4


def test_output_keeps_the_input_dtype(tmp_path, adapters):
    source = adapters["plain"]
    half = tmp_path / "half"
    half.mkdir()
    (half / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    from safetensors.torch import save_file

    save_file({k: v.to(torch.bfloat16) for k, v in load_file(source / "adapter_model.safetensors").items()},
              half / "adapter_model.safetensors")
    out = tmp_path / "out"
    lata_peft.combine([half, half], out, weights=[0.5, 0.5])
    assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.bfloat16}
    lata_peft.combine([half], tmp_path / "f32", dtype="float32")
    assert {t.dtype for t in load_file(tmp_path / "f32" / "adapter_model.safetensors").values()} == {torch.float32}


def test_inputs_are_not_modified(tmp_path, adapters):
    import hashlib

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    before = {k: digest(v) for k, v in adapters.items()}
    lata_peft.combine([adapters["plain"], adapters["rank8"]], tmp_path / "o", forget=[adapters["patterns"]],
                      method="ties", rank=4)
    assert {k: digest(v) for k, v in adapters.items()} == before


def test_gpt2_fan_in_fan_out_conv1d(tmp_path):
    """GPT-2's Conv1D stores weights transposed (fan_in_fan_out); the combination must follow."""
    from conftest import make_adapter
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()
    a = make_adapter(tmp_path / "a", gpt2, 1, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    b = make_adapter(tmp_path / "b", gpt2, 2, r=3, target_modules=["c_attn"], fan_in_fan_out=True)
    out = tmp_path / "out"
    lata_peft.combine([a, b], out, weights=[1.0, -0.5])
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    want = expected_logits(gpt2, tokens, [(1.0, a), (-0.5, b)])
    got = logits_with_adapter(gpt2, out, tokens)
    assert (got - want).abs().max() < 1e-5 * max(1.0, want.abs().max())


class TinyConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            [torch.nn.Sequential(torch.nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), torch.nn.ReLU())
             for i in range(2)]
        )
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def test_conv2d_lora(tmp_path):
    """Conv LoRA (A: (r, in, kh, kw), B: (out, r, 1, 1)) combines exactly and loads back in PEFT."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = TinyConvNet().eval()
    folders = []
    for seed, rank in ((1, 2), (2, 3)):
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=4, target_modules=r"blocks\.\d\.0", init_lora_weights=False)
        model = get_peft_model(copy.deepcopy(net), config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.1)
        model.save_pretrained(tmp_path / f"conv{seed}")
        folders.append(tmp_path / f"conv{seed}")
    out = tmp_path / "out"
    lata_peft.combine(folders, out, weights=[0.5, 1.5])
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    expected = copy.deepcopy(net)
    parameters = dict(expected.named_parameters())
    with torch.no_grad():
        for coefficient, folder in zip((0.5, 1.5), folders, strict=True):
            merged = PeftModel.from_pretrained(copy.deepcopy(net), str(folder)).merge_and_unload()
            for name, parameter in merged.named_parameters():
                parameters[name].add_(coefficient * (parameter - dict(net.named_parameters())[name]))
        got = PeftModel.from_pretrained(copy.deepcopy(net), str(out))(x)
        torch.testing.assert_close(got, expected(x), rtol=1e-5, atol=1e-5)
