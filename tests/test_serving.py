"""``combine --target vllm|llama.cpp|tgi``: each output, read the way that engine reads it
(``tests/engine_rules.py``, written from the engines' source), gives PEFT's own delta of the same
combination; each passes the engine's acceptance rules; what an engine would drop or reject is refused
before anything is written. Plus the model card and the byte-identical recipe re-run of every output."""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BASE_ID, peft_delta_weights
from engine_rules import engine_delta, llamacpp_problems, tgi_ignored, tgi_problems, vllm_problems
from safetensors.torch import load_file
from typer.testing import CliRunner

import lata_peft
from lata_peft.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "adapters"
ENGINES_OF = {"vllm": ("vllm", "vllm<0.32"), "llama.cpp": ("llama.cpp",), "tgi": ("tgi",)}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, base: torch.nn.Module) -> Path:
    folder = tmp_path_factory.mktemp("tiny_base") / BASE_ID
    base.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# the base's own card\n")
    return folder


def written_ranks(folder: Path) -> set[int]:
    tensors = load_file(folder / "adapter_model.safetensors")
    return {t.shape[0] for k, t in tensors.items() if k.endswith(("lora_A.weight", "lora_embedding_A"))}


def assert_same_deltas(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    assert set(got) == set(expected)
    for name, delta in expected.items():
        assert float((got[name] - delta).abs().max()) <= rtol * float(delta.abs().max()), name


def assert_engine_accepts(folder: Path, target: str, layers: int | None = None) -> None:
    rank = json.loads((folder / "adapter_config.json").read_text())["r"]
    if target == "vllm":
        assert vllm_problems(folder, max_lora_rank=rank) == []
        assert vllm_problems(folder, max_lora_rank=rank, legacy=True) == []
    elif target == "llama.cpp":
        assert llamacpp_problems(folder) == []
    else:
        assert tgi_problems(folder, num_layers=layers) == [] and tgi_ignored(folder, num_layers=layers) == []


@pytest.mark.parametrize("target", ["vllm", "llama.cpp", "tgi"])
def test_shipped_mixed_rank_combination_is_read_as_peft_reads_it(tmp_path: Path, target: str) -> None:
    """The issue's case: math + code at energy:0.9 (ranks 2-7); PEFT's delta from the PEFT-target folder's
    config is the reference, and each engine reads the target's folder to the same delta."""
    inputs = [EXAMPLES / "math", EXAMPLES / "code"]
    lata_peft.combine(inputs, tmp_path / "peft", rank="energy:0.9")
    result = lata_peft.combine(inputs, tmp_path / target, rank="energy:0.9", target=target)
    assert len(written_ranks(tmp_path / "peft")) > 1
    reference = engine_delta(tmp_path / "peft", "peft")
    for engine in ENGINES_OF[target]:
        assert_same_deltas(engine_delta(tmp_path / target, engine), reference)
    if target == "llama.cpp":  # the converter's reading of the PEFT-target folder is what goes wrong
        assert any(not torch.allclose(d, reference[m]) for m, d in engine_delta(tmp_path / "peft", engine).items())
    expected_rank = {"vllm": 8, "llama.cpp": 7, "tgi": 8}[target]
    config = json.loads((tmp_path / target / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == expected_rank and not config["use_rslora"]
    assert config["rank_pattern"] == config["alpha_pattern"] == {}
    assert written_ranks(tmp_path / target) == {expected_rank}
    assert_engine_accepts(tmp_path / target, target, layers=30)
    serving = result.report["serving"]
    assert serving == {"target": target, "rank": expected_rank, "uniform_rank": True, "status": "uniform-rank",
                       "zero_modules": 0}
    peft_report = json.loads((tmp_path / "peft" / "lata_report.json").read_text())
    assert peft_report["summary"]["serving"] == "not uniform-rank"


@pytest.mark.parametrize("target", ["vllm", "llama.cpp", "tgi"])
def test_tiny_mixed_inputs_equal_peft_merge(tmp_path: Path, target: str, base: torch.nn.Module,
                                            adapters: dict[str, Path]) -> None:
    """Inputs with rank patterns, rsLoRA and alpha patterns, a forgotten one, truncated to rank 5:
    the target's folder merged by PEFT itself equals PEFT's merge of the PEFT-target folder, and each
    engine's reading of it equals that merge too."""
    inputs = [adapters["plain"], adapters["patterns"]]
    options = {"forget": [adapters["rslora"]], "rank": "energy:0.8", "weights": [1.0, 0.5]}
    lata_peft.combine(inputs, tmp_path / "peft", **options)
    lata_peft.combine(inputs, tmp_path / target, target=target, **options)
    reference = {k.removesuffix(".weight"): d for k, d in peft_delta_weights(base, tmp_path / "peft").items()}
    assert len(written_ranks(tmp_path / "peft")) > 1
    merged = {k.removesuffix(".weight"): d for k, d in peft_delta_weights(base, tmp_path / target).items()}
    assert_same_deltas(merged, reference)
    for engine in ENGINES_OF[target]:
        assert_same_deltas(engine_delta(tmp_path / target, engine), reference)
    assert_engine_accepts(tmp_path / target, target, layers=4)


def test_vllm_rank_is_the_smallest_max_lora_rank_that_holds_it(tmp_path: Path, adapters: dict[str, Path]) -> None:
    inputs = [adapters["plain"], adapters["rank8"], adapters["rslora"]]  # exact: ranks 4 + 8 + 6 = 18
    lata_peft.combine(inputs, tmp_path / "exact", target="vllm")
    assert written_ranks(tmp_path / "exact") == {32}
    lata_peft.combine(inputs, tmp_path / "r16", target="vllm", rank=16)
    assert written_ranks(tmp_path / "r16") == {16}


def test_tgi_gets_every_layer_type_in_every_layer(tmp_path: Path, base: torch.nn.Module, adapters: dict[str, Path],
                                                  tiny_base: Path) -> None:
    """Layers 1 and 2 of 4 only: TGI would drop every type (test_engine_rules), so zero modules fill layers
    0 and 3 (the layer count from --base); TGI then applies PEFT's delta, and zeros elsewhere."""
    some = adapters["some_layers"]
    result = lata_peft.combine([some], tmp_path / "tgi", target="tgi", base=str(tiny_base))
    assert result.report["serving"]["zero_modules"] == 7 * 2
    assert tgi_problems(tmp_path / "tgi", num_layers=4) == [] and tgi_ignored(tmp_path / "tgi", num_layers=4) == []
    got = engine_delta(tmp_path / "tgi", "tgi", num_layers=4)
    expected = {k.removesuffix(".weight"): d for k, d in peft_delta_weights(base, some).items()}
    assert set(got) == {f"model.layers.{i}.{m}" for i in range(4) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    for module, delta in got.items():
        if module in expected:
            assert float((delta - expected[module]).abs().max()) <= 1e-5 * float(expected[module].abs().max())
        else:
            assert not delta.any()


def refused(tmp_path: Path, args: list[str], *words: str) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["combine", *args, "-o", str(out)])
    message = result.output.strip()
    assert result.exit_code == 2, result.output
    assert len(message.splitlines()) == 1 and message.startswith("error:") and "Traceback" not in message
    for word in words:
        assert word in message, message
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_what_an_engine_would_drop_is_refused(tmp_path: Path, adapters: dict[str, Path], tiny_base: Path) -> None:
    embedding = str(adapters["embedding"])
    refused(tmp_path, [embedding, "--target", "tgi"], "--target tgi", "embed_tokens", "--target peft")
    refused(tmp_path, [str(adapters["plain"]), "--target", "tgi", "--fold-into", str(tiny_base)], "--fold-into")
    refused(tmp_path, [str(adapters["plain"]), "--target", "ollama"], "--target", "peft, vllm, llama.cpp, tgi")
    gpt2_like = tmp_path / "gpt2"  # a GPT-2 Conv1D adapter
    _gpt2_adapter(gpt2_like)
    refused(tmp_path, [str(gpt2_like), "--target", "llama.cpp"], "Conv1D", "--fold-into")
    refused(tmp_path, [str(gpt2_like), "--target", "tgi"], "transformer.h.0.attn.c_attn")


def test_full_weights_and_biases_are_refused_where_the_engine_drops_them(tmp_path: Path, tiny_base: Path) -> None:
    from test_full_weights import make_adapter as make_full_adapter
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    base = tmp_path / "cls_base"
    model.save_pretrained(base)
    head = make_full_adapter(lambda: model, base, tmp_path / "head", 1, r=4, target_modules=["q_proj", "v_proj"],
                             task_type="SEQ_CLS")
    lata_peft.combine([head], tmp_path / "vllm_head", target="vllm")  # vLLM serves classifier / score heads
    assert vllm_problems(tmp_path / "vllm_head", max_lora_rank=8) == []
    refused(tmp_path, [str(head), "--target", "tgi"], "score.weight", "modules_to_save")
    biased = make_full_adapter(lambda: model, base, tmp_path / "biased", 2, r=4, target_modules=["q_proj", "v_proj"],
                               lora_bias=True)
    for target in ("vllm", "llama.cpp", "tgi"):
        refused(tmp_path, [str(biased), "--target", target], f"--target {target}", "lora_bias")


def _gpt2_adapter(folder: Path) -> None:
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32))
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                                 init_lora_weights=False))
    peft_model.save_pretrained(folder)


