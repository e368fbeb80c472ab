"""``lata-peft inspect`` shows full trained weights (a SEQ_CLS adapter's ``score`` head) beside the LoRA
modules in its table, with ``|saved - base|`` computed here from the two files when ``--base`` is given."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from test_full_weights import llama_cls, make_adapter, save_base
from typer.testing import CliRunner

from lata_peft.cli import app

runner = CliRunner()


def test_inspect_table_lists_the_saved_head_and_its_task_vector_norm(tmp_path: Path) -> None:
    save_base(llama_cls, tmp_path / "base")
    adapter = make_adapter(llama_cls, tmp_path / "base", tmp_path / "a", 1, r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    saved = load_file(adapter / "adapter_model.safetensors")
    head = next(t for k, t in saved.items() if k.endswith("score.weight"))
    base_head = load_file(tmp_path / "base" / "model.safetensors")["score.weight"]
    expected = float((head.double() - base_head.double()).norm())

    plain = runner.invoke(app, ["inspect", str(adapter)], terminal_width=200)
    assert plain.exit_code == 0, plain.output
    row = next(line for line in plain.output.splitlines() if "score.weight" in line)
    assert "3x32" in row and "96" in row and f"{float(head.double().norm()):.4f}" in row
    assert row.rstrip(" │").endswith("-")  # no base: no task vector

    with_base = runner.invoke(app, ["inspect", str(adapter), "--base", str(tmp_path / "base")], terminal_width=200)
    assert with_base.exit_code == 0, with_base.output
    row = next(line for line in with_base.output.splitlines() if "score.weight" in line)
    assert f"{expected:.4f}" in row and expected > 0
    assert torch.isfinite(head).all()
