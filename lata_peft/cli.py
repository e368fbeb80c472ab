"""``lata-peft``: typer commands that call the API and render its results. No maths here.

Every flag has the name of an API argument (and recipe key). A :class:`LataError`
becomes one ``error:`` line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import api
from .errors import LataError
from .recipe import run_recipe

app = typer.Typer(
    help="Combine LoRA adapters with Layer-Aware Task Arithmetic (LATA), TA, TIES, DARE.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out_console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")


class RichProgress:
    """Adapts a rich progress bar (on stderr) to :class:`lata_peft.api.Progress`."""

    def __init__(self, enabled: bool) -> None:
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=err_console, transient=True, disable=not enabled,
        )
        self.task: Any = None

    def start(self, total: int, description: str) -> None:
        self.task = self.bar.add_task(description, total=total)

    def advance(self) -> None:
        self.bar.advance(self.task)


def _guarded(call: Callable[[], T]) -> T:
    """Run ``call``; a LataError is one line on stderr and exit 2, warnings are one line each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = call()
        except LataError as exc:
            message = " ".join(str(exc).split())  # one line, whatever the cause said
            err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True, markup=True)
            raise typer.Exit(2) from None
        finally:
            for warning in caught:
                if issubclass(warning.category, UserWarning) and "lata" in str(warning.filename):
                    text = escape(str(warning.message))
                    err_console.print(f"[yellow]warning:[/] {text}", highlight=False, soft_wrap=True)
    return result


def _print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")