# ----------------------------------------------------------------------------- model card and recipe


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("target", ["peft", "tgi"])
def test_recipe_and_card_command_remake_the_same_bytes(tmp_path: Path, target: str, adapters: dict[str, Path]) -> None:
    args = [str(adapters["plain"]), str(adapters["patterns"]), "--forget", str(adapters["rank8"]), "--weight", "1",
            "--weight", "0.5", "--rank", "energy:0.9", "--method", "lata", "--instruction", str(adapters["instruct"]),
            "--scheme", "log", "--target", target]
    first = tmp_path / "first"
    assert runner.invoke(app, ["combine", *args, "-o", str(first)]).exit_code == 0
    again = tmp_path / "again"
    result = runner.invoke(app, ["run", str(first / "lata_recipe.yaml"), "-o", str(again)])
    assert result.exit_code == 0, result.output
    assert sha256(again / "adapter_model.safetensors") == sha256(first / "adapter_model.safetensors")
    assert (again / "adapter_config.json").read_text() == (first / "adapter_config.json").read_text()
    card = (first / "README.md").read_text()
    command = card.split("```bash\n")[2].split("\n```")[0]  # the card's one-command form
    words = shlex.split(command.replace(" -o OUT", f" -o {tmp_path / 'third'}"))
    assert words[:2] == ["lata-peft", "combine"]
    assert runner.invoke(app, words[1:]).exit_code == 0
    assert sha256(tmp_path / "third" / "adapter_model.safetensors") == sha256(first / "adapter_model.safetensors")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == BASE_ID and front["library_name"] == "peft" and "lata-peft" in front["tags"]
    for role, folder in (("task", adapters["plain"]), ("forget", adapters["rank8"])):
        line = next(line for line in card.splitlines() if f"`{folder}`" in line)
        assert line.startswith(f"| {role} |") and sha256(folder / "adapter_model.safetensors") in line
    assert f"target: `{target}`" in card
    mixed = json.loads((first / "lata_report.json").read_text())["summary"]["serving"] == "not uniform-rank"
    assert mixed == (target == "peft") and ("**not uniform-rank**" in card) == mixed


