"""GSM8K (Cobbe et al. 2021, https://github.com/openai/grade-school-math): exact match of the final
number, plus the NLL of the reference solution as a continuous metric.

Prompt: ``template`` with ``{question}`` replaced (default: the Alpaca template our adapters are
trained with), preceded by ``shots`` solved training problems. Generation is greedy and batched
with left padding, stopped at the template's instruction header (the start of a next problem).

Answer extraction, the usual one (as in lm-evaluation-harness's strict and flexible matches): the
first number after the last ``####`` if there is one, else the last number in the text; commas,
``$`` and a trailing ``.`` are dropped and ``18.00`` reads as ``18``. The reference is the number
after its ``#### `` and the two must be equal strings.
"""

from __future__ import annotations

import random
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from .data import read_jsonl
from .generation import generate
from .perplexity import answer_nll
from .progress import Progress
from .prompts import ALPACA_TEMPLATE

MAX_NEW_TOKENS = 256
NUMBER = re.compile(r"-?\$?\d(?:[\d,]*\d)?(?:\.\d+)?")
CALCULATOR = re.compile(r"<<[^>]*>>")


def normalize_number(text: str) -> str:
    """``"$1,234."`` -> ``"1234"``, ``"18.00"`` -> ``"18"``, ``"0.50"`` -> ``"0.5"``; non-numbers only stripped."""
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return cleaned
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final numeric answer in ``text`` (see the module docstring), normalized; ``None`` if no number."""
    if "####" in text:
        found = NUMBER.search(text.rsplit("####", 1)[1])
        if found:
            return normalize_number(found.group())
    numbers = NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def clean_solution(answer: str) -> str:
    """A reference solution without its ``<<48/2=24>>`` calculator annotations."""
    return CALCULATOR.sub("", answer)


def build_prompt(question: str, template: str = ALPACA_TEMPLATE, shots: list[dict[str, Any]] | None = None) -> str:
    """``template`` for ``question``, after each shot's prompt + cleaned solution + a blank line."""
    context = "".join(template.replace("{question}", s["question"]) + clean_solution(s["answer"]) + "\n\n"
                      for s in shots or [])
    return context + template.replace("{question}", question)


def stop_strings(template: str) -> list[str]:
    """Where a completion ends: the template's text before ``{question}`` (a new problem's header)."""
    header = template.split("{question}")[0].strip()
    return [header] if header else []


def evaluate_gsm8k(
    model: Any,
    tokenizer: Any,
    path: Path,
    *,
    train_path: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    shots: int = 0,
    template: str = ALPACA_TEMPLATE,
    max_new_tokens: int = MAX_NEW_TOKENS,
    seed: int = 0,
    with_nll: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Exact match (and ``answer_nll``/``answer_ppl`` of the cleaned reference solutions) on the
    first ``limit`` problems of ``path``; ``shots`` examples are drawn from ``train_path`` with
    ``random.Random(seed)``. Returns ``{"metrics", "n", "records"}``."""
    problems = read_jsonl(path, ("question", "answer"))[:limit]
    examples: list[dict[str, Any]] = []
    if shots:
        if train_path is None:
            raise ValueError("few-shot prompting needs train_path")
        pool = read_jsonl(train_path, ("question", "answer"))
        examples = random.Random(seed).sample(pool, min(shots, len(pool)))
    prompts = [build_prompt(p["question"], template, examples) for p in problems]
    completions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           stops=stop_strings(template), progress=progress, description="gsm8k generation")
    records: list[dict[str, Any]] = []
    for index, (problem, (completion,)) in enumerate(zip(problems, completions, strict=True)):
        reference = extract_answer(problem["answer"])
        prediction = extract_answer(completion)
        records.append({"index": index, "reference": reference, "prediction": prediction,
                        "correct": prediction is not None and prediction == reference, "completion": completion})
    metrics: dict[str, float] = {
        "exact_match": sum(r["correct"] for r in records) / len(records) if records else float("nan"),
    }
    if with_nll:
        nll = answer_nll(model, tokenizer, prompts, [clean_solution(p["answer"]) for p in problems],
                         batch_size=batch_size, progress=progress, description="gsm8k answer NLL")
        metrics.update(answer_nll=nll.mean, answer_ppl=nll.perplexity)
        for record, own in zip(records, nll.per_example, strict=True):
            record["answer_nll"] = own.mean
            record["answer_tokens"] = own.tokens
    return {"metrics": metrics, "n": len(records), "records": records,
            "settings": {"shots": shots, "template": template, "max_new_tokens": max_new_tokens, "seed": seed}}
