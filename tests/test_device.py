"""``--device cpu|cuda|auto``: refusals in one line before anything is written; on a GPU (when one is
visible) the CUDA path writes what the CPU path writes, to float rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lata_peft import combine, fold
from lata_peft.cli import app
from lata_peft.devices import resolve_device

runner = CliRunner()
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_auto_is_the_cpu_without_a_gpu_and_cuda_is_refused_in_one_line(tmp_path: Path,
                                                                      adapters: dict[str, Path]) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    out = tmp_path / "combined"
    for device, says in (("cuda", "--device cuda: no CUDA GPU is visible"), ("tpu", "--device 'tpu': expected one of")):
        result = runner.invoke(app, ["combine", str(adapters["plain"]), str(adapters["rank8"]), "--device", device,
                                     "-o", str(out)])
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and says in result.output, result.output
        assert "Traceback" not in result.output and not out.exists()
    auto = combine([adapters["plain"], adapters["rank8"]], tmp_path / "auto", method="ties", device="auto")
    cpu = combine([adapters["plain"], adapters["rank8"]], tmp_path / "cpu", method="ties")
    assert (tmp_path / "auto" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "cpu" / "adapter_model.safetensors").read_bytes()
    assert cpu.combination.modules.keys() == auto.combination.modules.keys()


def _close(left: Path, right: Path, tolerance: float) -> None:
    a, b = load_file(left), load_file(right)
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key].float(), b[key].float(), rtol=tolerance, atol=tolerance, msg=key)


@needs_gpu
@pytest.mark.parametrize("options", [
    {"method": "ta", "rank": "4"}, {"method": "ties", "space": "core"},
    {"method": "ties", "space": "full", "rank": "8"}, {"method": "dare_ties", "space": "core"}, {"method": "tsv"},
    {"method": "iso_c"},
])
def test_cuda_combine_writes_what_the_cpu_writes(tmp_path: Path, adapters: dict[str, Path], options: dict) -> None:
    inputs = [adapters["plain"], adapters["rank8"], adapters["patterns"]]
    combine(inputs, tmp_path / "cpu", **options)
    combine(inputs, tmp_path / "cuda", device="cuda", **options)
    _close(tmp_path / "cpu" / "adapter_model.safetensors", tmp_path / "cuda" / "adapter_model.safetensors", 1e-4)


@needs_gpu
def test_cuda_lata_scores_equal_the_cpu_scores(tmp_path: Path, adapters: dict[str, Path]) -> None:
    options = {"method": "lata", "instruction": adapters["instruct"]}
    cpu = combine([adapters["plain"], adapters["rank8"]], tmp_path / "cpu", **options)
    cuda = combine([adapters["plain"], adapters["rank8"]], tmp_path / "cuda", device="cuda", **options)
    assert cpu.table.keys() == cuda.table.keys()
    for label, rows in cpu.table.items():
        for ours, theirs in zip(rows, cuda.table[label], strict=True):
            assert theirs["cosine"] == pytest.approx(ours["cosine"], rel=1e-6, abs=1e-9)
            assert theirs["weight"] == pytest.approx(ours["weight"], rel=1e-6, abs=1e-9)


@needs_gpu
@pytest.mark.parametrize("four_bit", [False, True])
def test_cuda_fold_writes_what_the_cpu_writes(tmp_path: Path, adapters: dict[str, Path], base: torch.nn.Module,
                                            four_bit: bool) -> None:
    base.save_pretrained(tmp_path / "base")
    fold(adapters["plain"], tmp_path / "base", tmp_path / "cpu", four_bit=four_bit)
    fold(adapters["plain"], tmp_path / "base", tmp_path / "cuda", four_bit=four_bit, device="cuda")
    name = "model.safetensors"
    if four_bit:  # the packed codes may differ where W' sits on a quantisation boundary: compare dequantised
        from transformers import AutoModelForCausalLM

        models = [AutoModelForCausalLM.from_pretrained(tmp_path / side, device_map={"": "cuda"})
                  for side in ("cpu", "cuda")]
        ids = torch.arange(12, device="cuda").view(1, -1)
        torch.testing.assert_close(models[0](ids).logits, models[1](ids).logits, rtol=1e-2, atol=1e-2)
    else:
        _close(tmp_path / "cpu" / name, tmp_path / "cuda" / name, 1e-5)
