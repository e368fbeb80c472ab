"""Evaluation: perplexity against a hand computation, GSM8K answer extraction on real records,
HumanEval verdicts of the sandboxed runs, pass@k, and smoke runs of the generation paths."""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lata_peft.errors import LataError
from lata_peft.evaluate import answer_nll, evaluate, extract_answer, generate, pass_at_k, sliding_window_nll
from lata_peft.evaluate.data import data_root
from lata_peft.evaluate.gsm8k import ALPACA_TEMPLATE, build_prompt, normalize_number, stop_strings
from lata_peft.evaluate.humaneval import check_completion, load_problems, truncate_completion
from lata_peft.evaluate.perplexity import windows
from lata_peft.evaluate.sandbox import FAILED, PASSED, TIMED_OUT, run_program

DATA = data_root()
needs_data = pytest.mark.skipif(not (DATA / "gsm8k" / "test.jsonl").is_file(), reason=f"no shared data in {DATA}")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The tiny model is ~50x slower with 2 threads on a CPU shared with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer built in memory: 92 ids, within the tiny Llama's 96."""
    chars = string.digits + string.ascii_letters + " \n.,:;!?#$%()+-*/=<>_'\"[]{}"
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *chars])}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    model.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


class Recorder:
    """A progress sink that records what it was told."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, int]] = []
        self.advances = 0

    def start(self, total: int, description: str) -> None:
        self.phases.append((description, total))

    def advance(self) -> None:
        self.advances += 1


# --------------------------------------------------------------------------- perplexity


def test_windows_follow_the_hugging_face_loop() -> None:
    assert windows(40, 16, 6) == [(0, 16, 16), (6, 22, 6), (12, 28, 6), (18, 34, 6), (24, 40, 6)]
    assert windows(10, 16, 8) == [(0, 10, 10)]
    assert windows(32, 16, 16) == [(0, 16, 16), (16, 32, 16)]
    with pytest.raises(ValueError):
        windows(40, 16, 17)


def hand_nll(model: torch.nn.Module, ids: torch.Tensor, spans: list[tuple[int, int, int]]) -> tuple[float, int]:
    """Sum of -log p(ids[t] | ids[begin:t]) for t in [first, end) of each (begin, end, first), one forward per span."""
    total, count = 0.0, 0
    for begin, end, first in spans:
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[begin:end][None]).logits[0].double(), dim=-1)
        for t in range(first, end):
            total -= float(logp[t - 1 - begin, ids[t]])
            count += 1
    return total, count


def test_sliding_window_perplexity_equals_hand_computation(base: torch.nn.Module) -> None:
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(1))
    # max_length 16, stride 6: windows start at 0, 6, 12, 18, 24 and overlap by 10 tokens;
    # token t is scored once, in the first window that reaches past it.
    total, count = hand_nll(base, ids, [(0, 16, 1), (6, 22, 16), (12, 28, 22), (18, 34, 28), (24, 40, 34)])
    assert count == 39
    for batch_size in (1, 3):
        nll = sliding_window_nll(base, ids, max_length=16, stride=6, batch_size=batch_size)
        assert nll.tokens == count
        assert nll.mean == pytest.approx(total / count, rel=1e-5)
        assert nll.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


def test_ppl_task_on_a_text_file(base: torch.nn.Module, tmp_path: Path) -> None:
    text = "The cat sat on the mat.\n\nIt was 42 degrees!"
    (tmp_path / "notes.txt").write_text(text)
    tokenizer = tiny_tokenizer()
    ids = torch.tensor(tokenizer(text).input_ids)
    progress = Recorder()
    result = evaluate(base, f"ppl:{tmp_path / 'notes.txt'}", tokenizer=tokenizer, max_length=16, stride=8,
                      batch_size=2, progress=progress)
    spans = [(b, e, max(e - t, 1)) for b, e, t in windows(len(ids), 16, 8)]
    total, count = hand_nll(base, ids, spans)
    assert result["task"].startswith("ppl:") and result["n"] == count == len(ids) - 1
    assert result["metrics"]["nll"] == pytest.approx(total / count, rel=1e-5)
    assert result["metrics"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert progress.phases and progress.advances == progress.phases[0][1]
    json.dumps(result)


def test_answer_nll_is_padding_independent(base: torch.nn.Module) -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    prompts, answers = ["Q: 2+2?\nA:", "Question: what is six times seven?\nAnswer:"], [" 4", " 42, it is 42."]
    pooled = answer_nll(base, tokenizer, prompts, answers, batch_size=2)
    total = count = 0
    for prompt, answer, own in zip(prompts, answers, pooled.per_example, strict=True):
        p, a = tokenizer(prompt).input_ids, tokenizer(answer, add_special_tokens=False).input_ids
        first = len(p)
        nll, n = hand_nll(base, torch.tensor(p + a), [(0, len(p) + len(a), first)])
        assert own.tokens == n == len(a)
        assert own.mean == pytest.approx(nll / n, rel=1e-5)
        total, count = total + nll, count + n
    assert pooled.mean == pytest.approx(total / count, rel=1e-5)


class WithoutLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward takes no ``logits_to_keep`` (as before transformers 4.50)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> object:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_output_layer_sees_only_the_scored_positions(base: torch.nn.Module) -> None:
    """The output layer runs only where a next token is scored (answers, not prompts or padding),
    and the NLLs are those of a model that computes every position's logits."""
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    prompts = ["Q: 2+2?\nA:", "Question: what is six times seven?\nAnswer:", "Say hi:"]
    answers = [" 4", " 42, it is 42.", " hi there"]
    rows: list[int] = []
    hook = base.lm_head.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[:2].numel()))
    try:
        kept = answer_nll(base, tokenizer, prompts, answers, batch_size=3)
        ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(2))
        windowed = sliding_window_nll(base, ids, max_length=16, stride=6, batch_size=1)
    finally:
        hook.remove()
    lengths = [(len(tokenizer(p).input_ids), len(tokenizer(a, add_special_tokens=False).input_ids))
               for p, a in zip(prompts, answers, strict=True)]
    # One batch of 3 rows; a row's answer token t is predicted at position t - 1: the union over rows.
    needed = {t - 1 for p, a in lengths for t in range(p, p + a)}
    assert rows[0] == 3 * len(needed) < 3 * max(p + a for p, a in lengths)
    # Windows (0,16), (6,22), (12,28), (18,34), (24,40): 15 scored positions, then 6 per window.
    assert rows[1:] == [15, 6, 6, 6, 6]
    full = WithoutLogitsToKeep(base)
    everything = answer_nll(full, tokenizer, prompts, answers, batch_size=3)
    for own, reference in zip(kept.per_example, everything.per_example, strict=True):
        assert own.tokens == reference.tokens
        assert own.total == pytest.approx(reference.total, rel=1e-6)
    assert windowed.mean == pytest.approx(sliding_window_nll(full, ids, max_length=16, stride=6).mean, rel=1e-6)


