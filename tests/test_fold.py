"""Folding into the base: full precision == PEFT merge_and_unload; 4-bit == quantise(W + dW) once."""

from __future__ import annotations

import copy
import importlib
import json

import bitsandbytes.functional as bnbf
import pytest
import torch
from conftest import make_adapter, peft_delta_weights, perturbed_adapter, tiny_llama
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import lata_peft
from lata_peft.api import fold
from lata_peft.cli import app
from lata_peft.errors import LataError

runner = CliRunner()


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory, base):
    folder = tmp_path_factory.mktemp("base") / "tiny"
    base.save_pretrained(folder, max_shard_size="20KB")
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("chunk", [None, 300], ids=["whole", "row-blocks"])
def test_full_precision_fold_matches_peft_merge_and_unload(tmp_path, base, adapters, sharded_base, tokens,
                                                           monkeypatch, chunk):
    if chunk is not None:  # every adapted weight folded a few rows at a time
        monkeypatch.setattr(importlib.import_module("lata_peft.fold"), "ROW_BLOCK_ELEMENTS", chunk)
    assert (sharded_base / "model.safetensors.index.json").is_file()
    out = tmp_path / "folded"
    result = runner.invoke(app, ["fold", str(adapters["patterns"]), "--base", str(sharded_base), "-o", str(out)])
    assert result.exit_code == 0, result.output
    folded = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = PeftModel.from_pretrained(copy.deepcopy(base), str(adapters["patterns"])).merge_and_unload()
    with torch.no_grad():
        want, got = reference(tokens).logits, folded(tokens).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (out / "tokenizer_config.json").is_file() and (out / "lata_report.json").is_file()


