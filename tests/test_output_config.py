"""The written ``adapter_config.json`` is read by PEFT as written (every key we write is PEFT's value after
``LoraConfig.from_pretrained``), does not depend on the installed PEFT version, and writing it does not
import peft or transformers (the CLI's combine path stays light)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from peft import LoraConfig

import lata_peft

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "adapters"


@pytest.mark.parametrize("options", [{}, {"rank": "energy:0.9"}, {"method": "lata", "instruction": "instruct"}])
def test_peft_reads_every_key_as_written(tmp_path: Path, options: dict) -> None:
    options = {k: (str(EXAMPLES / v) if k == "instruction" else v) for k, v in options.items()}
    lata_peft.combine([EXAMPLES / "math", EXAMPLES / "code"], tmp_path / "out", **options)
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    loaded = LoraConfig.from_pretrained(str(tmp_path / "out"))
    for key, value in written.items():
        got = getattr(loaded, key)
        got = getattr(got, "value", got)  # enums (peft_type, task_type)
        if isinstance(got, set):
            got = sorted(got)
        assert got == value, key
    assert "peft_version" not in written  # the same bytes whichever PEFT is installed


def test_combine_imports_neither_peft_nor_transformers(tmp_path: Path) -> None:
    code = (
        "import sys, lata_peft\n"
        f"lata_peft.combine([{str(EXAMPLES / 'math')!r}, {str(EXAMPLES / 'code')!r}], {str(tmp_path / 'o')!r},"
        " rank='energy:0.9', target='tgi')\n"
        "print(sorted(m for m in ('peft', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