def _summary_table(result: api.CombineResult) -> None:
    report = result.report
    summary = report["summary"]
    table = Table(title="lata-peft combine", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for entry in report["inputs"]:
        weight = "" if entry["weight"] is None else f" x {entry['weight']:g}"
        table.add_row(entry["role"], f"{escape(entry['label'])}{weight}  [dim]{escape(entry['path'])}[/]")
    table.add_row("method", f"{report['method']}" + (f" + LATA {report['scheme']}" if report["lata"] else "")
                  + f", lambda {report['lambda']:g}, rank {report['rank']}")
    table.add_row("modules", str(summary["modules"]))
    table.add_row("output rank", f"{summary['min_rank']}–{summary['max_rank']}")
    table.add_row("parameters", f"{summary['parameters']:,}")
    table.add_row("max truncation error", f"{summary['max_error']:.3g} (relative {summary['max_relative_error']:.3g})")
    table.add_row("time", f"{summary['seconds']:.2f} s")
    table.add_row("written to", str(result.out) if result.out else "[yellow]nothing (dry run)[/]")
    out_console.print(table)
    if result.layer_weights:
        _layer_weights_table(result.layer_weights)
    if "fold" in report:
        _fold_table(report["fold"])


def _fold_table(fold: dict[str, Any]) -> None:
    table = Table(title="fold", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("base", escape(fold["base"]))
    table.add_row("written to", escape(fold["out"]))
    table.add_row("format", "bitsandbytes NF4" if fold["four_bit"] else "full precision")
    table.add_row("folded modules", str(fold["folded_modules"]))
    if fold["four_bit"]:
        table.add_row("quantised modules", str(fold["quantized_modules"]))
        error = fold["total_relative_error_4bit_vs_full_precision"]
        errors = fold["module_relative_errors_4bit_vs_full_precision"]
        worst = max(errors.items(), key=lambda kv: kv[1]) if errors else None
        table.add_row("4-bit cost |W4 - W|/|W|", f"{error:.4f} total" if error is not None else "-")
        if worst:
            table.add_row("worst module", f"{worst[1]:.4f}  {escape(worst[0])}")
    table.add_row("size", f"{fold['bytes_written'] / 1e6:.1f} MB of weights")
    out_console.print(table)


def _layer_weights_table(tables: dict[str, list[dict[str, Any]]]) -> None:
    table = Table(title="LATA per-layer cosine / weight", title_justify="left")
    table.add_column("layer", justify="right")
    for label in tables:
        table.add_column(f"{label}\ncos", justify="right")
        table.add_column("weight", justify="right")
    rows = {(r["layer"], r["module"]) for t in tables.values() for r in t}
    for unit in sorted(rows, key=lambda u: (u[0] or 0, u[1] or "")):
        cells = [str(unit[0]) if unit[1] is None else unit[1]]
        for table_rows in tables.values():
            row = next((r for r in table_rows if (r["layer"], r["module"]) == unit), None)
            cells += ["", ""] if row is None else [f"{row['cosine']:+.3f}", f"{row['weight']:.2f}"]
        table.add_row(*cells)
    out_console.print(table)


Strings = Annotated[list[str] | None, typer.Option()]


@app.command()
def combine(
    adapters: Annotated[list[str] | None, typer.Argument(help="Task adapters to add (folders or hub ids).")] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Output adapter folder.")] = None,
    forget: Annotated[list[str] | None, typer.Option("--forget", help="Adapter to subtract (repeatable).")] = None,
    method: Annotated[str, typer.Option(help="lata | ta | ties | dare | dare_ties | magnitude")] = "ta",
    weight: Annotated[list[float] | None, typer.Option("--weight", help="Weight per task adapter.")] = None,
    forget_weight: Annotated[list[float] | None, typer.Option("--forget-weight", help="Weight per forgotten adapter.")]
    = None,
    lam: Annotated[float, typer.Option("--lambda", help="Global scale lambda.")] = 1.0,
    rank: Annotated[str, typer.Option(help="exact | K | energy:F")] = "exact",
    instruction: Annotated[str | None, typer.Option(help="Instruction adapter (LATA scores layers against it).")]
    = None,
    instruction_from: Annotated[tuple[str, str] | None, typer.Option(
        help="BASE INSTRUCT model folders: the instruction vector is their difference.")] = None,
    lata: Annotated[bool, typer.Option(help="Apply LATA layer weights with a baseline method.")] = False,
    scheme: Annotated[str, typer.Option(help="LATA scheme: linear | log | threshold")] = "linear",
    threshold: Annotated[float, typer.Option(help="Drop-with-Threshold: keep layers with cosine < T.")] = 0.95,
    keep: Annotated[float | None, typer.Option(
        help="Drop-with-Threshold, relative: keep this fraction of the least aligned layers.")] = None,
    low: Annotated[float, typer.Option(help="LATA weight of the most instruction-like layer.")] = 0.0,
    high: Annotated[float, typer.Option(help="LATA weight of the most task-specific layer.")] = 1.0,
    normalize: Annotated[bool, typer.Option(help="Rescale LATA weights to mean 1.")] = False,
    granularity: Annotated[str, typer.Option(help="Score per block or per module.")] = "block",
    density: Annotated[float, typer.Option(help="TIES/DARE/magnitude: fraction of entries kept.")] = 0.5,
    seed: Annotated[int, typer.Option(help="DARE seed.")] = 0,
    sign_method: Annotated[str, typer.Option(help="TIES sign election: total | frequency")] = "total",
    dtype: Annotated[str | None, typer.Option(help="Output dtype: float32 | bfloat16 | float16")] = None,
    layer_regex: Annotated[str | None, typer.Option(help="Regex with one group: the block index.")] = None,
    strict: Annotated[bool, typer.Option(help="Refuse adapters of different base models.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Read pickled .bin weights (weights_only=True).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Compute and report; write nothing.")] = False,
    fold_into: Annotated[str | None, typer.Option(help="Write this base model with the combination folded in.")]
    = None,
    four_bit: Annotated[bool, typer.Option("--4bit", help="With --fold-into: quantise to NF4 once.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Combine adapters: lambda * (sum_i w_i dW_i - sum_j f_j dW_j), optionally LATA-weighted per layer."""
    progress = RichProgress(enabled=not as_json)
    with progress.bar:
        result = _guarded(lambda: api.combine(
            adapters or [], out, forget=forget or (), method=method, weights=weight, forget_weights=forget_weight,
            lam=lam, rank=rank, instruction=instruction, instruction_from=instruction_from, lata=lata,
            scheme=scheme, threshold=threshold, keep=keep, low=low,
            high=high, normalize=normalize, granularity=granularity, density=density, seed=seed,
            sign_method=sign_method, dtype=dtype, layer_regex=layer_regex, strict=strict,
            allow_pickle=allow_pickle, overwrite=overwrite, dry_run=dry_run, fold_into=fold_into,
            four_bit=four_bit, progress=progress,
        ))
    if as_json:
        _print_json({**result.report, "out": str(result.out) if result.out else None})
    else:
        _summary_table(result)


@app.command()
def inspect(
    adapters: Annotated[list[str], typer.Argument(help="Adapters to inspect.")],
    instruction: Annotated[str | None, typer.Option(help="Instruction adapter to score layers against.")] = None,
    instruction_from: Annotated[tuple[str, str] | None, typer.Option(
        help="BASE INSTRUCT model folders: the instruction vector is their difference.")] = None,
    scheme: Annotated[str, typer.Option(help="LATA scheme for the weight column.")] = "linear",
    threshold: Annotated[float, typer.Option(help="Drop-with-Threshold threshold.")] = 0.95,
    keep: Annotated[float | None, typer.Option(help="Drop-with-Threshold: fraction of least aligned layers kept.")]
    = None,
    normalize: Annotated[bool, typer.Option(help="Rescale LATA weights to mean 1.")] = False,
    granularity: Annotated[str, typer.Option(help="Score per block or per module.")] = "block",
    layer_regex: Annotated[str | None, typer.Option(help="Regex with one group: the block index.")] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Read pickled .bin weights (weights_only=True).")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write a per-layer PNG figure here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Per layer: norm, cosine with the instruction adapter, and the LATA weight of each scheme."""
    result = _guarded(lambda: api.inspect(
        adapters, instruction=instruction, instruction_from=instruction_from, scheme=scheme, threshold=threshold,
        keep=keep, normalize=normalize,
        granularity=granularity, layer_regex=layer_regex, allow_pickle=allow_pickle, plot=plot,
    ))
    if as_json:
        _print_json(result.to_dict())
        return
    for label, adapter in result.adapters.items():
        ranks = sorted({m["rank"] for m in adapter["modules"]})
        out_console.print(f"[bold]{escape(label)}[/]: {len(adapter['modules'])} modules, "
                          f"rank {'/'.join(map(str, ranks))}  [dim]{escape(adapter['path'])}[/]", soft_wrap=True)
        table = Table()
        table.add_column("layer", justify="right")
        table.add_column("norm", justify="right")
        scored = instruction is not None or instruction_from is not None
        if scored:
            table.add_column("cosine", justify="right")
            for name in ("linear", "log", "threshold"):
                table.add_column(name, justify="right")
        for row in adapter["layers"]:
            cells = [str(row["layer"]) if row["module"] is None else row["module"], f"{row['norm']:.4f}"]
            if scored:
                cells.append(f"{row['cosine']:+.3f}")
                cells += [f"{row['weights'][n]:.2f}" for n in ("linear", "log", "threshold")]
            table.add_row(*cells)
        out_console.print(table)
    if plot is not None:
        out_console.print(f"plot written to {plot}")


@app.command()
def fold(
    adapter: Annotated[str, typer.Argument(help="PEFT LoRA adapter folder (or hub id).")],
    base: Annotated[str, typer.Option(help="transformers model folder (or hub id).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output model folder.")],
    four_bit: Annotated[bool, typer.Option("--4bit", help="Quantise to bitsandbytes NF4 once.")] = False,
    blocksize: Annotated[int | None, typer.Option(help="NF4 block size (default: the base's, else 64).")] = None,
    compute_dtype: Annotated[str | None, typer.Option(help="NF4 compute dtype (default: the base dtype).")] = None,
    double_quant: Annotated[bool | None, typer.Option(help="Quantise the NF4 scales too.")] = None,
    quant_storage: Annotated[str | None, typer.Option(help="Storage dtype of packed weights.")] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Read pickled .bin weights (weights_only=True).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Fold an adapter into its base model: W <- W + s B A, streamed; --4bit quantises once."""
    progress = RichProgress(enabled=not as_json)
    with progress.bar:
        report = _guarded(lambda: api.fold(
            adapter, base, out, four_bit=four_bit, blocksize=blocksize, compute_dtype=compute_dtype,
            double_quant=double_quant, quant_storage=quant_storage, allow_pickle=allow_pickle,
            overwrite=overwrite, progress=progress,
        ))
    if as_json:
        _print_json(report)
    else:
        _fold_table(report["fold"])


@app.command("eval")
def evaluate_command(
    model: Annotated[str, typer.Argument(help="transformers model folder (the base).")],
    task: Annotated[list[str], typer.Option("--task", help="wikitext2 | gsm8k | humaneval | ppl:FILE (repeatable).")],
    adapter: Annotated[str | None, typer.Option(help="PEFT adapter folder applied to the model.")] = None,
    fold: Annotated[list[str] | None, typer.Option(
        "--fold", help="Adapters combined (TA) and folded into the model in memory before evaluating.")] = None,
    limit: Annotated[int | None, typer.Option(help="Examples (gsm8k, humaneval) or tokens (perplexity).")] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 8,
    max_new_tokens: Annotated[int | None, typer.Option(help="Generation length (gsm8k 256, humaneval 512).")] = None,
    shots: Annotated[int, typer.Option(help="GSM8K few-shot examples from the train split.")] = 0,
    num_samples: Annotated[int, typer.Option(help="HumanEval samples per problem (pass@k).")] = 1,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (with --num-samples > 1).")] = 0.0,
    four_bit: Annotated[bool, typer.Option("--4bit", help="Load the model in bitsandbytes NF4.")] = False,
    data: Annotated[Path | None, typer.Option(help="Data file or folder (default: ../shared/data).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Evaluate a model (with an adapter): WikiText-2 perplexity, GSM8K exact match, HumanEval pass@k."""
    from .evaluate import evaluate

    progress = RichProgress(enabled=not as_json)
    results = []
    with progress.bar:
        source: Any = _guarded(lambda: _combined_in_memory(model, fold)) if fold else model
        for name in task:
            results.append(_guarded(lambda name=name: evaluate(
                source, name, adapter=None if fold else adapter, tokenizer=model if fold else None, limit=limit,
                batch_size=batch_size, max_new_tokens=max_new_tokens, four_bit=four_bit, shots=shots,
                num_samples=num_samples, temperature=temperature, data=data, progress=progress)))
    if as_json:
        _print_json(results if len(results) > 1 else results[0])
        return
    table = Table(title="lata-peft eval", title_justify="left")
    for column in ("task", "metric", "value", "n", "seconds"):
        table.add_column(column, justify="right" if column != "task" else "left")
    for result in results:
        for metric, value in result["metrics"].items():
            table.add_row(result["task"], metric, f"{value:.4f}" if isinstance(value, float) else str(value),
                          str(result["n"]), f"{result['seconds']:.1f}")
    out_console.print(table)


def _combined_in_memory(model: str, adapters: list[str]) -> Any:
    """The model with the exact sum of ``adapters`` merged into its weights (PEFT merge of our output)."""
    import tempfile

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as scratch:
        api.combine(adapters, Path(scratch) / "sum")
        base = AutoModelForCausalLM.from_pretrained(model)
        return PeftModel.from_pretrained(base, str(Path(scratch) / "sum")).merge_and_unload().eval()


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe (one API call).")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Compute and report; write nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Run a YAML recipe: its single key is the verb, its mapping the arguments."""
    from .recipe import load_recipe

    verb, _ = _guarded(lambda: load_recipe(recipe))
    overrides: dict[str, Any] = {}
    if verb == "combine":
        overrides = {"overwrite": overwrite, "dry_run": dry_run} if (overwrite or dry_run) else {}
    result = _guarded(lambda: run_recipe(recipe, **overrides))
    if isinstance(result, api.CombineResult):
        if as_json:
            _print_json({**result.report, "out": str(result.out) if result.out else None})
        else:
            _summary_table(result)
    elif isinstance(result, dict):
        _print_json(result) if as_json else _fold_table(result["fold"])
    else:
        _print_json(result.to_dict())


def main() -> None:  # pragma: no cover
    app()