@pytest.mark.parametrize("chunk", [None, 300], ids=["whole", "row-blocks"])
def test_combine_fold_into_matches_dense_sum(tmp_path, base, adapters, sharded_base, tokens, monkeypatch, chunk):
    if chunk is not None:
        monkeypatch.setattr(importlib.import_module("lata_peft.fold"), "ROW_BLOCK_ELEMENTS", chunk)
    out = tmp_path / "folded"
    lata_peft.combine([adapters["plain"], adapters["rank8"]], out, weights=[0.5, 1.0], fold_into=sharded_base)
    folded = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = copy.deepcopy(base)
    parameters = dict(expected.named_parameters())
    with torch.no_grad():
        for coefficient, name in ((0.5, "plain"), (1.0, "rank8")):
            for key, delta in peft_delta_weights(base, adapters[name]).items():
                parameters[key].add_(coefficient * delta.float())
        torch.testing.assert_close(folded(tokens).logits, expected(tokens).logits, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- 4-bit

QUANT = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32, "bnb_4bit_use_double_quant": True}


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A base whose widths are multiples of the NF4 block size (bitsandbytes' CPU kernels need it)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False)).eval()
    root = tmp_path_factory.mktemp("wide")
    model.save_pretrained(root / "base")
    a = make_adapter(root / "a", model, 11, r=8, lora_alpha=16)
    b = make_adapter(root / "b", model, 12, r=4, lora_alpha=8)
    return model, root / "base", a, b


def dequantized(linear) -> torch.Tensor:
    return bnbf.dequantize_4bit(linear.weight.data, linear.weight.quant_state).float()


@pytest.mark.parametrize("chunk", [None, 1000], ids=["one-shot", "row-blocks"])
def test_four_bit_fold_quantises_once_and_beats_peft(tmp_path, wide, monkeypatch, chunk):
    if chunk is not None:  # every weight folded and quantised 7 (width 128) or 3 (width 256) rows at a time
        monkeypatch.setattr(importlib.import_module("lata_peft.fold"), "ROW_BLOCK_ELEMENTS", chunk)
    model, base_dir, a, b = wide
    out = tmp_path / "q4"
    result = lata_peft.combine([a, b], out, fold_into=base_dir, four_bit=True)
    assert result.report["fold"]["quantized_modules"] == 14
    reloaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["load_in_4bit"] and config["bnb_4bit_quant_type"] == "nf4"

    exact = {k: v.detach().float().clone() for k, v in model.named_parameters()}
    for folder in (a, b):
        for key, delta in peft_delta_weights(model, folder).items():
            exact[key] += delta.float()

    # PEFT's path: load the base in 4-bit, merge one adapter after the other (quantise 3 times)
    four_bit = BitsAndBytesConfig(load_in_4bit=True, **QUANT)
    peft_model = AutoModelForCausalLM.from_pretrained(base_dir, device_map="cpu", quantization_config=four_bit)
    for folder in (a, b):
        peft_model = PeftModel.from_pretrained(peft_model, str(folder)).merge_and_unload()

    ours_error = peft_error = 0.0
    ours_modules = dict(reloaded.named_modules())
    peft_modules = dict(peft_model.named_modules())
    for key, target in exact.items():
        module = key.removesuffix(".weight")
        if not module.endswith("_proj"):
            continue
        assert type(ours_modules[module]).__name__ == "Linear4bit"
        ours = dequantized(ours_modules[module])
        once, state = bnbf.quantize_4bit(target, blocksize=64, compress_statistics=True, quant_type="nf4")
        torch.testing.assert_close(ours, bnbf.dequantize_4bit(once, state).float())  # quantise(W + dW), once
        ours_error += float((ours - target).square().sum())
        peft_error += float((dequantized(peft_modules[module]) - target).square().sum())
    assert ours_error < peft_error
    reported = result.report["fold"]["total_relative_error_4bit_vs_full_precision"]
    total = sum(float(v.square().sum()) for k, v in exact.items() if k.removesuffix(".weight").endswith("_proj"))
    assert reported == pytest.approx((ours_error / total) ** 0.5, rel=1e-3)
    with torch.no_grad():
        assert torch.isfinite(reloaded(torch.tensor([[1, 2, 3]])).logits).all()


def test_four_bit_base_is_dequantised_once(tmp_path, wide):
    model, base_dir, a, _ = wide
    quantized_base = tmp_path / "q4base"
    AutoModelForCausalLM.from_pretrained(base_dir, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, **QUANT)).save_pretrained(quantized_base)
    out = tmp_path / "q4"
    report = fold(a, quantized_base, out)
    assert report["fold"]["four_bit"] is True
    base4 = AutoModelForCausalLM.from_pretrained(quantized_base, device_map="cpu")
    reloaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    deltas = peft_delta_weights(model, a)
    name = "model.layers.0.self_attn.q_proj"
    expected = dequantized(dict(base4.named_modules())[name]) + deltas[name + ".weight"].float()
    once, state = bnbf.quantize_4bit(expected, blocksize=64, compress_statistics=True, quant_type="nf4")
    torch.testing.assert_close(dequantized(dict(reloaded.named_modules())[name]), bnbf.dequantize_4bit(once, state))


def test_base_shapes_come_from_headers_and_4bit_quant_states(tmp_path, wide):
    """The shape check before a merge reads a 4-bit base's shapes from bitsandbytes' quant state: the
    unquantised model's parameter shapes, while the packed tensors are (n/2, 1)."""
    from lata_peft.full_weights import BaseWeights

    model, base_dir, _, _ = wide
    quantized_base = tmp_path / "q4base"
    AutoModelForCausalLM.from_pretrained(base_dir, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, **QUANT)).save_pretrained(quantized_base)
    packed = load_all(quantized_base)["model.layers.0.mlp.down_proj.weight"]
    assert packed.shape[1] == 1
    full, four_bit = BaseWeights(base_dir), BaseWeights(quantized_base)
    for name, parameter in model.named_parameters():
        assert full.stored_shape(name) == four_bit.stored_shape(name) == tuple(parameter.shape), name
    assert full.stored_shape("model.layers.9.mlp.down_proj.weight") is None


