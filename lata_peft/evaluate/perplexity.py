"""Perplexity: of a long text with strided sliding windows, and of answers given prompts.

Sliding-window perplexity follows the Hugging Face recipe
(https://huggingface.co/docs/transformers/perplexity): tokenize the whole text once, move a window
of ``max_length`` tokens forward by ``stride``; each window scores only the tokens that the previous
window did not (labels ``-100`` on the overlap), so every token after the first is scored exactly
once, with up to ``max_length - stride`` tokens of context. Then

    mean NLL = sum_t -log p(x_t | x_{<t} in its window) / (number of scored tokens),
    perplexity = exp(mean NLL).

Unlike the recipe's ``num_valid_tokens - 1`` per window, the divisor here is the exact number of
scored (shifted) labels: the first window scores ``end - 1`` tokens, later ones ``end - prev_end``.

Answer perplexity (a continuous metric that moves even when exact match does not) is the same
mean NLL restricted to answer tokens, given the prompt: ``sum -log p(a_i | prompt, a_{<i})`` over
all answers' tokens divided by their count, computed in right-padded batches (labels ``-100`` on
the prompt and the padding).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional

from .loading import max_positions, model_device
from .progress import Progress, batches, tracked

DEFAULT_MAX_LENGTH = 1024
IGNORE = -100


@dataclass
class NLL:
    """A summed negative log-likelihood (nats) over ``tokens`` scored tokens."""

    total: float = 0.0
    tokens: int = 0

    @property
    def mean(self) -> float:
        """Mean NLL per scored token (``nan`` when nothing was scored)."""
        return self.total / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        """``exp(mean NLL)``."""
        return math.exp(self.mean) if self.tokens else math.nan


@dataclass
class AnswerNLL(NLL):
    """Answer NLL pooled over all answers, plus each answer's own ``(total, tokens)``."""

    per_example: list[NLL] = field(default_factory=list)


