"""Behaviour unchanged: combine, fold and compare on the shipped adapters write exactly the bytes
they wrote before the spec/pipeline refactor (sha256s in tests/data/golden_sha256.json, recorded
with the previous code on the same inputs)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import lata_peft

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ROOT / "examples" / "adapters"
BASE = Path("~/.cache/lata_peft/SmolLM2-135M-Instruct").expanduser()
EXPECTED = json.loads((ROOT / "tests" / "data" / "golden_sha256.json").read_text())
needs_base = pytest.mark.skipif(not (BASE / "config.json").is_file(),
                                reason="SmolLM2 base not prepared (python recipes/prepare_base.py)")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_files(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir())
            if p.suffix in (".safetensors", ".json") and p.name != "lata_report.json"}


def adapter_files(folder: Path) -> dict[str, str]:
    return {name: sha256(folder / name) for name in ("adapter_model.safetensors", "adapter_config.json")}


def test_combine_outputs_are_unchanged(tmp_path: Path) -> None:
    lata_peft.combine([ADAPTERS / "math", ADAPTERS / "code"], tmp_path / "lata", forget=[ADAPTERS / "shout"],
                      method="lata", instruction=ADAPTERS / "instruct")
    lata_peft.combine(lata_peft.CombineSpec(adapters=(str(ADAPTERS / "math"), str(ADAPTERS / "code")),
                                            out=str(tmp_path / "ties"), method="ties", rank="8", space="full"))
    lata_peft.combine([ADAPTERS / "math", ADAPTERS / "code"], tmp_path / "energy", rank="energy:0.9", lata=True,
                      instruction=ADAPTERS / "instruct", scheme="threshold", keep=0.5)
    assert adapter_files(tmp_path / "lata") == EXPECTED["combine_lata"]
    assert adapter_files(tmp_path / "ties") == EXPECTED["combine_ties_rank8"]
    assert adapter_files(tmp_path / "energy") == EXPECTED["combine_ta_lata_energy"]


@needs_base
def test_fold_outputs_are_unchanged(tmp_path: Path) -> None:
    lata_peft.fold(ADAPTERS / "math", BASE, tmp_path / "fold")
    lata_peft.fold(lata_peft.FoldSpec(adapter=str(ADAPTERS / "math"), base=str(BASE), out=str(tmp_path / "fold4"),
                                      four_bit=True))
    written = model_files(tmp_path / "fold")
    assert {k: v for k, v in written.items() if k in EXPECTED["fold"]} == EXPECTED["fold"]
    written4 = model_files(tmp_path / "fold4")
    assert {k: v for k, v in written4.items() if k in EXPECTED["fold_4bit"]} == EXPECTED["fold_4bit"]


@needs_base
def test_compare_results_are_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny plan's metrics, record for record, as the old recipes/experiment.py computed them."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("LATA_GOLDEN_BASE", str(BASE))
    monkeypatch.setenv("LATA_GOLDEN_RESULTS", str(tmp_path / "results.json"))
    monkeypatch.setenv("LATA_GOLDEN_REPORT", str(tmp_path / "report.md"))
    summary = lata_peft.compare(str(ROOT / "tests" / "data" / "golden_plan.yaml"))
    records = json.loads((tmp_path / "results.json").read_text())
    for record in records:
        record.pop("seconds")
    assert summary["runs"] == len(records) == 8
    digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
    assert digest == EXPECTED["compare"]["results"]
    assert "<!-- results:golden -->" in (tmp_path / "report.md").read_text()