def test_one_rule_says_which_base_weight_takes_a_delta():
    """``holds_delta`` (used by the pre-merge check, the fold and full-parameter merging) accepts PEFT's own
    delta for each kind of layer flattened to weight space, and refuses it transposed or a row short."""
    from peft import LoraConfig, get_peft_model

    from lata_peft.full_weights import holds_delta

    layers = {"linear": torch.nn.Linear(6, 4), "embed": torch.nn.Embedding(9, 5), "conv": torch.nn.Conv2d(3, 4, (2, 3))}
    model = get_peft_model(torch.nn.ModuleDict(layers), LoraConfig(r=2, target_modules=list(layers)))
    for name, layer in layers.items():
        peft_delta = model.base_model.model[name].get_delta_weight("default")
        rows = peft_delta.shape[0]
        flat = (rows, peft_delta.numel() // rows)
        assert holds_delta(layer.weight.shape, flat), name
        assert not holds_delta(layer.weight.shape, flat[::-1]), name
        assert not holds_delta(layer.weight.shape, (rows - 1, flat[1])), name
    assert not holds_delta((), (1, 1))


def test_four_bit_base_keeps_untouched_weights_bit_for_bit(tmp_path, wide):
    model, base_dir, _, _ = wide
    quantized_base = tmp_path / "q4base"
    AutoModelForCausalLM.from_pretrained(base_dir, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, **QUANT)).save_pretrained(quantized_base)
    qv = make_adapter(tmp_path / "qv", model, 13, target_modules=["q_proj", "v_proj"])
    report = fold(qv, quantized_base, tmp_path / "out")
    before, after = load_all(quantized_base), load_all(tmp_path / "out")
    packed = [k for k in before if k.endswith(".weight") and f"{k}.absmax" in before]
    targeted = [k for k in packed if ".q_proj." in k or ".v_proj." in k]
    untouched = [k for k in packed if k not in targeted]
    assert len(targeted) == 4 and len(untouched) == 10
    assert report["fold"]["copied_4bit_modules"] == len(untouched)
    assert report["fold"]["quantized_modules"] == len(packed)
    for key in untouched:  # the packed bytes and every part of the quant state
        for part in [key, *(k for k in before if k.startswith(f"{key}."))]:
            assert torch.equal(before[part], after[part]), part
    for key in targeted:
        assert not torch.equal(before[key], after[key]), key
    reloaded = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu").named_modules())
    base4 = dict(AutoModelForCausalLM.from_pretrained(quantized_base, device_map="cpu").named_modules())
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(dequantized(reloaded[name]), dequantized(base4[name]))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A GPT-2 (``Conv1D`` layers, weights stored (in, out)) with widths of whole NF4 blocks, and two adapters
    of it: a plain LoRA and a DoRA one."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0)).eval()
    root = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(root / "base")
    targets = ["c_attn", "c_proj", "c_fc"]
    plain = make_adapter(root / "plain", model, 21, target_modules=targets, fan_in_fan_out=True)
    dora = perturbed_adapter(model, root / "dora", 22, r=4, lora_alpha=8, target_modules=targets,
                             fan_in_fan_out=True, use_dora=True)
    return model, root / "base", plain, dora


@pytest.mark.parametrize("name", ["plain", "dora"])
def test_four_bit_fold_of_gpt2_conv1d_is_transformers_quantising_the_merged_model(tmp_path, gpt2, name):
    """transformers quantises a Conv1D weight ``W`` (in, out) as ``W^T``: the 4-bit fold of a full-precision
    GPT-2 equals, weight for weight, transformers loading PEFT's ``merge_and_unload`` result in 4-bit."""
    model, base_dir, plain, dora = gpt2
    adapter = {"plain": plain, "dora": dora}[name]
    fold(adapter, base_dir, tmp_path / "q4", four_bit=True)
    PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).merge_and_unload().save_pretrained(tmp_path / "fp")
    theirs = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "fp", device_map="cpu", quantization_config=(
        BitsAndBytesConfig(load_in_4bit=True, **QUANT))).named_modules())
    ours = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "q4", device_map="cpu").named_modules())
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8
    for module in conv1d:
        assert type(ours[module]).__name__ == type(theirs[module]).__name__ == "Linear4bit", module
        torch.testing.assert_close(dequantized(ours[module]), dequantized(theirs[module]), rtol=0, atol=1e-6)
    with torch.no_grad():
        tokens = torch.tensor([[1, 5, 9, 2, 7]])
        torch.testing.assert_close(ours[""](tokens).logits, theirs[""](tokens).logits, rtol=1e-5, atol=1e-5)


