"""LATA scoring with dense deltas (issue 16): with ``--base``, DoRA modules and full trained parameters
(``modules_to_save``) are part of their block's task vector.

The reference is written here, densely: each adapter merged by PEFT's own ``merge_and_unload``, its
task vector ``merged - base`` for every parameter, the block's (or module's) parameters flattened
together, and ``cos = <tau, iota> / (|tau| |iota|)``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import perturbed_adapter
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from lata_peft import inspect

LAYERS = 2


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def make_adapter(base: LlamaForCausalLM, folder: Path, seed: int, **config: object) -> Path:
    """A PEFT adapter with every trainable tensor (factors, magnitudes, saved modules) moved by seeded noise."""
    return perturbed_adapter(base, folder, seed, r=4, lora_alpha=8, **config)


def task_vector(base: LlamaForCausalLM, adapter: Path) -> dict[str, torch.Tensor]:
    """``merge_and_unload(W) - W`` for every parameter (zero where the adapter changes nothing)."""
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).merge_and_unload().state_dict()
    return {key: (merged[key] - value).double() for key, value in base.state_dict().items()}


def dense_scores(tau: dict[str, torch.Tensor], iota: dict[str, torch.Tensor], granularity: str,
                 only: set[str] | None = None) -> dict[tuple[int, str | None], tuple[float, float, float]]:
    """Per unit the task adapter changes: ``(|tau|, |iota|, cos)`` over the unit's parameters flattened.
    ``only``: the parameters that count (else every one)."""
    units: dict[tuple[int, str | None], list[str]] = {}
    for key in tau:
        if ".layers." not in key or (only is not None and key not in only):
            continue
        block = int(key.split(".layers.")[1].split(".")[0])
        units.setdefault((block, key.rsplit(".", 1)[0] if granularity == "module" else None), []).append(key)
    scores = {}
    for unit, keys in units.items():
        t = torch.cat([tau[k].flatten() for k in keys])
        i = torch.cat([iota[k].flatten() for k in keys])
        if t.norm() > 0:  # a side without the unit has cosine 0
            cosine = float(t @ i / (t.norm() * i.norm())) if i.norm() > 0 else 0.0
            scores[unit] = (float(t.norm()), float(i.norm()), cosine)
    return scores


def our_scores(result, label: str) -> dict[tuple[int, str | None], tuple[float, float, float]]:
    return {(row["layer"], row["module"]): (row["norm"], row["instruction_norm"], row["cosine"])
            for row in result.adapters[label]["layers"]}


def assert_scores(ours: dict, expected: dict) -> None:
    assert set(ours) == set(expected)
    for unit, values in expected.items():
        assert ours[unit] == pytest.approx(values, rel=1e-5, abs=1e-7), unit  # the reference: fp32 merges


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("scoring")
    base = tiny()
    base.save_pretrained(root / "base")
    task = make_adapter(base, root / "task", 1, use_dora=True, target_modules=["q_proj", "v_proj"],
                        modules_to_save=["input_layernorm", "post_attention_layernorm", "lm_head"])
    instruction = make_adapter(base, root / "instruction", 2, target_modules=["q_proj", "k_proj"],
                               modules_to_save=["input_layernorm"])
    dora_instruction = make_adapter(base, root / "dora_instruction", 3, use_dora=True,
                                    target_modules=["q_proj", "down_proj"],
                                    modules_to_save=["post_attention_layernorm"])
    plain_task = make_adapter(base, root / "plain_task", 4, target_modules=["q_proj", "v_proj"],
                              modules_to_save=["input_layernorm"])
    return {"root": root, "base": base, "task": task, "instruction": instruction,
            "dora_instruction": dora_instruction, "plain_task": plain_task}


@pytest.mark.parametrize("granularity", ["block", "module"])
@pytest.mark.parametrize("instruction", ["instruction", "dora_instruction"])
def test_block_cosine_counts_dora_and_saved_parameters(models, granularity, instruction):
    """Every parameter of the block: DoRA deltas, saved - base; one-sided parameters add to one norm."""
    base = models["base"]
    expected = dense_scores(task_vector(base, models["task"]), task_vector(base, models[instruction]), granularity)
    assert len(expected) == (4 * LAYERS if granularity == "module" else LAYERS)
    result = inspect([str(models["task"])], instruction=str(models[instruction]),
                     base=str(models["root"] / "base"), granularity=granularity)
    assert_scores(our_scores(result, "task"), expected)


def test_without_base_only_the_lora_factors_are_scored(models):
    """No base: as before, the LoRA modules alone (the saved layer norms are left out)."""
    base = models["base"]
    tau, iota = task_vector(base, models["plain_task"]), task_vector(base, models["instruction"])
    lora = {key for key in tau if key.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))}
    without = inspect([str(models["plain_task"])], instruction=str(models["instruction"]))
    assert_scores(our_scores(without, "plain_task"), dense_scores(tau, iota, "block", only=lora))
    with_base = inspect([str(models["plain_task"])], instruction=str(models["instruction"]),
                        base=str(models["root"] / "base"))
    assert_scores(our_scores(with_base, "plain_task"), dense_scores(tau, iota, "block"))


def test_dense_instruction_reads_the_parameters_the_task_trains(models):
    """Instruction vector = instruct model - base model: read for the task's parameters only."""
    base, root = models["base"], models["root"]
    instruct = PeftModel.from_pretrained(copy.deepcopy(base), str(models["instruction"])).merge_and_unload()
    instruct.save_pretrained(root / "instruct")
    tau, iota = task_vector(base, models["task"]), task_vector(base, models["instruction"])
    trained = {key for key, value in tau.items() if value.abs().max() > 0}
    result = inspect([str(models["task"])], instruction_from=(str(root / "base"), str(root / "instruct")),
                     base=str(root / "base"))
    assert_scores(our_scores(result, "task"), dense_scores(tau, iota, "block", only=trained))