# --------------------------------------------------------------------------- GSM8K


@needs_data
def test_gsm8k_reference_answers_extract_to_their_integers() -> None:
    rows = [json.loads(line) for line in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 1319
    for row in rows:
        final = row["answer"].rsplit("####", 1)[1]
        assert extract_answer(row["answer"]) == str(int(final.replace(",", "")))


@pytest.mark.parametrize(("text", "expected"), [
    ("She earns 3 * 6 = 18 dollars, so the answer is 1,234.", "1234"),
    ("Janet makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("#### 5\nThen she buys 7 more.", "5"),
    ("First 3 + 4 = 7.\nThe total is $1,250.00.", "1250"),
    ("It drops to -5 degrees", "-5"),
    ("Half a dollar is 0.50", "0.5"),
    ("I do not know.", None),
])
def test_gsm8k_extracts_the_final_number(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_gsm8k_prompt_and_normalization() -> None:
    assert build_prompt("What is 2+2?") == "### Instruction:\nWhat is 2+2?\n\n### Response:\n"
    shot = {"question": "What is 1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}
    assert build_prompt("Q?", shots=[shot]) == ALPACA_TEMPLATE.replace("{question}", "What is 1+1?") \
        + "1+1=2\n#### 2\n\n" + ALPACA_TEMPLATE.replace("{question}", "Q?")
    assert build_prompt("Q?", "Question: {question}\nAnswer:") == "Question: Q?\nAnswer:"
    assert stop_strings(ALPACA_TEMPLATE) == ["### Instruction:"]
    assert normalize_number("$1,234.") == "1234" and normalize_number("18.00") == "18"


# --------------------------------------------------------------------------- HumanEval


@pytest.fixture(scope="module")
def problems() -> list[dict[str, object]]:
    if not (DATA / "humaneval" / "HumanEval.jsonl.gz").is_file():
        pytest.skip(f"no HumanEval data in {DATA}")
    return load_problems(DATA / "humaneval" / "HumanEval.jsonl.gz", limit=5)


def test_canonical_solutions_pass_and_a_wrong_one_fails(problems: list[dict[str, object]]) -> None:
    # Trusted programs: unsafe_exec only matters where no sandbox works (tests/test_sandbox.py checks the sandbox).
    for problem in problems:
        outcome = check_completion(problem, str(problem["canonical_solution"]), timeout=10, unsafe_exec=True)
        assert outcome.status == PASSED, (problem["task_id"], outcome.error)
    wrong = check_completion(problems[0], "    return None\n", timeout=10, unsafe_exec=True)
    assert wrong.status == FAILED and "AssertionError" in wrong.error


def test_infinite_loop_times_out(problems: list[dict[str, object]]) -> None:
    outcome = check_completion(problems[0], "    while True:\n        pass\n", timeout=2, unsafe_exec=True)
    assert outcome.status == TIMED_OUT
    assert 2 <= outcome.seconds < 10


def test_scratch_files_are_allowed_and_an_early_exit_is_no_pass(problems: list[dict[str, object]]) -> None:
    # Writes outside the sandbox and the other escapes: tests/test_sandbox.py.
    solution = str(problems[0]["canonical_solution"])
    scratch = "    open('scratch.txt', 'w').write('x')\n" + solution
    assert check_completion(problems[0], scratch, unsafe_exec=True).status == PASSED
    assert run_program("import sys\nsys.exit(0)\n", timeout=10, unsafe_exec=True).status == FAILED


def test_truncate_completion_at_stop_sequences() -> None:
    body = "    return sorted(x)\n"
    for tail in ("\ndef helper():\n", "\nclass A:\n", "\nif __name__ == '__main__':\n", "\nprint(f(1))", "\n# test\n"):
        assert truncate_completion(body + tail) == body
    assert truncate_completion(body) == body


def test_pass_at_k_estimator() -> None:
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))
    for n, c, k in [(20, 5, 10), (200, 13, 1), (200, 13, 100), (7, 0, 3)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 4) == 0.0 and pass_at_k(1, 1, 1) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


# --------------------------------------------------------------------------- generation paths


def test_batched_left_padded_generation_matches_one_by_one(base: torch.nn.Module) -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    prompts = ["def f(x):\n", "The answer to 6 * 7 is"]
    batched = generate(base, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    single = generate(base, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    assert batched == single and all(len(c) == 1 for c in batched)
    assert tokenizer.padding_side == "right"


@needs_data
def test_gsm8k_smoke(base: torch.nn.Module) -> None:
    progress = Recorder()
    result = evaluate(base, "gsm8k", tokenizer=tiny_tokenizer(), limit=2, batch_size=2, max_new_tokens=4,
                      progress=progress)
    assert result["task"] == "gsm8k" and result["n"] == 2 and result["seconds"] >= 0
    assert 0 <= result["metrics"]["exact_match"] <= 1
    assert result["metrics"]["answer_nll"] > 0 and math.isfinite(result["metrics"]["answer_ppl"])
    assert [r["reference"] for r in result["records"]] == ["18", "3"]
    assert set(result["records"][0]) >= {"prediction", "correct", "completion", "answer_nll"}
    assert [d for d, _ in progress.phases] == ["gsm8k generation", "gsm8k answer NLL"]
    json.dumps(result)


@needs_data
def test_humaneval_and_wikitext_smoke(base: torch.nn.Module) -> None:
    result = evaluate(base, "humaneval", tokenizer=tiny_tokenizer(), limit=1, max_new_tokens=4, timeout=5)
    assert result["n"] == 1 and set(result["metrics"]) >= {"pass@1", "passed", "failed", "timed_out", "solution_nll"}
    assert result["records"][0]["task_id"] == "HumanEval/0"
    assert result["records"][0]["samples"][0]["status"] in (PASSED, FAILED, TIMED_OUT)
    wiki = evaluate(base, "wikitext2", tokenizer=tiny_tokenizer(), limit=64, max_length=32)
    assert wiki["n"] == 63 and wiki["settings"]["stride"] == 16 and wiki["metrics"]["perplexity"] > 1
    json.dumps([result, wiki])


def test_missing_data_and_bad_tasks_are_lata_errors(base: torch.nn.Module, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LataError, match=r"missing\.jsonl"):
        evaluate(base, "gsm8k", tokenizer=tiny_tokenizer(), data=tmp_path / "missing.jsonl")
    with pytest.raises(LataError, match="tokenizer"):
        evaluate(base, f"ppl:{__file__}")
    monkeypatch.setenv("LATA_PEFT_DATA", str(tmp_path))
    with pytest.raises(LataError, match=re.escape(str(tmp_path / "humaneval" / "HumanEval.jsonl.gz"))):
        evaluate(base, "humaneval", tokenizer=tiny_tokenizer())
    with pytest.raises(LataError, match=r"nope\.txt"):
        evaluate(base, f"ppl:{tmp_path / 'nope.txt'}", tokenizer=tiny_tokenizer())
    with pytest.raises(LataError, match="expected one of"):
        evaluate(base, "mmlu", tokenizer=tiny_tokenizer())
