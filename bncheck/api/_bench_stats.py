"""Statistics of an A/B comparison spread over independent instance pairs (pure numpy).

``bncheck.bench.compare`` gives the paired-round bootstrap of one pair of runners. Where a
model's weights land in memory moves its latency by a few percent (±1–6 % between two
onnxruntime sessions of the same small model, measured), so one pair's interval answers "is
this session of B faster than this session of A", not "is B faster than A". The two-level
bootstrap here resamples instance pairs and then rounds, with a small-sample expansion.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

__all__ = [
    "CONFIDENCE",
    "RESAMPLES",
    "expanded_alpha",
    "hierarchical_bootstrap_ratio",
    "t_quantile",
]

RESAMPLES = 4000  # the expanded interval reads quantiles near 0.1 %: more resamples
CONFIDENCE = 0.95


def hierarchical_bootstrap_ratio(
    a: np.ndarray,
    b: np.ndarray,
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Ratio of medians and its two-level percentile bootstrap interval.

    ``a``, ``b``: shape ``(instances, rounds, iters)``, instance ``s`` of A timed interleaved
    with instance ``s`` of B. Point estimate ``median(B) / median(A)`` over all samples. Each
    of ``resamples`` draws picks instances ``s_1 … s_S`` with replacement and, within each
    drawn instance, rounds ``r_1 … r_R`` with replacement (the same indices for A and B, so
    pairs and rounds stay paired), and computes ``median(B[drawn]) / median(A[drawn])``; the
    interval is that statistic's ``α'/2`` and ``1 − α'/2`` quantiles. Resampling both levels
    carries the between-instance spread into the interval (a round-only bootstrap of one pair
    is far too narrow for "is B faster than A").

    With few instances a percentile interval is too narrow, so it is *expanded* (Hesterberg,
    "What teachers should know about the bootstrap", 2015, §5.4): with ``S ≥ 2`` instances,
    ``α' = 2·Φ(−sqrt(S / (S − 1)) · t_{S−1, 1−α/2})``, ``α = 1 − confidence``; with one
    instance ``α' = α`` (the paired round bootstrap of ``bench.bootstrap_ratio``).
    Returns ``(ratio, low, high)``.
    """
    n_inst, n_rounds, _ = a.shape
    ratio = float(np.median(b) / np.median(a))
    rng = np.random.default_rng(seed)
    inst = rng.integers(0, n_inst, size=(resamples, n_inst))
    rnd = rng.integers(0, n_rounds, size=(resamples, n_inst, n_rounds))
    stats = np.empty(resamples)
    chunk = max(1, (4 << 20) // a.size)  # ≤ 4 Mi floats per side per chunk
    for s in range(0, resamples, chunk):
        ii = inst[s : s + chunk][:, :, None]
        rr = rnd[s : s + chunk]
        n = len(ii)
        med_a = np.median(a[ii, rr].reshape(n, -1), axis=1)
        med_b = np.median(b[ii, rr].reshape(n, -1), axis=1)
        stats[s : s + n] = med_b / med_a
    alpha = expanded_alpha(1.0 - confidence, n_inst)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return ratio, float(low), float(high)


def t_quantile(p: float, df: int) -> float:
    """Student-t quantile by its Cornish–Fisher expansion in ``1/df`` (Abramowitz & Stegun
    26.7.5): within 0.01 of the exact value for df ≥ 3 at p = 0.975."""
    z = statistics.NormalDist().inv_cdf(p)
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def expanded_alpha(alpha: float, n: int) -> float:
    """``2·Φ(−sqrt(n/(n−1)) · t_{n−1, 1−α/2})`` for ``n ≥ 2``, else ``alpha``."""
    if n < 2:
        return alpha
    t = t_quantile(1 - alpha / 2, n - 1)
    return 2 * statistics.NormalDist().cdf(-math.sqrt(n / (n - 1)) * t)
