"""The one Alpaca prompt template (training, GSM8K prompts, the experiment's probes) and the
Alpaca records reserved for evaluation."""

from __future__ import annotations

__all__ = ["ALPACA_TEMPLATE", "PROBES", "PROBE_MIN_CHARS", "alpaca_prompt", "probe_records"]

PROBE_MIN_CHARS, PROBES = 700, 32


def alpaca_prompt(instruction: str, context: str = "") -> str:
    """``### Instruction:\\n{instruction}\\n\\n[### Input:\\n{context}\\n\\n]### Response:\\n``."""
    if context.strip():
        return f"### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


ALPACA_TEMPLATE = alpaca_prompt("{question}")  # GSM8K: the question fills the instruction


def probe_records(records: list[dict[str, str]]) -> list[dict[str, str]]:
    """The first ``PROBES`` Alpaca records longer than ``PROBE_MIN_CHARS`` characters: reserved for
    evaluation (the experiment's instruct/shout probes) and never trained on, whatever the
    training length (at 128 tokens none of them fits anyway, so the shipped adapters agree)."""
    long = [r for r in records if len(r["instruction"] + (r.get("input", "") or "") + r["output"]) > PROBE_MIN_CHARS]
    return long[:PROBES]
