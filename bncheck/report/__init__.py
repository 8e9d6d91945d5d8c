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
from bncheck.layers import Finding, ModelInfo, Severity
from bncheck.wording import plural

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


def origins(info: ModelInfo) -> dict[str, str | None]:
    """BN layer name (the node name tools use) → the module path the exporter recorded, or
    None where the file records none."""
    return {x.name: x.origin for x in info.bn_layers}


def layer_label(name: str | None, names: dict[str, str | None] | None = None) -> str:
    """The name a person knows a layer by: its module path where the file records one (torch's
    exporter names ONNX nodes ``node__native_batch_norm_legit_no_training__0``), else its
    name; ``model`` for a model-level finding."""
    if name is None:
        return "model"
    return (names or {}).get(name) or name


def finding_dict(f: Finding, names: dict[str, str | None] | None = None) -> dict[str, Any]:
    """A finding for json: ``layer`` is the node name tools use, ``origin`` the module path
    the exporter recorded (None where there is none)."""
    return {
        "code": f.code,
        "severity": f.severity.value,
        "layer": f.layer,
        "origin": None if f.layer is None else (names or {}).get(f.layer),
        "message": f.message,
        "hint": f.hint,
    }


def _gh_escape(text: str, *, prop: bool = False) -> str:
    # GitHub workflow commands: data escapes %, CR, LF; properties also ':' and ','.
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


def github_lines(
    path: str, findings: Iterable[Finding], names: dict[str, str | None] | None = None
) -> list[str]:
    """One ``::error``/``::warning``/``::notice`` workflow command per finding; layers by
    :func:`layer_label`."""
    lines = []
    for f in findings:
        where = f" ({layer_label(f.layer, names)})" if f.layer else ""
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
    return ", ".join(
        [
            plural(counts["error"], "error"),
            plural(counts["warning"], "warning"),
            f"{counts['info']} info",
        ]
    )


def findings_markdown(
    findings: Iterable[Finding],
    *,
    hints: bool = True,
    names: dict[str, str | None] | None = None,
) -> list[str]:
    """Markdown table rows for ``findings`` (with a leading blank line); empty when none.
    Layers by :func:`layer_label`."""
    findings = list(findings)
    if not findings:
        return []
    if hints:
        lines = ["", "| severity | code | layer | message | fix |", "|---|---|---|---|---|"]
    else:
        lines = ["", "| severity | code | layer | message |", "|---|---|---|---|"]
    for f in findings:
        row = f"| {f.severity.value} | {f.code} | {md_escape(layer_label(f.layer, names))} | "
        row += f"{md_escape(f.message)} |"
        lines.append(row + (f" {md_escape(f.hint)} |" if hints else ""))
    return lines


def print_findings(
    console: Any, findings: Iterable[Finding], names: dict[str, str | None] | None = None
) -> None:
    """One line per finding on a rich console (layers by :func:`layer_label`); each code's
    fix hint once, after its first warning or error."""
    from rich.text import Text

    hinted: set[str] = set()
    for f in findings:
        console.print(
            Text.assemble(
                (f"{f.severity.value:>7} ", SEVERITY_STYLE[f.severity]),
                (f"{f.code} ", "bold"),
                (f"{layer_label(f.layer, names)}: ", "bold"),
                f.message,
            )
        )
        if f.severity != Severity.INFO and f.code not in hinted:
            hinted.add(f.code)
            console.print(Text(f"          fix: {f.hint}", style="dim"))
