"""Evaluation of a base model, optionally with a PEFT adapter: WikiText-2 / text perplexity,
GSM8K exact match, HumanEval pass@k — each with a continuous NLL metric — through one function.

>>> evaluate("models/smollm2", "gsm8k", adapter="adapters/math", limit=50)  # doctest: +SKIP
{"task": "gsm8k", "metrics": {"exact_match": ..., "answer_nll": ..., "answer_ppl": ...}, "n": 50, ...}
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import LataError
from .data import GSM8K_TRAIN, TASK_FILES, existing, read_text, task_file, wikitext_rows
from .generation import generate
from .gsm8k import ALPACA_TEMPLATE, evaluate_gsm8k, extract_answer
from .gsm8k import MAX_NEW_TOKENS as GSM8K_NEW_TOKENS
from .humaneval import MAX_NEW_TOKENS as HUMANEVAL_NEW_TOKENS
from .humaneval import check_completion, evaluate_humaneval, pass_at_k
from .loading import load_model, load_tokenizer, prepare_tokenizer, with_adapter
from .perplexity import answer_nll, sliding_window_nll, text_perplexity
from .progress import Progress
from .sandbox import Execution, check_isolation, run_program

__all__ = [
    "TASKS", "Execution", "Progress", "answer_nll", "check_completion", "evaluate", "extract_answer", "generate",
    "pass_at_k", "run_program", "sliding_window_nll", "text_perplexity",
]

TASKS = ("wikitext2", "gsm8k", "humaneval", "ppl:FILE")
PathLike = str | os.PathLike[str]


def _resolve_data(task: str, data: PathLike | None) -> Path:
    if task.startswith("ppl:"):
        name = task[4:]
        if not name:
            raise LataError("task ppl:FILE needs a file name, e.g. ppl:notes.txt")
        return existing(Path(name).expanduser(), "text")
    if task not in TASK_FILES:
        raise LataError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    return task_file(task, data)


def _run_task(model: Any, tokenizer: Any, task: str, path: Path, *, train: Path | None, limit: int | None,
              batch_size: int, max_new_tokens: int | None, shots: int, template: str, num_samples: int,
              temperature: float, timeout: float, max_length: int | None, stride: int | None, seed: int,
              progress: Progress | None, unsafe_exec: bool = False) -> dict[str, Any]:
    if task == "gsm8k":
        return evaluate_gsm8k(model, tokenizer, path, train_path=train, limit=limit, batch_size=batch_size,
                              shots=shots, template=template, max_new_tokens=max_new_tokens or GSM8K_NEW_TOKENS,
                              seed=seed, progress=progress)
    if task == "humaneval":
        return evaluate_humaneval(model, tokenizer, path, limit=limit, batch_size=batch_size, num_samples=num_samples,
                                  temperature=temperature, max_new_tokens=max_new_tokens or HUMANEVAL_NEW_TOKENS,
                                  timeout=timeout, seed=seed, progress=progress, unsafe_exec=unsafe_exec)
    text = "\n\n".join(wikitext_rows(path)) if task == "wikitext2" else read_text(path)
    result = text_perplexity(model, tokenizer, text, max_length=max_length, stride=stride, limit=limit,
                             batch_size=batch_size, progress=progress)
    metrics = {"perplexity": result.pop("perplexity"), "nll": result.pop("nll")}
    return {"metrics": metrics, "n": result["scored_tokens"], "settings": result}


def evaluate(
    model: PathLike | torch.nn.Module,
    task: str,
    *,
    adapter: PathLike | None = None,
    tokenizer: PathLike | Any | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    data: PathLike | None = None,
    max_new_tokens: int | None = None,
    four_bit: bool = False,
    progress: Progress | None = None,
    shots: int = 0,
    template: str = ALPACA_TEMPLATE,
    num_samples: int = 1,
    temperature: float = 0.0,
    timeout: float = 10.0,
    max_length: int | None = None,
    stride: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    unsafe_exec: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` (+ ``adapter``) on ``task`` and return a JSON-ready dict:
    ``{"task", "metrics": {name: value}, "n", "seconds", "model", "adapter", "settings", "records"?}``.

    * ``model``: a local transformers model folder (``four_bit``: loaded with NF4 bitsandbytes,
      ``device``/``dtype`` as in :func:`~lata_peft.evaluate.loading.load_model`), or a loaded model
      object (then ``tokenizer`` is required; an ``adapter`` is removed from it again afterwards).
    * ``adapter``: a PEFT adapter folder, applied with ``PeftModel.from_pretrained``.
    * ``tokenizer``: a folder or tokenizer object; default the model folder. Without a pad token
      it gets the EOS token as pad.
    * ``task``: ``wikitext2`` (strided perplexity of the test split; ``limit`` = max tokens,
      ``max_length``/``stride`` the windows), ``ppl:FILE`` (the same for a UTF-8 text file),
      ``gsm8k`` (exact match + ``answer_nll``; ``shots``, ``template``; ``limit`` = problems,
      ``max_new_tokens`` default 256), ``humaneval`` (pass@k + ``solution_nll``; ``num_samples``
      with ``temperature`` > 0 for k > 1, ``timeout`` seconds per program; ``max_new_tokens`` default 512).
      Generated code runs only in an OS sandbox (bubblewrap); where none works this is a ``LataError``
      before the model loads, unless ``unsafe_exec=True`` runs it unisolated (see ``docs/SECURITY.md``).
    * ``data``: the task's data file, or a folder laid out like ``../shared/data`` (default:
      ``$LATA_PEFT_DATA`` or the shared folder). A missing file is a ``LataError`` naming it.
    * ``progress``: gets ``start(total, description)`` per phase and ``advance()`` per batch.
    """
    path = _resolve_data(task, data)
    train = None
    if task == "gsm8k" and shots:
        train = existing(path.parent / Path(GSM8K_TRAIN).name, "gsm8k few-shot")
    if task == "humaneval" and num_samples > 1 and temperature <= 0:
        raise LataError(f"humaneval: num_samples={num_samples} needs temperature > 0 (greedy gives one sample)")
    if task == "humaneval":
        check_isolation(unsafe_exec)
    if limit is not None and limit < 1:
        raise LataError(f"limit must be >= 1, got {limit}")
    start = time.perf_counter()
    owned = isinstance(model, (str, os.PathLike))
    if owned:
        loaded = load_model(model, four_bit=four_bit, device=device, dtype=dtype)
        tokenizer = load_tokenizer(model if tokenizer is None else tokenizer)
    else:
        if tokenizer is None:
            raise LataError("evaluate: a loaded model needs its tokenizer (tokenizer=...)")
        loaded = model
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
    tokenizer = prepare_tokenizer(tokenizer)
    was_training = loaded.training
    try:
        with with_adapter(loaded, adapter, restore=not owned) as active:
            active.eval()
            result = _run_task(active, tokenizer, task, path, train=train, limit=limit, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, shots=shots, template=template,
                               num_samples=num_samples, temperature=temperature, timeout=timeout,
                               max_length=max_length, stride=stride, seed=seed, progress=progress,
                               unsafe_exec=unsafe_exec)
    finally:
        loaded.train(was_training)
    return {
        "task": task,
        "metrics": result["metrics"],
        "n": result["n"],
        "seconds": round(time.perf_counter() - start, 3),
        "model": str(model) if owned else type(model).__name__,
        "adapter": None if adapter is None else str(adapter),
        "data": str(path),
        "four_bit": four_bit,
        "settings": {"limit": limit, "batch_size": batch_size, **result.get("settings", {})},
        **({"records": result["records"]} if "records" in result else {}),
    }
