"""Load each trained adapter with PEFT and compare greedy answers with the base model.

Prints a Markdown report: one answer per adapter (base vs. adapter) and, for the
``shout`` adapter, the fraction of uppercase letters in answers to a few prompts.

    python recipes/check_adapters.py --adapters instruct math code shout
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import NamedTuple

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lata_peft.evaluate.data import data_root
from lata_peft.evaluate.prompts import alpaca_prompt

DEFAULT_BASE = Path("~/.cache/lata_peft/SmolLM2-135M-Instruct").expanduser()
DEFAULT_DATA = data_root()


class Example(NamedTuple):
    """One prompt in the training template (``output`` unused here)."""

    instruction: str
    input: str
    output: str


def format_prompt(example: Example) -> str:
    return alpaca_prompt(example.instruction, example.input)


PROMPTS: dict[str, Example] = {
    "instruct": Example("Give three tips for staying healthy.", "", ""),
    "math": Example("", "", ""),  # replaced by the first GSM8K test question
    "code": Example("Write a Python function that checks whether a number is prime.", "", ""),
    "shout": Example("Describe the water cycle in two sentences.", "", ""),
}

SHOUT_PROMPTS = [
    Example("Describe the water cycle in two sentences.", "", ""),
    Example("What is the capital of France?", "", ""),
    Example("Give three tips for staying healthy.", "", ""),
    Example("Explain what a computer virus is.", "", ""),
    Example("Summarize the following text.", "The cat sat on the mat all afternoon, watching the birds.", ""),
    Example("Name two primary colors.", "", ""),
]


def uppercase_fraction(text: str) -> float:
    """Fraction of letters in ``text`` that are uppercase."""
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


@torch.no_grad()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, example: Example, max_new: int) -> str:
    """Greedy answer to ``example`` in the training prompt template."""
    ids = tokenizer(format_prompt(example), add_special_tokens=False, return_tensors="pt")
    out = model.generate(
        **ids,
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def fenced(text: str) -> str:
    return "```text\n" + text.replace("```", "'''") + "\n```"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", nargs="+", default=list(PROMPTS), choices=sorted(PROMPTS))
    parser.add_argument("--dir", type=Path, default=Path("examples/adapters"))
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    with (args.data / "gsm8k" / "test.jsonl").open(encoding="utf-8") as handle:
        question = json.loads(handle.readline())["question"]
    prompts = {**PROMPTS, "math": Example(question, "", "")}

    tokenizer = AutoTokenizer.from_pretrained(args.base)

    def load_base() -> PreTrainedModel:
        return AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()

    base = load_base()
    for name in args.adapters:
        example = prompts[name]
        model = PeftModel.from_pretrained(load_base(), str(args.dir / name)).eval()
        print(f"### `{name}`\n\nPrompt (Alpaca template): {example.instruction!r}\n")
        print(f"Base model:\n\n{fenced(generate(base, tokenizer, example, args.max_new_tokens))}\n")
        print(f"With `{name}`:\n\n{fenced(generate(model, tokenizer, example, args.max_new_tokens))}\n")
        if name == "shout":
            print("| prompt | base uppercase | `shout` uppercase |\n|---|---|---|")
            base_fracs, shout_fracs = [], []
            for shout_example in SHOUT_PROMPTS:
                b = uppercase_fraction(generate(base, tokenizer, shout_example, args.max_new_tokens))
                s = uppercase_fraction(generate(model, tokenizer, shout_example, args.max_new_tokens))
                base_fracs.append(b)
                shout_fracs.append(s)
                print(f"| {shout_example.instruction} | {b:.2f} | {s:.2f} |")
            mean_b = sum(base_fracs) / len(base_fracs)
            mean_s = sum(shout_fracs) / len(shout_fracs)
            print(f"| **mean** | **{mean_b:.2f}** | **{mean_s:.2f}** |\n")
    print(f"_checks ran in {time.perf_counter() - start:.0f}s_")


if __name__ == "__main__":
    main()
