"""The CLI end to end: summary, --json, --dry-run, inspect (table, JSON, plot), recipes, --help."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import lata_peft.api
from lata_peft.cli import app
from lata_peft.recipe import load_recipe

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_verb_and_flag():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for verb in ("combine", "inspect", "run"):
        assert verb in result.output
    result = runner.invoke(app, ["combine", "--help"], terminal_width=200)
    for flag in ("--forget", "--method", "--weight", "--lambda", "--rank", "--dry-run", "--json", "--instruction",
                 "--scheme", "--threshold", "--granularity", "--overwrite", "--allow-pickle", "--strict"):
        assert flag in result.output


def test_combine_summary_and_json(tmp_path, adapters):
    out = tmp_path / "out"
    result = runner.invoke(app, ["combine", str(adapters["plain"]), str(adapters["rank8"]), "--forget",
                                 str(adapters["patterns"]), "--rank", "6", "-o", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "modules" in result.output and "28" in result.output and "max truncation error" in result.output
    assert (out / "adapter_model.safetensors").is_file()
    result = runner.invoke(app, ["combine", str(adapters["plain"]), "--method", "lata", "--instruction",
                                 str(adapters["instruct"]), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = report["layer_weights"]["plain"]
    assert [row["layer"] for row in rows] == [0, 1, 2, 3]
    assert sorted(row["weight"] for row in rows) == pytest.approx([0, 1 / 3, 2 / 3, 1])  # Linear-Drop-by-Rank
    assert report["out"] is None and report["summary"]["modules"] == 21  # the weight-0 block is not written


def test_inspect_json_and_plot(tmp_path, adapters):
    plot = tmp_path / "scores.png"
    result = runner.invoke(app, ["inspect", str(adapters["plain"]), str(adapters["rank8"]), "--instruction",
                                 str(adapters["instruct"]), "--json", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload) == {"plain", "rank8"}
    for row in payload["plain"]["layers"]:
        assert isinstance(row["layer"], int) and row["norm"] > 0 and -1 <= row["cosine"] <= 1
        assert set(row["weights"]) == {"linear", "log", "threshold"} and row["weight"] == row["weights"]["linear"]
    assert {m["rank"] for m in payload["rank8"]["modules"]} == {8}
    from PIL import Image

    with Image.open(plot) as image:
        assert image.size[0] >= 800 and image.size[1] >= 600
        colors = image.convert("RGB").getcolors(maxcolors=1_000_000)
        assert len(colors) > 50  # lines, text and a legend, not a blank canvas


def test_inspect_table_without_instruction(adapters):
    result = runner.invoke(app, ["inspect", str(adapters["patterns"])], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "rank 2/4/6" in result.output


RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_shipped_recipe_runs(recipe, tmp_path, monkeypatch):
    """Each recipe names its launch command, points at shipped adapters, and runs (dry run / temp output)."""
    assert recipe.read_text().splitlines()[0] == f"# Launch: lata-peft run recipes/{recipe.name}"
    spec = load_recipe(recipe)
    for key in ("adapters", "forget"):
        for path in getattr(spec, key, ()):
            assert (ROOT / path / "adapter_config.json").is_file(), path
    monkeypatch.chdir(ROOT)
    if spec.verb == "combine":
        result = runner.invoke(app, ["run", str(recipe), "--dry-run", "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["summary"]["modules"] > 0
    elif spec.verb == "eval":
        if not (Path(spec.model).expanduser() / "config.json").is_file():
            pytest.skip(f"no base model at {spec.model} (recipes/prepare_base.py prepares it)")
        for path in spec.fold:
            assert (ROOT / path / "adapter_config.json").is_file(), path
        result = runner.invoke(app, ["run", str(recipe), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["metrics"]["perplexity"] > 1
    else:
        from lata_peft import inspect

        inspect(spec.adapters, instruction=spec.instruction, plot=tmp_path / "p.png")


def test_recipe_runs(tmp_path, adapters):
    recipe = tmp_path / "r.yaml"
    out = tmp_path / "out"
    recipe.write_text(yaml.safe_dump({"combine": {
        "adapters": [str(adapters["plain"])], "forget": [str(adapters["rank8"])], "lambda": 0.5,
        "method": "lata", "instruction": str(adapters["instruct"]), "scheme": "threshold", "out": str(out)}}))
    result = runner.invoke(app, ["run", str(recipe), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["lambda"] == 0.5 and report["scheme"] == "threshold"
    assert (out / "lata_report.json").is_file()
    recipe.write_text(yaml.safe_dump({"combine": {"adapters": ["x"], "lamda": 1}}))
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code == 2 and "lamda" in result.output and str(recipe) in result.output


def test_eval_command_on_a_tiny_model(tmp_path, base, adapters):
    """``lata-peft eval`` with --adapter and with --fold gives the same perplexity (same weights)."""
    from test_evaluate import tiny_tokenizer

    folder = tmp_path / "model"
    base.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 3)
    args = ["eval", str(folder), "--task", f"ppl:{text}", "--json"]
    with_adapter = runner.invoke(app, [*args, "--adapter", str(adapters["plain"])])
    folded = runner.invoke(app, [*args, "--fold", str(adapters["plain"])])
    plain = runner.invoke(app, args)
    assert with_adapter.exit_code == folded.exit_code == plain.exit_code == 0, with_adapter.output + folded.output
    ppl = [json.loads(r.stdout)["metrics"]["perplexity"] for r in (with_adapter, folded, plain)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-4)
    assert ppl[0] != pytest.approx(ppl[2], rel=1e-4)
    missing = runner.invoke(app, ["eval", str(folder), "--task", "ppl:/nonexistent.txt"])
    assert missing.exit_code == 2 and "/nonexistent.txt" in missing.output
    # The same spec as a recipe and through the API.
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(yaml.safe_dump({"eval": {"model": str(folder), "tasks": [f"ppl:{text}"],
                                               "fold": [str(adapters["plain"])]}}))
    from_recipe = runner.invoke(app, ["run", str(recipe), "--json"])
    assert from_recipe.exit_code == 0, from_recipe.output
    assert json.loads(from_recipe.stdout)["metrics"]["perplexity"] == pytest.approx(ppl[1], rel=1e-6)
    [from_api] = lata_peft.api.evaluate(str(folder), tasks=[f"ppl:{text}"], adapter=str(adapters["plain"]))
    assert from_api["metrics"]["perplexity"] == pytest.approx(ppl[0], rel=1e-6)


@pytest.mark.parametrize(("extra", "message"), [
    ([], "at least one --task"),
    (["--task", "wikitext2", "--adapter", "a", "--fold", "b"], "--adapter or --fold, not both"),
    (["--task", "wikitext2", "--fold", "b", "--4bit"], "--4bit does not apply"),
    (["--task", "wikitext2", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--task", "wikitext2", "--temperature", "-1"], "--temperature must be at least 0"),
])
def test_eval_refusals_are_one_line(tmp_path, extra, message):
    result = runner.invoke(app, ["eval", str(tmp_path), *extra])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_another_models_adapter_is_refused_in_one_short_line(tmp_path, base, adapters):
    """``combine --base``, ``inspect --base`` and ``eval --fold`` check shapes against the base's headers before
    merging; ``eval --adapter`` reaches PEFT, whose multi-line refusal is cut to its first size mismatch."""
    from conftest import make_adapter
    from test_evaluate import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    wrong = make_adapter(tmp_path / "wrong", other, 3)
    folder = tmp_path / "model"
    base.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 3)
    out = tmp_path / "out"
    for args, problem in [
        (["combine", str(wrong), "--base", str(folder), "-o", str(out)], "not for this base"),
        (["inspect", str(wrong), "--base", str(folder)], "not for this base"),
        (["eval", str(folder), "--task", f"ppl:{text}", "--fold", str(wrong)], "not for this base"),
        (["eval", str(folder), "--task", f"ppl:{text}", "--adapter", str(wrong)], "size mismatch"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]  # after any load bar
        assert len(errors) == 1 and errors[0] == result.output.strip().splitlines()[-1], result.output
        line = errors[0]
        assert len(line) < 600, line
        assert problem in line and str(wrong) in line, line
        assert not out.exists()
    combined = runner.invoke(app, ["combine", str(adapters["plain"]), "--base", str(folder), "-o", str(out)])
    assert combined.exit_code == 0, combined.output  # the right model's adapter passes the same check
