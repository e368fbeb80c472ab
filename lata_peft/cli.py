"""``lata-peft``: typer commands built from the verbs' specs, calling the API. No maths here.

Every verb (``combine``, ``inspect``, ``fold``, ``export``, ``compare``, ``eval``) takes its options from the
fields of its spec (:mod:`lata_peft.specs`): the flag names, types, defaults and help text are stated once,
there. A :class:`LataError` becomes one ``error:`` line on stderr and exit code 2; SIGTERM is
handled like Ctrl-C (the output being written is removed, nothing half-written is left).
"""

from __future__ import annotations

import inspect
import json
import signal
import sys
import typing
import warnings
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args, get_origin, get_type_hints

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from . import render
from .errors import LataError
from .recipe import PROGRESS_VERBS, load_recipe, run_spec
from .spec import Spec
from .specs import CombineSpec, CompareSpec, EvalSpec, ExportSpec, FoldSpec, InspectSpec

app = typer.Typer(
    help="Combine LoRA adapters with Layer-Aware Task Arithmetic (LATA), TA, TIES, DARE.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)
T = TypeVar("T")
JSON_OPTION = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


class RichProgress:
    """Adapts a rich progress bar (on stderr) to :class:`lata_peft.progress.Progress`."""

    def __init__(self, enabled: bool) -> None:
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), _AmountColumn(), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=err_console, transient=True, disable=not enabled,
        )
        self.task: Any = None

    def start(self, total: int, description: str, unit: str = "") -> None:
        self.task = self.bar.add_task(description, total=total, unit=unit)

    def advance(self, amount: int = 1) -> None:
        self.bar.advance(self.task, amount)


class _AmountColumn(ProgressColumn):
    """``12/30`` for counted items, ``1.2/16.0 GB`` for bytes."""

    def render(self, task: Any) -> Text:
        if task.fields.get("unit") == "bytes":
            return Text(f"{task.completed / 1e9:.1f}/{(task.total or 0) / 1e9:.1f} GB", style="progress.download")
        return Text(f"{int(task.completed)}/{int(task.total or 0)}", style="progress.download")


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


# ----------------------------------------------------------------------------- options from specs


def _cli_type(kind: Any) -> Any:
    """The type typer parses for a spec field: tuples become repeatable options, ``str | int`` a string."""
    args = [a for a in get_args(kind) if a is not type(None)]
    if get_origin(kind) in (typing.Union, type(int | None)):
        if len(args) > 1:
            return str | None  # e.g. --rank: exact | K | energy:F, parsed by the spec
        return _cli_type(args[0]) | None if get_origin(args[0]) is not tuple else args[0] | None
    if get_origin(kind) is tuple and len(get_args(kind)) == 2 and get_args(kind)[1] is Ellipsis:
        return list[get_args(kind)[0]] | None
    return kind


def _parameter(spec_field: Field[Any], kind: Any) -> inspect.Parameter:
    meta = spec_field.metadata
    default = spec_field.default if spec_field.default is not MISSING else None
    info = typer.Argument(help=meta["help"]) if meta.get("argument") else typer.Option(
        *(meta.get("flags") or ()), help=meta["help"])
    if default == "":  # a required path (fold's adapter, --base, -o)
        default = inspect.Parameter.empty
    elif isinstance(default, tuple):  # a repeatable option: none given is ()
        default = None
    return inspect.Parameter(spec_field.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[_cli_type(kind), info])


def spec_command(spec_class: type[Spec], show: Callable[[Any, bool], None], progress: bool = True) -> None:
    """Register the command ``spec_class.verb``: one CLI option per spec field, plus ``--json``."""
    hints = get_type_hints(spec_class)
    own = set(vars(spec_class).get("__annotations__", {}))  # the verb's own options first, shared ones after
    spec_fields = sorted((f for f in fields(spec_class) if f.metadata.get("cli", True)),
                         key=lambda f: f.name not in own)
    tuples = {f.name for f in spec_fields if isinstance(f.default, tuple)}

    def command(**values: Any) -> None:
        as_json = values.pop("as_json")
        values = {k: (() if v is None and k in tuples else v) for k, v in values.items()}
        bar = RichProgress(enabled=progress and not as_json)
        with bar.bar:
            result = _guarded(lambda: run_spec(spec_class(**values), **({"progress": bar} if progress else {})))
        show(result, as_json)

    parameters = [_parameter(f, hints[f.name]) for f in spec_fields]
    parameters.append(inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, default=False,
                                        annotation=JSON_OPTION))
    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = spec_class.__doc__
    app.command(name=spec_class.verb)(command)


# ----------------------------------------------------------------------------- how results are shown


def show_result(result: Any, as_json: bool) -> None:
    """Any verb's result: its JSON, or its tables."""
    from .api import CombineResult, InspectResult

    if isinstance(result, list):  # eval: one result per task
        _print_json(result if len(result) > 1 else result[0]) if as_json else render.eval_table(result)
    elif isinstance(result, CombineResult):
        if as_json:
            _print_json({**result.report, "out": str(result.out) if result.out else None})
        else:
            render.combine_summary(result)
    elif isinstance(result, InspectResult):
        if as_json:
            _print_json(result.to_dict())
        else:
            scored = any(row.get("cosine") is not None for a in result.adapters.values() for row in a["layers"])
            render.inspect_tables(result, scored)
    elif isinstance(result, dict) and result.get("format") == "gguf":
        _print_json(result) if as_json else render.export_table(result)
    elif isinstance(result, dict) and "fold" in result:
        _print_json(result) if as_json else render.fold_table(result["fold"])
    else:
        _print_json(result) if as_json else render.compare_summary(result)


for _spec_class in (CombineSpec, InspectSpec, FoldSpec, ExportSpec, CompareSpec, EvalSpec):
    spec_command(_spec_class, show_result, progress=_spec_class.verb in PROGRESS_VERBS)


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe (one API call).")],
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Write here instead of the recipe's out.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder (one lata-peft wrote).")] = False,
    dry_run: Annotated[bool, typer.Option(help="combine: compute and report; write nothing.")] = False,
    as_json: JSON_OPTION = False,
) -> None:
    """Run a YAML recipe: its single key is the verb, its mapping the verb's options."""
    overrides: dict[str, Any] = {k: v for k, v in (("out", str(out) if out else None), ("overwrite", overwrite),
                                                   ("dry_run", dry_run)) if v}
    spec = _guarded(lambda: load_recipe(recipe, **overrides))
    bar = RichProgress(enabled=not as_json and spec.verb in PROGRESS_VERBS)
    with bar.bar:
        result = _guarded(lambda: run_spec(spec, **({"progress": bar} if spec.verb in PROGRESS_VERBS else {})))
    show_result(result, as_json)


__all__ = ["app", "main", "spec_command"]


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: staging folders are removed


def main() -> None:  # pragma: no cover
    """The ``lata-peft`` console script: SIGTERM handled like SIGINT, then the typer app."""
    signal.signal(signal.SIGTERM, _terminate)
    app()
