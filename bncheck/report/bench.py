"""Render a ``BenchResult`` (schema ``bncheck.bench/2``).

A row's verdict follows its interval against the threshold (``bench.verdict``); a noisy timer
(a side's robust CV above ``bench.NOISY_CV``) is a flag beside it, not a verdict of its own.
Schema 2 (from 1): ``unstable`` became ``noisy`` (a flag, no longer a verdict), verdicts are
``B slower`` / ``B faster`` / ``no difference`` / ``inconclusive`` judged against
``threshold``, and ``summary.fail_if_slower`` is a ratio (it was ``fail_if_slower_pct``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bncheck.api._bench import BenchResult, BenchRow, BenchSide
from bncheck.bench import Samples, fails_slower
from bncheck.report import dump_json, md_escape

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

SCHEMA = "bncheck.bench/2"
LABELS = ("A", "B")


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:,.0f}"


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def side_dict(side: BenchSide | None) -> dict[str, Any] | None:
    if side is None:
        return None
    return {
        "path": side.path,
        "format": side.format,
        "framework": side.framework,
        "engine": side.engine,
        "bn_layers": side.bn_layers,
        "folds_bn_itself": side.folds_bn_itself,
    }


def row_dict(row: BenchRow) -> dict[str, Any]:
    """Per batch size: each side's figures (``Samples.to_dict``), memory, and with ``vs`` the
    ratio B/A with its interval as ``ratio_ci: [low, high]``."""
    out: dict[str, Any] = {
        "batch_size": row.batch_size,
        "a": row.a.to_dict(row.batch_size),
        "b": None if row.b is None else row.b.to_dict(row.batch_size),
        "memory": {"kind": row.memory_kind, "bytes": row.memory_bytes},
        "noisy": row.noisy,
        "verdict": row.verdict,
    }
    c = row.comparison
    if c is not None:
        out.update(
            {
                "ratio": c.ratio,
                "ratio_ci": [c.ci_low, c.ci_high],
                "confidence": c.confidence,
                "threshold": c.threshold,
                "speedup": 1.0 / c.ratio if c.ratio > 0 else None,
                "rounds": c.rounds,
                "iters_per_round": c.iters_per_round,
                "resamples": c.resamples,
                "bootstrap": "two-level (instance pairs, then paired rounds), expanded percentile",
            }
        )
    return out


def to_json(result: BenchResult) -> str:
    payload = {
        "model": side_dict(result.a),
        "vs": side_dict(result.b),
        "device": result.device,
        "threads": result.threads,
        "inputs": result.inputs,
        "settings": result.settings,
        "rows": [row_dict(r) for r in result.rows],
        "notes": result.notes,
        "summary": {
            "rows": len(result.rows),
            "noisy": result.noisy,
            "threshold": result.threshold,
            "fail_if_slower": result.fail_if_slower,
            "failed": result.failed,
        },
    }
    return dump_json(SCHEMA, payload)


def noise_text(row: BenchRow) -> str:
    """Why a row's figures are shaky, or "" when the timer was steady."""
    if not row.noisy:
        return ""
    worst = max(row.a.robust_cv, row.b.robust_cv if row.b is not None else 0.0)
    return f"noisy timer (robust CV {worst:.0%}): a quieter machine or more --time-budget helps"


def verdict_text(
    row: BenchRow, labels: tuple[str, str] = LABELS, *, with_noise: bool = True
) -> str:
    """One phrase for a row: the ratio, its interval and the verdict it allows, with the noisy
    flag after it when ``with_noise``."""
    c = row.comparison
    noise = noise_text(row) if with_noise else ""
    if c is None:
        return noise
    a, b = labels
    ci = f"{c.ratio:.3f}× ({c.confidence:.0%} CI {c.ci_low:.3f}–{c.ci_high:.3f})"
    phrase = {
        "B faster": f"{b} is faster than {a}: {ci}",
        "B slower": f"{b} is slower than {a}: {ci}",
        "no difference": f"no difference beyond {c.threshold:g}×: {ci}",
        "inconclusive": f"inconclusive at {c.threshold:g}×: {ci} straddles it; "
        "more --rounds would decide",
    }[c.verdict]
    return f"{phrase}; {noise}" if noise else phrase


def _stats_cells(s: Samples, batch: int) -> list[str]:
    return [
        _ms(s.median),
        _ms(s.percentile(10)),
        _ms(s.percentile(90)),
        _ms(s.percentile(99)),
        f"{s.throughput(batch):,.0f}",
        str(s.n),
    ]


STAT_HEADERS = ["median ms", "p10", "p90", "p99", "samples/s", "iters"]


