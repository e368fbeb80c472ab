"""Conformance on real published PEFT configs (issue 16): every kind of adapter users download.

For each config in ``tests/data/community`` (see ``tests/community.py``): two adapters synthesised
by PEFT at a tiny model's shapes (seeds 0 and 1), ``inspect`` on one, task arithmetic on both, and
the output loaded by PEFT must give the logits of the tiny model whose weights are
``base + delta_a + delta_b``, each delta taken from PEFT's own ``merge_and_unload``. Kinds that must
stay refused exit 2 with one line naming the file. Cases that need a lata-peft feature are
``xfail(strict=True)``: they turn into failures (XPASS) the day the feature lands.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from community import CONFIG_NAME, Case, community_cases, example_inputs, synthesise, tiny_model
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from lata_peft import api
from lata_peft.cli import app
from lata_peft.specs import CombineSpec

runner = CliRunner()
CASES = community_cases()
CAN_PASS_BASE = "base" in {spec_field.name for spec_field in fields(CombineSpec)}


def _param(case: Case) -> pytest.ParameterSet:
    marks = [] if case.expected in ("ok", "refused") else [
        pytest.mark.xfail(strict=True, reason=f"issue 16: {case.expected}")]
    return pytest.param(case, id=case.name, marks=marks)


ADAPTERS = [_param(case) for case in CASES if case.expected != "refused"]
REFUSED = [_param(case) for case in CASES if case.expected == "refused"]


def _merged_delta(case: Case, folder: Path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``W_merged - W_base`` for every base tensor, from PEFT's ``merge_and_unload`` of ``folder``."""
    merged = PeftModel.from_pretrained(tiny_model(case), str(folder)).merge_and_unload().state_dict()
    return {key: merged[key] - tensor for key, tensor in base.items()}


def _logits(model: nn.Module, case: Case) -> torch.Tensor:
    with torch.no_grad():
        return model(**example_inputs(case)).logits


def _lora_modules(folder: Path) -> set[str]:
    keys = load_file(folder / "adapter_model.safetensors")
    return {key.removeprefix("base_model.model.").split(".lora_")[0] for key in keys
            if ".lora_A" in key or ".lora_embedding_A" in key}


@pytest.mark.parametrize("case", ADAPTERS)
def test_real_config_combines_like_peft(case: Case, tmp_path: Path) -> None:
    a = synthesise(case, tmp_path / "a", seed=0)
    b = synthesise(case, tmp_path / "b", seed=1)
    base_model = tiny_model(case)
    base = base_model.state_dict()

    options = {}
    if CAN_PASS_BASE:  # full trained weights (heads) are task vectors saved - base; DoRA's needs W too
        base_model.save_pretrained(tmp_path / "base")
        options["base"] = str(tmp_path / "base")

    shown = api.inspect([str(a)], **options).adapters
    (entry,) = shown.values()
    assert entry["base_model"] == case.real_config().get("base_model_name_or_path")
    assert {row["module"] for row in entry["modules"]} == _lora_modules(a)
    assert all(row["norm"] > 0 for row in entry["modules"])

    out = tmp_path / "out"
    api.combine(adapters=(str(a), str(b)), out=str(out), method="ta", **options)

    delta_a, delta_b = _merged_delta(case, a, base), _merged_delta(case, b, base)
    reference = tiny_model(case)
    reference.load_state_dict({key: base[key] + delta_a[key] + delta_b[key] for key in base})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        combined = PeftModel.from_pretrained(tiny_model(case), str(out)).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message).lower()], [str(w.message) for w in caught]

    expected, got, before = _logits(reference, case), _logits(combined, case), _logits(base_model, case)
    assert (expected - before).abs().max() > 1e-3  # the adapters do move the model
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


def _digests(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_kinds_stay_refused(case: Case, tmp_path: Path) -> None:
    folder = synthesise(case, tmp_path / "adapter", seed=0)
    before = _digests(tmp_path)
    result = runner.invoke(app, ["inspect", str(folder)], terminal_width=400)
    message = result.output.strip()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(message.splitlines()) == 1 and message.startswith("error:"), message
    has_weights = any((folder / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin"))
    assert str(folder / CONFIG_NAME if has_weights else folder) in message, message  # the file, or the bare folder
    assert _digests(tmp_path) == before  # nothing written, nothing changed


def test_every_community_config_is_a_case() -> None:
    """No config sits in tests/data/community without a case (and expected outcome) in the table."""
    folders = {path.parent.name for path in (Path(__file__).parent / "data" / "community").glob(f"*/{CONFIG_NAME}")}
    assert folders == {case.name for case in CASES}
    assert len(CASES) >= 36


@pytest.mark.parametrize("case", ADAPTERS)
def test_real_config_serving_targets_read_as_peft(case: Case, tmp_path: Path) -> None:
    """``--target vllm`` and ``--target llama.cpp`` on every real config: each output, read by that engine's
    own rules (``tests/engine_rules.py``), gives PEFT's delta of the PEFT-target output and passes the
    engine's acceptance rules; or the target refuses, in one LataError naming it (heads, biases, Conv1D)."""
    from engine_rules import engine_delta, llamacpp_problems, vllm_problems

    from lata_peft.errors import LataError

    a, b = synthesise(case, tmp_path / "a", seed=0), synthesise(case, tmp_path / "b", seed=1)
    options = {}
    if CAN_PASS_BASE:
        tiny_model(case).save_pretrained(tmp_path / "base")
        options["base"] = str(tmp_path / "base")
    api.combine(adapters=(str(a), str(b)), out=str(tmp_path / "peft"), rank="energy:0.9", **options)
    reference = engine_delta(tmp_path / "peft", "peft")
    for target, engines in (("vllm", ("vllm", "vllm<0.32")), ("llama.cpp", ("llama.cpp",))):
        out = tmp_path / target
        try:
            api.combine(adapters=(str(a), str(b)), out=str(out), rank="energy:0.9", target=target, **options)
        except LataError as exc:
            assert f"--target {target}" in str(exc) and not out.exists()
            continue
        for engine in engines:
            got = engine_delta(out, engine)
            assert set(got) == set(reference)
            for module, delta in reference.items():
                assert float((got[module] - delta).abs().max()) <= 1e-5 * max(float(delta.abs().max()), 1e-12), module
        rank = json.loads((out / "adapter_config.json").read_text())["r"]
        problems = vllm_problems(out, max_lora_rank=rank) if target == "vllm" else llamacpp_problems(out)
        assert problems == [], problems
