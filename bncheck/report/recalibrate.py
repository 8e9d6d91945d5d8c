"""Render a ``RecalibrateResult`` (schema ``bncheck.recalibrate/1``)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from bncheck.api._recalibrate import SETTLED, RecalibrateResult, describe_batches
from bncheck.report import (
    dump_json,
    finding_dict,
    findings_markdown,
    github_lines,
    layer_label,
    md_escape,
    origins,
    print_findings,
)
from bncheck.wording import plural

SCHEMA = "bncheck.recalibrate/1"


def _score(m) -> str:
    return "—" if m is None else f"{m.score:.3g}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1%}"


def summary_line(r: RecalibrateResult) -> str:
    acc = ""
    if r.accuracy_before is not None:
        acc = f"; accuracy {_pct(r.accuracy_before)} → {_pct(r.accuracy_after)}"
    elif r.output_change is not None:
        acc = f"; outputs changed by {r.output_change:.3g} (relative L2)"
    wrote = f" · wrote {r.output}" if r.output else ""
    if r.refused:
        wrote = " · NOT written: accuracy fell (BN405; --force writes it)"
    return (
        f"{r.info.path}: recalibrated {plural(len(r.layers), 'BN layer')} ({r.mode}) on "
        f"{plural(r.samples, 'sample')} in {describe_batches(r.batch_sizes)}{acc}{wrote}"
    )


def to_json(r: RecalibrateResult) -> str:
    def mm(m):
        if m is None:
            return None
        return {
            "score": m.score,
            "over": m.over,
            "max_abs_mean_shift": m.max_abs_mean_shift,
            "max_abs_log_var_ratio": m.max_abs_log_var_ratio,
            "median_kl": m.median_kl,
            "max_kl": m.max_kl,
            "share_over": m.share_over,
        }

    names = origins(r.info)
    payload = {
        "model": {"path": r.info.path, "format": r.info.format},
        "output": None if r.output is None else str(r.output),
        "data": r.data,
        "mode": r.mode,
        "samples": r.samples,
        "batches": r.batches,
        "batch_size": r.batch_size,
        "batch_sizes": [{"size": size, "count": n} for size, n in r.batch_sizes],
        "world_size": r.world_size,
        "running_var": "unbiased",  # M2/(n-1), PyTorch's convention, for ONNX too
        "settled_threshold": SETTLED,
        "accuracy_before": r.accuracy_before,
        "accuracy_after": r.accuracy_after,
        "output_change": r.output_change,
        "thresholds": r.thresholds.to_dict(),
        "forced": r.forced,
        "refused": r.refused,
        "findings": [finding_dict(f) for f in r.findings],
        "layers": [
            {
                "name": x.name,
                "origin": names.get(x.name),
                "before": mm(x.before),
                "after": mm(x.after),
                "mean_change_last_half": x.mean_change,
                "var_change_last_half": x.var_change,
                "converged": x.converged,
            }
            for x in r.layers
        ],
        "warnings": r.warnings,
        "notes": r.notes,
    }
    return dump_json(SCHEMA, payload)


def render_text(r: RecalibrateResult, console: Console) -> None:
    table = Table(
        title=f"recalibrate {escape(r.info.path)}  [dim]({escape(r.data)})",
        title_justify="left",
        header_style="bold",
    )
    table.add_column("BN layer", overflow="fold")
    table.add_column("mismatch before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("last-half change (mean σ / var)", justify="right")
    names = origins(r.info)
    for x in r.layers:
        change = (
            "—"
            if x.mean_change is None
            else f"{x.mean_change:.3f} / {x.var_change:.3f}" + ("" if x.converged else " !")
        )
        table.add_row(layer_label(x.name, names), _score(x.before), _score(x.after), change)
    console.print(table)
    console.print(
        "[dim]mismatch = KL of a high-percentile channel between the layer's input "
        "statistics and the statistics it normalizes with (bncheck.mismatch)[/]"
    )
    print_findings(console, r.findings)
    for w in r.warnings:
        console.print(Text.assemble(("warning:", "yellow"), f" {w}"))
    for n in r.notes:
        console.print(Text(f"note: {n}", style="dim"))
    console.print(Text(summary_line(r), style="bold red" if r.refused else "bold"))


def render_markdown(r: RecalibrateResult) -> str:
    lines = [f"### bncheck recalibrate: `{r.info.path}`", ""]
    lines += ["| BN layer | mismatch before | after | converged |", "|---|---:|---:|---|"]
    names = origins(r.info)
    for x in r.layers:
        lines.append(
            f"| `{md_escape(layer_label(x.name, names))}` | {_score(x.before)} | "
            f"{_score(x.after)} | {x.converged} |"
        )
    lines += findings_markdown(r.findings)
    lines += ["", f"**{md_escape(summary_line(r))}**", ""]
    return "\n".join(lines)


def render_github(r: RecalibrateResult) -> str:
    lines = github_lines(r.info.path, r.findings)
    lines += [f"::warning file={r.info.path},title=bncheck recalibrate::{w}" for w in r.warnings]
    return "\n".join([*lines, summary_line(r)])
