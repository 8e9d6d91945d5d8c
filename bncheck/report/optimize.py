"""Render an ``OptimizeResult`` (schema ``bncheck.optimize/2``; 2 since its ``bench`` rows use
schema ``bncheck.bench/2``): what changed, the verification, the latency before/after, the findings
that remain."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.text import Text

from bncheck.api._optimize import OptimizeResult
from bncheck.layers import Severity
from bncheck.report import (
    SEVERITY_STYLE,
    counts_text,
    dump_json,
    finding_dict,
    findings_markdown,
    github_lines,
    md_escape,
    print_findings,
    severity_counts,
)
from bncheck.report import bench as bench_rep
from bncheck.report.fold import bn_text, verification_line
from bncheck.wording import plural

SCHEMA = "bncheck.optimize/2"
LABELS = ("original", "optimized")


def _recal_dict(result: OptimizeResult) -> dict[str, Any] | None:
    r = result.recalibration
    if r is None:
        return None
    layers = list(r.layers)
    return {
        "data": r.data,
        "samples": r.samples,
        "batches": r.batches,
        "layers": len(layers),
        "mismatched_before": sum(1 for x in layers if x.before is not None and x.before.over),
        "mismatched_after": sum(1 for x in layers if x.after is not None and x.after.over),
        "accuracy_before": r.accuracy_before,
        "accuracy_after": r.accuracy_after,
    }


def recal_line(result: OptimizeResult) -> str:
    d = _recal_dict(result)
    if d is None:
        skipped = [n for n in result.notes if n.startswith("recalibration skipped")]
        return skipped[0] if skipped else "recalibration skipped"
    acc = ""
    if d["accuracy_before"] is not None and d["accuracy_after"] is not None:
        acc = f", accuracy {d['accuracy_before']:.1%} → {d['accuracy_after']:.1%}"
    return (
        f"recalibrated {plural(d['layers'], 'BN layer')} on {d['data']}: "
        f"layers over the mismatch threshold {d['mismatched_before']} → "
        f"{d['mismatched_after']}{acc}"
    )


def fold_line(result: OptimizeResult) -> str:
    f = result.fold
    if f is None:
        return "fold skipped: the recalibration lowered accuracy (BN405)"
    merged = f", merged {len(f.merges)} Mul/Add" if f.merges else ""
    return (
        f"{bn_text(f)} (BN left: {len(f.folded.bn_layers)}{merged}; parameters "
        f"{f.source.parameters:,} → {f.folded.parameters:,})"
    )


def summary_line(result: OptimizeResult) -> str:
    src = result.before.info.path
    if result.refused:
        return f"{src}: recalibration lowered accuracy (BN405) · no file written"
    if not result.passed:
        return f"{src}: verification FAILED · no file written"
    parts = [f"{src} → {result.output}", fold_line(result).split(" (")[0]]
    b = result.bench
    if b is not None and b.rows:
        parts.append(
            "; ".join(
                f"batch {r.batch_size}: {bench_rep.verdict_text(r, LABELS, with_noise=False)}"
                for r in b.rows
            )
        )
    parts.append(counts_text(severity_counts(result.findings)) + " remain")
    return " · ".join(parts)


def to_json(result: OptimizeResult) -> str:
    f = result.fold
    b = result.bench
    payload = {
        "model": {"path": result.before.info.path, "format": result.before.info.format},
        "output": None if result.output is None else str(result.output),
        "recalibration": _recal_dict(result),
        "fold": None
        if f is None
        else {
            "folded": f.folded_count,
            "affine": f.affine_count,
            "skipped": f.kept_count,
            "merged": len(f.merges),
            "changed": f.changed,
            "unverified": f.unverified,
            "bn_layers_after": len(f.folded.bn_layers),
            "steps": [
                {"layer": s.layer, "into": s.into, "target": s.target, "reason": s.reason}
                for s in f.steps
            ],
            "verification": None if f.verification is None else f.verification.to_dict(),
        },
        "bench": None
        if b is None
        else {
            "model": bench_rep.side_dict(b.a),
            "vs": bench_rep.side_dict(b.b),
            "device": b.device,
            "threads": b.threads,
            "inputs": b.inputs,
            "settings": b.settings,
            "rows": [bench_rep.row_dict(r) for r in b.rows],
            "notes": b.notes,
        },
        "findings_before": [finding_dict(x) for x in result.before.findings],
        "findings": [finding_dict(x) for x in result.findings],
        "notes": result.notes,
        "summary": {
            "passed": result.passed,
            "written": result.output is not None,
            "bn_layers_before": len(result.before.info.bn_layers),
            "bn_layers_after": None if f is None else len(f.folded.bn_layers),
            **severity_counts(result.findings),
        },
    }
    return dump_json(SCHEMA, payload)


def render_text(result: OptimizeResult, console: Console) -> None:
    console.print(f"[bold]optimize {result.before.info.path}[/]")
    console.print(f"  1. inspect: {counts_text(severity_counts(result.before.findings))}")
    console.print(f"  2. {recal_line(result)}")
    if result.recalibration is not None:
        print_findings(console, result.recalibration.findings)
    console.print(f"  3. {fold_line(result)}")
    style = "green" if result.passed else "bold red"
    if result.fold is not None:
        console.print(Text(f"     {verification_line(result.fold)}", style=style))
    if result.bench is not None:
        console.print("  4. latency, original (A) vs optimized (B):")
        for line in bench_rep.side_lines(result.bench, LABELS):
            console.print(f"     {line}", style="dim")
        console.print(bench_rep.latency_table(result.bench, LABELS))
        for note in result.bench.notes:
            console.print(Text(f"note: {note}", style="cyan"))
    for note in result.notes:
        if not note.startswith("recalibration skipped"):
            console.print(Text(f"note: {note}", style="cyan"))
    if result.after is not None:
        remaining = [x for x in result.after.findings if x.severity != Severity.INFO]
        console.print(f"  5. remaining findings: {counts_text(severity_counts(result.findings))}")
        for x in remaining:
            console.print(
                Text.assemble(
                    (f"{x.severity.value:>7} ", SEVERITY_STYLE[x.severity]),
                    (f"{x.code} ", "bold"),
                    f"{x.layer or 'model'}: {x.message}",
                )
            )
    console.print(summary_line(result), style="bold" if result.passed else "bold red")


def render_markdown(result: OptimizeResult) -> str:
    lines = [f"### bncheck optimize: `{md_escape(result.before.info.path)}`", ""]
    lines.append(f"1. inspect: {counts_text(severity_counts(result.before.findings))}")
    lines.append(f"2. {md_escape(recal_line(result))}")
    if result.recalibration is not None:
        lines += findings_markdown(result.recalibration.findings, hints=False)
    verified = "" if result.fold is None else f"; {verification_line(result.fold)}"
    lines.append(f"3. {md_escape(fold_line(result) + verified)}")
    if result.bench is not None:
        lines += ["", *bench_rep.markdown_table(result.bench, LABELS), ""]
        lines += [f"- {md_escape(s)}" for s in bench_rep.side_lines(result.bench, LABELS)]
        lines += [f"- note: {md_escape(n)}" for n in result.bench.notes]
    lines += [f"- note: {md_escape(n)}" for n in result.notes]
    if result.after is not None:
        lines += findings_markdown(result.after.findings, hints=False)
    lines += ["", f"**{md_escape(summary_line(result))}**", ""]
    return "\n".join(lines)


def render_github(result: OptimizeResult) -> str:
    path = result.before.info.path
    lines = []
    if result.recalibration is not None:
        lines += github_lines(path, result.recalibration.findings)
    if result.fold is not None and not result.passed:
        lines.append(
            f"::error file={path},title=bncheck optimize::{verification_line(result.fold)}"
        )
    if result.after is not None:
        lines += github_lines(str(result.output), result.after.findings)
    if result.bench is not None:
        lines += [
            f"::warning file={path},title=bncheck optimize (batch {r.batch_size})::"
            f"{bench_rep.verdict_text(r, LABELS)}"
            for r in result.bench.rows
            if r.noisy or r.verdict == "inconclusive"
        ]
    lines.append(summary_line(result))
    return "\n".join(lines)
