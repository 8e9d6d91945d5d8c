"""Render a ``FoldResult`` (schema ``bncheck.fold/1``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from bncheck.api._fold import FoldResult
from bncheck.layers import ModelInfo
from bncheck.report import dump_json, md_escape
from bncheck.wording import plural

if TYPE_CHECKING:
    from rich.console import Console

SCHEMA = "bncheck.fold/1"


def _sizes(info: ModelInfo) -> dict[str, Any]:
    return {"bn_layers": len(info.bn_layers), "nodes": info.nodes, "parameters": info.parameters}


def _action(step) -> str:
    if step.into == "affine":
        return "→ scale+shift"
    if step.into is not None:
        return f"→ {step.into} {step.target or ''}".rstrip()
    return "kept"


def _g(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3g}"


def verification_line(result: FoldResult) -> str:
    """One line that states the comparison actually made: the worst output's error, its bound
    and where the bound came from; on failure, by how much and what tolerance would pass."""
    v = result.verification
    if v is None:
        if result.unverified == "nothing changed":
            return "not verified: nothing changed, the model is the input as it was"
        return "not verified (--no-verify)"
    verdict = "passed" if v.passed else "FAILED"
    head = f"verification {verdict} on {plural(v.samples, 'sample')}"
    w = v.worst
    if w is None:
        return f"{head}: the model has no outputs to compare"
    what = f"output '{w.name}'" if v.region is None else f"tensor '{w.name}' ({v.region})"
    err = f"worst {what}: max|Δ| {_g(w.max_abs_error)}"
    if w.max_ref > 0 and math.isfinite(w.max_abs_error):
        err += f" = {w.max_rel_error:.2g} × max|ref| {_g(w.max_ref)}"
    tol = f"rtol {w.rtol:.2g}" + (f" + atol {w.atol:.2g}" if w.atol else "")
    if w.passed:
        cmp = f" ≤ bound {_g(w.bound)} ({tol}: {v.basis})"
    elif not math.isfinite(w.max_abs_error):
        cmp = " (a value is NaN or Inf in one model only)"
    else:
        cmp = f" > bound {_g(w.bound)} ({tol}: {v.basis}), {w.excess:.3g}× over"
    line = f"{head}: {err}{cmp}"
    if v.suggested is not None:
        s = v.suggested
        line += f"; --rtol {s.rtol:.2g}" + (f" --atol {s.atol:.2g}" if s.atol else "")
        line += " would pass"
    if v.top1_agreement is not None:
        line += f"; top-1 agreement {v.top1_agreement:.1%}"
    return f"{line} · on {v.inputs}"


def bn_text(result: FoldResult) -> str:
    """ "folded N of M BN layers[, K made scale+shift]", or "no BN layers"."""
    n = len(result.steps)
    if not n:
        return "no BN layers"
    text = f"folded {result.folded_count} of {plural(n, 'BN layer')}"
    if result.affine_count:
        text += f", {result.affine_count} made scale+shift"
    return text


def merges_line(result: FoldResult) -> str | None:
    """The per-channel Mul/Add runs merged into their producers, counted apart from BN."""
    if not result.merges:
        return None
    return (
        f"merged {plural(len(result.merges), 'per-channel Mul/Add run')} (bias adds, "
        "decomposed BN; not BN layers) into the Conv/Gemm before them"
    )


def summary_line(result: FoldResult) -> str:
    before, after = _sizes(result.source), _sizes(result.folded)
    if result.output:
        wrote = f"wrote {result.output}" + ("" if result.changed else " (the input, unchanged)")
    else:
        wrote = "no file written" if not result.passed else "no output requested"
    if not result.changed:
        return f"{result.source.path}: nothing to fold ({bn_text(result)}) · {wrote}"
    nodes = (
        f", nodes {before['nodes']} → {after['nodes']}"
        if before["nodes"] is not None and after["nodes"] is not None
        else ""
    )
    merged = f", merged {len(result.merges)} Mul/Add" if result.merges else ""
    return (
        f"{result.source.path}: {bn_text(result)} (BN left: {after['bn_layers']}){merged}"
        f"{nodes} · {wrote}"
    )


def to_json(result: FoldResult) -> str:
    payload = {
        "model": {"path": result.source.path, "format": result.source.format},
        "output": None if result.output is None else str(result.output),
        "steps": [
            {"layer": s.layer, "into": s.into, "target": s.target, "reason": s.reason}
            for s in result.steps
        ],
        "merges": [{"nodes": s.layer, "into": s.target} for s in result.merges],
        "before": _sizes(result.source),
        "after": _sizes(result.folded),
        "verification": None if result.verification is None else result.verification.to_dict(),
        "notes": result.notes,
        "unverified": result.unverified,
        "summary": {
            "bn_layers": len(result.steps),
            "folded": result.folded_count,
            "affine": result.affine_count,
            "skipped": result.kept_count,
            "merged": len(result.merges),
            "changed": result.changed,
            "passed": result.passed,
        },
    }
    return dump_json(SCHEMA, payload)


def render_text(result: FoldResult, console: Console) -> None:
    from rich.table import Table
    from rich.text import Text

    if result.steps:
        table = Table(title=f"fold {result.source.path}", title_justify="left", header_style="bold")
        table.add_column("BN layer", overflow="fold")
        table.add_column("action")
        table.add_column("why kept", overflow="fold")
        origin = {x.name: x.origin for x in result.source.bn_layers}
        for s in result.steps:
            style = "green" if s.into else "yellow"
            table.add_row(
                origin.get(s.layer) or s.layer, Text(_action(s), style=style), s.reason or ""
            )
        console.print(table)
    merged = merges_line(result)
    if merged:
        console.print(merged)
    b, a = _sizes(result.source), _sizes(result.folded)
    if result.changed:
        console.print(
            f"parameters {b['parameters']:,} → {a['parameters']:,}; "
            f"nodes {b['nodes'] if b['nodes'] is not None else '?'} → "
            f"{a['nodes'] if a['nodes'] is not None else '?'}"
        )
    v = result.verification
    for note in v.notes if v is not None else []:
        console.print(f"note: {note}", style="dim")
    style = "green" if result.passed else "bold red"
    console.print(Text(verification_line(result), style=style))
    for note in result.notes:
        console.print(Text(f"note: {note}", style="dim"))
    console.print(summary_line(result), style="bold")


def render_markdown(result: FoldResult) -> str:
    lines = [f"### bncheck fold: `{result.source.path}`", ""]
    if result.steps:
        lines += ["| BN layer | action | why kept |", "|---|---|---|"]
        for s in result.steps:
            lines.append(f"| `{md_escape(s.layer)}` | {_action(s)} | {md_escape(s.reason or '')} |")
        lines.append("")
    merged = merges_line(result)
    if merged:
        lines += [md_escape(merged), ""]
    lines += [md_escape(verification_line(result)), "", f"**{md_escape(summary_line(result))}**"]
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
