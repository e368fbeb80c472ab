"""Module name -> transformer block index, for the architectures PEFT users meet.

| family | module names look like |
| --- | --- |
| Llama, Mistral, Qwen2, Gemma, Phi-3 | ``model.layers.<i>.self_attn.q_proj`` |
| GPT-2, Falcon, Bloom | ``transformer.h.<i>.attn.c_attn`` |
| GPT-NeoX / Pythia | ``gpt_neox.layers.<i>.attention.query_key_value`` |
| OPT | ``model.decoder.layers.<i>.self_attn.q_proj`` |
| T5 / encoder-decoders | ``encoder.block.<i>.layer.0.SelfAttention.q`` |

Modules outside the blocks (embeddings, LM head) map to ``None``; anything else is an
error unless the user gives ``layer_regex`` (one capture group: the block index).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .errors import LataError

__all__ = ["BLOCK_PATTERN", "block_index", "blocks_of", "group_by_block", "safe_block"]

BLOCK_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)(?:\.|$)")
OUTSIDE_BLOCKS = re.compile(
    r"(?:^|\.)(?:embed_tokens|embed_in|embed_out|wte|wpe|word_embeddings|lm_head|score|shared|embed_positions)$"
)


def block_index(module: str, layer_regex: str | None = None) -> int | None:
    """The block a module belongs to, ``None`` for embeddings and heads.

    >>> block_index("base_model.model.model.layers.12.mlp.down_proj")
    12
    >>> block_index("transformer.h.3.attn.c_attn")
    3
    >>> block_index("model.embed_tokens") is None
    True
    """
    if layer_regex is not None:
        match = re.search(layer_regex, module)
        if match is None:
            raise LataError(f"module {module}: does not match --layer-regex {layer_regex!r}")
        return int(match.group(1))
    match = BLOCK_PATTERN.search(module)
    if match is not None:
        return int(match.group(1))
    if OUTSIDE_BLOCKS.search(module):
        return None
    raise LataError(
        f"module {module}: no transformer block index found in its name; pass --layer-regex with one "
        r"capture group for the index (e.g. 'decoder\.stack\.(\d+)\.')"
    )


def group_by_block(
    modules: Iterable[str], layer_regex: str | None = None, blocks: Mapping[str, int | None] | None = None
) -> dict[int | None, list[str]]:
    """``{block: [module, ...]}`` with blocks in ascending order (``None`` last); ``blocks`` gives
    the block of each module when the caller has computed them already."""
    groups: dict[int | None, list[str]] = {}
    for module in modules:
        block = blocks[module] if blocks is not None else block_index(module, layer_regex)
        groups.setdefault(block, []).append(module)
    return dict(sorted(groups.items(), key=lambda item: (item[0] is None, item[0] or 0)))


def blocks_of(modules: Iterable[str], layer_regex: str | None = None) -> dict[str, int | None]:
    """``{module: block}`` for every module, computed once per run and handed down the pipeline."""
    return {module: block_index(module, layer_regex) for module in modules}


def safe_block(module: str) -> int | None:
    """The block of ``module``, or ``None`` where its name has none (a head, an unknown layout)."""
    match = BLOCK_PATTERN.search(module)
    return int(match.group(1)) if match is not None else None
