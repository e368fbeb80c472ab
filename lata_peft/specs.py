"""The verbs' specs: ``combine``, ``inspect``, ``fold``, ``export``, ``compare``, ``eval``. One field per option.

The CLI flags, the recipe keys, the API's keyword arguments and the reports all come from
these fields (see :mod:`lata_peft.spec`). Cross-field rules live in each ``check``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .combine import RankPolicy
from .devices import resolve_device
from .dtypes import DTYPES
from .errors import LataError
from .methods import (
    DENSITY,
    METHOD_NAMES,
    METHODS,
    RUN_PARAMS,
    SEED,
    SIGN_METHOD,
    SIGN_METHODS,
    SPACES,
    Method,
    MethodParam,
    parse_params,
)
from .serving import TARGETS
from .spec import Spec, option
from .weighting import LayerWeighting

__all__ = ["CombineSpec", "CompareSpec", "EvalSpec", "ExportSpec", "FoldSpec", "InspectSpec", "ScoringSpec"]

Paths = tuple[str, ...]
QUANT_STORAGE = ("uint8", "float16", "bfloat16", "float32")


def _allow_pickle() -> bool:
    return option(False, "Read pickled adapter_model.bin weights (with torch's weights_only=True).")


def _device() -> str:
    return option("cpu", "Where the maths runs: cpu | cuda | auto (cuda when a GPU is visible); files are read "
                         "and written from the CPU.")


def _overwrite() -> bool:
    return option(False, "Replace an existing output folder (only one that lata-peft wrote).")


@dataclass(frozen=True)
class ScoringSpec(Spec):
    """LATA scoring and weighting options, shared by ``combine`` and ``inspect``."""

    instruction: str | None = option(None, "Instruction adapter that LATA scores each layer against.", path=True)
    instruction_from: tuple[str, str] | None = option(
        None, "BASE INSTRUCT model folders: the instruction vector is their difference.", path=True)
    scheme: str = option("linear", "LATA weighting scheme: linear | log | threshold.")
    threshold: float = option(0.95, "Drop-with-Threshold: keep layers whose cosine is below this.")
    keep: float | None = option(None, "Drop-with-Threshold, relative: keep this fraction of the least aligned layers.")
    low: float = option(0.0, "LATA weight of the most instruction-like layer.")
    high: float = option(1.0, "LATA weight of the most task-specific layer.")
    normalize: bool = option(False, "Rescale LATA weights to mean 1.")
    granularity: str = option("block", "Score per block or per module.")
    layer_regex: str | None = option(None, "Regex with one capture group, the block index (unknown architectures).")
    base: str | None = option(None, "Base model folder (or hub id), read tensor by tensor: full trained weights "
                                    "(modules_to_save, biases) become task vectors saved - base, DoRA modules "
                                    "m (W + sBA) / ||W + sBA|| - W; both count in LATA's scores.", path=True)
    device: str = _device()

    @property
    def weighting(self) -> LayerWeighting:
        """The weighting scheme and its parameters (validated on construction)."""
        return LayerWeighting(self.scheme, self.low, self.high, self.threshold, self.normalize, self.keep)

    @property
    def has_instruction(self) -> bool:
        return self.instruction is not None or self.instruction_from is not None

    def check(self) -> None:
        self.weighting  # noqa: B018  (validates scheme, low/high, keep)
        if self.granularity not in ("block", "module"):
            raise LataError(f"--granularity {self.granularity!r}: expected 'block' or 'module'")
        if self.instruction is not None and self.instruction_from is not None:
            raise LataError("give --instruction or --instruction-from, not both")
        resolve_device(self.device)  # a known name, and for cuda a visible GPU


def _params_help() -> str:
    """``density (magnitude, ties, dare, dare_ties): ...; alpha (iso_c, iso_cts): ...``: each parameter once,
    with the methods that declare it."""
    takers: dict[MethodParam, list[str]] = {}
    for method in METHODS.values():
        for param in method.params:
            takers.setdefault(param, []).append(method.name)
    return "; ".join(f"{param.name} ({', '.join(names)}): {param.help}" for param, names in takers.items())


@dataclass(frozen=True)
class CombineSpec(ScoringSpec):
    """Combine adapters: lambda * (sum_i w_i l_i dW_i - sum_j f_j l_j dW_j), l = LATA's layer weights."""

    verb: ClassVar[str] = "combine"

    adapters: Paths = option((), "Task adapters to add (folders or hub ids).", argument=True, path=True)
    out: str | None = option(None, "Output adapter (or, with --fold-into, model) folder.", flags=("-o", "--out"))
    forget: Paths = option((), "Adapter to subtract (repeatable).", flags=("--forget",), path=True)
    method: str = option("ta", "Merge method: " + " | ".join(METHOD_NAMES) + ".")
    weights: tuple[float, ...] = option((), "Weight per task adapter (one value: all).", flags=("--weight",))
    forget_weights: tuple[float, ...] = option((), "Weight per forgotten adapter.", flags=("--forget-weight",))
    lam: float = option(1.0, "Global scale lambda.", flags=("--lambda",), key="lambda")
    rank: str | int = option("exact", "Output rank: exact | K | energy:F.")
    lata: bool = option(False, "Apply LATA layer weights with a baseline method.")
    density: float | None = option(None, "Shorthand of --param density= (magnitude, TIES, DARE: fraction of "
                                   "entries kept; default 0.5).")
    seed: int | None = option(None, "Shorthand of --param seed= (DARE's mask seed; default 0).")
    sign_method: str | None = option(None, "Shorthand of --param sign_method= (TIES sign election: "
                                     + " | ".join(SIGN_METHODS) + "; default total).")
    dtype: str | None = option(None, "Output dtype: " + " | ".join(DTYPES) + " (default: the inputs').")
    strict: bool = option(False, "Refuse adapters whose base_model_name_or_path differ.")
    allow_pickle: bool = _allow_pickle()
    overwrite: bool = _overwrite()
    dry_run: bool = option(False, "Compute and report; write nothing.")
    fold_into: str | None = option(None, "Write this base model with the combination folded in.", path=True)
    four_bit: bool = option(False, "With --fold-into: quantise to bitsandbytes NF4 once.", flags=("--4bit",),
                            key="4bit")
    space: str = option("core", "Where element-wise methods merge: core (exact on the factors' core matrices, "
                                "Panariello et al. 2025) | full (dense per module, as PEFT and mergekit).")
    params: tuple[str, ...] = option((), "Method parameter NAME=VALUE (repeatable): " + _params_help() + ".",
                                     flags=("--param",))
    target: str = option("peft", "Serving engine the adapter is written for: " + " | ".join(TARGETS)
                         + " (not peft: one rank for every module, lora_alpha = r; docs/SERVING.md).")

    @property
    def uses_lata(self) -> bool:
        return self.method == "lata" or self.lata

    @property
    def rank_policy(self) -> RankPolicy:
        return RankPolicy.parse(self.rank)

    @property
    def registry_method(self) -> Method:
        """The registry's entry for ``--method`` (``lata`` is task arithmetic), parameters unbound."""
        return METHODS["ta" if self.method == "lata" else self.method]

    @property
    def merge_method(self) -> Method:
        """The method with its parameters bound."""
        return self.registry_method.bind(self.method_parameters)

    def _shorthands(self) -> dict[str, float | int | str]:
        """``--density``, ``--seed``, ``--sign-method`` as given, for a method that declares them (others ignore
        them: an experiment passes its training seed to every method)."""
        declared = {param.name for param in self.registry_method.params}
        return {name: value for name in RUN_PARAMS if name in declared and (value := getattr(self, name)) is not None}

    @property
    def method_parameters(self) -> dict[str, float | int | str | None]:
        """Every parameter the method declares: ``--param``, else its shorthand flag, else the registry's
        default (what the report records)."""
        return self.registry_method.resolved({**self._shorthands(), **parse_params(self.registry_method, self.params)})

    @property
    def run_options(self) -> tuple[float, int, str]:
        """``(density, seed, sign_method)`` the element-wise rule runs with; the defaults where the method
        declares none of them (task arithmetic, the subspace methods: unused)."""
        values = self.method_parameters
        return (float(values.get("density") or DENSITY.default), int(values.get("seed") or SEED.default),
                str(values.get("sign_method") or SIGN_METHOD.default))

    def check(self) -> None:
        super().check()
        if self.method not in METHOD_NAMES:
            raise LataError(f"--method {self.method!r}: expected one of {', '.join(METHOD_NAMES)}")
        self.rank_policy  # noqa: B018  (validates --rank)
        if self.space not in SPACES:
            raise LataError(f"--space {self.space!r}: expected one of {', '.join(SPACES)}")
        if self.space == "full" and self.registry_method.core_only:
            raise LataError(f"--method {self.method} runs in core space only (its full-space form on LoRA deltas is "
                            "the same merge at the cost of dense SVDs): drop --space full")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise LataError(f"--density {self.density}: expected 0 < density <= 1")
        if self.sign_method is not None and self.sign_method not in SIGN_METHODS:
            raise LataError(f"--sign-method {self.sign_method!r}: expected one of {', '.join(SIGN_METHODS)}")
        given = parse_params(self.registry_method, self.params)
        for name, value in self._shorthands().items():
            if name in given and given[name] != value:
                raise LataError(f"--{name.replace('_', '-')} {value} and --param {name}={given[name]}: one value, "
                                "given once")
        density = self.method_parameters.get("density")
        if density is not None and not 0.0 < float(density) <= 1.0:
            raise LataError(f"--param density={density}: expected 0 < density <= 1")
        self.merge_method  # noqa: B018  (validates --param)
        problem = self.registry_method.problem(self.method_parameters)
        if problem is not None:
            raise LataError(f"--method {self.method}: {problem}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise LataError(f"--dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.uses_lata and not self.has_instruction:
            raise LataError("LATA needs an instruction vector: pass --instruction I or "
                            "--instruction-from BASE INSTRUCT")
        if self.out is None and not self.dry_run:
            raise LataError("no output folder: pass -o OUT (or --dry-run)")
        if not self.adapters and not self.forget:
            raise LataError("no adapters given")
        if self.target not in TARGETS:
            raise LataError(f"--target {self.target!r}: expected one of {', '.join(TARGETS)}")
        if self.target != "peft" and self.fold_into is not None:
            raise LataError(f"--target {self.target} writes an adapter for a server; with --fold-into the output is "
                            "a model, which every engine loads as it is: drop one of the two")
        if self.four_bit and self.fold_into is None:
            raise LataError("--4bit needs --fold-into BASE (a 4-bit adapter is not a thing: the base is quantised)")
        for flag, values, count in (("--weight", self.weights, len(self.adapters)),
                                    ("--forget-weight", self.forget_weights, len(self.forget))):
            if len(values) > 1 and len(values) != count:
                raise LataError(f"{flag}: got {len(values)} values for {count} adapters")

    def input_weights(self) -> list[float]:
        """``w`` per input (``--weight`` / ``--forget-weight``, one value for all, default 1), task
        adapters first, then the forgotten ones; lambda and the sign are applied in the merge."""
        def per_input(values: tuple[float, ...], count: int) -> list[float]:
            return list(values) if len(values) == count else [values[0] if values else 1.0] * count

        scales = per_input(self.weights, len(self.adapters)) + per_input(self.forget_weights, len(self.forget))
        return [float(s) for s in scales]


@dataclass(frozen=True)
class InspectSpec(ScoringSpec):
    """Per layer: norm, cosine with the instruction vector, and each scheme's LATA weight."""

    verb: ClassVar[str] = "inspect"

    adapters: Paths = option((), "Adapters to inspect (folders or hub ids).", argument=True, path=True)
    allow_pickle: bool = _allow_pickle()
    plot: str | None = option(None, "Write a per-layer PNG figure here.")

    def check(self) -> None:
        super().check()
        if not self.adapters:
            raise LataError("no adapters given")


@dataclass(frozen=True)
class FoldSpec(Spec):
    """Fold an adapter into its base model: W <- W + s B A, streamed; --4bit quantises once."""

    verb: ClassVar[str] = "fold"

    adapter: str = option("", "PEFT LoRA adapter folder (or hub id).", argument=True, path=True)
    base: str = option("", "transformers model folder (or hub id).", path=True)
    out: str = option("", "Output model folder.", flags=("-o", "--out"))
    four_bit: bool = option(False, "Quantise to bitsandbytes NF4 once.", flags=("--4bit",), key="4bit")
    blocksize: int | None = option(None, "NF4 block size (default: the base's, else 64).")
    compute_dtype: str | None = option(None, "NF4 compute dtype (default: the base dtype).")
    double_quant: bool | None = option(None, "Quantise the NF4 scales too (default: the base's, else yes).")
    quant_storage: str | None = option(None, "Storage dtype of packed NF4 weights (default uint8).")
    device: str = _device()
    allow_pickle: bool = _allow_pickle()
    overwrite: bool = _overwrite()

    def check(self) -> None:
        resolve_device(self.device)  # a known name, and for cuda a visible GPU
        for name in ("adapter", "base", "out"):
            if not getattr(self, name):
                raise LataError(f"fold needs {'an adapter' if name == 'adapter' else '--' + name}")
        if self.blocksize is not None and self.blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise LataError(f"--blocksize {self.blocksize}: expected a power of two from 64 to 4096")
        if self.compute_dtype is not None and self.compute_dtype not in DTYPES:
            raise LataError(f"--compute-dtype {self.compute_dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.quant_storage is not None and self.quant_storage not in QUANT_STORAGE:
            raise LataError(f"--quant-storage {self.quant_storage!r}: expected one of {', '.join(QUANT_STORAGE)}")


@dataclass(frozen=True)
class ExportSpec(Spec):
    """Write an adapter as a llama.cpp LoRA GGUF (llama-server --lora, Ollama ADAPTER), computed as PEFT computes it."""

    verb: ClassVar[str] = "export"

    adapter: str = option("", "PEFT LoRA adapter folder (or hub id).", argument=True, path=True)
    out: str = option("", "The .gguf file to write.", flags=("--gguf", "-o"), key="gguf")
    base: str | None = option(None, "Base model folder or hub id; only its config.json and tensor shapes are read "
                                    "(default: the adapter's base_model_name_or_path).", path=True)
    overwrite: bool = option(False, "Replace an existing .gguf file.")

    def check(self) -> None:
        if not self.adapter:
            raise LataError("export needs an adapter folder")
        if not self.out:
            raise LataError("export needs the file to write: --gguf OUT.gguf")


@dataclass(frozen=True)
class CompareSpec(Spec):
    """Run an experiment plan: every method, setting and lambda on your adapters, then the report."""

    verb: ClassVar[str] = "compare"

    plan: str = option("", "The experiment plan (YAML): adapters, settings, methods, lambdas, probes.",
                       argument=True)
    report_only: bool = option(False, "Only rewrite the report and plots from the results so far.")
    lambdas: tuple[float, ...] = option((), "Run only these lambdas now (the rest later; the run resumes).",
                                        flags=("--lambdas",))

    def check(self) -> None:
        if not self.plan:
            raise LataError("compare needs a plan file")


EVAL_TASKS = "wikitext2 | gsm8k | humaneval | ppl:FILE"


@dataclass(frozen=True)
class EvalSpec(Spec):
    """Evaluate a model (with an adapter): WikiText-2 perplexity, GSM8K exact match, HumanEval pass@k."""

    verb: ClassVar[str] = "eval"

    model: str = option("", "transformers model folder (the base).", argument=True, path=True)
    tasks: Paths = option((), f"{EVAL_TASKS} (repeatable).", flags=("--task",))
    adapter: str | None = option(None, "PEFT adapter folder applied to the model.", path=True)
    fold: Paths = option((), "Adapters combined (TA) and folded into the model in memory before evaluating.",
                         flags=("--fold",), path=True)
    limit: int | None = option(None, "Examples (gsm8k, humaneval) or tokens (perplexity).")
    batch_size: int = option(8, "Batch size.")
    max_new_tokens: int | None = option(None, "Generation length (gsm8k 256, humaneval 512).")
    shots: int = option(0, "GSM8K few-shot examples from the train split.")
    num_samples: int = option(1, "HumanEval samples per problem (pass@k).")
    temperature: float = option(0.0, "Sampling temperature (with --num-samples > 1).")
    four_bit: bool = option(False, "Load the model in bitsandbytes NF4.", flags=("--4bit",), key="4bit")
    data: str | None = option(None, "Data file or folder (default: ../shared/data).", path=True)
    unsafe_exec: bool = option(False, "Run HumanEval's generated code even where no OS sandbox (bubblewrap) works: "
                                      "UNISOLATED, for trusted models or a throwaway VM only (docs/SECURITY.md).",
                               flags=("--unsafe-exec",))

    def check(self) -> None:
        if not self.model:
            raise LataError("eval needs a model folder")
        if not self.tasks:
            raise LataError(f"eval needs at least one --task ({EVAL_TASKS})")
        if self.adapter and self.fold:
            raise LataError("eval takes --adapter or --fold, not both")
        if self.four_bit and self.fold:
            raise LataError("eval --fold merges the adapters into full-precision weights; --4bit does not apply")
        for name in ("batch_size", "num_samples", "limit", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LataError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.shots < 0:
            raise LataError(f"--shots must be at least 0, got {self.shots}")
        if self.temperature < 0:
            raise LataError(f"--temperature must be at least 0, got {self.temperature}")
