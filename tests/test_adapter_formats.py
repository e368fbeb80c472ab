"""``adapter_formats.normalize``: AdaLoRA, PEFT 0.2 ``enable_lora`` and old key names as exact plain LoRA.

Every reference is PEFT's own: AdaLoRA adapters are trained, pruned and saved by PEFT and reloaded
with ``PeftModel.from_pretrained``; PEFT 0.2's ``MergedLinear`` forward is copied from its v0.2.0 source.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import make_adapter, tiny_llama
from peft import AdaLoraConfig, PeftModel, get_peft_model
from peft.tuners.adalora import AdaLoraLayer
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch.nn import functional
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lata_peft import adapter_formats
from lata_peft.adapter import KEY_PREFIX, LoraModule, parse_modules, read_tensors
from lata_peft.adapter_config import check_config
from lata_peft.adapter_formats import Normalized, normalize
from lata_peft.errors import LataError

TARGETS = ["q_proj", "v_proj", "down_proj"]


def small_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return small_llama()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def adalora_model(base: LlamaForCausalLM, seed: int, **options: object) -> torch.nn.Module:
    """A PEFT AdaLoRA model (init_r=4) with seeded random A, E, B."""
    settings = {"init_r": 4, "target_r": 2, "lora_alpha": 16, "total_step": 6, "tinit": 1, "tfinal": 2,
                "target_modules": TARGETS, **options}
    model = get_peft_model(copy.deepcopy(base), AdaLoraConfig(**settings))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_()
    return model


def save_adalora(folder: Path, base: LlamaForCausalLM, how: str, **options: object) -> Path:
    """An AdaLoRA adapter saved by PEFT: pruned by hand (one module to rank 0), by PEFT's allocator, or unpruned."""
    model = adalora_model(base, seed=3, **options)
    if how == "masks":
        masks = {}
        for index, (name, _) in enumerate(n for n in model.base_model.model.named_parameters() if "lora_E" in n[0]):
            masks[name] = [bool((index + step) % 3) for step in range(4)] if index else [False] * 4
        model.peft_config["default"].rank_pattern = masks  # as RankAllocator.mask_to_budget writes it
    elif how == "allocator":
        model.train()
        inputs = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))
        for step in range(5):
            model(input_ids=inputs, labels=inputs).loss.backward()
            model.base_model.update_and_allocate(step)
            model.zero_grad()
        assert model.peft_config["default"].rank_pattern, "the allocator should have fixed a rank pattern"
    else:  # no rank_pattern: ranks stay init_r, two singular values zeroed as the budget masking does
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_E" in n)[1:3] = 0
    model.save_pretrained(folder)
    return folder