def test_fold_into_a_4bit_gpt2_adds_the_transposed_delta(tmp_path, gpt2):
    """Into a 4-bit GPT-2 (quantised by transformers): each Conv1D weight becomes ``Q(dequant(W^T) + dW^T)``,
    quantised once; the shape check reads the transposed quant-state shapes."""
    model, base_dir, plain, _ = gpt2
    quantized_base = tmp_path / "q4base"
    AutoModelForCausalLM.from_pretrained(base_dir, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, **QUANT)).save_pretrained(quantized_base)
    lata_peft.combine([plain], tmp_path / "out", fold_into=quantized_base)
    base4 = dict(AutoModelForCausalLM.from_pretrained(quantized_base, device_map="cpu").named_modules())
    ours = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu").named_modules())
    for key, delta in peft_delta_weights(model, plain).items():  # PEFT's deltas, in Conv1D's (in, out)
        module = key.removesuffix(".weight")
        expected = dequantized(base4[module]) + delta.float().T
        once, state = bnbf.quantize_4bit(expected, blocksize=64, compress_statistics=True, quant_type="nf4")
        torch.testing.assert_close(dequantized(ours[module]), bnbf.dequantize_4bit(once, state), rtol=0, atol=1e-6)


def load_all(folder):
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors




# --------------------------------------------------------------------------------------------- bad input


def test_fold_bad_inputs(tmp_path, adapters, sharded_base, wide, monkeypatch):
    wide_adapter = wide[2]
    out = tmp_path / "out"

    def refused(args, problem):
        result = runner.invoke(app, ["fold", *args, "-o", str(out)])
        assert result.exit_code == 2, result.output
        assert problem in result.output and len(result.output.strip().splitlines()) == 1, result.output
        assert not out.exists()

    refused([str(wide_adapter), "--base", str(sharded_base)], "not for this base model")
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    config = json.loads((sharded_base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (gptq / "config.json").write_text(json.dumps(config))
    (gptq / "model.safetensors").write_bytes(b"")
    refused([str(adapters["plain"]), "--base", str(gptq)], "'gptq'")
    refused([str(adapters["plain"]), "--base", str(tmp_path)], "no config.json")
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6, 10))
    refused([str(adapters["plain"]), "--base", str(sharded_base)], "GB are free")


def test_four_bit_needs_a_base(tmp_path, adapters):
    with pytest.raises(LataError, match="--fold-into"):
        lata_peft.combine([adapters["plain"]], tmp_path / "o", four_bit=True)


def test_tiny_model_helper_is_deterministic():
    assert torch.equal(tiny_llama().lm_head.weight, tiny_llama().lm_head.weight)


def test_fold_progress_counts_the_bytes_of_the_base(tmp_path, adapters, sharded_base):
    """The fold's progress total is the base's tensor bytes (summed here from the loaded tensors), and the
    advances add up to it, so the bar's ETA is in bytes read, not in tensors of very different sizes."""
    from safetensors.torch import load_file

    class Recorder:
        def __init__(self):
            self.starts, self.done = [], 0

        def start(self, total, description, unit=""):
            self.starts.append((total, unit))

        def advance(self, amount=1):
            self.done += amount

    recorder = Recorder()
    fold(str(adapters["plain"]), str(sharded_base), str(tmp_path / "folded"), progress=recorder)
    expected = sum(t.numel() * t.element_size() for path in sorted(sharded_base.glob("model*.safetensors"))
                   for t in load_file(path).values())
    assert recorder.starts == [(expected, "bytes")] and recorder.done == expected


