"""Latency harness: warm-up, timed iterations, interleaved A/B rounds, a CI of the ratio.

Framework-neutral: a backend hands over a *runner*, a callable ``() -> None`` that runs one
inference on inputs bound beforehand and returns when the result is complete. Where work is
queued asynchronously the harness cannot see it finish, so pass ``sync``: it is called after
every call (warm-up and timed) *inside* the timed region. **CUDA runners must pass
``sync=torch.cuda.synchronize``** (or their own stream's ``synchronize``), otherwise only the
kernel launches are timed. Timing uses ``time.perf_counter_ns``.

Comparisons interleave A and B in rounds whose order alternates (A,B then B,A …), so slow drift
of the machine (clock scaling, thermal, a neighbour's load) hits both sides alike, and neither
always runs second on warm caches. The confidence interval of the ratio ``median(B) / median(A)``
comes from a *paired round bootstrap*: each resample draws ``rounds`` round indices with
replacement, takes the same rounds for both sides (keeping the drift pairing), and computes the
ratio of the pooled medians of the drawn rounds; the interval is the percentile interval of
those ratios. Resampling rounds rather than single iterations respects the correlation between
iterations run back to back, which an iteration bootstrap would ignore (and so be too narrow).

This module never imports a framework or ``rich``; progress goes through a plain callback.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_MARGIN",
    "NOISY_CV",
    "Comparison",
    "Samples",
    "bootstrap_ratio",
    "compare",
    "fails_slower",
    "measure",
    "peak_rss_bytes",
    "verdict",
]

Runner = Callable[[], None]
Progress = Callable[[int, int], None]
Clock = Callable[[], int]

#: A side whose robust coefficient of variation (1.4826·MAD / median) exceeds this has a noisy
#: timer: ``Comparison.noisy`` flags it. The verdict still follows the interval, which noise
#: already widens; a flag tells the reader why an interval is wide.
NOISY_CV = 0.25
#: Without a threshold of the user's, ratios within 2 % of 1 either way count as no difference
#: (the fold's latency target; run-to-run drift on a shared machine is of this order).
DEFAULT_MARGIN = 1.02

SETTLE_WINDOW = 5  # warm-up settles when the median of the last 5 calls …
SETTLE_REL = 0.02  # … moves less than 2 % against the median of the 5 before


@dataclass(frozen=True, eq=False)
class Samples:
    """Per-iteration wall times of one runner, in seconds (float64)."""

    seconds: np.ndarray
    warmup_iters: int = 0

    @property
    def n(self) -> int:
        return len(self.seconds)

    @property
    def median(self) -> float:
        return float(np.median(self.seconds))

    @property
    def mean(self) -> float:
        return float(np.mean(self.seconds))

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0–100), linear interpolation between order statistics."""
        return float(np.percentile(self.seconds, q))

    @property
    def std(self) -> float:
        """Sample standard deviation, ``sqrt(Σ(x − mean)² / (n − 1))`` (0 for one sample)."""
        return float(np.std(self.seconds, ddof=1)) if self.n > 1 else 0.0

    @property
    def cv(self) -> float:
        """Coefficient of variation ``std / mean``; one preempted iteration can inflate it."""
        return self.std / self.mean if self.mean > 0 else 0.0

    @property
    def robust_cv(self) -> float:
        """``1.4826 · median(|x − median|) / median``: equals ``cv`` for Gaussian noise, but is
        not moved by a few outliers. ``Comparison.noisy`` is judged on it."""
        med = self.median
        mad = float(np.median(np.abs(self.seconds - med)))
        return 1.4826 * mad / med if med > 0 else 0.0

    def throughput(self, batch_size: int) -> float:
        """Samples per second at the median: ``batch_size / median``."""
        return batch_size / self.median if self.median > 0 else math.inf

    def to_dict(self, batch_size: int | None = None) -> dict[str, Any]:
        """JSON-ready figures. Keys: ``iterations``, ``warmup_iterations``, ``median_ms``,
        ``mean_ms``, ``min_ms``, ``max_ms``, ``p10_ms``, ``p90_ms``, ``p99_ms``, ``std_ms``
        (times in milliseconds), ``cv``, ``robust_cv`` (ratios), and with ``batch_size`` also
        ``batch_size`` and ``throughput_per_s`` (samples per second at the median)."""
        ms = 1e3
        out: dict[str, Any] = {
            "iterations": self.n,
            "warmup_iterations": self.warmup_iters,
            "median_ms": self.median * ms,
            "mean_ms": self.mean * ms,
            "min_ms": float(self.seconds.min()) * ms,
            "max_ms": float(self.seconds.max()) * ms,
            "p10_ms": self.percentile(10) * ms,
            "p90_ms": self.percentile(90) * ms,
            "p99_ms": self.percentile(99) * ms,
            "std_ms": self.std * ms,
            "cv": self.cv,
            "robust_cv": self.robust_cv,
        }
        if batch_size is not None:
            out["batch_size"] = batch_size
            out["throughput_per_s"] = self.throughput(batch_size)
        return out


