"""Render an ``InspectResult`` (schema ``bncheck.inspect/1``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from bncheck.api import InspectResult
from bncheck.layers import BNLayer, Severity
from bncheck.report import (
    SEVERITY_STYLE,
    counts_text,
    dump_json,
    finding_dict,
    findings_markdown,
    github_lines,
    md_escape,
    origins,
    print_findings,
    severity_counts,
)
from bncheck.wording import plural

if TYPE_CHECKING:
    from rich.console import Console

SCHEMA = "bncheck.inspect/1"


def _range(a: np.ndarray | None) -> dict[str, float] | None:
    if a is None or np.asarray(a).size == 0:
        return None
    x = np.asarray(a, dtype=np.float64)
    return {"min": float(np.min(x)), "median": float(np.median(x)), "max": float(np.max(x))}


def _range_text(a: np.ndarray | None) -> str:
    r = _range(a)
    if r is None:
        return "—"
    return f"{r['min']:.3g} … {r['max']:.3g}"


def _producer_text(layer: BNLayer) -> str:
    p = layer.producer
    if p is None:
        return "?"
    return p.op if p.op in ("input",) else f"{p.op} {p.name}"


def _fold_text(layer: BNLayer) -> str:
    if layer.fold.foldable:
        return f"→ {layer.fold.into}"
    return "no"


def layer_dict(layer: BNLayer) -> dict[str, Any]:
    def nb(n):  # neighbour
        return None if n is None else {"name": n.name, "op": n.op, "has_weights": n.has_weights}

    return {
        "name": layer.name,
        "kind": layer.kind,
        "channels": layer.channels,
        "eps": layer.eps,
        "momentum": layer.momentum,
        "affine": layer.affine,
        "track_running_stats": layer.track_running_stats,
        "training": layer.training,
        "frozen": layer.frozen,
        "origin": layer.origin,
        "num_batches_tracked": layer.num_batches_tracked,
        "call_sites": layer.call_sites,
        "stats_dtype": layer.stats_dtype,
        "param_dtype": layer.param_dtype,
        "running_mean": _range(layer.running_mean),
        "running_var": _range(layer.running_var),
        "weight": _range(layer.weight),
        "bias": _range(layer.bias),
        "producer": nb(layer.producer),
        "consumers": [nb(c) for c in layer.consumers],
        "fold": {
            "foldable": layer.fold.foldable,
            "into": layer.fold.into,
            "target": layer.fold.target,
            "reason": layer.fold.reason,
        },
    }


def payload(result: InspectResult) -> dict[str, Any]:
    """The body of a ``bncheck.inspect/1`` document (also one model's entry in ``/2``)."""
    info = result.info
    return {
        "model": {
            "path": info.path,
            "format": info.format,
            "framework": info.framework,
            "opset": info.opset,
            "training": info.training,
            "graph_error": info.graph_error,
            "parameters": info.parameters,
            "nodes": info.nodes,
            "inputs": [
                {"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in info.inputs
            ],
            "outputs": [
                {"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in info.outputs
            ],
        },
        "bn_layers": [layer_dict(layer) for layer in info.bn_layers],
        "norm_layers": [
            {"name": n.name, "kind": n.kind, "shape": n.shape, "eps": n.eps, "affine": n.affine}
            for n in info.norm_layers
        ],
        "findings": [finding_dict(f, origins(info)) for f in result.findings],
        "notes": result.notes,
        "summary": {
            "bn_layers": len(info.bn_layers),
            "foldable": sum(1 for layer in info.bn_layers if layer.fold.foldable),
            "norm_layers": len(info.norm_layers),
            **severity_counts(result.findings),
        },
    }


def to_json(result: InspectResult) -> str:
    return dump_json(SCHEMA, payload(result))


def summary_line(result: InspectResult) -> str:
    info = result.info
    foldable = sum(1 for layer in info.bn_layers if layer.fold.foldable)
    return (
        f"{info.path}: {plural(len(info.bn_layers), 'BN layer')} ({foldable} foldable), "
        f"{plural(len(info.norm_layers), 'other norm')} · "
        f"{counts_text(severity_counts(result.findings))}"
    )


def render_text(
    result: InspectResult, console: Console, *, verbose: bool = False, show_info: bool = False
) -> None:
    """The layer table, the findings (info ones with ``verbose`` or ``show_info``, i.e. rules
    chosen with --select; BN301 always), the summary."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    info = result.info
    by_layer: dict[str | None, list] = {}
    for f in result.findings:
        by_layer.setdefault(f.layer, []).append(f)

    title = f"{escape(info.path)}  [dim]({info.format}"
    title += f", opset {info.opset})" if info.opset else ")"
    table = Table(title=title, title_justify="left", show_lines=False, header_style="bold")
    table.add_column("BN layer", overflow="fold")
    table.add_column("ch", justify="right")
    table.add_column("producer", overflow="fold")
    table.add_column("running mean")
    table.add_column("running var")
    table.add_column("fold")
    table.add_column("findings")
    for layer in info.bn_layers:
        codes = Text()
        for f in by_layer.get(layer.name, []):
            if codes:
                codes.append(" ")
            codes.append(f.code, style=SEVERITY_STYLE[f.severity])
        table.add_row(
            layer.origin or layer.name,  # json keeps the node name; the module path reads better
            str(layer.channels),
            _producer_text(layer),
            _range_text(layer.running_mean),
            _range_text(layer.running_var),
            Text(_fold_text(layer), style="green" if layer.fold.foldable else "dim"),
            codes,
        )
    if info.bn_layers:
        console.print(table)
    else:
        console.print(Text(f"{info.path}: no BatchNorm layers", style="bold"))

    if info.norm_layers:
        norms = Table(title="other normalization layers", title_justify="left", header_style="bold")
        for col in ("layer", "kind", "shape", "eps"):
            norms.add_column(col)
        for n in info.norm_layers:
            norms.add_row(n.name, n.kind, n.shape, "—" if n.eps is None else f"{n.eps:g}")
        console.print(norms)

    shown = [
        f
        for f in result.findings
        if verbose or show_info or f.severity != Severity.INFO or f.code == "BN301"
    ]
    print_findings(console, shown, origins(info))
    for note in result.notes:
        console.print(Text(f"note: {note}", style="dim"))
    console.print(Text(summary_line(result), style="bold"))


def render_markdown(result: InspectResult) -> str:
    info = result.info
    lines = [f"### bncheck inspect: `{info.path}`", ""]
    lines.append("| BN layer | kind | channels | producer | fold | findings |")
    lines.append("|---|---|---:|---|---|---|")
    codes: dict[str | None, list[str]] = {}
    for f in result.findings:
        codes.setdefault(f.layer, []).append(f.code)
    for layer in info.bn_layers:
        fold = _fold_text(layer) if layer.fold.foldable else f"no: {layer.fold.reason}"
        lines.append(
            f"| `{md_escape(layer.origin or layer.name)}` | {layer.kind} | {layer.channels} | "
            f"{md_escape(_producer_text(layer))} | {md_escape(fold)} | "
            f"{' '.join(codes.get(layer.name, []))} |"
        )
    lines += findings_markdown(result.findings, names=origins(info))
    lines += ["", f"**{md_escape(summary_line(result))}**", ""]
    return "\n".join(lines)


def render_github(result: InspectResult) -> str:
    lines = github_lines(result.info.path, result.findings, origins(result.info))
    return "\n".join([*lines, summary_line(result)])


def error_json(path: str, message: str, exit_code: int) -> str:
    """The ``bncheck.inspect/1`` document of a model that could not be read: its path and the
    error, so that a pipeline parsing stdout sees the failure (the same line goes to stderr)."""
    return dump_json(
        SCHEMA, {"model": {"path": path}, "error": {"message": message, "exit_code": exit_code}}
    )