def windows(length: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The ``(begin, end, target_length)`` windows of the Hugging Face strided evaluation.

    ``begin`` runs over ``0, stride, 2*stride, ...``; ``end = min(begin + max_length, length)``;
    the window scores its last ``target_length = end - previous end`` tokens; it stops at the
    window that reaches ``length``.
    """
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    spans: list[tuple[int, int, int]] = []
    previous_end = 0
    for begin in range(0, length, stride):
        end = min(begin + max_length, length)
        spans.append((begin, end, end - previous_end))
        previous_end = end
        if end == length:
            break
    return spans


def _takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the (PEFT-unwrapped) model's forward takes transformers' ``logits_to_keep``."""
    unwrapped = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(unwrapped.forward).parameters


def _scored_logits(model: torch.nn.Module, labels: torch.Tensor, **inputs: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions whose next token is scored, and those next tokens (``-100`` where a
    row does not score it).

    Position ``t`` predicts token ``t + 1``, so the output layer is needed only where some row has
    ``labels[:, t + 1] != -100``: the prompt and the padding need none. For a 262k vocabulary
    (Gemma) that layer costs more than the rest of a small model, so the positions are passed as
    transformers' ``logits_to_keep`` (a 1-D tensor of positions, every row); a model whose forward
    does not take it computes all logits, which are then indexed. Same numbers either way.
    """
    positions = (labels[:, 1:] != IGNORE).any(dim=0).nonzero().squeeze(1)
    targets = labels[:, positions + 1]
    if _takes_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=positions.to(labels.device)).logits
    else:
        logits = model(**inputs).logits[:, positions.to(labels.device)]
    return logits, targets


def _summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed NLL and scored-token counts: ``sum_t -log softmax(logits[t])[targets[t]]`` over
    ``targets[t] != -100`` (logits already aligned with the tokens they predict), in float32, one row
    at a time to bound the temporary memory."""
    totals = torch.stack([
        functional.cross_entropy(logits[row].float(), targets[row], ignore_index=IGNORE, reduction="sum")
        for row in range(logits.size(0))
    ])
    return totals, (targets != IGNORE).sum(dim=1)


@torch.no_grad()
def sliding_window_nll(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    progress: Progress | None = None,
) -> NLL:
    """Summed NLL of a 1-D token sequence, scored with strided windows (see the module docstring).

    ``max_length`` defaults to the model's maximum positions capped at 1024, ``stride`` to
    ``max_length // 2``. Windows of equal shape are run ``batch_size`` at a time (same result).
    """
    ids = input_ids.reshape(-1)
    max_length = max_length or max_positions(model, DEFAULT_MAX_LENGTH) or DEFAULT_MAX_LENGTH
    stride = stride or max(1, max_length // 2)
    spans = windows(len(ids), max_length, stride)
    groups: list[list[tuple[int, int, int]]] = []
    for span in spans:
        last = groups[-1] if groups else None
        if last and len(last) < batch_size and (last[0][1] - last[0][0], last[0][2]) == (span[1] - span[0], span[2]):
            last.append(span)
        else:
            groups.append([span])
    device = model_device(model)
    result = NLL()
    for group in tracked(groups, progress, "perplexity"):
        chunk = torch.stack([ids[begin:end] for begin, end, _ in group]).to(device)
        target = group[0][2]
        labels = chunk.clone()
        labels[:, : chunk.size(1) - target] = IGNORE
        total, count = _summed_nll(*_scored_logits(model, labels, input_ids=chunk))
        result.total += float(total.sum())
        result.tokens += int(count.sum())
    return result


def encode_text(tokenizer: Any, text: str, limit: int | None = None, margin: int = 16) -> torch.Tensor:
    """``text`` tokenized once (with the tokenizer's special tokens), as a 1-D tensor; with ``limit``, its
    first ``limit`` tokens. Then only a prefix of the text is tokenized, grown until it yields ``margin``
    tokens more than needed, so that the kept tokens do not depend on where the prefix was cut."""
    if limit is None:
        return tokenizer(text, return_tensors="pt").input_ids[0]
    chars = 8 * (limit + margin)
    while True:
        ids = tokenizer(text[:chars], return_tensors="pt").input_ids[0]
        if len(ids) >= limit + margin or chars >= len(text):
            return ids[:limit]
        chars *= 2


def text_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Perplexity of ``text`` tokenized once (the first ``limit`` tokens when given).

    Returns ``{"perplexity", "nll", "tokens", "scored_tokens", "max_length", "stride"}``.
    """
    ids = encode_text(tokenizer, text, limit)
    max_length = max_length or max_positions(model, DEFAULT_MAX_LENGTH) or DEFAULT_MAX_LENGTH
    stride = stride or max(1, max_length // 2)
    nll = sliding_window_nll(model, ids, max_length=max_length, stride=stride, batch_size=batch_size,
                             progress=progress)
    return {"perplexity": nll.perplexity, "nll": nll.mean, "tokens": len(ids), "scored_tokens": nll.tokens,
            "max_length": max_length, "stride": stride}


def encode_pair(tokenizer: Any, prompt: str, answer: str, max_length: int | None) -> tuple[list[int], int]:
    """Token ids of ``prompt`` (with the tokenizer's special tokens) followed by ``answer``'s
    (without), and the number of prompt tokens kept; over ``max_length`` the left is cut off."""
    prompt_ids = list(tokenizer(prompt).input_ids)
    answer_ids = list(tokenizer(answer, add_special_tokens=False).input_ids)
    ids = prompt_ids + answer_ids
    cut = max(0, len(ids) - max_length) if max_length else 0
    return ids[cut:], max(0, len(prompt_ids) - cut)


@torch.no_grad()
def answer_nll(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    answers: list[str],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: Progress | None = None,
    description: str = "answer NLL",
) -> AnswerNLL:
    """NLL of each answer's tokens given its prompt, pooled and per example.

    Batches are right-padded (``attention_mask`` 0 on padding) and labelled ``-100`` on prompt
    and padding tokens, so only answer tokens count. ``max_length`` (default: the model's maximum
    positions) cuts long pairs from the left. Examples are batched longest first.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    max_length = max_length or max_positions(model)
    encoded = [encode_pair(tokenizer, p, a, max_length) for p, a in zip(prompts, answers, strict=True)]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model_device(model)
    per_example = [NLL() for _ in encoded]
    for chunk in tracked(batches(order, batch_size), progress, description):
        width = max(len(encoded[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for row, i in enumerate(chunk):
            tokens, n_prompt = encoded[i]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
            labels[row, n_prompt: len(tokens)] = torch.tensor(tokens[n_prompt:], dtype=torch.long)
        totals, counts = _summed_nll(*_scored_logits(model, labels.to(device), input_ids=ids.to(device),
                                                     attention_mask=mask.to(device)))
        for row, i in enumerate(chunk):
            per_example[i] = NLL(float(totals[row]), int(counts[row]))
    pooled = AnswerNLL(per_example=per_example)
    pooled.total = sum(n.total for n in per_example)
    pooled.tokens = sum(n.tokens for n in per_example)
    return pooled
