"""Build the data folder the recipes read (the layout of ``../shared/data``) from the public sources.

For machines with internet access (e.g. a GPU machine for ``recipes/paper_scale_gpu.sh``); the
development machines have ``../shared/data`` already. Point the recipes at the result with
``LATA_PEFT_DATA=<out>`` (evaluation, experiment) and ``--data <out>`` (train_adapters.py).

    python recipes/fetch_data.py --out ~/.cache/lata_peft/data

==================================  =====================================================  ==============
file                                source                                                 licence
==================================  =====================================================  ==============
gsm8k/{train,test}.jsonl            github openai/grade-school-math                        MIT
humaneval/HumanEval.jsonl.gz        github openai/human-eval                               MIT
instruct/alpaca_en_demo.json        github hiyouga/LLaMA-Factory ``data/``                 research use
code/code_alpaca_2k.json            github sahil280114/codealpaca ``data/``                CC BY-NC 4.0
wikitext2/wiki.test.raw             hub Salesforce/wikitext ``wikitext-2-raw-v1`` test     CC BY-SA 3.0
==================================  =====================================================  ==============
"""

from __future__ import annotations

import argparse
import urllib.request
from pathlib import Path

RAW = "https://raw.githubusercontent.com"
FILES = {
    "gsm8k/train.jsonl": f"{RAW}/openai/grade-school-math/master/grade_school_math/data/train.jsonl",
    "gsm8k/test.jsonl": f"{RAW}/openai/grade-school-math/master/grade_school_math/data/test.jsonl",
    "humaneval/HumanEval.jsonl.gz": f"{RAW}/openai/human-eval/master/data/HumanEval.jsonl.gz",
    "instruct/alpaca_en_demo.json": f"{RAW}/hiyouga/LLaMA-Factory/main/data/alpaca_en_demo.json",
    "code/code_alpaca_2k.json": f"{RAW}/sahil280114/codealpaca/master/data/code_alpaca_2k.json",
}


def download(url: str, target: Path) -> None:
    """``url`` to ``target``, written atomically (a partial download never looks finished)."""
    partial = target.with_name(target.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response:
        partial.write_bytes(response.read())
    partial.replace(target)


def wikitext(target: Path) -> None:
    """The non-empty rows of WikiText-2 raw test, CRLF-separated (what ``wikitext_rows`` reads)."""
    from datasets import load_dataset

    rows = [row for row in load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")["text"] if row]
    partial = target.with_name(target.name + ".part")
    partial.write_bytes("\r\n".join(row.rstrip("\n") for row in rows).encode("utf-8"))
    partial.replace(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    out = args.out.expanduser()
    for relpath, url in FILES.items():
        target = out / relpath
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            print(f"{url} -> {target}", flush=True)
            download(url, target)
    target = out / "wikitext2" / "wiki.test.raw"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"Salesforce/wikitext -> {target}", flush=True)
        wikitext(target)
    print(f"data ready in {out}")


if __name__ == "__main__":
    main()
