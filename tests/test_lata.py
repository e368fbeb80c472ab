"""LATA: factored block cosines, scheme orderings, and the written per-block deltas."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import peft_delta_weights
from peft import PeftModel
from safetensors.torch import load_file, save_file

import lata_peft
from lata_peft.adapter import load_adapter
from lata_peft.scoring import score_layers
from lata_peft.weighting import LayerWeighting, layer_weights, rank_by_alignment

INSTRUCTION_LIKE = (0, 1)  # blocks where the constructed task adapter copies the instruction adapter


def constructed_task(tmp_path: Path, instruct: Path, seed: int, name: str) -> Path:
    """Same factors as ``instruct`` (plus 1% noise) in blocks 0-1, independent random factors in 2-3."""
    folder = tmp_path / name
    shutil.copytree(instruct, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for key, tensor in tensors.items():
        block = int(key.split(".layers.")[1].split(".")[0])
        noise = torch.randn(tensor.shape, generator=g) * tensor.std()
        tensors[key] = tensor + 0.01 * noise if block in INSTRUCTION_LIKE else noise
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def dense_block_cosine(base, task: Path, instruction: Path) -> dict[int, float]:
    t, i = peft_delta_weights(base, task), peft_delta_weights(base, instruction)
    result = {}
    for block in range(4):
        names = sorted(n for n in t if f".layers.{block}." in n)
        tv = torch.cat([t[n].flatten() for n in names])
        iv = torch.cat([i[n].flatten() for n in names])
        result[block] = float(tv @ iv / (tv.norm() * iv.norm()))
    return result


def test_factored_block_cosines_equal_dense_cosines(base, adapters):
    scores = score_layers(load_adapter(adapters["plain"]), load_adapter(adapters["instruct"]))
    dense = dense_block_cosine(base, adapters["plain"], adapters["instruct"])
    assert [s.layer for s in scores] == [0, 1, 2, 3]
    for s in scores:
        assert s.cosine == pytest.approx(dense[s.layer], abs=1e-6)


def test_module_granularity_matches_dense(base, adapters):
    scores = score_layers(load_adapter(adapters["rank8"]), load_adapter(adapters["instruct"]), "module")
    t = peft_delta_weights(base, adapters["rank8"])
    i = peft_delta_weights(base, adapters["instruct"])
    assert len(scores) == 28
    for s in scores:
        a, b = t[s.module + ".weight"].flatten(), i[s.module + ".weight"].flatten()
        assert s.cosine == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-6)


@pytest.mark.parametrize("scheme", ["linear", "log", "threshold"])
@pytest.mark.parametrize("forget", [False, True])
def test_instruction_like_blocks_get_smaller_weights(tmp_path, adapters, scheme, forget):
    task = constructed_task(tmp_path, adapters["instruct"], 0, "task")
    args = {"forget": [task]} if forget else {}
    result = lata_peft.combine([] if forget else [task], tmp_path / "out", method="lata",
                               instruction=adapters["instruct"], scheme=scheme, threshold=0.9, **args)
    rows = result.layer_weights["task"]
    cosines = {r["layer"]: r["cosine"] for r in rows}
    weights = {r["layer"]: r["weight"] for r in rows}
    assert min(cosines[b] for b in INSTRUCTION_LIKE) > 0.99
    assert max(abs(cosines[b]) for b in (2, 3)) < 0.5
    assert max(weights[b] for b in INSTRUCTION_LIKE) < min(weights[b] for b in (2, 3))
    written = json.loads((tmp_path / "out" / "lata_report.json").read_text())
    assert written["layer_weights"]["task"][2]["weight"] == pytest.approx(weights[2])


def test_block_deltas_are_the_weighted_sum_of_input_block_deltas(tmp_path, base, adapters):
    task = constructed_task(tmp_path, adapters["instruct"], 1, "task")
    out = tmp_path / "out"
    result = lata_peft.combine([task, adapters["plain"]], out, forget=[adapters["rank8"]], method="lata",
                               instruction=adapters["instruct"], scheme="log", weights=[1.0, 0.5], lam=0.9,
                               normalize=True)
    layer_weight = {label: {r["layer"]: r["weight"] for r in rows} for label, rows in result.layer_weights.items()}
    inputs = {"task": (task, 0.9 * 1.0), "plain": (adapters["plain"], 0.9 * 0.5), "rank8": (adapters["rank8"], -0.9)}
    expected: dict[str, torch.Tensor] = {}
    for label, (folder, coefficient) in inputs.items():
        for name, delta in peft_delta_weights(base, folder).items():
            block = int(name.split(".layers.")[1].split(".")[0])
            expected[name] = expected.get(name, 0) + coefficient * layer_weight[label][block] * delta
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).merge_and_unload()
    written, original = dict(merged.named_parameters()), dict(base.named_parameters())
    for name, delta in expected.items():
        torch.testing.assert_close((written[name] - original[name]).detach().double(), delta, rtol=1e-4, atol=1e-6)
    assert sum(layer_weight["task"].values()) / 4 == pytest.approx(1.0)  # normalised to mean 1


def test_scheme_formulas():
    cosines = [0.9, 0.1, 0.5, 0.3]  # ranks (most instruction-like first): 0, 3, 1, 2
    assert rank_by_alignment(cosines) == [0, 3, 1, 2]
    assert layer_weights(cosines, LayerWeighting("linear")) == pytest.approx([0, 1, 1 / 3, 2 / 3])
    import math

    assert layer_weights(cosines, LayerWeighting("log")) == pytest.approx(
        [0, math.log(4) / math.log(4), math.log(2) / math.log(4), math.log(3) / math.log(4)])
    assert layer_weights(cosines, LayerWeighting("threshold", threshold=0.4)) == [0, 1, 0, 1]
    assert layer_weights(cosines, LayerWeighting("linear", low=0.5, high=1.5)) == pytest.approx(
        [0.5, 1.5, 0.5 + 1 / 3, 0.5 + 2 / 3])
    normalized = layer_weights(cosines, LayerWeighting("threshold", threshold=0.4, normalize=True))
    assert normalized == [0, 2, 0, 2]
    assert rank_by_alignment([0.2, 0.2, 0.1]) == [0.5, 0.5, 2]


def test_baseline_with_lata_weights(tmp_path, adapters):
    task = constructed_task(tmp_path, adapters["instruct"], 2, "task")
    result = lata_peft.combine([task, adapters["plain"]], tmp_path / "out", method="ties", lata=True,
                               instruction=adapters["instruct"], scheme="threshold", threshold=0.9, rank=4)
    coefficients = {r.module: r.coefficients for r in result.combination.reports}
    assert coefficients["model.layers.0.self_attn.q_proj"] == [1.0]  # the task adapter dropped in block 0
    assert len(coefficients["model.layers.3.self_attn.q_proj"]) == 2  # and kept in block 3
    assert result.report["lata"] is True and result.report["method"] == "ties"


def test_instruction_from_two_full_models(tmp_path, base, adapters):
    """Instruction vector = instruct model - base model, read per module; cosines equal dense ones."""
    base_dir, instruct_dir = tmp_path / "base", tmp_path / "instruct"
    base.save_pretrained(base_dir)
    instruct = copy.deepcopy(base)
    instruction_delta = peft_delta_weights(base, adapters["instruct"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in instruct.named_parameters():
            if name in instruction_delta:  # blocks 0-1 follow the instruction adapter, the rest is noise
                noise = torch.randn(parameter.shape, generator=g) * 0.05
                parameter.add_(instruction_delta[name].float() if ".layers.0." in name or ".layers.1." in name
                               else noise)
    instruct.save_pretrained(instruct_dir, max_shard_size="30KB")
    task = constructed_task(tmp_path, adapters["instruct"], 3, "task")
    scores = score_layers(load_adapter(task), __import__("lata_peft.instruction", fromlist=["x"]).DenseInstruction(
        base_dir, instruct_dir))
    t = peft_delta_weights(base, task)
    for s in scores:
        names = sorted(n for n in t if f".layers.{s.layer}." in n)
        tv = torch.cat([t[n].flatten() for n in names])
        iv = torch.cat([(dict(instruct.named_parameters())[n] - dict(base.named_parameters())[n]).detach()
                        .double().flatten() for n in names])
        assert s.cosine == pytest.approx(float(tv @ iv / (tv.norm() * iv.norm())), abs=1e-6)
    result = lata_peft.combine([task], tmp_path / "out", method="lata", instruction_from=[base_dir, instruct_dir],
                               scheme="threshold", threshold=0.9)
    weights = {r["layer"]: r["weight"] for r in result.layer_weights["task"]}
    assert weights == {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0}


def test_relative_threshold_keeps_the_least_aligned_fraction():
    cosines = [0.9, 0.1, 0.5, 0.3, 0.7]
    assert layer_weights(cosines, LayerWeighting("threshold", keep=0.4)) == [0, 1, 0, 1, 0]
    assert layer_weights(cosines, LayerWeighting("threshold", keep=1.0)) == [1, 1, 1, 1, 1]
    assert layer_weights(cosines, LayerWeighting("threshold", keep=0.0)) == [0, 0, 0, 0, 0]
    with pytest.raises(lata_peft.LataError, match="--keep"):
        LayerWeighting("threshold", keep=1.5)


def test_instruction_norms_are_computed_once_and_change_nothing(adapters, monkeypatch):
    """``pipeline.score`` shares the instruction's squared norms across task adapters: the scores equal
    those of each adapter scored alone, and the instruction's norms are computed once per module."""
    from lata_peft import scoring
    from lata_peft.adapter import load_adapter
    from lata_peft.pipeline import assemble, score

    tasks = [load_adapter(adapters[name]) for name in ("plain", "rank8", "patterns")]
    instruction = load_adapter(adapters["instruct"])
    inputs = assemble(tasks, instruction, [1.0] * 3, [1.0] * 3, None)
    calls = []
    squared = scoring._squared
    monkeypatch.setattr(scoring, "_squared", lambda x: calls.append(1) or squared(x))
    shared = score(inputs, "block")
    assert len(calls) == sum(len(t.modules) for t in tasks) + len(instruction.modules)  # instruction's once
    for label, task in zip(inputs.labels, tasks, strict=True):
        alone = scoring.score_layers(task, instruction, "block", blocks=inputs.blocks)
        assert [s.to_dict() for s in alone] == [s.to_dict() for s in shared[label]]
