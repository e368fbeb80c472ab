"""The engines' rules of ``tests/engine_rules.py`` on real PEFT folders: the shipped adapter is taken and read
alike by all; PEFT's rule agrees with PEFT's own merge; a mixed-rank lata-peft output is read right by vLLM
(both before and after its per-module patterns, since lata-peft writes ``alpha == r``) and wrong by TGI's
and llama.cpp's converter (what ``--target`` and ``export --gguf`` are for)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import peft_delta_weights
from engine_rules import (
    ENGINES,
    engine_delta,
    engine_scales,
    llamacpp_problems,
    tgi_ignored,
    tgi_problems,
    vllm_max_lora_rank,
    vllm_problems,
)
from safetensors.torch import load_file, save_file

import lata_peft

MATH = Path(__file__).resolve().parents[1] / "examples" / "adapters" / "math"


def close(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], rtol: float = 1e-9) -> bool:
    """Same modules, each delta within ``rtol`` of its largest entry."""
    return set(x) == set(y) and all(
        float((x[k].double() - y[k].double()).abs().max()) <= rtol * float(y[k].abs().max()) for k in x)


def test_shipped_math_is_accepted_and_read_alike_by_all() -> None:
    assert vllm_problems(MATH, max_lora_rank=8) == vllm_problems(MATH, 8, legacy=True) == []
    assert vllm_max_lora_rank(MATH) == 8 and vllm_problems(MATH, max_lora_rank=1)
    assert tgi_problems(MATH) == tgi_problems(MATH, sgmv=False) == llamacpp_problems(MATH) == tgi_ignored(MATH) == []
    tensors = load_file(MATH / "adapter_model.safetensors")  # r=8, lora_alpha=16: scale 2 everywhere
    modules = {key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
               for key in tensors if key.endswith(".lora_A.weight")}
    assert all(engine_scales(MATH, engine) == dict.fromkeys(modules, 2.0) for engine in ENGINES)
    key = "base_model.model.model.layers.3.self_attn.k_proj"
    expected = 2.0 * tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()
    assert torch.equal(engine_delta(MATH, "tgi", modules=["model.layers.3.self_attn.k_proj"])[
        "model.layers.3.self_attn.k_proj"], expected)


@pytest.mark.parametrize("name", ["plain", "patterns", "rslora", "embedding"])
def test_peft_rule_is_peft_merge(name: str, base: torch.nn.Module, adapters: dict[str, Path]) -> None:
    merged = {key.removesuffix(".weight"): delta for key, delta in peft_delta_weights(base, adapters[name]).items()}
    assert close(engine_delta(adapters[name], "peft"), merged, rtol=1e-5)  # PEFT merges in float32


def test_vllm_reads_patterns_since_0_32(adapters: dict[str, Path]) -> None:
    folder = adapters["patterns"]  # r=4, alpha=8; q_proj of layer 1 has rank 6; up_proj alpha 3; down_proj rank 2
    peft, new, old = (engine_delta(folder, engine) for engine in ("peft", "vllm", "vllm<0.32"))
    assert close(new, peft)
    q, up, k = "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.0.self_attn.k_proj"
    assert torch.allclose(old[q], peft[q] * (8 / 4) / (8 / 6))  # global 8/4 instead of 8/6
    assert torch.allclose(old[up], peft[up] * (8 / 4) / (3 / 4))  # global alpha 8 instead of 3
    assert torch.allclose(old[k], peft[k])
    assert vllm_max_lora_rank(folder) == 8
    assert vllm_problems(folder, max_lora_rank=1) == ["LoRA rank 6 is greater than max_lora_rank 1."]
    assert vllm_problems(folder, max_lora_rank=1, legacy=True) == [
        "LoRA rank 4 is greater than max_lora_rank 1.",  # legacy checks r only, then fails copying rank 6
        "a module has rank 6, more than max_lora_rank 1 (set_lora fails)"]


def test_mixed_rank_lata_output(tmp_path: Path, adapters: dict[str, Path]) -> None:
    folder = tmp_path / "energy"
    lata_peft.combine(adapters=[adapters["plain"], adapters["rank8"]], out=folder, rank="energy:0.9")
    config = json.loads((folder / "adapter_config.json").read_text())
    common = config["r"]
    ranks = {name: tensor.shape[0] for name, tensor in load_file(folder / "adapter_model.safetensors").items()
             if name.endswith("lora_A.weight")}
    assert len(set(ranks.values())) > 1 and config["lora_alpha"] == common and max(ranks.values()) <= 8
    peft = engine_delta(folder, "peft")
    assert close(engine_delta(folder, "vllm"), peft) and close(engine_delta(folder, "vllm<0.32"), peft)
    llamacpp = engine_delta(folder, "llama.cpp")  # common / r_m instead of 1
    for key, rank in ranks.items():
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        assert torch.allclose(llamacpp[module], peft[module] * common / rank)
    assert tgi_problems(folder) == []  # every rank pads to 8 for SGMV, so layers stack
    tgi = engine_delta(folder, "tgi")  # q_proj first at alpha/r, then config.r = 8 for every later type
    for module, delta in tgi.items():
        factor = 1.0 if module.endswith("q_proj") else common / 8
        assert torch.allclose(delta, peft[module] * factor)
    if common != 8:
        assert not close(tgi, peft)


def test_refusals(tmp_path: Path, adapters: dict[str, Path]) -> None:
    folder = tmp_path / "dora"
    shutil.copytree(MATH, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(use_dora=True, modules_to_save=["lm_head"], bias="all")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.modules_to_save.default.weight"] = torch.zeros(2, 2)
    save_file(tensors, folder / "adapter_model.safetensors")
    problems = vllm_problems(folder, max_lora_rank=8)
    assert "vLLM does not yet support DoRA." in problems and "Adapter bias is not supported." in problems
    assert any("modules_to_save" in p for p in problems) and any("unsupported LoRA weight" in p for p in problems)
    assert llamacpp_problems(folder) == [
        "Unexpected name 'base_model.model.lm_head.modules_to_save.default.weight': Not a lora_A or lora_B tensor"]
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    assert tgi_problems(folder)[-1] == "No adapter weights found (TGI reads .safetensors only)"
    some = adapters["some_layers"]  # layers 1 and 2 of 4 only: TGI drops every type
    assert set(tgi_ignored(some, num_layers=4)) == set(engine_delta(some, "peft"))
    assert engine_delta(some, "tgi", num_layers=4) == {}
