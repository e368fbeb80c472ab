"""The model card (``README.md``) of every output folder, rendered from its report: what the folder is,
what it was made from (inputs with sha256), how (method, weights, rank, serving target), and the
command and recipe that make it again. The front matter is the Hugging Face hub's model-card metadata
(``base_model``, ``library_name``, ``tags``; ``license`` carried from the base model's own card)."""

from __future__ import annotations

from typing import Any

import yaml

from .report import space_note

__all__ = ["CARD_NAME", "card_license", "model_card"]

CARD_NAME = "README.md"


def card_license(card: str | None) -> str | None:
    """The ``license`` of a model card's YAML front matter (``None`` when there is none)."""
    if not card or not card.startswith("---"):
        return None
    front, _, _ = card[3:].partition("\n---")
    try:
        metadata = yaml.safe_load(front)
    except yaml.YAMLError:
        return None
    value = metadata.get("license") if isinstance(metadata, dict) else None
    return value if isinstance(value, str) else None


def _front_matter(report: dict[str, Any], folded: bool, license_name: str | None) -> str:
    bases = [entry["base_model"] for entry in report["inputs"] if entry.get("base_model")]
    metadata: dict[str, Any] = {}
    if bases:
        metadata["base_model"] = bases[0]
    metadata["library_name"] = "transformers" if folded else "peft"
    metadata["tags"] = ["lata-peft", "lora", "merge", str(report["method"])]
    if license_name:
        metadata["license"] = license_name
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n"


def _inputs_table(inputs: list[dict[str, Any]]) -> list[str]:
    lines = ["| role | adapter | weight | base model | sha256 |", "| --- | --- | --- | --- | --- |"]
    for entry in inputs:
        hashes = entry.get("sha256") or {}
        digest = "<br>".join(f"`{name}` {value}" for name, value in sorted(hashes.items())) or "-"
        weight = "-" if entry.get("weight") is None else f"{entry['weight']:g}"
        base = entry.get("base_model") or "-"
        lines.append(f"| {entry['role']} | `{entry['path']}` | {weight} | {base} | {digest} |")
    return lines


def _method_lines(report: dict[str, Any]) -> list[str]:
    if report["verb"] == "fold":
        return ["The adapter above folded into its base model: `W <- W + s B A` for every adapted weight"
                + (", then quantised once to bitsandbytes NF4." if report["fold"]["four_bit"] else ".")]
    summary = report["summary"]
    lata = f" with LATA layer weights ({report['scheme']} scheme)" if report.get("lata") else ""
    parameters = "".join(f", {name} {value:g}" if isinstance(value, float) else f", {name} {value}"
                         for name, value in (report.get("method_parameters") or {}).items() if value is not None)
    space = space_note(report)
    lines = [f"* method: `{report['method']}`{space}{parameters}{lata}, lambda {report['lambda']:g}",
             f"* rank policy: `{report['rank']}`; combined ranks {summary['min_rank']}-{summary['max_rank']}, "
             f"{summary['modules']} modules, {summary['parameters']:,} parameters",
             f"* largest truncation error (relative): {summary['max_relative_error']:.3g}"]
    if report.get("full_weights"):
        lines.append(f"* full trained weights combined: {len(report['full_weights'])}")
    return lines


def _serving_lines(report: dict[str, Any], folded: bool) -> list[str]:
    if folded:
        nf4 = " (bitsandbytes NF4)" if report["fold"]["four_bit"] else ""
        return [f"A full model folder{nf4}: load it with `AutoModelForCausalLM.from_pretrained` (or the class of "
                "its task); engines serve it as any model of its architecture."]
    serving = report.get("serving") or {"target": "peft", "rank": None, "status": "uniform-rank"}
    lines = [f"* target: `{serving['target']}`; ranks: {serving['status']}"
             + (f", rank {serving['rank']} for every module (zero-padded, exact), `lora_alpha` {serving['rank']}"
                if serving.get("rank") else "")]
    if serving["status"] == "not uniform-rank":
        lines.append("* **not uniform-rank**: exact in PEFT and vLLM >= 0.32, wrong in llama.cpp's converter and "
                     "TGI. Write it with `--target llama.cpp|tgi|vllm`, or `lata-peft export --gguf` for llama.cpp.")
    lines.append("* load: `PeftModel.from_pretrained(base_model, \"THIS_FOLDER\")`; serving commands: "
                 "lata-peft's `docs/SERVING.md`")
    return lines


def model_card(report: dict[str, Any], command: str, license_name: str | None = None) -> str:
    """``README.md`` for an output folder from its ``report`` and the ``command`` that makes it again."""
    folded = "fold" in report
    what = "A model with LoRA adapters folded in" if folded else "A LoRA adapter combined from LoRA adapters"
    lines = [
        _front_matter(report, folded, license_name),
        "# lata-peft output", "",
        f"{what}, made by [lata-peft](https://pypi.org/project/lata-peft/) {report['lata_peft_version']} "
        f"on {report['created']} (`{report['verb']}`).", "",
        "## Inputs", "", *_inputs_table(report["inputs"]), "",
        "## Method", "", *_method_lines(report), "",
        "## Serving", "", *_serving_lines(report, folded), "",
        "## Reproduce", "",
        "`lata_recipe.yaml` in this folder is the whole recipe (the same adapter bytes each run):", "",
        "```bash", "lata-peft run lata_recipe.yaml -o OUT", "```", "",
        "or, as one command:", "", "```bash", command, "```", "",
        "`lata_report.json` holds every module's rank and error.", "",
    ]
    return "\n".join(lines)
