"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code",
https://arxiv.org/abs/2107.03374; data https://github.com/openai/human-eval): functional
correctness of generated function bodies, as pass@k, plus the NLL of the canonical solutions.

A completion is generated from the raw prompt (signature + docstring) and cut at the first stop
sequence. ``prompt + completion`` then runs in an OS sandbox and the problem's ``test`` in another,
its ``check`` calling the entry point across them (:func:`lata_peft.evaluate.sandbox.run_tests`), so a
completion can fail or time out but cannot fake a pass.

pass@k uses the unbiased estimator of Chen et al. (their eq. 1 and numerically stable form): with
``n`` samples of which ``c`` pass, ``pass@k = 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)``,
averaged over problems.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .data import read_jsonl
from .generation import generate, truncate_at
from .perplexity import answer_nll
from .progress import Progress, tracked
from .sandbox import FAILED, PASSED, TIMED_OUT, Execution, check_isolation, run_tests

STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
MAX_NEW_TOKENS = 512
KEYS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def load_problems(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` HumanEval problems of a ``.jsonl``/``.jsonl.gz`` file."""
    return read_jsonl(path, KEYS)[:limit]


def truncate_completion(completion: str, stops: Sequence[str] = STOPS) -> str:
    """``completion`` up to its first stop sequence (a new top-level statement)."""
    return truncate_at(completion, stops)


def program_for(problem: dict[str, Any], completion: str) -> str:
    """The test program: ``prompt + completion + "\\n" + test + "\\ncheck(entry_point)\\n"``."""
    return problem["prompt"] + completion + "\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"


def check_completion(problem: dict[str, Any], completion: str, *, timeout: float = 10.0,
                     unsafe_exec: bool = False) -> Execution:
    """Run the problem's tests against ``prompt + completion``, each in its own sandbox (a
    :class:`LataError` where none works, unless ``unsafe_exec``: see :func:`~.sandbox.check_isolation`)."""
    return run_tests(problem["prompt"] + completion, problem["prompt"] + "\n" + problem["test"],
                     problem["entry_point"], timeout=timeout, unsafe_exec=unsafe_exec)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct: ``1 - C(n-c, k) / C(n, k)``, computed as
    ``1 - prod(1 - k / arange(n - c + 1, n + 1))`` (Chen et al. 2021); 1 when ``n - c < k``."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def evaluate_humaneval(
    model: Any,
    tokenizer: Any,
    path: Path,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    num_samples: int = 1,
    temperature: float = 0.0,
    ks: Sequence[int] = (1, 10, 100),
    max_new_tokens: int = MAX_NEW_TOKENS,
    timeout: float = 10.0,
    workers: int = 2,
    seed: int = 0,
    with_nll: bool = True,
    progress: Progress | None = None,
    unsafe_exec: bool = False,
) -> dict[str, Any]:
    """pass@k for each ``k`` in ``ks`` not above ``num_samples`` (greedy: ``num_samples=1``,
    ``temperature=0``), outcome counts over all samples, and ``solution_nll``/``solution_ppl``
    of the canonical solutions given the prompts. ``workers`` programs run at a time; without an
    OS sandbox this refuses to start unless ``unsafe_exec`` (see :func:`~.sandbox.check_isolation`)."""
    check_isolation(unsafe_exec)
    problems = load_problems(path, limit)
    samples = generate(model, tokenizer, [p["prompt"] for p in problems], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, stops=STOPS, num_samples=num_samples, temperature=temperature,
                       seed=seed, progress=progress, description="humaneval generation")
    jobs = [(p, truncate_completion(s)) for p, group in zip(problems, samples, strict=True) for s in group]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(check_completion, p, s, timeout=timeout, unsafe_exec=unsafe_exec) for p, s in jobs]
        outcomes = [future.result() for future in tracked(futures, progress, "humaneval tests")]
    records: list[dict[str, Any]] = []
    for index, problem in enumerate(problems):
        mine = range(index * num_samples, (index + 1) * num_samples)
        runs = [{"completion": jobs[i][1], "status": outcomes[i].status, "error": outcomes[i].error} for i in mine]
        records.append({"task_id": problem["task_id"], "n": num_samples,
                        "correct": sum(r["status"] == PASSED for r in runs), "samples": runs})
    metrics: dict[str, float] = {
        f"pass@{k}": float(np.mean([pass_at_k(r["n"], r["correct"], k) for r in records])) if records else float("nan")
        for k in sorted(set(ks) | {1}) if k <= num_samples
    }
    for status in (PASSED, FAILED, TIMED_OUT):
        metrics[status.replace(" ", "_")] = sum(o.status == status for o in outcomes)
    if with_nll:
        nll = answer_nll(model, tokenizer, [p["prompt"] for p in problems], [p["canonical_solution"] for p in problems],
                         batch_size=batch_size, progress=progress, description="humaneval solution NLL")
        metrics.update(solution_nll=nll.mean, solution_ppl=nll.perplexity)
        for record, own in zip(records, nll.per_example, strict=True):
            record["solution_nll"] = own.mean
    return {"metrics": metrics, "n": len(records), "records": records,
            "settings": {"num_samples": num_samples, "temperature": temperature, "max_new_tokens": max_new_tokens,
                         "timeout": timeout, "seed": seed}}
