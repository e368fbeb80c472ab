"""What an experiment measures: NLL of reference answers on held-out probes (built-in and your own),
WikiText-2 perplexity, and optionally GSM8K exact match and HumanEval pass@1."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from ..devices import autocast
from ..errors import LataError
from ..evaluate import evaluate
from ..evaluate.data import data_root
from ..evaluate.perplexity import NLL, answer_nll
from ..evaluate.prompts import PROBES, alpaca_prompt, probe_records

__all__ = ["BUILT_IN", "VALIDATION_SPLITS", "custom_probes", "measure", "probe_sets"]

BUILT_IN = ("math_nll", "code_nll", "instruct_nll", "shout_nll", "wikitext2_ppl")


def probe_sets(limits: dict[str, int]) -> dict[str, tuple[list[str], list[str]]]:
    """(prompts, answers) per NLL metric, from real data the adapters were not trained on."""
    shared = data_root()
    gsm8k = [json.loads(line) for line in (shared / "gsm8k" / "test.jsonl").read_text().splitlines()]
    gsm8k = gsm8k[: limits["math"]]
    with gzip.open(shared / "humaneval" / "HumanEval.jsonl.gz", "rt") as handle:
        humaneval = [json.loads(line) for line in handle][: limits["code"]]
    # train_adapters.py reserves these long Alpaca records (probe_records): no adapter was trained on them.
    if limits["instruct"] > PROBES:
        raise LataError(f"limits.instruct is {limits['instruct']}; only {PROBES} probe records are reserved")
    alpaca = probe_records(json.loads((shared / "instruct" / "alpaca_en_demo.json").read_text()))[: limits["instruct"]]
    return {
        "math_nll": ([alpaca_prompt(r["question"]) for r in gsm8k], [r["answer"] for r in gsm8k]),
        "code_nll": ([r["prompt"] for r in humaneval], [r["canonical_solution"] for r in humaneval]),
        "instruct_nll": ([alpaca_prompt(r["instruction"], r["input"]) for r in alpaca], [r["output"] for r in alpaca]),
        "shout_nll": ([alpaca_prompt(r["instruction"], r["input"]) for r in alpaca],
                      [r["output"].upper() for r in alpaca]),
    }


def custom_probes(spec: dict[str, dict[str, Any]]) -> dict[str, tuple[list[str], list[str]]]:
    """The plan's ``probes``: your own behaviours, each a JSONL file of records measured as the mean
    NLL of ``record[answer]`` given ``record[prompt]`` (wrapped in the Alpaca template with
    ``template: alpaca``), over the first ``limit`` records.

    ``{metric: {file, prompt, answer, template: raw|alpaca, limit}}``; ``file`` is relative to the
    current folder unless absolute. A missing file or field is a :class:`LataError`.
    """
    probes = {}
    for metric, entry in spec.items():
        path = Path(entry["file"]).expanduser()
        try:
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as exc:
            raise LataError(f"probe {metric!r}: {path}: {exc}") from exc
        records = records[: entry.get("limit", len(records))]
        fields = (entry.get("prompt", "prompt"), entry.get("answer", "answer"))
        bad = next((i for i, r in enumerate(records) if not all(isinstance(r.get(f), str) for f in fields)), None)
        if bad is not None or not records:
            where = f"record {bad + 1}" if bad is not None else "no records"
            raise LataError(f"probe {metric!r}: {path}: {where} lacks the text fields {fields[0]!r}, {fields[1]!r}")
        wrap = alpaca_prompt if entry.get("template", "raw") == "alpaca" else str
        probes[metric] = ([wrap(r[fields[0]]) for r in records], [r[fields[1]] for r in records])
    return probes


VALIDATION_SPLITS = ("alternate",)


def _pooled(examples: list[NLL]) -> float:
    """Mean NLL per token over ``examples``, pooled as :func:`answer_nll` pools all of them."""
    return NLL(sum(e.total for e in examples), sum(e.tokens for e in examples)).mean


def measure(model: Any, tokenizer: Any, probes: dict[str, tuple[list[str], list[str]]],
            config: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{"metrics": {...}}``: every probe's answer NLL, WikiText-2 perplexity and the optional generation
    metrics.

    With ``validation: alternate`` each probe's examples split in two disjoint halves: the 1st, 3rd, ...
    form the *validation* split, which picks each method's lambda, and the 2nd, 4th, ... the *test* split,
    which is reported: ``{"metrics": test, "validation": validation}``. WikiText-2 and the generation
    metrics are not split (they are in both).
    """
    device = next(model.parameters()).device
    split = config.get("validation")
    with autocast(device, config.get("autocast")):
        batch = config.get("nll_batch", 8)  # a 262k vocabulary (Gemma) makes 8 x 512 fp32 logits 4 GB
        nlls = {name: answer_nll(model, tokenizer, p, a, batch_size=batch, max_length=512).per_example
                for name, (p, a) in probes.items()}
        shared = {}
        wikitext = evaluate(model, "wikitext2", tokenizer=tokenizer, limit=config["wikitext_tokens"],
                            max_length=512, stride=256, batch_size=4)
        shared["wikitext2_ppl"] = wikitext["metrics"]["perplexity"]
        if config.get("gsm8k_generate"):
            result = evaluate(model, "gsm8k", tokenizer=tokenizer, limit=config["gsm8k_generate"],
                              batch_size=config.get("generate_batch", 8),
                              max_new_tokens=config.get("max_new_tokens", 256))
            shared["gsm8k_em"] = result["metrics"]["exact_match"]
        if config.get("humaneval_generate"):
            result = evaluate(model, "humaneval", tokenizer=tokenizer, limit=config["humaneval_generate"],
                              batch_size=config.get("generate_batch", 8))
            shared["humaneval_pass1"] = result["metrics"]["pass@1"]
    if split is None:
        return {"metrics": {**{name: _pooled(per) for name, per in nlls.items()}, **shared}}
    return {"metrics": {**{name: _pooled(per[1::2]) for name, per in nlls.items()}, **shared},
            "validation": {**{name: _pooled(per[0::2]) for name, per in nlls.items()}, **shared}}