def _timed(runner: Runner, sync: Callable[[], None] | None, clock: Clock) -> float:
    t0 = clock()
    runner()
    if sync is not None:
        sync()
    return (clock() - t0) * 1e-9


def _settled(times: list[float]) -> bool:
    k = SETTLE_WINDOW
    if len(times) < 2 * k:
        return False
    last = float(np.median(times[-k:]))
    prev = float(np.median(times[-2 * k : -k]))
    return prev > 0 and abs(last - prev) / prev < SETTLE_REL


def _warm_up(
    runner: Runner,
    sync: Callable[[], None] | None,
    warmup: int,
    clock: Clock,
    time_cap_s: float | None,
) -> list[float]:
    """``warmup`` calls, then more until the running median settles (see ``_settled``).

    The extension is capped at ``max(3 · warmup, 2 · SETTLE_WINDOW)`` calls in all, and at
    ``time_cap_s`` seconds beyond the fixed calls, so a noisy machine cannot stall here.
    """
    times = [_timed(runner, sync, clock) for _ in range(warmup)]
    if warmup == 0:
        return times
    cap = max(3 * warmup, 2 * SETTLE_WINDOW)
    start = clock()
    while len(times) < cap and not _settled(times):
        if time_cap_s is not None and (clock() - start) * 1e-9 > time_cap_s:
            break
        times.append(_timed(runner, sync, clock))
    return times


