"""Batched text generation with left padding, stop strings, greedy or sampled decoding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .loading import model_device
from .progress import Progress, batches, tracked


def truncate_at(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any of ``stops``."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


class StopOnStrings(StoppingCriteria):
    """Stops each sequence once its generated text (after ``prompt_length`` tokens) contains a stop string.

    Only the last ``max(len(stop)) + 8`` generated tokens are decoded at each step (a token spans
    at least one character, so a stop string that just appeared lies within them).
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.prompt_length = prompt_length
        self.tail = max((len(s) for s in self.stops), default=0) + 8

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)
        if not self.stops:
            return done
        new = input_ids[:, self.prompt_length:][:, -self.tail:]
        for row, text in enumerate(self.tokenizer.batch_decode(new, skip_special_tokens=True)):
            done[row] = any(stop in text for stop in self.stops)
        return done


def _completion(tokenizer: Any, prompt_ids: torch.Tensor, new_ids: torch.Tensor) -> str:
    """The text the new tokens add to the prompt: decode(prompt + new) minus decode(prompt), which
    keeps the leading space that decoding the new tokens alone drops with SentencePiece tokenizers."""
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(torch.cat([prompt_ids, new_ids]), skip_special_tokens=True)
    if full.startswith(head):
        return full[len(head):]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    stops: Sequence[str] = (),
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 0.95,
    seed: int = 0,
    progress: Progress | None = None,
    description: str = "generating",
) -> list[list[str]]:
    """``num_samples`` completions per prompt, each cut at its first stop string.

    Greedy decoding when ``temperature <= 0`` (then ``num_samples`` must be 1), else nucleus
    sampling with ``temperature`` and ``top_p``, seeded by ``seed``. Prompts are left-padded
    (``tokenizer.padding_side = "left"``, restored afterwards) so that new tokens line up.
    """
    if temperature <= 0 and num_samples != 1:
        raise ValueError("greedy decoding gives one sample per prompt; set temperature > 0 for num_samples > 1")
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if temperature > 0:
        options.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, num_return_sequences=num_samples)
        torch.manual_seed(seed)
    else:
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    device = model_device(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    results: list[list[str]] = []
    try:
        for chunk in tracked(batches(list(prompts), batch_size), progress, description):
            encoded = tokenizer(list(chunk), return_tensors="pt", padding=True)
            width = encoded.input_ids.size(1)
            criteria = StoppingCriteriaList([StopOnStrings(tokenizer, stops, width)])
            output = model.generate(input_ids=encoded.input_ids.to(device),
                                    attention_mask=encoded.attention_mask.to(device),
                                    stopping_criteria=criteria, **options).cpu()
            for index in range(len(chunk)):
                prompt_ids = encoded.input_ids[index][encoded.attention_mask[index].bool()]
                rows = output[index * num_samples:(index + 1) * num_samples, width:]
                results.append([truncate_at(_completion(tokenizer, prompt_ids, row), stops) for row in rows])
    finally:
        tokenizer.padding_side = side
    return results