def latency_table(result: BenchResult, labels: tuple[str, str] = LABELS, title: str = "") -> Table:
    """The rich table: one line per batch size and side, the ratio on B's line."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title or None, title_justify="left", header_style="bold")
    table.add_column("batch", justify="right")
    table.add_column("model")
    for h in STAT_HEADERS:
        table.add_column(h, justify="right")
    if result.b is not None:
        table.add_column(f"{labels[1]}/{labels[0]} (95% CI)", overflow="fold")
    for row in result.rows:
        cells = [str(row.batch_size), labels[0], *_stats_cells(row.a, row.batch_size)]
        table.add_row(*cells, *([""] if result.b is not None else []))
        if row.b is not None:
            style = {"B faster": "green", "B slower": "red", "inconclusive": "yellow"}.get(
                row.verdict or "", ""
            )
            table.add_row(
                "",
                labels[1],
                *_stats_cells(row.b, row.batch_size),
                Text(verdict_text(row, labels), style=style),
            )
        elif row.noisy:
            table.add_row("", "", Text(noise_text(row), style="yellow"))
    return table


def side_lines(result: BenchResult, labels: tuple[str, str] = LABELS) -> list[str]:
    lines = [f"{labels[0]}: {result.a.path} · {result.a.engine}"]
    if result.b is not None:
        lines.append(f"{labels[1]}: {result.b.path} · {result.b.engine}")
    return lines


def memory_line(result: BenchResult) -> str:
    peak = max((r.memory_bytes or 0 for r in result.rows), default=0) or None
    kind = result.rows[0].memory_kind if result.rows else ""
    return f"memory: {_mib(peak)} ({kind})"


def summary_line(result: BenchResult, labels: tuple[str, str] = LABELS) -> str:
    parts = []
    for row in result.rows:
        if row.comparison is None:
            figure = (
                f"median {_ms(row.a.median)} ms, {row.a.throughput(row.batch_size):,.0f} samples/s"
            )
            figure += " (noisy timer)" if row.noisy else ""
        else:
            figure = verdict_text(row, labels, with_noise=False)
            figure += " (noisy timer)" if row.noisy else ""
        parts.append(f"batch {row.batch_size}: {figure}")
    head = result.a.path if result.b is None else f"{result.b.path} vs {result.a.path}"
    tail = ""
    if result.fail_if_slower is not None:
        verdict = "FAILED" if result.failed else "passed"
        tail = f" · --fail-if-slower {result.fail_if_slower:g} {verdict}"
    return f"{head}: {'; '.join(parts)}{tail}"


def render_text(result: BenchResult, console: Console) -> None:
    from rich.text import Text

    for line in side_lines(result):
        console.print(line, style="dim")
    console.print(latency_table(result, title=f"bench on {result.device}"))
    console.print(f"inputs: {result.inputs}", style="dim")
    console.print(memory_line(result), style="dim")
    for note in result.notes:
        console.print(Text(f"note: {note}", style="cyan"))
    style = "bold red" if result.failed else "bold"
    console.print(summary_line(result), style=style)


def markdown_table(result: BenchResult, labels: tuple[str, str] = LABELS) -> list[str]:
    ratio = result.b is not None
    head = ["batch", "model", *STAT_HEADERS] + ([f"{labels[1]}/{labels[0]} (95% CI)"] * ratio)
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for row in result.rows:
        lines.append(
            "| "
            + " | ".join(
                [str(row.batch_size), labels[0], *_stats_cells(row.a, row.batch_size)]
                + ([""] if ratio else [])
            )
            + " |"
        )
        if row.b is not None:
            cells = [
                "",
                labels[1],
                *_stats_cells(row.b, row.batch_size),
                md_escape(verdict_text(row, labels)),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(result: BenchResult) -> str:
    title = result.a.path if result.b is None else f"{result.b.path} vs {result.a.path}"
    lines = [f"### bncheck bench: `{md_escape(title)}`", ""]
    lines += [f"- {md_escape(line)}" for line in side_lines(result)]
    lines += ["", *markdown_table(result), ""]
    for r in result.rows:
        if r.noisy:
            lines.append(f"> **batch {r.batch_size}:** {md_escape(noise_text(r))}")
    lines.append(f"- inputs: {md_escape(result.inputs)}")
    lines.append(f"- {memory_line(result)}")
    lines += [f"- note: {md_escape(n)}" for n in result.notes]
    lines += ["", f"**{md_escape(summary_line(result))}**", ""]
    return "\n".join(lines)


def render_github(result: BenchResult) -> str:
    path = result.b.path if result.b is not None else result.a.path
    lines = []
    for row in result.rows:
        title = f"bncheck bench (batch {row.batch_size})"
        if (
            result.fail_if_slower is not None
            and row.comparison is not None
            and fails_slower(row.comparison, result.fail_if_slower)
        ):
            lines.append(
                f"::error file={path},title={title}::{verdict_text(row)}, more than "
                f"{result.fail_if_slower:g}× slower even at the interval's low end"
            )
        elif row.verdict == "inconclusive" or row.noisy:
            lines.append(f"::warning file={path},title={title}::{verdict_text(row)}")
    lines += [f"::notice file={path},title=bncheck bench::{n}" for n in result.notes]
    lines.append(summary_line(result))
    return "\n".join(lines)