def measure(
    runner: Runner,
    *,
    warmup: int = 10,
    min_time_s: float = 1.0,
    max_iters: int = 10_000,
    min_iters: int = 20,
    sync: Callable[[], None] | None = None,
    progress: Progress | None = None,
    clock: Clock = time.perf_counter_ns,
) -> Samples:
    """Time ``runner``: warm up, then call it until ``min_time_s`` has passed *and* at least
    ``min_iters`` calls were timed, never more than ``max_iters``.

    Each sample is ``clock()`` after ``runner(); sync()`` minus ``clock()`` before, in seconds.
    ``progress(done, total)`` is called now and then with an estimated total; ``clock``
    (nanoseconds) is replaceable for tests.
    """
    if max_iters < 1 or min_iters < 1 or warmup < 0:
        raise ValueError("max_iters and min_iters must be ≥ 1 and warmup ≥ 0")
    min_iters = min(min_iters, max_iters)
    warm = _warm_up(runner, sync, warmup, clock, min_time_s)
    if warm and np.median(warm) > 0:
        estimate = math.ceil(min_time_s / float(np.median(warm)))
        total = min(max(estimate, min_iters), max_iters)
    else:
        total = min_iters
    every = max(1, total // 100)  # the callback draws a bar: keep it off the hot loop
    times: list[float] = []
    start = clock()
    while len(times) < max_iters and (
        len(times) < min_iters or (clock() - start) * 1e-9 < min_time_s
    ):
        times.append(_timed(runner, sync, clock))
        if progress is not None and len(times) % every == 0:
            progress(len(times), max(total, len(times)))
    if progress is not None:
        progress(len(times), len(times))
    return Samples(np.asarray(times, dtype=np.float64), warmup_iters=len(warm))


@dataclass(frozen=True, eq=False)
class Comparison:
    """A against B. ``ratio = median(B) / median(A)``: above 1 means B is slower."""

    a: Samples
    b: Samples
    ratio: float
    ci_low: float
    ci_high: float
    confidence: float
    rounds: int
    iters_per_round: int
    resamples: int
    threshold: float = DEFAULT_MARGIN
    noisy_cv: float = NOISY_CV
    order: list[str] = field(default_factory=list, repr=False)  # "AB" / "BA" per round

    @property
    def verdict(self) -> str:
        """What the interval allows against ``threshold``: see ``verdict()``."""
        return verdict(self.ci_low, self.ci_high, self.threshold)

    @property
    def noisy(self) -> bool:
        """Either side's robust CV exceeds ``noisy_cv``: a flag beside the verdict."""
        return self.a.robust_cv > self.noisy_cv or self.b.robust_cv > self.noisy_cv

    def to_dict(self, batch_size: int | None = None) -> dict[str, Any]:
        """JSON-ready. Keys: ``a``, ``b`` (``Samples.to_dict``), ``ratio`` (median B / median A),
        ``speedup`` (its inverse), ``ci_low``, ``ci_high``, ``confidence``, ``threshold``,
        ``verdict``, ``noisy``, ``noisy_cv``, ``rounds``, ``iters_per_round``, ``resamples``,
        ``bootstrap`` (the method, ``"paired rounds"``)."""
        return {
            "a": self.a.to_dict(batch_size),
            "b": self.b.to_dict(batch_size),
            "ratio": self.ratio,
            "speedup": 1.0 / self.ratio if self.ratio > 0 else math.inf,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "confidence": self.confidence,
            "threshold": self.threshold,
            "verdict": self.verdict,
            "noisy": self.noisy,
            "noisy_cv": self.noisy_cv,
            "rounds": self.rounds,
            "iters_per_round": self.iters_per_round,
            "resamples": self.resamples,
            "bootstrap": "paired rounds",
        }


def bootstrap_ratio(
    a_rounds: np.ndarray,
    b_rounds: np.ndarray,
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Ratio of medians and its paired-round percentile bootstrap interval.

    ``a_rounds``, ``b_rounds``: shape ``(rounds, iters)``. Point estimate
    ``median(B) / median(A)`` over all samples; each of ``resamples`` draws picks round indices
    ``i_1 … i_R`` uniformly with replacement (one seeded ``np.random.Generator``) and computes
    ``median(B[i_·]) / median(A[i_·])``; the interval is that statistic's
    ``(1 ± confidence) / 2`` quantiles. Returns ``(ratio, low, high)``.
    """
    rounds, iters = a_rounds.shape
    ratio = float(np.median(b_rounds) / np.median(a_rounds))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, rounds, size=(resamples, rounds))
    stats = np.empty(resamples)
    chunk = max(1, (4 << 20) // (rounds * iters))  # ≤ 4 Mi floats per side per chunk
    for s in range(0, resamples, chunk):
        sel = idx[s : s + chunk]
        med_a = np.median(a_rounds[sel].reshape(len(sel), -1), axis=1)
        med_b = np.median(b_rounds[sel].reshape(len(sel), -1), axis=1)
        stats[s : s + chunk] = med_b / med_a
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return ratio, float(low), float(high)


def compare(
    runner_a: Runner,
    runner_b: Runner,
    *,
    rounds: int = 20,
    iters_per_round: int = 10,
    warmup: int = 10,
    sync_a: Callable[[], None] | None = None,
    sync_b: Callable[[], None] | None = None,
    seed: int = 0,
    resamples: int = 2000,
    confidence: float = 0.95,
    threshold: float = DEFAULT_MARGIN,
    progress: Progress | None = None,
    clock: Clock = time.perf_counter_ns,
) -> Comparison:
    """Time A and B in ``rounds`` interleaved rounds of ``iters_per_round`` calls each.

    Both sides warm up first (as in ``measure``). Round ``r`` runs A then B when ``r`` is
    even, B then A when odd. The ratio's interval is ``bootstrap_ratio`` over the rounds; the
    verdict is judged against ``threshold``.
    ``progress(done_rounds, rounds)`` after each round.
    """
    if rounds < 2 or iters_per_round < 1:
        raise ValueError("compare needs rounds ≥ 2 and iters_per_round ≥ 1")
    if resamples < 2000:
        raise ValueError("use at least 2000 bootstrap resamples")
    warm_a = _warm_up(runner_a, sync_a, warmup, clock, None)
    warm_b = _warm_up(runner_b, sync_b, warmup, clock, None)
    a = np.empty((rounds, iters_per_round))
    b = np.empty((rounds, iters_per_round))
    sides = {"A": (runner_a, sync_a, a), "B": (runner_b, sync_b, b)}
    order = []
    for r in range(rounds):
        seq = "AB" if r % 2 == 0 else "BA"
        order.append(seq)
        for side in seq:
            run, sync, out = sides[side]
            for i in range(iters_per_round):
                out[r, i] = _timed(run, sync, clock)
        if progress is not None:
            progress(r + 1, rounds)
    ratio, low, high = bootstrap_ratio(a, b, resamples=resamples, confidence=confidence, seed=seed)
    return Comparison(
        a=Samples(a.ravel(), warmup_iters=len(warm_a)),
        b=Samples(b.ravel(), warmup_iters=len(warm_b)),
        ratio=ratio,
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        rounds=rounds,
        iters_per_round=iters_per_round,
        resamples=resamples,
        threshold=threshold,
        order=order,
    )


def verdict(ci_low: float, ci_high: float, threshold: float = DEFAULT_MARGIN) -> str:
    """The verdict a ratio interval ``[ci_low, ci_high]`` of ``median(B) / median(A)`` allows,
    against a threshold ``T ≥ 1`` and its inverse:

    - ``B slower`` when ``ci_low > T`` (the whole interval is beyond the threshold);
    - ``B faster`` when ``ci_high < 1 / T``;
    - ``no difference`` when ``1 / T ≤ ci_low`` and ``ci_high ≤ T`` (it sits inside);
    - ``inconclusive`` otherwise: the interval straddles ``T`` or ``1 / T``.

    A noisy timer widens the interval; it does not change this rule, so an interval that lies
    far beyond the threshold is a verdict however noisy the machine was.
    """
    if threshold < 1.0:
        raise ValueError("the threshold is a ratio ≥ 1")
    if ci_low > threshold:
        return "B slower"
    if ci_high < 1.0 / threshold:
        return "B faster"
    if ci_low >= 1.0 / threshold and ci_high <= threshold:
        return "no difference"
    return "inconclusive"


def fails_slower(comparison: Comparison, ratio: float) -> bool:
    """``--fail-if-slower R``: True exactly when the interval's lower bound is above ``R``, i.e.
    B is more than ``R`` times slower than A even at the low end of the interval; noise that
    leaves the lower bound at or below ``R`` never fails a CI run."""
    return comparison.ci_low > ratio


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process in bytes (``ru_maxrss``: KiB on Linux, bytes on
    macOS), or None where ``resource`` does not exist (Windows). CUDA memory is the backend's."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
