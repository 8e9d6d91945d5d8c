"""Render a ``FoldResult`` (schema ``bncheck.fold/1``)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bncheck.api._fold import FoldResult
from bncheck.layers import ModelInfo
from bncheck.report import dump_json, md_escape

SCHEMA = "bncheck.fold/1"


def _sizes(info: ModelInfo) -> dict[str, Any]:
    return {"bn_layers": len(info.bn_layers), "nodes": info.nodes, "parameters": info.parameters}


def _action(step) -> str:
    if step.into == "affine":
        return "→ scale+shift"
    if step.into is not None:
        return f"→ {step.into} {step.target or ''}".rstrip()
    return "kept"


def verification_line(result: FoldResult) -> str:
    v = result.verification
    if v is None:
        return "not verified (--no-verify)"
    top1 = "" if v.top1_agreement is None else f", top-1 agreement {v.top1_agreement:.1%}"
    verdict = "passed" if v.passed else "FAILED"
    return (
        f"verification {verdict}: max abs error {v.max_abs_error:.3g}, max rel error "
        f"{v.max_rel_error:.3g} (rtol {v.rtol:g}, atol {v.atol:g}){top1} on {v.inputs}"
    )


def summary_line(result: FoldResult) -> str:
    before, after = _sizes(result.source), _sizes(result.folded)
    wrote = (
        f"wrote {result.output}"
        if result.output
        else ("no file written" if not result.passed else "no output requested")
    )
    nodes = (
        f", nodes {before['nodes']} → {after['nodes']}"
        if before["nodes"] is not None and after["nodes"] is not None
        else ""
    )
    return (
        f"{result.source.path}: folded {result.folded_count} of {len(result.steps)} BN layers "
        f"(BN left: {after['bn_layers']}){nodes} · {wrote}"
    )


def to_json(result: FoldResult) -> str:
    payload = {
        "model": {"path": result.source.path, "format": result.source.format},
        "output": None if result.output is None else str(result.output),
        "steps": [
            {"layer": s.layer, "into": s.into, "target": s.target, "reason": s.reason}
            for s in result.steps
        ],
        "before": _sizes(result.source),
        "after": _sizes(result.folded),
        "verification": None if result.verification is None else result.verification.to_dict(),
        "notes": result.notes,
        "summary": {
            "bn_layers": len(result.steps),
            "folded": result.folded_count,
            "skipped": len(result.steps) - result.folded_count,
            "passed": result.passed,
        },
    }
    return dump_json(SCHEMA, payload)


def render_text(result: FoldResult, console: Console) -> None:
    table = Table(title=f"fold {result.source.path}", title_justify="left", header_style="bold")
    table.add_column("BN layer", overflow="fold")
    table.add_column("action")
    table.add_column("why kept", overflow="fold")
    origin = {x.name: x.origin for x in result.source.bn_layers}
    for s in result.steps:
        style = "green" if s.into else "yellow"
        table.add_row(origin.get(s.layer) or s.layer, Text(_action(s), style=style), s.reason or "")
    console.print(table)
    b, a = _sizes(result.source), _sizes(result.folded)
    console.print(
        f"parameters {b['parameters']:,} → {a['parameters']:,}; "
        f"nodes {b['nodes'] if b['nodes'] is not None else '?'} → "
        f"{a['nodes'] if a['nodes'] is not None else '?'}"
    )
    style = "green" if result.passed else "bold red"
    console.print(Text(verification_line(result), style=style))
    for note in result.notes:
        console.print(Text(f"note: {note}", style="dim"))
    console.print(summary_line(result), style="bold")


def render_markdown(result: FoldResult) -> str:
    lines = [f"### bncheck fold: `{result.source.path}`", "", "| BN layer | action | why kept |"]
    lines.append("|---|---|---|")
    for s in result.steps:
        lines.append(f"| `{md_escape(s.layer)}` | {_action(s)} | {md_escape(s.reason or '')} |")
    lines += [
        "",
        md_escape(verification_line(result)),
        "",
        f"**{md_escape(summary_line(result))}**",
    ]
    return "\n".join(lines) + "\n"


def render_github(result: FoldResult) -> str:
    path = result.source.path
    lines = [
        f"::notice file={path},title=bncheck fold ({s.layer})::kept: {s.reason}"
        for s in result.steps
        if s.into is None
    ]
    if not result.passed:
        lines.append(f"::error file={path},title=bncheck fold::{verification_line(result)}")
    lines.append(summary_line(result))
    return "\n".join(lines)
