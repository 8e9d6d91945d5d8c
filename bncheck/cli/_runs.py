"""What ``inspect`` and ``check`` share when they run over several models: an unreadable model
said on stderr at once, and the run's report in the chosen format with the worst exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

import typer

from bncheck.cli import Common, console, emit

if TYPE_CHECKING:
    from bncheck.api import InspectRun, ModelEntry


def say_error(opts: Common) -> Callable[[ModelEntry], None]:
    """The ``on_error`` of a run: one ``bncheck: error:`` line (and the traceback with -v)."""

    def said(entry: ModelEntry) -> None:
        if opts.verbose and entry.exception is not None:
            import traceback

            traceback.print_exception(entry.exception)
        print(f"bncheck: error: {entry.error}", file=sys.stderr)

    return said


def render_run(run: InspectRun, opts: Common) -> NoReturn:
    """Print ``run`` in ``opts.format`` and exit with the worst code over its models."""
    from bncheck.report import inspect_run as rep

    for p in run.excluded:
        print(f"bncheck: note: {p}: left out by `exclude` in [tool.bncheck]", file=sys.stderr)
    if not run.entries:
        print("bncheck: warning: no model files found in the given paths", file=sys.stderr)
    if opts.format == "json":
        emit(rep.to_json(run, opts.fail_on))
    elif opts.format == "sarif":
        from bncheck.report.sarif import to_sarif

        emit(to_sarif(run))
    elif opts.format == "junit":
        from bncheck.report.junit import to_junit

        emit(to_junit(run, opts.fail_on))
    elif opts.format == "github":
        emit(rep.render_github(run))
    elif opts.format == "markdown":
        emit(rep.render_markdown(run))
    else:
        rep.render_text(
            run, console(), verbose=opts.verbose, quiet=opts.quiet, show_info=bool(opts.select)
        )
    raise typer.Exit(rep.exit_code(run, opts.fail_on))
