"""Render a ``CheckResult`` (schema ``bncheck.check/1``).

The text and markdown tables draw a bar of ``█`` per layer, scaled to the largest layer score
(or the threshold, when every layer is below it), so the worst layers stand out.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from bncheck.api._check import CheckResult, LayerCheck
from bncheck.layers import Severity
from bncheck.report import (
    SEVERITY_STYLE,
    counts_text,
    dump_json,
    finding_dict,
    findings_markdown,
    github_lines,
    layer_label,
    md_escape,
    origins,
    print_findings,
    severity_counts,
)
from bncheck.wording import plural

if TYPE_CHECKING:
    from rich.console import Console

SCHEMA = "bncheck.check/1"
BAR_WIDTH = 20
_EIGHTHS = " ▏▎▍▌▋▊▉"


def bar(score: float, scale: float, width: int = BAR_WIDTH) -> str:
    """``score/scale`` of ``width`` cells in ``█`` with an eighth-block tail; full for inf."""
    if not math.isfinite(score) or score >= scale:
        return "█" * width
    if score <= 0 or scale <= 0:
        return ""
    eighths = round(score / scale * width * 8)
    full, rest = divmod(eighths, 8)
    return "█" * full + (_EIGHTHS[rest] if rest else "")


def bar_scale(result: CheckResult) -> float:
    """The score a full bar stands for: the largest finite layer score, at least the threshold."""
    finite = [
        lc.mismatch.score
        for lc in result.measured
        if lc.mismatch is not None and math.isfinite(lc.mismatch.score)
    ]
    return max([result.thresholds.layer.kl, *finite])


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def divergence_line(result: CheckResult) -> str:
    d = result.divergence
    if not result.layers:
        return "outputs: not compared (the model has no BatchNorm layers)"
    if d is None:
        return "outputs: not compared (no batch of 2 or more samples, or comparison turned off)"
    top1 = "" if d.top1_agreement is None else f", top-1 agreement {d.top1_agreement:.1%}"
    return (
        f"outputs, running vs batch statistics: relative L2 {d.rel_l2:.3g}{top1} "
        f"({plural(d.samples, 'sample')}; threshold {result.thresholds.output_rel_l2:g})"
    )


def first_label(result: CheckResult) -> str | None:
    """The first diverging layer by the name a person knows (:func:`layer_label`)."""
    if result.first_diverging is None:
        return None
    return layer_label(result.first_diverging, origins(result.info))


def first_line(result: CheckResult) -> str | None:
    if result.first_diverging is None:
        return None
    later = sum(1 for lc in result.over if lc.name != result.first_diverging)
    verb = "diverges" if later == 1 else "diverge"
    inherit = (
        f"; {plural(later, 'later layer')} {verb} too, largely inherited from it" if later else ""
    )
    return (
        f"first diverging layer: {first_label(result)} — later layers inherit its shift, "
        f"so start there{inherit}"
    )


NO_BN = "the model has no BatchNorm layers: nothing to check"


def summary_line(result: CheckResult) -> str:
    if not result.layers:
        return f"{result.info.path}: {NO_BN} · {counts_text(severity_counts(result.findings))}"
    over = len(result.over)
    first = f"first diverging: {first_label(result)}" if result.first_diverging else "none over"
    rel = "" if result.divergence is None else f" · output rel L2 {result.divergence.rel_l2:.3g}"
    return (
        f"{result.info.path}: {len(result.measured)} of {plural(len(result.layers), 'BN layer')} "
        f"checked on {plural(result.samples, 'sample')} · {over} over threshold ({first}){rel} · "
        f"{counts_text(severity_counts(result.findings))}"
    )


def _layer_dict(lc: LayerCheck, first: str | None) -> dict[str, Any]:
    m = lc.mismatch
    out: dict[str, Any] = {
        "index": lc.index,
        "name": lc.name,
        "origin": lc.layer.origin,
        "kind": lc.layer.kind,
        "channels": lc.layer.channels,
        "eps": lc.layer.eps,
        "measured": m is not None,
        "skipped": lc.skipped,
        "count": None if lc.moments is None else lc.moments.count,
        "first_diverging": lc.name == first,
    }
    if m is not None:
        out.update(
            over=m.over,
            score=m.score,
            share_over=m.share_over,
            median_kl=m.median_kl,
            max_kl=m.max_kl,
            median_abs_mean_shift=m.median_abs_mean_shift,
            max_abs_mean_shift=m.max_abs_mean_shift,
            median_abs_log_var_ratio=m.median_abs_log_var_ratio,
            max_abs_log_var_ratio=m.max_abs_log_var_ratio,
            worst_channel=m.worst_channel,
        )
    per_channel: dict[str, Any] = {}
    if lc.moments is not None:
        per_channel["data_mean"] = lc.data_mean
        per_channel["data_var"] = lc.data_var
    if lc.metrics is not None:
        per_channel.update(lc.metrics)
    out["per_channel"] = per_channel or None
    return out


def to_json(result: CheckResult) -> str:
    return dump_json(SCHEMA, payload(result))


def payload(result: CheckResult) -> dict[str, Any]:
    """The body of a ``bncheck.check/1`` document (also one model's entry in a run over
    several models)."""
    info = result.info
    d = result.divergence
    return {
        "model": {"path": info.path, "format": info.format, "framework": info.framework},
        "data": {
            "description": result.data,
            "synthetic": result.synthetic,
            "samples": result.samples,
            "batches": result.batches,
        },
        "task": result.task,
        "thresholds": result.thresholds.to_dict(),
        "layers": [_layer_dict(lc, result.first_diverging) for lc in result.layers],
        "first_diverging": result.first_diverging,
        "output_divergence": None
        if d is None
        else {
            "rel_l2": d.rel_l2,
            "outputs": [{"name": n, "rel_l2": v} for n, v in d.outputs],
            "top1_agreement": d.top1_agreement,
            "samples": d.samples,
        },
        "findings": [finding_dict(f, origins(info)) for f in result.findings],
        "notes": result.notes,
        "summary": {
            "bn_layers": len(result.layers),
            "measured": len(result.measured),
            "over": len(result.over),
            "first_diverging": result.first_diverging,
            **severity_counts(result.findings),
        },
    }


def render_text(
    result: CheckResult, console: Console, *, verbose: bool = False, show_info: bool = False
) -> None:
    """The table, the output comparison, the findings, the summary. Info findings (and each
    later diverging layer, BN404) are listed with ``verbose`` or ``show_info`` (rules chosen
    with --select); otherwise counted."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    info = result.info
    th = result.thresholds.layer
    scale = bar_scale(result)
    table = Table(
        title=f"check {escape(info.path)}  [dim]({info.format}) on {escape(result.data)}",
        title_justify="left",
        header_style="bold",
        caption=f"bar: layer score (KL of the channel at the {th.max_share:.0%} quantile), "
        f"full = {scale:.3g} nats; threshold {th.kl:g}",
        caption_justify="left",
    )
    table.add_column("#", justify="right")
    table.add_column("BN layer", overflow="fold")
    table.add_column("ch", justify="right")
    table.add_column("|shift| max", justify="right")
    table.add_column("|ln var| med", justify="right")
    table.add_column("over", justify="right")
    table.add_column("score", justify="right")
    table.add_column("mismatch", no_wrap=True)
    for lc in result.layers:
        m = lc.mismatch
        if m is None:
            table.add_row(
                str(lc.index),
                lc.layer.origin or lc.name,
                str(lc.layer.channels),
                *(["—"] * 4),
                Text(lc.skipped or "not measured", style="dim"),
            )
            continue
        style = "bold red" if m.over else "green"
        cell = Text(bar(m.score, scale), style=style)
        if lc.name == result.first_diverging:
            cell.append(" ◀ first", style="bold red")
        table.add_row(
            str(lc.index),
            # ONNX node names from torch's exporter are long; the module path reads better.
            Text(lc.layer.origin or lc.name, style="bold red" if m.over else ""),
            str(m.channels),
            _g(m.max_abs_mean_shift),
            _g(m.median_abs_log_var_ratio),
            f"{m.share_over:.0%}",
            _g(m.score),
            cell,
        )
    if result.layers:
        console.print(table)
        console.print(Text(divergence_line(result)))
    first = first_line(result)
    if first:
        console.print(Text(first, style="bold red"))
    _render_findings(result, console, verbose=verbose or show_info)
    for note in result.notes:
        console.print(Text(f"note: {note}", style="dim"))
    console.print(Text(summary_line(result), style="bold"))


