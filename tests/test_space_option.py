"""``combine --space core|full`` and ``--param`` end to end: a core-space TIES / magnitude output, loaded with
``PeftModel.from_pretrained`` and merged by PEFT, equals PEFT's own ``merge_utils`` rule applied to cores the
test builds from the adapters' files (``torch.linalg.svd`` of the stacked factors), mapped back; core and
full TA write the same delta; what can't be is refused in one line; the report records the parameters."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.utils import merge_utils
from safetensors.torch import load_file
from test_core_space import reference_basis
from typer.testing import CliRunner

import lata_peft
from lata_peft.cli import app
from lata_peft.lowrank import LowRank

runner = CliRunner()


def factors(folder: Path) -> dict[str, LowRank]:
    """Each module's ``s B A`` read straight from the adapter's files (``s = lora_alpha / r``)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    modules = {}
    for key, A in tensors.items():
        if key.endswith("lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            B = tensors[key.replace("lora_A", "lora_B")]
            modules[module] = LowRank(B.double(), A.double(), config["lora_alpha"] / config["r"])
    return modules


@pytest.mark.parametrize(("method", "density", "options"), [
    ("ties", 0.5, {"density": 0.5}), ("magnitude", 0.5, {"density": 0.5}),
    ("ties", 0.3, {"params": ["density=0.3"]}), ("magnitude", 0.7, {"params": ["density=0.7"]}),
])
def test_core_space_output_is_peft_rule_on_cores(tmp_path: Path, base, adapters, method: str, density: float,
                                                 options: dict) -> None:
    names, coefficients = ("plain", "rank8", "instruct"), (1.0, 0.5, -1.0)
    lata_peft.combine([adapters["plain"], adapters["rank8"]], tmp_path / "out", forget=[adapters["instruct"]],
                      method=method, weights=[1.0, 0.5], space="core", **options)
    merged = dict(PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).merge_and_unload()
                  .named_parameters())
    original = dict(base.named_parameters())
    inputs = [factors(adapters[name]) for name in names]
    for module in inputs[0]:
        terms = [(c, f[module]) for c, f in zip(coefficients, inputs, strict=True)]
        U_B, V_A, cores = reference_basis(terms)
        signed = [core if c >= 0 else -core for (c, _), core in zip(terms, cores, strict=True)]
        weights = torch.tensor([abs(c) for c, _ in terms], dtype=torch.float64)
        rule = merge_utils.ties if method == "ties" else merge_utils.magnitude_prune
        expected = U_B @ rule(signed, weights, density) @ V_A.T
        got = (merged[f"{module}.weight"] - original[f"{module}.weight"]).double()
        assert float((got - expected).norm()) <= 2e-5 * float(expected.norm()), module


def test_core_and_full_task_arithmetic_write_the_same_delta(tmp_path: Path, adapters) -> None:
    for space in ("core", "full"):
        lata_peft.combine([adapters["plain"], adapters["rank8"]], tmp_path / space, method="ta", space=space)
    assert (tmp_path / "core" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "full" / "adapter_model.safetensors").read_bytes()


def test_subspace_method_parameters_reach_the_merge_and_the_report(tmp_path: Path, adapters) -> None:
    """Iso-C's alpha scales the whole merge (its formula is linear in alpha); the report records it."""
    results = {alpha: lata_peft.combine([adapters["plain"], adapters["rank8"]], tmp_path / f"a{alpha}",
                                        method="iso_c", params=[f"alpha={alpha}"]) for alpha in (1.0, 2.5)}
    assert results[2.5].report["method_parameters"] == {"alpha": 2.5}
    for module, one in results[1.0].combination.modules.items():
        other = results[2.5].combination.modules[module]
        assert torch.allclose(other.delta.dense(), 2.5 * one.delta.dense(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("args", "words"), [
    (["--method", "tsv", "--space", "full"], ["core space only"]),
    (["--method", "iso_c", "--param", "fraction=0.5"], ["iso_c takes", "alpha"]),
    (["--method", "ties", "--param", "alpha=2"], ["ties takes", "convention"]),
    (["--method", "dare", "--param", "alpha=2"], ["dare takes", "convention, normalize, rescale"]),
    (["--method", "magnitude", "--param", "alpha=2"], ["magnitude takes", "density"]),
    (["--method", "ta", "--param", "density=0.4"], ["ta takes", "none"]),
    (["--method", "ties", "--density", "0.3", "--param", "density=0.4"], ["--density 0.3", "given once"]),
    (["--method", "dare", "--param", "seed=1.5"], ["seed", "whole number"]),
    (["--method", "ties", "--param", "density=0"], ["density=0", "0 < density"]),
    (["--method", "ties", "--param", "sign_method=vote"], ["total, frequency"]),
    (["--method", "dare_ties", "--param", "rescale=false"], ["normalize and rescale", "convention=mergekit"]),
    (["--method", "dare", "--param", "convention=mergekit", "--param", "rescale=no"], ["true, false"]),
    (["--method", "ties", "--param", "convention=ours"], ["peft, mergekit"]),
    (["--method", "iso_cts", "--param", "common_fraction=2"], ["common_fraction", "<= 1"]),
    (["--space", "half"], ["--space", "core, full"]),
])
def test_bad_space_or_params_are_one_line(tmp_path: Path, adapters, args: list[str], words: list[str]) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["combine", str(adapters["plain"]), *args, "-o", str(out)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert all(word in result.output for word in words), result.output
    assert not out.exists()


def test_full_space_exact_says_what_it_lost(adapters, tmp_path: Path) -> None:
    result = runner.invoke(app, ["combine", str(adapters["plain"]), str(adapters["rank8"]), "--method", "ties",
                                 "--space", "full", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0 and "warning: --space full" in result.output and "--space core" in result.output


@pytest.mark.parametrize(("method", "shorthand", "param"), [
    ("ties", ["--density", "0.3"], ["--param", "density=0.3"]),
    ("ties", ["--sign-method", "frequency"], ["--param", "sign_method=frequency"]),
    ("dare_ties", ["--seed", "7", "--density", "0.4"], ["--param", "seed=7", "--param", "density=0.4"]),
])
def test_shorthand_flags_set_the_method_parameters(tmp_path: Path, adapters, method: str, shorthand: list[str],
                                                   param: list[str]) -> None:
    """``--density`` / ``--seed`` / ``--sign-method`` and ``--param`` are one parameter, declared by the method:
    the same bytes, not the default's, and the value in the report."""
    outputs, reports = {}, {}
    for name, flags in (("shorthand", shorthand), ("param", param), ("default", [])):
        out = tmp_path / name
        result = runner.invoke(app, ["combine", str(adapters["plain"]), str(adapters["rank8"]), "--forget",
                                     str(adapters["instruct"]), "--method", method, *flags, "-o", str(out)])
        assert result.exit_code == 0, result.output
        outputs[name] = (out / "adapter_model.safetensors").read_bytes()
        reports[name] = json.loads((out / "lata_report.json").read_text())["method_parameters"]
    assert outputs["shorthand"] == outputs["param"] != outputs["default"]
    given = dict(item.split("=") for item in param[1::2])
    assert reports["shorthand"] == reports["param"]
    assert {name: str(reports["param"][name]) for name in given} == given
    defaults = {"density": 0.5, "sign_method": "total", **({"seed": 0} if method == "dare_ties" else {})}
    assert {name: reports["default"][name] for name in defaults} == defaults
