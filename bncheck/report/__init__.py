"""Render any bncheck result: rich text, json (versioned schema), github annotations, markdown.

One module per result kind; this one holds what they share. JSON schemas are versioned as
``bncheck.<command>/<major>``: a field is never removed or changes meaning within a major.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from bncheck import __version__
from bncheck.layers import Finding, Severity

FORMATS = ("text", "json", "github", "markdown")

SEVERITY_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}
GITHUB_LEVEL = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}


def jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays and non-finite floats into plain JSON values.

    NaN and Inf are not JSON: they become the strings "nan", "inf", "-inf".
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def dump_json(schema: str, payload: dict[str, Any]) -> str:
    doc = {"schema": schema, "bncheck_version": __version__, **payload}
    return json.dumps(jsonable(doc), indent=2, sort_keys=False)


def finding_dict(f: Finding) -> dict[str, Any]:
    return {
        "code": f.code,
        "severity": f.severity.value,
        "layer": f.layer,
        "message": f.message,
        "hint": f.hint,
    }


def _gh_escape(text: str, *, prop: bool = False) -> str:
    # GitHub workflow commands: data escapes %, CR, LF; properties also ':' and ','.
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


def github_lines(path: str, findings: Iterable[Finding]) -> list[str]:
    """One ``::error``/``::warning``/``::notice`` workflow command per finding."""
    lines = []
    for f in findings:
        where = f" ({f.layer})" if f.layer else ""
        title = _gh_escape(f"bncheck {f.code}{where}", prop=True)
        msg = _gh_escape(f"{f.message}. Fix: {f.hint}")
        lines.append(
            f"::{GITHUB_LEVEL[f.severity]} file={_gh_escape(path, prop=True)},title={title}::{msg}"
        )
    return lines


def md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def severity_counts(findings: Iterable[Finding]) -> dict[str, int]:
    counts = {s.value: 0 for s in (Severity.ERROR, Severity.WARNING, Severity.INFO)}
    for f in findings:
        counts[f.severity.value] += 1
    return counts


def counts_text(counts: dict[str, int]) -> str:
    def plural(n: int, word: str) -> str:
        return f"{n} {word}{'' if n == 1 else 's'}"

    return ", ".join(
        [
            plural(counts["error"], "error"),
            plural(counts["warning"], "warning"),
            f"{counts['info']} info",
        ]
    )


def findings_markdown(findings: Iterable[Finding], *, hints: bool = True) -> list[str]:
    """Markdown table rows for ``findings`` (with a leading blank line); empty when none."""
    findings = list(findings)
    if not findings:
        return []
    if hints:
        lines = ["", "| severity | code | layer | message | fix |", "|---|---|---|---|---|"]
    else:
        lines = ["", "| severity | code | layer | message |", "|---|---|---|---|"]
    for f in findings:
        row = f"| {f.severity.value} | {f.code} | {md_escape(f.layer or 'model')} | "
        row += f"{md_escape(f.message)} |"
        lines.append(row + (f" {md_escape(f.hint)} |" if hints else ""))
    return lines


def print_findings(console: Any, findings: Iterable[Finding]) -> None:
    """One line per finding on a rich console; each code's fix hint once, after its first
    warning or error."""
    from rich.text import Text

    hinted: set[str] = set()
    for f in findings:
        console.print(
            Text.assemble(
                (f"{f.severity.value:>7} ", SEVERITY_STYLE[f.severity]),
                (f"{f.code} ", "bold"),
                (f"{f.layer or 'model'}: ", "bold"),
                f.message,
            )
        )
        if f.severity != Severity.INFO and f.code not in hinted:
            hinted.add(f.code)
            console.print(Text(f"          fix: {f.hint}", style="dim"))