@pytest.mark.parametrize("four_bit", [False, True])
def test_big_unchanged_tensors_are_copied_file_to_file(tmp_path, adapters, sharded_base, monkeypatch, four_bit):
    """Unchanged tensors of SHARD_BYTES or more (here: a tiny threshold) go to shards of their own, copied in
    chunks: every output tensor equals the buffered path's, and transformers loads the folded model."""
    import importlib

    from safetensors.torch import load_file

    fold_module = importlib.import_module("lata_peft.fold")  # lata_peft.fold is also the API function
    shards = importlib.import_module("lata_peft.shards")

    def tensors(folder):
        return {k: v for path in sorted(folder.glob("model*.safetensors")) for k, v in load_file(path).items()}

    fold(str(adapters["plain"]), str(sharded_base), str(tmp_path / "buffered"), four_bit=four_bit)
    monkeypatch.setattr(fold_module, "SHARD_BYTES", 1024)
    monkeypatch.setattr(shards, "COPY_CHUNK", 1000)  # several chunks per tensor
    fold(str(adapters["plain"]), str(sharded_base), str(tmp_path / "copied"), four_bit=four_bit)
    buffered, copied = tensors(tmp_path / "buffered"), tensors(tmp_path / "copied")
    assert buffered.keys() == copied.keys()
    assert all(torch.equal(buffered[k], copied[k]) for k in buffered)
    assert len(list((tmp_path / "copied").glob("model*.safetensors"))) > len(
        list((tmp_path / "buffered").glob("model*.safetensors")))  # the big ones got shards of their own
    if not four_bit:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "copied")
        assert torch.equal(model.model.embed_tokens.weight, buffered["model.embed_tokens.weight"])


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("storage", ["uint8", "bfloat16", "float32"])
@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float16, torch.float32])
def test_quantising_in_row_blocks_writes_bitsandbytes_one_shot_bytes(monkeypatch, double_quant, storage, compute):
    fold_module = importlib.import_module("lata_peft.fold")  # the module (lata_peft.fold is also the API function)
    monkeypatch.setattr(fold_module, "ROW_BLOCK_ELEMENTS", 1000)  # 37 x 128 -> 5 blocks of 7 rows
    weight = torch.randn(37, 128, generator=torch.Generator().manual_seed(3)) * 3
    ours, ours_state = fold_module.NF4(64, compute, double_quant, storage, None, set()).quantize(weight)
    theirs, their_state = bnbf.quantize_4bit(weight.to(compute), blocksize=64, compress_statistics=double_quant,
                                             quant_type="nf4", quant_storage=getattr(torch, storage))
    assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))
    ours_parts, their_parts = ours_state.as_dict(packed=True), their_state.as_dict(packed=True)
    assert ours_parts.keys() == their_parts.keys()
    assert all(torch.equal(ours_parts[key], their_parts[key]) for key in ours_parts)
    restored = bnbf.dequantize_4bit(theirs, their_state)  # any block of rows, restored alone
    absmax = fold_module.NF4.restored_absmax(ours_state)
    for start, stop in ((0, 7), (7, 14), (30, 37), (3, 5)):
        assert torch.equal(fold_module.NF4.dequantize_rows(ours, ours_state, absmax, start, stop), restored[start:stop])


def test_row_block_fold_writes_the_one_shot_fold_to_rounding(tmp_path, wide, monkeypatch):
    """Folding 7 / 3 rows at a time (the 8B path) writes what folding each whole weight at once writes, up to
    fp32 rounding: BLAS may round an ``addmm`` on a few rows differently (bit for bit at 8B shapes here)."""
    _, base_dir, a, b = wide
    one_shot = lata_peft.combine([a, b], tmp_path / "one", fold_into=base_dir, four_bit=True, weights=[0.7, -0.4])
    monkeypatch.setattr(importlib.import_module("lata_peft.fold"), "ROW_BLOCK_ELEMENTS", 1000)
    blocks = lata_peft.combine([a, b], tmp_path / "rows", fold_into=base_dir, four_bit=True, weights=[0.7, -0.4])
    want, got = load_all(tmp_path / "one"), load_all(tmp_path / "rows")
    assert want.keys() == got.keys()
    codes = [key for key in want if key.endswith("_proj.weight")]
    assert len(codes) == 14
    changed = sum(int((want[key] != got[key]).sum()) for key in codes) / sum(want[key].numel() for key in codes)
    assert changed < 1e-3  # a 4-bit code flips only where an fp32 rounding crosses a level boundary
    for key in want:
        if want[key].is_floating_point():
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0)
    errors = blocks.report["fold"]["module_relative_errors_4bit_vs_full_precision"]
    assert errors == pytest.approx(one_shot.report["fold"]["module_relative_errors_4bit_vs_full_precision"], rel=1e-5)
    assert len(errors) == 14 and all(0 < value < 0.2 for value in errors.values())
