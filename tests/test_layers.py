"""Module name -> block index for the architectures users bring."""

from __future__ import annotations

import pytest

from lata_peft.errors import LataError
from lata_peft.layers import block_index, group_by_block


@pytest.mark.parametrize(
    ("module", "block"),
    [
        ("model.layers.7.self_attn.q_proj", 7),  # Llama / Mistral / Qwen2 / Gemma
        ("base_model.model.model.layers.12.mlp.down_proj", 12),
        ("model.layers.3.self_attn.qkv_proj", 3),  # Phi-3
        ("model.layers.0.mlp.gate_up_proj", 0),  # Phi-3
        ("transformer.h.11.attn.c_attn", 11),  # GPT-2
        ("transformer.h.2.self_attention.query_key_value", 2),  # Falcon / Bloom
        ("gpt_neox.layers.5.attention.query_key_value", 5),  # GPT-NeoX / Pythia
        ("gpt_neox.layers.5.mlp.dense_4h_to_h", 5),
        ("model.decoder.layers.9.self_attn.k_proj", 9),  # OPT
        ("model.decoder.layers.9.fc1", 9),
        ("encoder.block.4.layer.0.SelfAttention.q", 4),  # T5
        ("model.embed_tokens", None),
        ("lm_head", None),
        ("transformer.wte", None),
        ("gpt_neox.embed_in", None),
    ],
)
def test_known_architectures(module, block):
    assert block_index(module) == block


def test_unknown_names_need_a_regex():
    with pytest.raises(LataError, match="--layer-regex"):
        block_index("net.stage3.conv")
    assert block_index("net.stage3.conv", r"stage(\d+)") == 3
    with pytest.raises(LataError, match="does not match"):
        block_index("net.head", r"stage(\d+)")


def test_group_by_block_orders_blocks():
    groups = group_by_block(["model.layers.10.a", "model.embed_tokens", "model.layers.2.b", "model.layers.2.c"])
    assert list(groups) == [2, 10, None]
    assert groups[2] == ["model.layers.2.b", "model.layers.2.c"]
