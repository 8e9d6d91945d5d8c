"""``check --report out.html``: one self-contained page (inline SVG charts, no scripts, no links).

Charts are drawn with matplotlib (the optional extra ``bncheck[report]``) into inline SVG whose
labels stay SVG text (drawn in the browser's sans-serif font), so the page needs nothing from
the network and stays small: about 100 kB for the sample ResNet, where a page embedding
plotly.js weighs several MB. Content: the per-layer score chart with the threshold, the
per-layer table, the output comparison, the findings, and per-channel histograms (mean shift,
log variance ratio) for the worst layers. Written atomically. matplotlib's global settings
are left untouched (``rc_context``).
"""

from __future__ import annotations

import html
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from bncheck.api._check import CheckResult, LayerCheck
from bncheck.api._common import is_folder
from bncheck.atomic import temp_beside
from bncheck.errors import InputError
from bncheck.report import layer_label, origins
from bncheck.report.check import divergence_line, first_line, summary_line

WORST_LAYERS = 4  # histograms for this many layers with the highest scores
SUFFIXES = (".html", ".htm")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;
color:#222;max-width:1100px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em}
td,th{border-bottom:1px solid #ddd;padding:.25em .6em;text-align:right}
td.l,th.l{text-align:left}tr.over td{color:#b00}tr.first td{font-weight:bold}
.error{color:#b00}.warning{color:#a60}.info{color:#06c}.dim{color:#777}
svg{max-width:100%;height:auto}
"""


def require_matplotlib() -> None:
    """Raise InputError when the optional plotting dependency is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError(
            "--report needs matplotlib, which is not installed: pip install 'bncheck[report]'"
        ) from None


def check_report_path(path: str | os.PathLike[str]) -> Path:
    """Refuse a report path that cannot be written, before any work is done."""
    out = Path(path)
    if is_folder(path):
        raise InputError(
            f"{os.fspath(path)}: is a folder, not a file name; give one, e.g. {out / 'check.html'}"
        )
    if out.suffix.lower() not in SUFFIXES:
        raise InputError(f"{out}: the report must end in .html")
    parent = out.parent.resolve()
    if not parent.is_dir():
        raise InputError(f"{out}: folder {out.parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{out}: folder {out.parent} is not writable")
    require_matplotlib()
    return out


def _svg(fig: Any, salt: str) -> str:
    import matplotlib

    buf = io.StringIO()
    # Ids inside inline SVGs share the page's namespace: a salt per figure keeps them apart
    # (and fixed, so the same result gives the same page).
    with matplotlib.rc_context({"svg.hashsalt": f"bncheck-{salt}", "svg.fonttype": "none"}):
        # No metadata block: it carries a date (pages would differ run to run) and links.
        none = dict.fromkeys(("Creator", "Date", "Format", "Type"))
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata=none)
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE: inline SVG


def _figure(width: float, height: float) -> Any:
    # A bare Figure, not pyplot: no global figure registry, no GUI backend.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def layer_chart(result: CheckResult) -> str:
    """Horizontal bars: each measured layer's score (log scale), threshold line, first marked."""
    measured = result.measured
    if not measured:
        return ""
    kl = result.thresholds.layer.kl
    known = origins(result.info)
    names = [layer_label(lc.name, known) for lc in measured]
    floor = kl * 1e-3  # log axis: zero scores sit at the floor
    scores = [
        max(lc.mismatch.score, floor) if math.isfinite(lc.mismatch.score) else kl * 1e4
        for lc in measured
        if lc.mismatch is not None
    ]
    colors = [
        "#b00000" if lc.mismatch is not None and lc.mismatch.over else "#4a9a4a" for lc in measured
    ]
    fig = _figure(9, 0.8 + 0.28 * len(measured))
    ax = fig.add_subplot()
    y = np.arange(len(measured))
    ax.barh(y, scores, color=colors)
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: minor ones collide
    ax.set_xlim(min([*scores, kl]) / 2, max([*scores, kl]) * 3)
    ax.set_yticks(y, [n if len(n) <= 48 else "…" + n[-47:] for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(kl, color="#333", linestyle="--", linewidth=1)
    ax.text(kl, len(measured) - 0.4, f" threshold {kl:g}", fontsize=8, va="top")
    ax.set_xlabel("layer score: KL (nats) of the channel at the max-share quantile")
    nodes = [lc.name for lc in measured]
    if result.first_diverging in nodes:
        i = nodes.index(result.first_diverging)
        ax.annotate(
            "first diverging",
            (scores[i], i),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
            color="#b00000",
            fontweight="bold",
        )
    return _svg(fig, "layers")


def channel_histograms(lc: LayerCheck) -> str:
    """Per-channel histograms of one layer: mean shift (running std) and ln variance ratio;
    titled with the layer's module path where the file records one."""
    if lc.metrics is None:
        return ""
    fig = _figure(9, 2.6)
    for k, (key, label) in enumerate(
        (("mean_shift", "mean shift (running std)"), ("log_var_ratio", "ln(var data / var run)"))
    ):
        ax = fig.add_subplot(1, 2, k + 1)
        vals = np.asarray(lc.metrics[key], dtype=np.float64)
        finite = vals[np.isfinite(vals)]
        if finite.size:
            ax.hist(finite, bins=min(40, max(5, finite.size // 2)), color="#3a6ea5")
        ax.axvline(0, color="#333", linewidth=0.8)
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(label, fontsize=9)
        ax.set_ylabel("channels", fontsize=9)
        if finite.size < vals.size:
            ax.set_title(f"{vals.size - finite.size} non-finite channels left out", fontsize=8)
    fig.suptitle(lc.layer.origin or lc.name, fontsize=10)
    return _svg(fig, f"layer{lc.index}")


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: float) -> str:
    return f"{x:.3g}"


def _table(result: CheckResult) -> str:
    head = (
        "<tr><th>#</th><th class=l>BN layer</th><th>ch</th><th>|shift| med</th>"
        "<th>|shift| max</th><th>|ln var| med</th><th>KL med</th><th>KL max</th>"
        "<th>over</th><th>score</th></tr>"
    )
    rows = [head]
    known = origins(result.info)
    for lc in result.layers:
        label = _esc(layer_label(lc.name, known))
        m = lc.mismatch
        if m is None:
            rows.append(
                f"<tr><td>{lc.index}</td><td class=l>{label}</td>"
                f"<td>{lc.layer.channels}</td><td class='l dim' colspan=7>"
                f"{_esc(lc.skipped or 'not measured')}</td></tr>"
            )
            continue
        cls = " ".join(
            c for c, on in (("over", m.over), ("first", lc.name == result.first_diverging)) if on
        )
        rows.append(
            f"<tr class='{cls}'><td>{lc.index}</td><td class=l>{label}</td>"
            f"<td>{m.channels}</td><td>{_num(m.median_abs_mean_shift)}</td>"
            f"<td>{_num(m.max_abs_mean_shift)}</td><td>{_num(m.median_abs_log_var_ratio)}</td>"
            f"<td>{_num(m.median_kl)}</td><td>{_num(m.max_kl)}</td>"
            f"<td>{m.share_over:.0%}</td><td>{_num(m.score)}</td></tr>"
        )
    return "<table>" + "\n".join(rows) + "</table>"


def render_html(result: CheckResult) -> str:
    """The whole page as one string (inline CSS and SVG)."""
    require_matplotlib()
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>bncheck check: {_esc(result.info.path)}</title><style>{_CSS}</style></head>",
        f"<body><h1>bncheck check: {_esc(result.info.path)}</h1>",
        f"<p>{_esc(result.data)}</p>",
        f"<p><b>{_esc(summary_line(result))}</b></p>",
    ]
    first = first_line(result)
    if first:
        parts.append(f"<p class=error><b>{_esc(first)}</b></p>")
    parts.append(f"<p>{_esc(divergence_line(result))}</p>")
    chart = layer_chart(result)
    if chart:
        parts += ["<h2>Mismatch per layer</h2>", chart]
    parts += ["<h2>Figures per layer</h2>", _table(result)]
    if result.findings:
        parts.append("<h2>Findings</h2><ul>")
        known = origins(result.info)
        for f in result.findings:
            parts.append(
                f"<li><span class={f.severity.value}>{f.severity.value}</span> "
                f"<b>{_esc(f.code)}</b> {_esc(layer_label(f.layer, known))}: {_esc(f.message)}"
                f"<br><span class=dim>fix: {_esc(f.hint)}</span></li>"
            )
        parts.append("</ul>")
    worst = sorted(
        (lc for lc in result.measured if lc.mismatch is not None),
        key=lambda lc: (-_sort_key(lc.mismatch.score), lc.index),
    )[:WORST_LAYERS]
    if worst:
        parts.append(f"<h2>Per-channel figures of the {len(worst)} worst layers</h2>")
        parts += [channel_histograms(lc) for lc in worst]
    if result.notes:
        parts.append("<h2>Notes</h2><ul>")
        parts += [f"<li>{_esc(n)}</li>" for n in result.notes]
        parts.append("</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _sort_key(score: float) -> float:
    return math.inf if math.isnan(score) else score


def write_html(result: CheckResult, path: str | os.PathLike[str]) -> Path:
    """Write :func:`render_html` to ``path`` atomically (temp file in the folder, then rename)."""
    out = check_report_path(path)
    page = render_html(result)
    fd, tmp = temp_beside(out, ".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
