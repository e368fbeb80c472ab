"""Rich tables for each verb's result: what users see when they do not ask for ``--json``."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .report import space_note

__all__ = ["combine_summary", "compare_summary", "eval_table", "export_table", "fold_table", "inspect_tables",
           "out_console"]

out_console = Console()


def combine_summary(result: Any) -> None:
    """The summary of a combine: inputs, method, ranks, error, time, where it was written."""
    report = result.report
    summary = report["summary"]
    table = Table(title="lata-peft combine", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for entry in report["inputs"]:
        weight = "" if entry["weight"] is None else f" x {entry['weight']:g}"
        table.add_row(entry["role"], f"{escape(entry['label'])}{weight}  [dim]{escape(entry['path'])}[/]")
    space = space_note(report)
    table.add_row("method", f"{report['method']}{space}" + (f" + LATA {report['scheme']}" if report["lata"] else "")
                  + f", lambda {report['lambda']:g}, rank {report['rank']}")
    table.add_row("modules", str(summary["modules"]))
    table.add_row("output rank", f"{summary['min_rank']}–{summary['max_rank']}")
    if report.get("serving"):
        table.add_row("serving", _serving(report["serving"], summary))
    table.add_row("parameters", f"{summary['parameters']:,}")
    table.add_row("max truncation error", f"{summary['max_error']:.3g} (relative {summary['max_relative_error']:.3g})")
    table.add_row("time", f"{summary['seconds']:.2f} s")
    table.add_row("written to", str(result.out) if result.out else "[yellow]nothing (dry run)[/]")
    out_console.print(table)
    if result.layer_weights:
        layer_weights_table(result.layer_weights)
    if "fold" in report:
        fold_table(report["fold"])


def _serving(serving: dict[str, Any], summary: dict[str, Any]) -> str:
    """One line: the target, the rank written, and a warning for a mixed-rank PEFT output."""
    if serving["rank"] is not None:
        padded = "" if summary["min_rank"] == summary["max_rank"] == serving["rank"] else \
            f", padded from {summary['min_rank']}–{summary['max_rank']}"
        zeros = f", {serving['zero_modules']} zero modules for TGI's layer types" if serving["zero_modules"] else ""
        rank = serving["rank"]
        return f"{serving['target']}: rank {rank} for every module{padded}, lora_alpha {rank}{zeros}"
    if serving["uniform_rank"]:
        return "peft: uniform-rank (PEFT, vLLM and llama.cpp read it alike; for TGI use --target tgi)"
    return ("[yellow]peft: not uniform-rank[/] — exact in PEFT and vLLM >= 0.32, wrong in llama.cpp and TGI: "
            "write it with --target llama.cpp|tgi|vllm, or lata-peft export --gguf")


def export_table(summary: dict[str, Any]) -> None:
    """The GGUF export's summary: the file, its architecture, modules, rank and scale handling."""
    table = Table(title="lata-peft export", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("written to", escape(summary["path"]))
    table.add_row("architecture", summary["architecture"])
    table.add_row("modules", f"{summary['modules']} ({summary['tensors']} tensors, F32)")
    table.add_row("rank", f"up to {summary['rank']}, adapter.lora.alpha {summary['alpha']:g}")
    table.add_row("scale", "folded into lora_b per module (mixed ranks or patterns: exact in llama.cpp)"
                  if summary["scale_folded"] else "as llama.cpp's converter writes it (already exact)")
    table.add_row("size", f"{summary['bytes'] / 1e6:.1f} MB")
    table.add_row("use", f"llama-server -m BASE.gguf --lora {escape(summary['path'])}  (Ollama: ADAPTER line)")
    out_console.print(table)


def fold_table(fold: dict[str, Any]) -> None:
    """The fold's summary: format, counts, the 4-bit error and size."""
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


def layer_weights_table(tables: dict[str, list[dict[str, Any]]]) -> None:
    """Per scored unit and input: the cosine with the instruction vector and the LATA weight."""
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


def inspect_tables(result: Any, scored: bool) -> None:
    """Per adapter: its modules and ranks, then per layer its norm (and cosine and scheme weights)."""
    for label, adapter in result.adapters.items():
        ranks = sorted({m["rank"] for m in adapter["modules"]})
        out_console.print(f"[bold]{escape(label)}[/]: {len(adapter['modules'])} modules, "
                          f"rank {'/'.join(map(str, ranks))}  [dim]{escape(adapter['path'])}[/]", soft_wrap=True)
        table = Table()
        table.add_column("layer", justify="right")
        table.add_column("norm", justify="right")
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
        if adapter.get("full_weights"):
            full_weights_table(adapter["full_weights"])


def full_weights_table(rows: list[dict[str, Any]]) -> None:
    """Full trained parameters (modules_to_save, biases): shape, size, norm, and with --base ``|saved - base|``."""
    table = Table(title="full trained weights (modules_to_save, biases)", title_justify="left",
                  caption="|saved - base|: the task vector, with --base BASE")
    for name, justify in (("parameter", "left"), ("shape", "right"), ("parameters", "right"), ("norm", "right"),
                          ("|saved - base|", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        delta = "-" if row["delta_norm"] is None else f"{row['delta_norm']:.4f}"
        table.add_row(escape(row["parameter"]), "x".join(map(str, row["shape"])), f"{row['parameters']:,}",
                      f"{row['norm']:.4f}", delta)
    out_console.print(table)


def compare_summary(summary: dict[str, Any]) -> None:
    """Where the comparison's results, report and plots were written, and how many runs it holds."""
    table = Table(title="lata-peft compare", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in summary.items():
        table.add_row(key, escape(str(value)))
    out_console.print(table)


def eval_table(results: list[dict[str, Any]]) -> None:
    """One row per task and metric."""
    table = Table(title="lata-peft eval", title_justify="left")
    for column in ("task", "metric", "value", "n", "seconds"):
        table.add_column(column, justify="right" if column != "task" else "left")
    for result in results:
        for metric, value in result["metrics"].items():
            table.add_row(result["task"], metric, f"{value:.4f}" if isinstance(value, float) else str(value),
                          str(result["n"]), f"{result['seconds']:.1f}")
    out_console.print(table)
