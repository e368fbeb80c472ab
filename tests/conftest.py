"""Tiny real models and PEFT adapters, built once per test session.

The base is a 4-block Llama with random weights; adapters are made by PEFT itself
(``get_peft_model`` + ``save_pretrained``) with random non-zero B, so every
delta is a genuine PEFT adapter of the kind users have on disk.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BASE_ID = "tiny-llama-for-tests"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def make_adapter(folder: Path, base: LlamaForCausalLM, seed: int, **lora: object) -> Path:
    """Save a PEFT LoRA adapter with random A and B (``init_lora_weights=False``)."""
    torch.manual_seed(seed)
    options = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **lora}
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**options))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                parameter.normal_(0, 0.05)
    model.peft_config["default"].base_model_name_or_path = BASE_ID
    model.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)
    return folder


def perturbed_adapter(model: torch.nn.Module, folder: Path, seed: int, **lora: object) -> Path:
    """A PEFT adapter of ``model`` (left as it is) with every trainable tensor (factors, DoRA magnitudes,
    saved modules, biases) moved by seeded noise (x 0.2), saved to ``folder``."""
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in peft_model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def base() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def adapters(tmp_path_factory: pytest.TempPathFactory, base: LlamaForCausalLM) -> dict[str, Path]:
    """Adapters covering the config features that change the scale or rank per module."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "plain": make_adapter(root / "plain", base, 1),
        "rank8": make_adapter(root / "rank8", base, 2, r=8, lora_alpha=4),
        "rslora": make_adapter(root / "rslora", base, 3, r=6, lora_alpha=12, use_rslora=True),
        "patterns": make_adapter(
            root / "patterns", base, 4, r=4, lora_alpha=8,
            rank_pattern={"down_proj": 2, "model.layers.1.self_attn.q_proj": 6},
            alpha_pattern={"up_proj": 3, "layers.2.self_attn.v_proj": 20},
        ),
        "attention_only": make_adapter(root / "attention_only", base, 5, target_modules=["q_proj", "v_proj"]),
        "instruct": make_adapter(root / "instruct", base, 6),
        "embedding": make_adapter(root / "embedding", base, 7, target_modules=["embed_tokens", "q_proj", "down_proj"]),
        "some_layers": make_adapter(root / "some_layers", base, 8, r=2, layers_to_transform=[1, 2]),
    }


@pytest.fixture(scope="session")
def tokens() -> torch.Tensor:
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def logits_with_adapter(base: LlamaForCausalLM, adapter: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    with torch.no_grad():
        return model(tokens).logits


def peft_delta_weights(base: LlamaForCausalLM, adapter: Path) -> dict[str, torch.Tensor]:
    """Per-module dense deltas as PEFT itself merges them: ``merge_and_unload(W) - W``."""
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).merge_and_unload()
    original = dict(base.named_parameters())
    return {
        name: (parameter.detach() - original[name].detach()).double()
        for name, parameter in merged.named_parameters()
        if not torch.equal(parameter, original[name])
    }


def logits_with_deltas(base: LlamaForCausalLM, deltas: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    model = copy.deepcopy(base)
    with torch.no_grad():
        parameters = dict(model.named_parameters())
        for name, delta in deltas.items():
            parameters[name].add_(delta.to(parameters[name].dtype))
        return model(tokens).logits
