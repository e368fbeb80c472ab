"""The compare verb's grid and analysis (lata_peft.experiment): what runs, and how wins are counted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lata_peft import LataError
from lata_peft.evaluate import prompts
from lata_peft.experiment import analysis, grid, probes, report
from lata_peft.experiment import plan as plans

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


class experiment:  # noqa: N801  (the names the tests use, from the modules that own them now)
    runs, key_of = staticmethod(grid.runs), staticmethod(grid.key_of)
    with_selectivity, verdicts = staticmethod(analysis.with_selectivity), staticmethod(analysis.verdicts)
    load_plan, check_metrics = staticmethod(plans.load_plan), staticmethod(plans.check_metrics)
    check_inputs, tuned_lambdas = staticmethod(plans.check_inputs), staticmethod(analysis.tuned_lambdas)
    custom_probes, alpaca_prompt = staticmethod(probes.custom_probes), staticmethod(prompts.alpaca_prompt)
    PlanError = LataError


def small_plan() -> dict:
    return {
        "adapters": ["instruct", "math", "shout"],
        "adapter_sets": {0: "a", 1: "b", 2: "c"},
        "settings": [
            {"name": "add", "kind": "add", "add": ["math"], "goals": {"math_nll": "min"}},
            {"name": "forget", "kind": "forget", "forget": ["shout"],
             "goals": {"shout_nll": "max", "selectivity": "max"}},
        ],
        "methods": [{"name": "ta", "method": "ta"}, {"name": "dare", "method": "dare"},
                    {"name": "lata_linear", "method": "lata"}],
        "lambdas": {"add": [0.5, 1.0], "forget": [1.0]},
        "dare_seeds": [0, 1, 2],
    }


def test_grid_counts_and_order() -> None:
    plan = small_plan()
    grid = experiment.runs(plan)
    keys = [experiment.key_of(r) for r in grid]
    assert len(keys) == len(set(keys))
    # 1 base + 3 seeds x 3 adapters + 3 seeds x (3 methods x 2 lambdas + 3 methods x 1 lambda)
    # + DARE-only extra seeds on the first set (3 lambda cells x 2 other seeds)
    assert len(grid) == 1 + 9 + 3 * 9 + 3 * 2
    combos = [r for r in grid if r["setting"] != "reference"]
    main = [r for r in combos if r["seed"] == r["train_seed"]]
    assert all(r["seed"] == r["train_seed"] for r in combos[: len(main)])
    lambdas = [r["lambda"] for r in main]
    # every training seed's lambda = 1 runs come before any lambda = 0.5 run
    assert lambdas == sorted(lambdas, key=lambda lam: lam != 1.0)
    first_half = [r for r in main if r["lambda"] == 0.5]
    assert [r["train_seed"] for r in first_half][:3] == [0, 0, 0]
    extra = [r for r in combos if r["seed"] != r["train_seed"]]
    assert {r["method"] for r in extra} == {"dare"} and {r["train_seed"] for r in extra} == {0}


def record(train_seed: int, setting: str, method: str, lam: float, **metrics: float) -> dict:
    return {"train_seed": train_seed, "setting": setting, "method": method, "lambda": lam, "seed": train_seed,
            "metrics": metrics}


def test_selectivity_is_forgetting_per_unit_of_damage() -> None:
    plan = small_plan()
    records = [record(0, "reference", "base", 0.0, shout_nll=2.0, instruct_nll=1.5),
               record(0, "forget", "ta", 1.0, shout_nll=3.0, instruct_nll=1.9)]
    out = experiment.with_selectivity(records, plan)
    assert "selectivity" not in out[0]["metrics"]
    assert out[1]["metrics"]["selectivity"] == pytest.approx((3.0 - 2.0) / (1.9 - 1.5))


def test_verdicts_are_paired_over_training_seeds() -> None:
    plan = small_plan()
    # math_nll (lower is better): LATA beats TA on every seed, beats DARE on two of three
    values = {"ta": [1.0, 1.1, 1.2], "dare": [0.95, 0.8, 0.9], "lata_linear": [0.9, 1.0, 0.85]}
    records = [record(t, "add", m, 1.0, math_nll=v[t]) for m, v in values.items() for t in range(3)]
    rows = {(r["ours"], r["baseline"]): r for r in experiment.verdicts(records, plan)}
    assert rows[("lata_linear", "ta")]["outcome"] == "win"
    assert rows[("lata_linear", "ta")]["mean_gain"] == pytest.approx((0.1 + 0.1 + 0.35) / 3)
    assert rows[("lata_linear", "dare")]["outcome"] == "tie"
    worse = [record(t, "add", "lata_linear", 1.0, math_nll=2.0) for t in range(3)]
    rows = {(r["ours"], r["baseline"]): r for r in experiment.verdicts(records[:6] + worse, plan)}
    assert rows[("lata_linear", "ta")]["outcome"] == rows[("lata_linear", "dare")]["outcome"] == "loss"


def test_maximised_goal_flips_the_sign() -> None:
    plan = small_plan()
    records = [record(t, "forget", m, 1.0, shout_nll=v) for t in range(3)
               for m, v in (("ta", 3.0), ("dare", 3.1), ("lata_linear", 3.05))]
    rows = {(r["ours"], r["baseline"]): r["outcome"] for r in experiment.verdicts(records, plan)
            if r["metric"] == "shout_nll"}
    assert rows == {("lata_linear", "ta"): "win", ("lata_linear", "dare"): "loss"}


def test_shipped_plans_name_known_methods_and_adapters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATA_NAME", "llama-3.1-8b")
    monkeypatch.setenv("LATA_CACHE", "/cache")
    for name, value in {"LATA_BASE": "/base", "LATA_ADAPTERS": "/adapters", "LATA_PROBES": "/style.jsonl"}.items():
        monkeypatch.setenv(name, value)
    paths = sorted((RECIPES / "experiments").glob("*.yaml"))
    assert {p.stem for p in paths} >= {"smollm2", "gemma3-270m", "paper-scale-gpu"}
    for path in paths:
        plan = experiment.load_plan(path)
        assert "$" not in yaml.safe_dump(plan), path
        assert {"instruct"} <= set(plan["adapters"]), path
        for setting in plan["settings"]:
            assert set(setting.get("add", [])) | set(setting.get("forget", [])) <= set(plan["adapters"]), path
            assert setting["kind"] in plan["lambdas"], path
        assert experiment.runs(plan), path
        experiment.check_metrics(plan)


def test_a_goal_the_plan_does_not_measure_is_refused() -> None:
    plan = {**small_plan(), "metrics": {"wikitext_tokens": 16}}
    experiment.check_metrics(plan)
    plan["settings"][0]["goals"] = {"pirate_nll": "min"}
    with pytest.raises(experiment.PlanError, match=r"'add' names metrics the plan does not measure: pirate_nll"):
        experiment.check_metrics(plan)
    experiment.check_metrics({**plan, "probes": {"pirate_nll": {"file": "x.jsonl"}}})


def test_plan_with_an_unset_variable_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LATA_NAME", raising=False)
    plan = tmp_path / "plan.yaml"
    plan.write_text("base: /models/${LATA_NAME}\n")
    with pytest.raises(experiment.PlanError, match=r"plan\.yaml.*LATA_NAME"):
        experiment.load_plan(plan)


def test_differences_within_the_tolerance_are_ties() -> None:
    plan = small_plan()
    records = [record(t, "add", m, 1.0, math_nll=v) for t in range(3)
               for m, v in (("ta", 1.0), ("dare", 1.01), ("lata_linear", 0.999))]
    rows = {r["baseline"]: r["outcome"] for r in experiment.verdicts(records, plan)}
    assert rows == {"ta": "tie", "dare": "win"}


def test_instruct_probes_are_reserved_from_training(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    records = [{"instruction": f"task {i}", "input": "", "output": ("x" * 800 if i % 3 == 0 else "short")}
               for i in range(200)]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    probes = prompts.probe_records(records)
    assert len(probes) == prompts.PROBES
    assert all(len(p["output"]) > prompts.PROBE_MIN_CHARS for p in probes)
    # the training script is run, never imported: it must leave exactly these records out of training
    code = ("import json, sys; from pathlib import Path; sys.path.insert(0, 'recipes'); import train_adapters as t; "
            "p = Path(sys.argv[1]); "
            "print(json.dumps([sorted({e.instruction for e in t.load_instruct(p)}), "
            "sorted({e.instruction for e in t.load_shout(p)})]))")
    root = RECIPES.parent
    trained, shouted = json.loads(subprocess.run([sys.executable, "-c", code, str(path)], cwd=root, check=True,
                                                 capture_output=True, text=True).stdout)
    assert not set(trained) & {p["instruction"] for p in probes}
    assert not set(shouted) & {p["instruction"] for p in probes}
    assert len(trained) == 200 - prompts.PROBES


def test_missing_inputs_are_named_before_any_run(tmp_path: Path) -> None:
    plan = small_plan()
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    for seed, folder in plan["adapter_sets"].items():
        for name in plan["adapters"]:
            if (seed, name) != (1, "shout"):
                (tmp_path / folder / name).mkdir(parents=True)
                (tmp_path / folder / name / "adapter_config.json").write_text("{}")
    plan = {**plan, "base": str(tmp_path / "base"),
            "adapter_sets": {s: str(tmp_path / f) for s, f in plan["adapter_sets"].items()}}
    with pytest.raises(experiment.PlanError, match=r"training seed 1: .*b lacks the adapter\(s\) shout$"):
        experiment.check_inputs(plan)
    (tmp_path / "b" / "shout").mkdir()
    (tmp_path / "b" / "shout" / "adapter_config.json").write_text("{}")
    experiment.check_inputs(plan)
    with pytest.raises(experiment.PlanError, match=r"no config\.json"):
        experiment.check_inputs({**plan, "base": str(tmp_path / "nowhere")})


def test_tuned_verdicts_compare_each_method_at_its_own_best_lambda() -> None:
    plan = small_plan()
    # TA is best at lambda 0.5, LATA at lambda 1; LATA at 1 beats TA at 0.5 on every seed, though it
    # loses to TA at 0.5. A lambda run on one seed only (TA, 1.0 on seed 0) is not eligible.
    values = {("ta", 0.5): [1.0, 1.0, 1.0], ("lata_linear", 0.5): [1.2, 1.2, 1.2],
              ("lata_linear", 1.0): [0.9, 0.95, 0.97]}
    records = [record(t, "add", m, lam, math_nll=v[t]) for (m, lam), v in values.items() for t in range(3)]
    records.append(record(0, "add", "ta", 1.0, math_nll=0.1))
    assert experiment.tuned_lambdas(records, plan)[("add", "ta", "math_nll")] == 0.5
    assert experiment.tuned_lambdas(records, plan)[("add", "lata_linear", "math_nll")] == 1.0
    at_half = {r["baseline"]: r["outcome"] for r in experiment.verdicts(records, plan) if r["lambda"] == 0.5}
    tuned = {r["baseline"]: (r["outcome"], r["n"]) for r in experiment.verdicts(records, plan, tuned=True)}
    assert at_half == {"ta": "loss"}
    assert tuned == {"ta": ("win", 3)}


def test_custom_probes_read_your_own_behaviours(tmp_path: Path) -> None:
    probes = tmp_path / "pirate.jsonl"
    probes.write_text('{"q": "Greet me.", "a": "Ahoy!"}\n\n{"q": "Say bye.", "a": "Fair winds!"}\n'
                      '{"q": "Third", "a": "cut by the limit"}\n')
    spec = {"pirate_nll": {"file": str(probes), "prompt": "q", "answer": "a", "limit": 2},
            "pirate_alpaca_nll": {"file": str(probes), "prompt": "q", "answer": "a", "template": "alpaca"}}
    out = experiment.custom_probes(spec)
    assert out["pirate_nll"] == (["Greet me.", "Say bye."], ["Ahoy!", "Fair winds!"])
    prompts, answers = out["pirate_alpaca_nll"]
    assert len(prompts) == 3 and prompts[0] == experiment.alpaca_prompt("Greet me.") != "Greet me."
    assert "Greet me." in prompts[0] and answers[2] == "cut by the limit"
    with pytest.raises(experiment.PlanError, match=r"'pirate_nll'.*pirate\.jsonl: record 1 lacks .*'question'"):
        experiment.custom_probes({"pirate_nll": {"file": str(probes), "prompt": "question", "answer": "a"}})
    with pytest.raises(experiment.PlanError, match=r"missing\.jsonl"):
        experiment.custom_probes({"x_nll": {"file": str(tmp_path / "missing.jsonl")}})


def test_selectivity_uses_the_settings_own_metrics() -> None:
    plan = small_plan()
    plan["settings"][1]["selectivity"] = {"forgotten": "pirate_nll", "kept": "math_nll"}
    records = [record(0, "reference", "base", 0.0, pirate_nll=2.0, math_nll=1.0, shout_nll=0.0, instruct_nll=0.0),
               record(0, "forget", "ta", 1.0, pirate_nll=2.6, math_nll=1.2, shout_nll=9.0, instruct_nll=9.0)]
    assert experiment.with_selectivity(records, plan)[1]["metrics"]["selectivity"] == pytest.approx(0.6 / 0.2)


def split_record(train_seed: int, setting: str, method: str, lam: float, test: dict, validation: dict) -> dict:
    return {**record(train_seed, setting, method, lam, **test), "validation": validation}


def test_lambda_is_picked_on_validation_and_reported_on_test() -> None:
    plan = small_plan()
    # On validation TA is best at 1.0 and LATA at 0.5; the test values would pick the other way round.
    records = []
    for t in range(3):
        records += [split_record(t, "add", "ta", 0.5, {"math_nll": 0.5}, {"math_nll": 1.2}),
                    split_record(t, "add", "ta", 1.0, {"math_nll": 1.0}, {"math_nll": 0.8}),
                    split_record(t, "add", "lata_linear", 0.5, {"math_nll": 0.9}, {"math_nll": 0.7}),
                    split_record(t, "add", "lata_linear", 1.0, {"math_nll": 0.1}, {"math_nll": 0.9})]
    best = experiment.tuned_lambdas(records, plan)
    assert best[("add", "ta", "math_nll")] == 1.0 and best[("add", "lata_linear", "math_nll")] == 0.5
    tuned = {r["baseline"]: r for r in experiment.verdicts(records, plan, tuned=True) if r["setting"] == "add"}
    # reported on test: LATA at 0.5 (0.9) against TA at 1.0 (1.0)
    assert tuned["ta"]["outcome"] == "win" and tuned["ta"]["mean_gain"] == pytest.approx(0.1)


def test_selectivity_is_computed_on_each_split_against_the_base_of_that_split() -> None:
    plan = small_plan()
    records = [split_record(0, "reference", "base", 0.0, {"shout_nll": 2.0, "instruct_nll": 1.5},
                            {"shout_nll": 2.2, "instruct_nll": 1.4}),
               split_record(0, "forget", "ta", 1.0, {"shout_nll": 3.0, "instruct_nll": 1.9},
                            {"shout_nll": 2.8, "instruct_nll": 1.7})]
    out = experiment.with_selectivity(records, plan)[1]
    assert out["metrics"]["selectivity"] == pytest.approx((3.0 - 2.0) / (1.9 - 1.5))
    assert out["validation"]["selectivity"] == pytest.approx((2.8 - 2.2) / (1.7 - 1.4))


def test_plan_comparisons_pair_exactly_the_named_methods() -> None:
    plan = {**small_plan(), "comparisons": [["lata_linear", "ta"], ["dare", "ta"]]}
    assert analysis.comparisons(plan) == [("lata_linear", "ta"), ("dare", "ta")]
    assert analysis.comparisons(small_plan()) == [("lata_linear", "ta"), ("lata_linear", "dare")]
    records = [record(t, "add", m, 1.0, math_nll=v) for t in range(3)
               for m, v in (("ta", 1.0), ("dare", 0.9), ("lata_linear", 1.1))]
    rows = {(r["ours"], r["baseline"]): r["outcome"] for r in experiment.verdicts(records, plan)}
    assert rows == {("lata_linear", "ta"): "loss", ("dare", "ta"): "win"}
    with pytest.raises(experiment.PlanError, match="comparison"):
        plans.check_schema({**full_plan(), "comparisons": [["ta", "nowhere"]]}, "plan.yaml")


def full_plan() -> dict:
    return {**small_plan(), "base": "b", "results": "r.json", "report": "R.md", "limits": {}, "metrics": {}}


def test_setting_order_finishes_each_setting_over_seeds_and_lambdas_first() -> None:
    plan = {**small_plan(), "order": "setting"}
    combos = [r for r in experiment.runs(plan) if r["setting"] != "reference" and r["seed"] == r["train_seed"]]
    settings = [r["setting"] for r in combos]
    assert settings == sorted(settings, key=["add", "forget"].index)
    add = [r for r in combos if r["setting"] == "add"]
    assert len(add) == 3 * 3 * 2 and [r["lambda"] for r in add[:9]] == [1.0] * 9


def test_goal_probes_only_when_asked() -> None:
    from lata_peft.experiment import probes_for

    plan = full_plan()
    every = {name: ([], []) for name in ("math_nll", "code_nll", "instruct_nll", "shout_nll")}
    assert probes_for(plan, "add", every) is every
    plan["metrics"] = {"measure": "goals"}
    assert set(probes_for(plan, "add", every)) == {"math_nll"}
    assert set(probes_for(plan, "forget", every)) == {"shout_nll", "instruct_nll"}  # selectivity needs both
    assert probes_for(plan, "reference", every) is every


def test_measure_splits_probe_examples_in_alternating_halves(monkeypatch: pytest.MonkeyPatch) -> None:
    from lata_peft.evaluate.perplexity import NLL, AnswerNLL

    # five examples with (summed NLL, tokens); validation = examples 1, 3, 5; test = 2, 4 (pooled per token)
    examples = [NLL(2.0, 2), NLL(9.0, 3), NLL(4.0, 1), NLL(1.0, 1), NLL(6.0, 3)]
    monkeypatch.setattr(probes, "answer_nll", lambda *a, **k: AnswerNLL(per_example=examples))
    monkeypatch.setattr(probes, "evaluate", lambda *a, **k: {"metrics": {"perplexity": 7.0}})
    model = torch.nn.Linear(1, 1)
    pair = {"math_nll": (["p"] * 5, ["a"] * 5)}
    split = probes.measure(model, None, pair, {"wikitext_tokens": 8, "validation": "alternate"})
    assert split["validation"]["math_nll"] == pytest.approx((2.0 + 4.0 + 6.0) / (2 + 1 + 3))
    assert split["metrics"]["math_nll"] == pytest.approx((9.0 + 1.0) / (3 + 1))
    assert split["metrics"]["wikitext2_ppl"] == split["validation"]["wikitext2_ppl"] == 7.0
    whole = probes.measure(model, None, pair, {"wikitext_tokens": 8})
    assert set(whole) == {"metrics"} and whole["metrics"]["math_nll"] == pytest.approx(22.0 / 10)


@pytest.mark.parametrize("kind", ["patterns", "embedding", "modules_to_save"])
def test_merged_evaluation_gives_peft_logits_and_restores_the_weights_bit_for_bit(
        base: torch.nn.Module, adapters: dict[str, Path], tokens: torch.Tensor, tmp_path: Path, kind: str) -> None:
    """Only the adapted layers are kept aside, unless the adapter swaps a whole module in (a saved head):
    either way the model is the same, bit for bit, afterwards."""
    import copy

    from conftest import logits_with_adapter, perturbed_adapter
    from peft import PeftModel

    from lata_peft.evaluate.loading import with_adapter

    adapter = (perturbed_adapter(base, tmp_path / kind, 9, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
               if kind == "modules_to_save" else adapters[kind])
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = logits_with_adapter(base, adapter, tokens)
    if kind == "modules_to_save":
        with torch.no_grad():  # a saved head that differs from the base's
            saved = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter))
            assert not torch.equal(saved.base_model.model.lm_head.modules_to_save["default"].weight,
                                   base.lm_head.weight)
    with with_adapter(model, adapter, restore=True, merge=True) as merged, torch.no_grad():
        assert not any("lora" in name or "modules_to_save" in name for name, _ in merged.named_modules())
        torch.testing.assert_close(merged(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    # Applied without merging, then removed (PEFT's unload alone would keep a swapped-in head).
    with with_adapter(model, adapter, restore=True) as applied, torch.no_grad():
        torch.testing.assert_close(applied(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


COMMUNITY = Path(__file__).resolve().parent / "data" / "community"


@pytest.mark.parametrize("folder", [
    "stathopoan__Apply-Lightweight-Fine-Tuning-to-a-Foundation-LLM-Model__lora_model",  # SEQ_CLS, modules_to_save null
    "deepbiolab__gpt2-classification-peft__peft_model",  # SEQ_CLS, modules_to_save [classifier, score]
    "HRF001__gemma-text-to-sql__adapter",  # CAUSAL_LM
    "Ahsan-Asim__FineTune_GPT2_Math_Riddles__model",  # task_type null
])
def test_published_configs_swap_modules_exactly_when_peft_does(folder: str) -> None:
    """Whether a merged evaluation must keep the whole model aside: PEFT, given the published config's
    task type and modules_to_save on a tiny Llama of that task, swaps a module in exactly then."""
    import json

    from peft import LoraConfig, get_peft_model
    from peft.utils.other import AuxiliaryTrainingWrapper
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from lata_peft.evaluate.loading import _swaps_modules

    config = json.loads((COMMUNITY / folder / "adapter_config.json").read_text())
    tiny = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, num_labels=3)
    model = (LlamaForSequenceClassification if config.get("task_type") == "SEQ_CLS" else LlamaForCausalLM)(tiny)
    peft_model = get_peft_model(model, LoraConfig(task_type=config.get("task_type"), target_modules=["q_proj"],
                                                  modules_to_save=config.get("modules_to_save")))
    swapped = any(isinstance(module, AuxiliaryTrainingWrapper) for module in peft_model.modules())
    assert _swaps_modules(COMMUNITY / folder) == swapped
    assert swapped == (config.get("task_type") == "SEQ_CLS")


def test_questions_group_pairs_that_differ_by_the_same_words() -> None:
    assert analysis.question("ta_lata", "ta") == analysis.question("iso_cts_lata", "iso_cts") == "+lata"
    assert analysis.question("ties_core", "ties_full") == analysis.question("dare_ties_core", "dare_ties_full")
    assert analysis.question("ties_core", "ties_full") == "core vs full"
    assert analysis.question("tsv", "ta") == "tsv vs ta"
    assert analysis.question("ties", "ties_lata") == "-lata"


def test_one_table_counts_the_best_lambda_verdicts_per_question() -> None:
    """Three seeds; TA + LATA beats TA on every seed, TSV + LATA ties TSV (one seed the other way), and the
    report's one-table row for ``+lata`` says 1 / 1 / 0 over its 2 pairs; TSV vs TA, a question of its own, loses."""
    plan = {**small_plan(), "methods": [{"name": n, "method": "ta"} for n in ("ta", "ta_lata", "tsv", "tsv_lata")],
            "comparisons": [["ta_lata", "ta"], ["tsv_lata", "tsv"], ["tsv", "ta"]], "lambdas": {"add": [1.0]}}
    plan["settings"] = plan["settings"][:1]
    values = {"ta": [1.0, 1.0, 1.0], "ta_lata": [0.9, 0.9, 0.9], "tsv": [1.1, 1.1, 1.1], "tsv_lata": [1.0, 1.2, 1.0]}
    records = [record(t, "add", m, 1.0, math_nll=v[t]) for m, v in values.items() for t in range(3)]
    tuned = experiment.verdicts(records, plan, tuned=True)
    assert analysis.tally(tuned) == {"+lata": {("add", "math_nll"): [1, 1, 0]},
                                     "tsv vs ta": {("add", "math_nll"): [0, 0, 1]}}
    lines = report.tally_table(plan, tuned)
    assert "| +lata | 2 | 1/1/0 |" in lines and "| tsv vs ta | 1 | 0/0/1 |" in lines
    assert "| question | pairs | add: math_nll |" in lines