def read_normalized(folder: Path) -> tuple[Normalized, dict[str, LoraModule]]:
    """Our readers, then normalize, check_config and parse_modules: the order load_adapter runs them in."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors, path = read_tensors(folder, allow_pickle=True)
    normalized = normalize(config, tensors, path)
    return normalized, parse_modules(check_config(normalized.config, path), normalized.tensors, path)


def save_lora(folder: Path, normalized: Normalized) -> Path:
    """The normalized config and tensors as a PEFT LoRA folder."""
    folder.mkdir()
    save_file({key: tensor.contiguous() for key, tensor in normalized.tensors.items()},
              folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(normalized.config))
    return folder


def logits(base: torch.nn.Module, folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    with torch.no_grad():
        return model(tokens).logits


# ----------------------------------------------------------------------------- AdaLoRA


@pytest.mark.parametrize("how", ["masks", "allocator", "unpruned"])
def test_adalora_deltas_and_logits_equal_peft(tmp_path, llama, tokens, how):
    folder = save_adalora(tmp_path / "adalora", llama, how)
    saved = json.loads((folder / "adapter_config.json").read_text())
    normalized, modules = read_normalized(folder)

    reloaded = PeftModel.from_pretrained(copy.deepcopy(llama), str(folder)).eval()
    layers = {name.removeprefix(KEY_PREFIX): layer for name, layer in reloaded.named_modules()
              if isinstance(layer, AdaLoraLayer)}
    assert len(layers) == 2 * len(TARGETS)
    for name, layer in layers.items():
        with torch.no_grad():
            reference = layer.get_delta_weight("default").double()
        if name in modules:
            assert torch.allclose(modules[name].delta.dense().double(), reference, rtol=1e-6, atol=1e-6), name
            assert modules[name].kind == "linear"
        else:
            assert not reference.any(), f"{name} was dropped but PEFT's delta is not zero"

    config = normalized.config
    assert config["peft_type"] == "LORA" and config["use_rslora"] is False
    assert not {"init_r", "target_r", "tinit", "tfinal", "total_step", "beta1", "orth_reg_weight"} & set(config)
    ranks = {name: module.delta.rank for name, module in modules.items()}
    if how == "masks":
        assert "model.layers.0.self_attn.q_proj" not in modules  # its mask keeps nothing
        assert ranks == {name: sum(mask) for name, mask in
                         ((key.removesuffix(".lora_E"), mask) for key, mask in saved["rank_pattern"].items())
                         if sum(mask)}
        assert len(set(ranks.values())) > 1
    if how == "unpruned":
        assert saved["rank_pattern"] is None
        assert sorted(ranks.values()) == [2] + [4] * 5  # two zero singular values dropped exactly

    dropped = sorted(set(layers) - set(modules))
    assert config.get("exclude_modules") == (dropped or None)  # PEFT gives pruned modules no fresh LoRA layer
    lora = save_lora(tmp_path / "lora", normalized)
    lora_model = PeftModel.from_pretrained(copy.deepcopy(llama), str(lora)).eval()
    adapted = {name.removeprefix(KEY_PREFIX) for name, layer in lora_model.named_modules()
               if isinstance(layer, LoraLayer)}
    assert adapted == set(modules)
    with torch.no_grad():
        torch.testing.assert_close(lora_model(tokens).logits, reloaded(tokens).logits, rtol=1e-5, atol=1e-5)


def test_adalora_default_targets_become_explicit(tmp_path, llama, tokens):
    """AdaLoRA's per-model default targets differ from LoRA's (t5, bart, opt...): the LoRA config names them."""
    folder = save_adalora(tmp_path / "adalora", llama, "unpruned", target_modules=["q_proj", "v_proj"])
    saved = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**saved, "target_modules": None}))  # as some saves have it
    normalized, modules = read_normalized(folder)
    assert normalized.config["target_modules"] == ["q_proj", "v_proj"] and len(modules) == 4
    lora = save_lora(tmp_path / "lora", normalized)
    torch.testing.assert_close(logits(llama, lora, tokens), logits(llama, folder, tokens), rtol=1e-5, atol=1e-5)


def test_adalora_without_tensors_is_refused(tmp_path):
    with pytest.raises(LataError, match="holds no AdaLoRA tensors"):
        normalize({"peft_type": "ADALORA", "init_r": 4}, {}, tmp_path / "adapter_model.safetensors")


def test_adalora_scale_uses_init_r_as_peft_does(tmp_path, llama):
    """After loading a pruned rank_pattern, PEFT keeps ranknum = init_r (not the kept rank)."""
    folder = save_adalora(tmp_path / "adalora", llama, "masks")
    normalized, modules = read_normalized(folder)
    denominator = float(torch.tensor(4.0) + 1e-5)
    for name, module in modules.items():
        assert module.delta.scale == pytest.approx(16 / denominator, rel=1e-12), name
    assert not any(key.endswith("lora_E.weight") or "ranknum" in key for key in normalized.tensors)


def test_adalora_ranknum_tensors_are_dropped(tmp_path, llama):
    folder = save_adalora(tmp_path / "adalora", llama, "masks")
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors, path = read_tensors(folder)
    with_ranknum = {**tensors, f"{KEY_PREFIX}model.layers.1.self_attn.q_proj.ranknum": torch.tensor([4.0])}
    plain = normalize(config, tensors, path)
    dropped = normalize(config, with_ranknum, path)
    assert plain.tensors.keys() == dropped.tensors.keys()


def adalora_inputs(tmp_path: Path, llama: LlamaForCausalLM) -> tuple[dict, dict[str, torch.Tensor], Path]:
    folder = save_adalora(tmp_path / "adalora", llama, "masks")
    tensors, path = read_tensors(folder)
    return json.loads((folder / "adapter_config.json").read_text()), tensors, path


V_PROJ = f"{KEY_PREFIX}model.layers.1.self_attn.v_proj"
MASK_KEY = "model.layers.1.self_attn.v_proj.lora_E"


def _without_e(config, tensors):
    del tensors[f"{V_PROJ}.lora_E"]


def _wide_e(config, tensors):
    tensors[f"{V_PROJ}.lora_E"] = torch.ones(tensors[f"{V_PROJ}.lora_E"].shape[0], 2)


def _short_b(config, tensors):
    tensors[f"{V_PROJ}.lora_B"] = tensors[f"{V_PROJ}.lora_B"][:, :1]


def _count_mask(config, tensors):
    config["rank_pattern"][MASK_KEY] = 3


def _int_mask(config, tensors):
    config["rank_pattern"][MASK_KEY] = [1, 0, 1, 1]


def _long_mask(config, tensors):
    config["rank_pattern"][MASK_KEY] = [True] * 5


def _pattern_list(config, tensors):
    config["rank_pattern"] = [True, False]


def _wrong_rank(config, tensors):
    config["rank_pattern"][MASK_KEY] = [True, True, False, False]


def _bad_key(config, tensors):
    config["rank_pattern"]["model.layers.1.self_attn.v_proj"] = config["rank_pattern"].pop(MASK_KEY)


def _bad_init_r(config, tensors):
    config["init_r"] = "4"


def _stray_tensor(config, tensors):
    tensors[f"{KEY_PREFIX}model.norm.weight"] = torch.ones(32)


def _all_pruned(config, tensors):
    for key in list(config["rank_pattern"]):
        config["rank_pattern"][key] = [False] * 4
    for key in list(tensors):
        tensors[key] = tensors[key][:0] if not key.endswith("lora_B") else tensors[key][:, :0]


BAD_ADALORA = {
    "missing lora_E": (_without_e, "has no lora_E tensor"),
    "E not (r, 1)": (_wide_e, "factor shapes"),
    "B rank differs": (_short_b, "factor shapes"),
    "mask is a count": (_count_mask, "must be a list of true/false"),
    "mask of ints": (_int_mask, "must be a list of true/false"),
    "mask longer than init_r": (_long_mask, "has 5 entries but init_r is 4"),
    "rank_pattern not an object": (_pattern_list, "rank_pattern must be an object"),
    "mask disagrees with tensors": (_wrong_rank, "rank_pattern keeps 2 of init_r=4"),
    "mask key not a lora_E name": (_bad_key, "is not a <module>.lora_E name"),
    "init_r not an int": (_bad_init_r, "init_r must be a positive integer"),
    "a tensor that is no factor": (_stray_tensor, "is not an AdaLoRA factor"),
    "everything pruned": (_all_pruned, "pruned to rank 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADALORA))
def test_bad_adalora_inputs_are_one_line(tmp_path, llama, case):
    config, tensors, path = adalora_inputs(tmp_path, llama)
    break_it, problem = BAD_ADALORA[case]
    break_it(config, tensors)
    with pytest.raises(LataError) as error:
        normalize(config, tensors, path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert problem in message


# ----------------------------------------------------------------------------- old key names and configs


@pytest.fixture(scope="module")
def modern(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("modern") / "lora", tiny_llama(), 11, r=4, lora_alpha=8)


PEFT_02_CONFIG = {  # adapter_config.json as PEFT 0.2 wrote it (alpaca-lora era): no use_rslora, patterns, ...
    "base_model_name_or_path": "decapoda-research/llama-7b-hf", "bias": "none", "enable_lora": None,
    "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": 8, "lora_dropout": 0.05, "merge_weights": False,
    "modules_to_save": None, "peft_type": "LORA", "r": 4, "target_modules": None, "task_type": "CAUSAL_LM",
}

OLD_KEYS = {
    "same names": lambda key: key,
    "no base_model.model. prefix": lambda key: key.removeprefix(KEY_PREFIX),
    "adapter infix": lambda key: key.replace(".weight", ".default.weight"),
    "infix, no prefix, no .weight": lambda key: key.removeprefix(KEY_PREFIX).replace(".weight", ".default"),
}


@pytest.mark.parametrize("case", sorted(OLD_KEYS))
def test_old_bin_layouts_give_the_modern_modules(tmp_path, modern, case):
    _, expected = read_normalized(modern)
    tensors, _ = read_tensors(modern)
    folder = tmp_path / "old"
    folder.mkdir()
    torch.save({OLD_KEYS[case](key): tensor for key, tensor in tensors.items()}, folder / "adapter_model.bin")
    (folder / "adapter_config.json").write_text(json.dumps(PEFT_02_CONFIG))
    normalized, modules = read_normalized(folder)
    assert set(normalized.tensors) == set(tensors)  # today's names
    assert modules.keys() == expected.keys()
    for name, module in modules.items():
        assert module.kind == expected[name].kind
        assert torch.equal(module.delta.dense(), expected[name].delta.dense()), name


def test_modern_lora_passes_through_unchanged(modern):
    config = json.loads((modern / "adapter_config.json").read_text())
    tensors, path = read_tensors(modern)
    normalized = normalize(config, tensors, path)
    assert normalized.config is config and normalized.tensors is tensors and normalized.warnings == ()


def test_other_peft_types_pass_through_for_check_config_to_refuse(modern):
    tensors, path = read_tensors(modern)
    for config in ({"peft_type": "IA3"}, {"peft_type": None}, ["not", "a", "dict"]):
        normalized = normalize(config, tensors, path)
        assert normalized.config is config and normalized.tensors is tensors


def test_factors_of_several_adapters_are_refused(modern):
    tensors, path = read_tensors(modern)
    mixed = {key.replace(".weight", ".default.weight"): tensor for key, tensor in tensors.items()}
    first = next(iter(mixed))
    mixed[first.replace(".default.", ".other.")] = mixed.pop(first)
    with pytest.raises(LataError, match=r"several adapters \(\['default', 'other'\]\)"):
        normalize(dict(PEFT_02_CONFIG), mixed, path)


def test_one_factor_under_two_names_is_refused(modern):
    tensors, path = read_tensors(modern)
    first = next(iter(tensors))
    doubled = {**tensors, first.replace(".weight", ".default.weight"): tensors[first]}
    with pytest.raises(LataError, match="are the same LoRA factor"):
        normalize(dict(PEFT_02_CONFIG), doubled, path)


# ----------------------------------------------------------------------------- PEFT 0.2 enable_lora (GPT-2 c_attn)


def peft_02_merged_forward(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, enable: list[bool], scaling: float,
                           out_features: int) -> torch.Tensor:
    """``MergedLinear.forward``'s LoRA term and ``zero_pad``, from ``src/peft/tuners/lora.py`` at v0.2.0."""
    after_A = functional.linear(x, A)
    after_B = functional.conv1d(after_A.transpose(-2, -1), B, groups=2).transpose(-2, -1)
    lora_ind = torch.zeros((out_features,), dtype=torch.bool).view(len(enable), -1)
    lora_ind[enable, :] = True
    lora_ind = lora_ind.view(-1)
    result = x.new_zeros((*x.shape[:-1], out_features)).view(-1, out_features)
    result[:, lora_ind] = after_B.reshape(-1, out_features // len(enable) * sum(enable))
    return result.view((*x.shape[:-1], out_features)) * scaling


def test_enable_lora_gpt2_c_attn_equals_peft_02(tmp_path):
    torch.manual_seed(5)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=32)).eval()
    enable, r, alpha = [True, False, True], 2, 16
    hidden, out_features = 32, 96
    tensors = {}
    for layer in range(2):  # lora_A: Linear(in, r k); lora_B: Conv1d(r k, o k, kernel_size=1, groups=2)
        tensors[f"{KEY_PREFIX}transformer.h.{layer}.attn.c_attn.lora_A.weight"] = torch.randn(r * 2, hidden)
        tensors[f"{KEY_PREFIX}transformer.h.{layer}.attn.c_attn.lora_B.weight"] = torch.randn(64, r, 1)
    config = {**PEFT_02_CONFIG, "base_model_name_or_path": "gpt2", "enable_lora": enable, "fan_in_fan_out": True,
              "r": r, "lora_alpha": alpha, "target_modules": ["c_attn"]}
    folder = tmp_path / "peft02"
    folder.mkdir()
    torch.save(tensors, folder / "adapter_model.bin")
    (folder / "adapter_config.json").write_text(json.dumps(config))

    normalized, modules = read_normalized(folder)
    assert "enable_lora" not in normalized.config and normalized.warnings == ()
    assert (normalized.config["r"], normalized.config["lora_alpha"]) == (4, 32)
    deltas = {}
    for layer in range(2):
        name = f"transformer.h.{layer}.attn.c_attn"
        A, B = tensors[f"{KEY_PREFIX}{name}.lora_A.weight"], tensors[f"{KEY_PREFIX}{name}.lora_B.weight"]
        reference = peft_02_merged_forward(torch.eye(hidden)[None], A, B, enable, alpha / r, out_features)[0]
        assert modules[name].kind == "linear_t" and modules[name].delta.rank == 4
        torch.testing.assert_close(modules[name].delta.dense(), reference, rtol=1e-6, atol=1e-6)
        assert not reference[:, 32:64].any()  # k is not adapted
        deltas[f"{name}.weight"] = reference  # Conv1D weight is (in, out): y = x W + b

    patched = copy.deepcopy(gpt2)
    with torch.no_grad():
        for name, parameter in patched.named_parameters():
            if name in deltas:
                parameter.add_(deltas[name])
    tokens = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    lora = save_lora(tmp_path / "lora", normalized)
    with torch.no_grad():
        torch.testing.assert_close(logits(gpt2, lora, tokens), patched(tokens).logits, rtol=1e-5, atol=1e-5)


