"""Render an ``InspectRun``: ``inspect`` over several models (json schema
``bncheck.inspect/2``), or ``check`` over several models on one dataset (``bncheck.check/2``).

Each model is rendered as its own report module renders it alone (``report.inspect`` or
``report.check``; its json entry is the body of that module's ``/1`` document); models that could
not be read or were skipped get an entry of their own, and a total closes the report.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console

from bncheck.api import InspectRun, ModelEntry
from bncheck.layers import Finding, Severity
from bncheck.report import _gh_escape, counts_text, dump_json, md_escape, severity_counts
from bncheck.report import inspect as one

SCHEMA = "bncheck.inspect/2"
SCHEMAS = {"inspected": SCHEMA, "checked": "bncheck.check/2"}


def _done(run: InspectRun) -> str:
    """What the run did to each model: "inspected" or "checked"."""
    return run.entries[0].done if run.entries else "inspected"


def _report(result: Any) -> Any:
    """The report module that renders one model's result alone."""
    from bncheck.report import check

    return check if isinstance(result, check.CheckResult) else one


def failing(findings: Iterable[Finding], fail_on: str) -> list[Finding]:
    """The findings at or above ``fail_on`` (none for ``never``)."""
    if fail_on == "never":
        return []
    threshold = Severity(fail_on).rank
    return [f for f in findings if f.severity.rank >= threshold]


def exit_code(run: InspectRun, fail_on: str) -> int:
    """The worst over all models: an unreadable model's own code (2, or 1 for the few errors
    that mean "findings"), else 1 when any finding reaches ``fail_on``, else 0."""
    worst = max((e.error_exit for e in run.errors), default=0)
    return max(worst, 1) if failing(run.findings, fail_on) else worst


def totals(run: InspectRun) -> dict[str, int]:
    return {
        "models": len(run.entries),
        _done(run): sum(1 for e in run.entries if e.result),
        "unreadable": len(run.errors),
        "skipped": len(run.skipped),
        **severity_counts(run.findings),
    }


def summary_line(run: InspectRun) -> str:
    t = totals(run)
    models = f"{t['models']} model{'' if t['models'] == 1 else 's'}"
    parts = [f"{t[_done(run)]} {_done(run)}"]
    if t["unreadable"]:
        parts.append(f"{t['unreadable']} unreadable")
    if t["skipped"]:
        parts.append(f"{t['skipped']} skipped")
    return f"{models}: {', '.join(parts)} · {counts_text(severity_counts(run.findings))}"


def _reason(e: ModelEntry) -> str:
    """The error or skip reason without the path it usually starts with (said just before)."""
    text = e.error if e.error is not None else e.skipped or ""
    return text.removeprefix(f"{e.path}: ")


def entry_dict(e: ModelEntry) -> dict[str, Any]:
    head: dict[str, Any] = {"path": e.path, "status": e.status}
    if e.result is not None:
        return {**head, **_report(e.result).payload(e.result)}
    if e.error is not None:
        return {**head, "error": e.error, "exit_code": e.error_exit}
    return {**head, "reason": e.skipped}


def to_json(run: InspectRun, fail_on: str) -> str:
    return dump_json(
        SCHEMAS[_done(run)],
        {
            "models": [entry_dict(e) for e in run.entries],
            "excluded": run.excluded,
            "summary": {**totals(run), "fail_on": fail_on, "exit_code": exit_code(run, fail_on)},
        },
    )


def render_text(
    run: InspectRun,
    console: Console,
    *,
    verbose: bool = False,
    quiet: bool = False,
    show_info: bool = False,
) -> None:
    for e in run.entries:
        if e.result is not None:
            if quiet:
                console.print(_report(e.result).summary_line(e.result))
            else:
                rep = _report(e.result)
                rep.render_text(e.result, console, verbose=verbose, show_info=show_info)
                console.print()
        elif e.error is not None:
            console.print(
                f"{e.path}: could not be read: {_reason(e)}", style="bold red", markup=False
            )
        else:
            console.print(f"{e.path}: skipped: {e.skipped}", style="dim", markup=False)
    console.print(summary_line(run), style="bold")


def render_markdown(run: InspectRun) -> str:
    command = "check" if _done(run) == "checked" else "inspect"
    lines = [f"## bncheck {command}: {summary_line(run)}", ""]
    for e in run.entries:
        if e.result is not None:
            lines.append(_report(e.result).render_markdown(e.result))
        elif e.error is not None:
            lines += [
                f"### `{md_escape(e.path)}`: could not be read",
                "",
                md_escape(_reason(e)),
                "",
            ]
        else:
            lines += [f"### `{md_escape(e.path)}`: skipped", "", md_escape(_reason(e)), ""]
    return "\n".join(lines)


def render_github(run: InspectRun) -> str:
    lines: list[str] = []
    for e in run.entries:
        if e.result is not None:
            lines.append(_report(e.result).render_github(e.result))
            continue
        level = "error" if e.error is not None else "notice"
        what = "could not be read" if e.error is not None else "skipped"
        where = _gh_escape(e.path, prop=True)
        lines.append(f"::{level} file={where},title=bncheck::{_gh_escape(f'{what}: {_reason(e)}')}")
    lines.append(summary_line(run))
    return "\n".join(lines)
