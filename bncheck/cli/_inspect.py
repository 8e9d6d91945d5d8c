"""``bncheck inspect``, ``rules`` and ``explain``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from bncheck.cli import (
    ArchKwargsOpt,
    ArchOpt,
    CheckpointKeyOpt,
    Common,
    FailOnOpt,
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
from bncheck.errors import BncheckError, InputError

FORMATS = ("text", "json", "github", "markdown", "sarif", "junit")
InspectFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        help="text | json | github | markdown | sarif (GitHub code scanning) | junit (test "
        "reports of GitLab, Jenkins)",
    ),
]
DocFormatOpt = Annotated[str, typer.Option("--format", help="text | json | markdown")]


@app.command()
def inspect(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="model files (.onnx, .pt2, .pt/.pth/.bin, .safetensors) and folders, walked "
            "for model files",
            show_default=False,
        ),
    ],
    fmt: InspectFormatOpt = None,
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
    """Static findings for every BN layer: no data needed. Several models per run: the exit
    code is the worst over all of them (2 when any could not be read, after the rest ran)."""
    from bncheck.api._walk import first_match, glob_match, relative

    opts = common(
        fmt,
        fail_on,
        select,
        ignore,
        arch,
        arch_kwargs,
        trust_pickle,
        input_shape,
        verbose,
        quiet,
        formats=FORMATS,
        checkpoint_key=checkpoint_key,
    )
    cfg = opts.config
    table = cfg.get("arch") if isinstance(cfg.get("arch"), dict) else None
    exclude = list(cfg.get("exclude", []))
    only = models[0] if len(models) == 1 else None
    if (
        only is not None
        and not only.is_dir()
        and opts.format in ("text", "json", "github", "markdown")
        and not any(glob_match(relative(only, cfg.root), g) for g in exclude)
    ):
        # One file: the report and the json schema (bncheck.inspect/1) are those of one model.
        if opts.open_options["arch"] is None and table:
            opts.open_options["arch"] = first_match(relative(only, cfg.root), table)
        _inspect_one(only, opts)
    _inspect_many(models, opts, table=table, include=cfg.get("include", []), exclude=exclude)


def _inspect_one(model: Path, opts: Common) -> NoReturn:
    from bncheck import api
    from bncheck.report import inspect as rep
    from bncheck.rules import validate_codes

    validate_codes([*opts.select, *opts.ignore])  # an option, not the model
    try:
        result = api.inspect(model, select=opts.select, ignore=opts.ignore, **opts.open_options)
    except BncheckError as exc:
        if opts.format != "json":
            raise
        # A pipeline parsing stdout must see the failure too (bncheck.inspect/1 + "error").
        print(f"bncheck: error: {exc}", file=sys.stderr)
        emit(rep.error_json(str(model), str(exc), int(exc.exit_code)))
        raise typer.Exit(exc.exit_code) from None
    render(rep, result, opts, verbose=opts.verbose, show_info=bool(opts.select))
    raise typer.Exit(exit_code_for(result.findings, opts.fail_on))


def _inspect_many(
    models: list[Path],
    opts: Common,
    *,
    table: dict[str, str] | None,
    include: list[str],
    exclude: list[str],
) -> NoReturn:
    from bncheck import api
    from bncheck.cli._runs import render_run, say_error

    open_options = dict(opts.open_options)
    arch = open_options.pop("arch") or table
    run = api.inspect_paths(
        models,
        select=opts.select,
        ignore=opts.ignore,
        include=include,
        exclude=exclude,
        arch=arch,
        root=opts.config.root,
        on_error=say_error(opts),
        **open_options,
    )
    render_run(run, opts)


def _doc_format(fmt: str) -> str:
    if fmt not in ("text", "json", "markdown"):
        raise InputError(f"--format {fmt!r}: choose text, json or markdown")
    return fmt


@app.command("rules")
def list_rules(fmt: DocFormatOpt = "text") -> None:
    """List every rule code with its severity and summary."""
    from bncheck.report import rules as rep
    from bncheck.rules import all_rules

    rules = list(all_rules().values())
    if _doc_format(fmt) == "json":
        emit(rep.rules_json(rules))
        return
    if fmt == "markdown":
        emit(rep.rules_markdown(rules))
        return
    from rich.table import Table

    table = Table(header_style="bold")
    for col in ("code", "name", "severity", "summary"):
        table.add_column(col)
    for r in rules:
        table.add_row(r.code, r.name, r.severity.value, r.summary)
    console().print(table)


@app.command()
def explain(
    code: Annotated[str, typer.Argument(help="rule code, e.g. BN101")],
    fmt: DocFormatOpt = "text",
) -> None:
    """Explain one rule: what it checks, why it matters, how to fix it."""
    from bncheck.report import rules as rep
    from bncheck.rules import all_rules

    _doc_format(fmt)
    r = all_rules().get(code.strip().upper())
    if r is None:
        raise InputError(f"unknown rule code {code!r} (see `bncheck rules`)")
    if fmt == "json":
        emit(rep.explain_json(r))
    elif fmt == "markdown":
        emit(rep.explain_markdown(r))
    else:
        emit(f"{r.code} ({r.name}, {r.severity.value})\n\n{r.doc}\n\nFix: {r.hint}")