def test_folded_output_card_keeps_the_base_license(tmp_path: Path, adapters: dict[str, Path], tiny_base: Path) -> None:
    lata_peft.fold(str(adapters["plain"]), str(tiny_base), str(tmp_path / "folded"))
    card = (tmp_path / "folded" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "apache-2.0" and front["library_name"] == "transformers"
    assert "the base's own card" not in card and sha256(adapters["plain"] / "adapter_model.safetensors") in card
    assert "lata-peft fold" in card


# ----------------------------------------------------------------------------- export --gguf


def test_export_verb_writes_what_llamacpp_computes_as_peft(tmp_path: Path, base: torch.nn.Module,
                                                           adapters: dict[str, Path], tiny_base: Path) -> None:
    """``lata-peft export`` of a mixed-rank combination, then as a recipe; llama.cpp's reading of the file
    (``test_gguf_export.llamacpp_deltas``) equals PEFT's own merge of the folder."""
    from test_gguf_export import assert_deltas, llamacpp_deltas

    folder = tmp_path / "energy"
    lata_peft.combine([adapters["plain"], adapters["rank8"]], folder, rank="energy:0.9")
    out = tmp_path / "energy.gguf"
    result = runner.invoke(app, ["export", str(folder), "--gguf", str(out), "--base", str(tiny_base), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["scale_folded"] and summary["path"] == str(out) and out.stat().st_size == summary["bytes"]
    got = llamacpp_deltas(out, base.config.num_attention_heads, base.config.num_key_value_heads)
    expected = {k.removesuffix(".weight"): d for k, d in peft_delta_weights(base, folder).items()}
    assert_deltas(got, expected, rtol=1e-4)
    recipe = tmp_path / "export.yaml"
    recipe.write_text(yaml.safe_dump({"export": {"adapter": str(folder), "gguf": str(out), "base": str(tiny_base)}}))
    again = tmp_path / "again.gguf"
    assert runner.invoke(app, ["run", str(recipe), "-o", str(again)]).exit_code == 0
    assert again.read_bytes() == out.read_bytes()


def test_export_never_replaces_an_input_or_a_file_that_is_not_gguf(tmp_path: Path, adapters: dict[str, Path],
                                                                   tiny_base: Path) -> None:
    folder = tmp_path / "plain"
    import shutil

    shutil.copytree(adapters["plain"], folder)
    before = {p.name: sha256(p) for p in folder.iterdir()}
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for target in (folder / "adapter_model.safetensors", folder, folder / "inside.gguf", tmp_path, notes):
        result = runner.invoke(app, ["export", str(folder), "--gguf", str(target), "--base", str(tiny_base),
                                     "--overwrite"])
        assert result.exit_code == 2 and result.output.startswith("error:"), result.output
        assert len(result.output.strip().splitlines()) == 1
    assert {p.name: sha256(p) for p in folder.iterdir()} == before and notes.read_text() == "mine"
    assert not (folder / "inside.gguf").exists()


def test_export_refuses_trained_weights_it_cannot_carry(tmp_path: Path) -> None:
    """A SEQ_CLS head (modules_to_save) or a lora_bias would be dropped from the GGUF: refused, nothing written."""
    from test_full_weights import llama_cls, make_adapter, save_base

    save_base(llama_cls, tmp_path / "base")
    for name, extra in (("head", {"task_type": "SEQ_CLS"}), ("biased", {"lora_bias": True})):
        adapter = make_adapter(llama_cls, tmp_path / "base", tmp_path / name, 1, r=4, lora_alpha=8,
                               target_modules=["q_proj", "v_proj"], **extra)
        out = tmp_path / f"{name}.gguf"
        result = runner.invoke(app, ["export", str(adapter), "--gguf", str(out), "--base", str(tmp_path / "base")])
        assert result.exit_code == 2 and "lata-peft fold" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not out.exists()
