"""Train/test mismatch: the statistics a BN layer sees on data against its running statistics.

Per channel, the data's mean and variance (population, from :class:`bncheck.numerics.Moments`)
are compared with the running ones, each variance taken with the layer's ε added — that is the
variance the layer actually divides by, and it keeps dead channels (σ² ≈ 0 on both sides) from
looking infinitely different. Three figures per channel: the signed mean shift in running-std
units, the log variance ratio and the Gaussian KL divergence, which folds both into one number.

A layer is summarized by how many of its channels diverge (:class:`Thresholds`), and the first
diverging layer in graph order is reported: later layers inherit its shift, so it is where to look.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bncheck.numerics import top1_agreement


def channel_metrics(
    data_mean: np.ndarray,
    data_var: np.ndarray,
    run_mean: np.ndarray,
    run_var: np.ndarray,
    eps: float,
) -> dict[str, np.ndarray]:
    """Per-channel mismatch between data statistics (d) and running statistics (r), float64.

    With ``vd = σd² + ε`` and ``vr = σr² + ε``:

    - ``mean_shift = (μd − μr)/√vr`` (signed, in running-std units),
    - ``log_var_ratio = ln(vd/vr)``,
    - ``kl = KL(N(μd, vd) ‖ N(μr, vr)) = ½[ln(vr/vd) + (vd + (μd − μr)²)/vr − 1]``, in nats.

    KL is evaluated as ``½[(u − ln(1 + u)) + (μd − μr)²/vr]`` with ``u = vd/vr − 1`` (``log1p``
    for |u| < ½) so nearly equal variances do not cancel to a negative number; identical
    statistics give exactly 0. A channel whose statistics (data or running) are non-finite, or
    whose ``σ² + ε ≤ 0``, cannot be measured and is certainly broken: all three figures are
    +inf there, without warnings. Pass the population variance (``Moments.var(ddof=0)``): the
    running variance is unbiased (ddof=1) in PyTorch, a difference of 1/n that is negligible
    for the element counts BN sees.
    """
    md, vd0, mr, vr0 = (
        np.asarray(a, dtype=np.float64) for a in (data_mean, data_var, run_mean, run_var)
    )
    if not (md.ndim == 1 and md.shape == vd0.shape == mr.shape == vr0.shape):
        raise ValueError(
            f"channel statistics must be 1-D of equal length, got data mean {md.shape}, "
            f"data var {vd0.shape}, running mean {mr.shape}, running var {vr0.shape}"
        )
    vd = vd0 + float(eps)
    vr = vr0 + float(eps)
    bad = ~(
        np.isfinite(md) & np.isfinite(vd) & np.isfinite(mr) & np.isfinite(vr) & (vd > 0) & (vr > 0)
    )
    # Neutral values on broken channels so the arithmetic below stays quiet; they become inf.
    md, mr = np.where(bad, 0.0, md), np.where(bad, 0.0, mr)
    vd, vr = np.where(bad, 1.0, vd), np.where(bad, 1.0, vr)
    with np.errstate(over="ignore", invalid="ignore"):
        delta = md - mr
        mean_shift = delta / np.sqrt(vr)
        u = vd / vr - 1.0
        near = np.abs(u) < 0.5
        # log(vd) − log(vr) stays accurate when vd/vr under- or overflows; log1p(u) when u ≈ 0.
        log_ratio = np.where(near, np.log1p(np.where(near, u, 0.0)), np.log(vd) - np.log(vr))
        var_term = np.maximum(u - log_ratio, 0.0)
        kl = 0.5 * (var_term + delta * delta / vr)
    inf = np.inf
    return {
        "mean_shift": np.where(bad, inf, mean_shift),
        "log_var_ratio": np.where(bad, inf, log_ratio),
        "kl": np.where(bad, inf, kl),
    }


@dataclass(frozen=True)
class Thresholds:
    """When a channel, and a layer, count as diverging.

    ``kl = 0.1`` nats per channel corresponds to a mean shift of ≈ 0.45 running std (½δ² = 0.1)
    or a variance off by a factor ≈ 1.6 (or 0.55) with equal means: large enough that the
    normalized activations are visibly off, and about 10× the sampling noise of moments taken
    from only ~50 values per channel (noise in KL ≈ 1/(2n) from the mean plus 1/(2n) from the
    variance), so a small calibration set does not flag healthy layers.

    ``max_share = 0.1``: a layer is flagged when more than 10% of its channels exceed ``kl``.
    A few outlier channels (nearly dead units whose running variance is tiny) are common in
    healthy trained networks and should not flag a layer on their own; a real distribution
    shift moves a large part of the channels at once.
    """

    kl: float = 0.1
    max_share: float = 0.1

    def __post_init__(self) -> None:
        if not (self.kl > 0 and math.isfinite(self.kl)):
            raise ValueError(f"kl threshold must be a positive number, got {self.kl}")
        if not 0 <= self.max_share < 1:
            raise ValueError(f"max_share must be in [0, 1), got {self.max_share}")


@dataclass(frozen=True)
class LayerMismatch:
    """One BN layer's mismatch, summarized over its channels.

    ``score`` is the KL of the (⌊max_share·C⌋ + 1)-th most divergent channel: the layer is
    ``over`` exactly when ``score > thresholds.kl``, i.e. when more than ⌊max_share·C⌋ channels
    exceed the per-channel threshold (``share_over > max_share`` up to that rounding). It reads
    as "at least this many channels diverge at least this much", is robust to a handful of
    outlier channels (unlike the max) and still reacts when a minority shifts (unlike the
    median). ``worst_channel`` is the index of the largest KL.
    """

    name: str
    channels: int
    median_abs_mean_shift: float
    max_abs_mean_shift: float
    median_abs_log_var_ratio: float
    max_abs_log_var_ratio: float
    median_kl: float
    max_kl: float
    worst_channel: int
    share_over: float
    score: float
    over: bool


def summarize_layer(
    name: str, metrics: dict[str, np.ndarray], thresholds: Thresholds | None = None
) -> LayerMismatch:
    """Summarize :func:`channel_metrics` output for one layer (see :class:`LayerMismatch`).

    ``share_over = #{c: kl_c > thresholds.kl}/C``; ``score = sort(kl, descending)[⌊max_share·C⌋]``;
    ``over = score > thresholds.kl``.
    """
    th = thresholds or Thresholds()
    kl = np.asarray(metrics["kl"], dtype=np.float64)
    shift = np.abs(np.asarray(metrics["mean_shift"], dtype=np.float64))
    lvr = np.abs(np.asarray(metrics["log_var_ratio"], dtype=np.float64))
    c = kl.shape[0] if kl.ndim == 1 else 0
    if c == 0 or shift.shape != kl.shape or lvr.shape != kl.shape:
        raise ValueError(f"layer {name}: metrics must be non-empty 1-D arrays of equal length")
    allowed = math.floor(th.max_share * c)  # < c because max_share < 1
    score = float(np.sort(kl)[::-1][allowed])
    return LayerMismatch(
        name=name,
        channels=c,
        median_abs_mean_shift=float(np.median(shift)),
        max_abs_mean_shift=float(shift.max()),
        median_abs_log_var_ratio=float(np.median(lvr)),
        max_abs_log_var_ratio=float(lvr.max()),
        median_kl=float(np.median(kl)),
        max_kl=float(kl.max()),
        worst_channel=int(np.argmax(kl)),
        share_over=float(np.count_nonzero(kl > th.kl)) / c,
        score=score,
        over=score > th.kl,
    )


def first_diverging(layers_in_graph_order: Sequence[LayerMismatch]) -> str | None:
    """Name of the first layer (in graph order) that is ``over``; None when none is.

    Later layers see the shifted activations of that one, so their mismatch is largely
    inherited: the first is where a fix (recalibration, a data check) should start.
    """
    for layer in layers_in_graph_order:
        if layer.over:
            return layer.name
    return None


def output_divergence(
    reference_outputs: Sequence[np.ndarray], candidate_outputs: Sequence[np.ndarray]
) -> dict[str, Any]:
    """How far a model's outputs move (e.g. running statistics vs recalibrated ones).

    ``rel_l2 = ‖a − b‖₂/‖a‖₂`` with a = reference and b = candidate, over all elements of all
    outputs together (float64; 0 when both are zero, inf when only the reference is); ``outputs``
    gives the same figure per output. ``top1_agreement`` is the share of rows whose argmax
    agrees over the 2-D ``[N, classes > 1]`` outputs, None when there is none.
    """
    if len(reference_outputs) != len(candidate_outputs):
        raise ValueError(
            f"{len(reference_outputs)} reference outputs "
            f"but {len(candidate_outputs)} candidate ones"
        )
    per_output = []
    num = den = 0.0
    for k, (ref, cand) in enumerate(zip(reference_outputs, candidate_outputs, strict=True)):
        a = np.asarray(ref, dtype=np.float64)
        b = np.asarray(cand, dtype=np.float64)
        if a.shape != b.shape:
            raise ValueError(f"output {k}: reference shape {a.shape} != candidate {b.shape}")
        n2 = float(np.sum((a - b) ** 2))
        d2 = float(np.sum(a * a))
        num += n2
        den += d2
        per_output.append(_rel(n2, d2))
    return {
        "rel_l2": _rel(num, den),
        "outputs": per_output,
        "top1_agreement": top1_agreement(reference_outputs, candidate_outputs),
    }


def _rel(num_sq: float, den_sq: float) -> float:
    if num_sq == 0.0:
        return 0.0
    if den_sq == 0.0:
        return math.inf
    return math.sqrt(num_sq) / math.sqrt(den_sq)