def test_enable_lora_on_a_linear_layer_drops_fan_in_fan_out(tmp_path):
    """PEFT 0.2 set fan_in_fan_out with enable_lora for any single target, then ignored it on nn.Linear."""
    tensors = {f"{KEY_PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
               f"{KEY_PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 2, 1)}
    config = {**PEFT_02_CONFIG, "enable_lora": [True, False, True], "fan_in_fan_out": True, "r": 2}
    path = tmp_path / "adapter_model.bin"
    normalized = normalize(config, tensors, path)
    assert normalized.config["fan_in_fan_out"] is False
    assert len(normalized.warnings) == 1 and "read as nn.Linear" in normalized.warnings[0]
    modules = parse_modules(check_config(normalized.config, path), normalized.tensors, path)
    assert modules["model.layers.0.self_attn.q_proj"].delta.shape == (48, 32)


@pytest.mark.parametrize(
    ("enable", "b_shape", "problem"),
    [
        ([True, False, True], (32, 2), "factor shapes"),
        ([True, False, True], (33, 2, 1), "not a grouped MergedLinear pair"),
        ([1, 0, 1], (32, 2, 1), "enable_lora must be a list of true/false"),
        ([False, False, False], (32, 2, 1), "enables no block"),
    ],
)
def test_bad_enable_lora_inputs(tmp_path, enable, b_shape, problem):
    tensors = {f"{KEY_PREFIX}h.0.attn.c_attn.lora_A.weight": torch.randn(4, 32),
               f"{KEY_PREFIX}h.0.attn.c_attn.lora_B.weight": torch.randn(*b_shape)}
    path = tmp_path / "adapter_model.bin"
    with pytest.raises(LataError) as error:
        normalize({**PEFT_02_CONFIG, "enable_lora": enable, "r": 2}, tensors, path)
    assert str(error.value).startswith(f"{path}: ") and problem in str(error.value)


# ----------------------------------------------------------------------------- quantised bases


@pytest.mark.parametrize(
    ("base", "warned"),
    [
        ("unsloth/llama-3-8b-bnb-4bit", True),
        ("unsloth/llama-3.2-3b-unsloth-bnb-4bit", True),
        ("unsloth/Qwen2.5-3B-Instruct-bnb-4bit", True),
        ("someone/model_bnb_4bit", True),
        ("unsloth/Llama-3.2-1B-Instruct", False),
        ("meta-llama/Llama-2-7b-hf", False),
        (None, False),
    ],
)
def test_quantised_base_is_a_warning_not_a_refusal(modern, base, warned):
    config = {**json.loads((modern / "adapter_config.json").read_text()), "base_model_name_or_path": base}
    tensors, path = read_tensors(modern)
    normalized = normalize(config, tensors, path)
    assert normalized.config is config and normalized.tensors is tensors
    assert len(normalized.warnings) == int(warned)
    if warned:
        assert "dequantised" in normalized.warnings[0] and "\n" not in normalized.warnings[0]


def test_pruned_modules_join_exclude_modules_in_every_form():
    excluding = adapter_formats._excluding
    assert excluding(None, ["a.q"]) == ["a.q"]
    assert excluding(["lm_head", "a.q"], ["a.q", "b.v"]) == ["lm_head", "a.q", "b.v"]
    pattern = excluding(r".*\.k_proj", ["a.q"])
    assert pattern == r"(?:.*\.k_proj)|a\.q"
    assert [name for name in ("x.k_proj", "a.q", "aXq") if re.fullmatch(pattern, name)] == ["x.k_proj", "a.q"]
    assert excluding("lm_head", []) == "lm_head"