def _render_findings(result: CheckResult, console: Console, *, verbose: bool) -> None:
    from rich.text import Text

    downstream = [f for f in result.findings if f.code == "BN404"]
    shown = [
        f
        for f in result.findings
        if verbose or (f.code != "BN404" and (f.severity != Severity.INFO or f.code == "BN403"))
    ]
    print_findings(console, shown, origins(result.info))
    if downstream and not verbose:
        n = len(downstream)
        console.print(
            Text.assemble(
                (f"{'warning':>7} ", SEVERITY_STYLE[Severity.WARNING]),
                ("BN404 ", "bold"),
                f"{plural(n, 'later layer')} {'diverges' if n == 1 else 'diverge'} downstream "
                "of the first (likely inherited; -v lists them)",
            )
        )


def render_markdown(result: CheckResult) -> str:
    scale = bar_scale(result)
    names = origins(result.info)
    lines = [f"### bncheck check: `{md_escape(result.info.path)}`", "", md_escape(result.data), ""]
    lines.append("| # | BN layer | ch | \\|shift\\| med | KL med | over | score | mismatch |")
    lines.append("|---:|---|---:|---:|---:|---:|---:|---|")
    for lc in result.layers:
        m = lc.mismatch
        if m is None:
            lines.append(
                f"| {lc.index} | `{md_escape(layer_label(lc.name, names))}` | "
                f"{lc.layer.channels} | — | — | — | — | "
                f"{md_escape(lc.skipped or 'not measured')} |"
            )
            continue
        mark = " **◀ first**" if lc.name == result.first_diverging else ""
        label = md_escape(layer_label(lc.name, names))
        name = f"**`{label}`**" if m.over else f"`{label}`"
        lines.append(
            f"| {lc.index} | {name} | {m.channels} | {_g(m.median_abs_mean_shift)} | "
            f"{_g(m.median_kl)} | {m.share_over:.0%} | {_g(m.score)} | "
            f"`{bar(m.score, scale, 20) or ' '}`{mark} |"
        )
    lines += ["", md_escape(divergence_line(result))]
    first = first_line(result)
    if first:
        lines += ["", f"**{md_escape(first)}**"]
    lines += findings_markdown(result.findings, names=names)
    for note in result.notes:
        lines += ["", f"_note: {md_escape(note)}_"]
    lines += ["", f"**{md_escape(summary_line(result))}**", ""]
    return "\n".join(lines)


def render_github(result: CheckResult) -> str:
    lines = github_lines(result.info.path, result.findings, origins(result.info))
    return "\n".join([*lines, summary_line(result)])
