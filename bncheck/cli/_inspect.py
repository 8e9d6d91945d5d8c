"""``bncheck inspect``, ``rules`` and ``explain``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bncheck.cli import (
    ArchKwargsOpt,
    ArchOpt,
    CheckpointKeyOpt,
    FailOnOpt,
    FormatOpt,
    IgnoreOpt,
    QuietOpt,
    SelectOpt,
    ShapeOpt,
    TrustOpt,
    VerboseOpt,
    app,
    common,
    console,
    emit,
    exit_code_for,
    render,
)
from bncheck.errors import InputError


@app.command()
def inspect(
    model: Annotated[
        Path, typer.Argument(help="model file: .onnx, .pt2, .pt/.pth/.bin, .safetensors")
    ],
    fmt: FormatOpt = None,
    fail_on: FailOnOpt = None,
    select: SelectOpt = None,
    ignore: IgnoreOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    checkpoint_key: CheckpointKeyOpt = None,
    input_shape: ShapeOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Static findings for every BN layer: no data needed."""
    from bncheck import api
    from bncheck.report import inspect as rep

    opts = common(
        fmt, fail_on, select, ignore, arch, arch_kwargs, trust_pickle, input_shape, verbose, quiet,
        checkpoint_key=checkpoint_key,
    )  # fmt: skip
    result = api.inspect(model, select=opts.select, ignore=opts.ignore, **opts.open_options)
    render(rep, result, opts, verbose=opts.verbose)
    raise typer.Exit(exit_code_for(result.findings, opts.fail_on))


@app.command("rules")
def list_rules() -> None:
    """List every rule code with its severity and summary."""
    from rich.table import Table

    from bncheck.rules import all_rules

    table = Table(header_style="bold")
    for col in ("code", "name", "severity", "summary"):
        table.add_column(col)
    for code, r in all_rules().items():
        table.add_row(code, r.name, r.severity.value, r.summary)
    console().print(table)


@app.command()
def explain(code: Annotated[str, typer.Argument(help="rule code, e.g. BN101")]) -> None:
    """Explain one rule: what it checks, why it matters, how to fix it."""
    from bncheck.rules import all_rules

    r = all_rules().get(code.strip().upper())
    if r is None:
        raise InputError(f"unknown rule code {code!r} (see `bncheck rules`)")
    emit(f"{r.code} ({r.name}, {r.severity.value})\n\n{r.doc}\n\nFix: {r.hint}")
