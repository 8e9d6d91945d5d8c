"""Tests for bncheck.bench.

Two kinds of runner: a fake clock (the runner advances it by a seeded random duration) makes the
statistics exactly reproducible, so interval-coverage checks cannot flake; real runners that
sleep or spin check the harness against the wall clock with tolerances stated per test.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from bncheck.bench import (
    NOISY_CV,
    Comparison,
    Samples,
    bootstrap_ratio,
    compare,
    fails_slower,
    measure,
    peak_rss_bytes,
    verdict,
)


class FakeClock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: float) -> None:
        self.ns += round(seconds * 1e9)


def noisy(clock: FakeClock, base_s: float, rng: np.random.Generator, sigma: float = 0.05):
    """A runner taking ``base_s · lognormal(0, sigma)`` of fake time: its median is ``base_s``."""
    return lambda: clock.advance(base_s * rng.lognormal(0.0, sigma))


def spin(seconds: float):
    """A runner busy-waiting ``seconds`` of wall time (precise, unlike sleep's overshoot)."""

    def run() -> None:
        end = time.perf_counter_ns() + round(seconds * 1e9)
        while time.perf_counter_ns() < end:
            pass

    return run


# --- Samples ------------------------------------------------------------------------------


def test_samples_statistics_by_hand() -> None:
    s = Samples(np.arange(1, 101, dtype=np.float64) * 1e-3)  # 1 … 100 ms
    assert s.median == pytest.approx(50.5e-3, rel=1e-12)
    assert s.mean == pytest.approx(50.5e-3, rel=1e-12)
    # numpy's linear percentile of 1..100: 1 + q/100 · 99
    assert s.percentile(10) == pytest.approx(10.9e-3, rel=1e-12)
    assert s.percentile(90) == pytest.approx(90.1e-3, rel=1e-12)
    assert s.percentile(99) == pytest.approx(99.01e-3, rel=1e-12)
    std = np.sqrt(100 * 101 / 12) * 1e-3  # ddof=1 std of 1..n is sqrt(n(n+1)/12)
    assert s.std == pytest.approx(std, rel=1e-12)
    assert s.cv == pytest.approx(std / 50.5e-3, rel=1e-12)
    assert s.robust_cv == pytest.approx(1.4826 * 25 / 50.5, rel=1e-12)  # MAD of 1..100 is 25
    assert s.throughput(32) == pytest.approx(32 / 50.5e-3, rel=1e-12)
    d = s.to_dict(batch_size=32)
    assert d["median_ms"] == pytest.approx(50.5, rel=1e-12)
    assert d["p99_ms"] == pytest.approx(99.01, rel=1e-12)
    assert d["min_ms"] == pytest.approx(1.0) and d["max_ms"] == pytest.approx(100.0)
    assert d["iterations"] == 100 and d["batch_size"] == 32
    assert d["throughput_per_s"] == pytest.approx(32 / 50.5e-3, rel=1e-12)
    json.dumps(d)  # JSON-ready: plain floats and ints
    assert "throughput_per_s" not in s.to_dict()


def test_robust_cv_ignores_one_outlier() -> None:
    seconds = np.full(200, 1e-3)
    seconds[::2] *= 1.01
    seconds[0] = 0.1  # one preempted iteration, 100× the rest
    s = Samples(seconds)
    assert s.cv > 1.0  # the classic figure explodes
    assert s.robust_cv < 0.02  # the robust one does not


# --- measure --------------------------------------------------------------------------------


def test_measure_fake_clock_counts_exact() -> None:
    clock = FakeClock()
    calls = []

    def run() -> None:
        calls.append(1)
        clock.advance(1e-3)

    s = measure(run, warmup=10, min_time_s=0.05, min_iters=20, clock=clock)
    # Constant durations settle after exactly 10 warm-up calls; then 50 × 1 ms reach 0.05 s.
    assert s.warmup_iters == 10
    assert s.n == 50
    assert len(calls) == 60
    assert s.median == pytest.approx(1e-3, abs=1e-12)
    # min_iters wins over a reached min_time_s; max_iters wins over both.
    assert measure(run, warmup=0, min_time_s=0.0, min_iters=7, clock=clock).n == 7
    assert measure(run, warmup=0, min_time_s=1.0, max_iters=5, clock=clock).n == 5


def test_measure_warmup_extends_until_settled() -> None:
    def jit_like(clock: FakeClock):
        # slow first calls, like a JIT or a cache fill: 5 × 10 ms, 5 × 5 ms, then 1 ms
        durations = iter([10e-3] * 5 + [5e-3] * 5 + [1e-3] * 1000)
        return lambda: clock.advance(next(durations))

    def warm(warmup: int, min_time_s: float) -> Samples:
        clock = FakeClock()
        return measure(
            jit_like(clock), warmup=warmup, min_time_s=min_time_s, max_iters=20, clock=clock
        )

    # warmup=10 (cap 30): at call 18 the medians of calls 9-13 (1 ms) and 14-18 (1 ms) agree.
    s = warm(10, 1.0)
    assert s.warmup_iters == 18
    assert s.n == 20 and s.median == pytest.approx(1e-3, abs=1e-12)
    # warmup=5: the cap max(3 · 5, 2 · 5) = 15 calls ends the extension before it settles.
    assert warm(5, 1.0).warmup_iters == 15
    # min_time_s=22 ms also caps the extension's time: 5 ms calls 6-9 spend 20 ms, call 10
    # reaches 25 ms > 22 ms, so the warm-up stops after 10 calls.
    assert warm(5, 0.022).warmup_iters == 10


def test_measure_progress_reports_to_the_end() -> None:
    clock = FakeClock()
    seen: list[tuple[int, int]] = []
    s = measure(
        lambda: clock.advance(1e-3),
        warmup=2,
        min_time_s=0.2,
        progress=lambda done, total: seen.append((done, total)),
        clock=clock,
    )
    assert seen[-1] == (s.n, s.n) == (200, 200)
    dones = [d for d, _ in seen]
    assert dones == sorted(dones) and len(seen) >= 100


def test_measure_sleep_runner_median() -> None:
    # sleep never returns early: the median is at least 2 ms. On an idle machine it overshoots
    # by well under 1 ms, but a loaded one can wake it late, so the upper bound is only 5×.
    s = measure(lambda: time.sleep(2e-3), warmup=2, min_time_s=0.05, min_iters=15)
    assert 2e-3 <= s.median <= 10e-3
    assert s.n >= 15


def test_measure_spin_runner_median() -> None:
    # A spin wait never ends before its deadline, and idle ends within a few µs of it; a loaded
    # machine preempts some spins, so only the direction and a 5× bound are asserted.
    s = measure(spin(1e-3), warmup=3, min_time_s=0.05, min_iters=20)
    assert 1e-3 <= s.median <= 5e-3


def test_sync_is_timed_and_called_after_every_call() -> None:
    """A runner that only *schedules* 20 ms of work: without sync the harness would time the
    scheduling alone; with a sync that waits for the work, every sample includes it."""
    pool = ThreadPoolExecutor(max_workers=1)
    pending: list[Future] = []
    log: list[str] = []

    def launch() -> None:
        log.append("run")
        pending.append(pool.submit(time.sleep, 20e-3))

    def sync() -> None:
        log.append("sync")
        while pending:
            pending.pop().result()

    try:
        s = measure(launch, warmup=1, min_time_s=0.0, min_iters=5, max_iters=5, sync=sync)
        assert s.seconds.min() >= 20e-3  # the work itself is inside every sample
        assert log == ["run", "sync"] * (s.warmup_iters + s.n)
        unsynced = measure(launch, warmup=0, min_time_s=0.0, min_iters=5, max_iters=5)
        assert unsynced.median < 4e-3  # without sync: scheduling only, 5× below the work
        sync()
    finally:
        pool.shutdown(wait=True)


# --- compare --------------------------------------------------------------------------------


def test_compare_interleaves_alternating_rounds() -> None:
    log: list[str] = []
    c = compare(
        lambda: log.append("A"),
        lambda: log.append("B"),
        rounds=4,
        iters_per_round=3,
        warmup=0,
    )
    assert "".join(log) == "AAABBBBBBAAAAAABBBBBBAAA"
    assert c.order == ["AB", "BA", "AB", "BA"]
    assert c.a.n == c.b.n == 12


def test_compare_calls_each_sync_after_its_runner() -> None:
    log: list[str] = []
    c = compare(
        lambda: log.append("A"),
        lambda: log.append("B"),
        rounds=2,
        iters_per_round=2,
        warmup=0,
        sync_a=lambda: log.append("a"),
        sync_b=lambda: log.append("b"),
    )
    assert "".join(log) == "AaAaBbBbBbBbAaAa"
    assert c.rounds == 2


def test_compare_two_times_slower_interval_contains_two() -> None:
    clock = FakeClock()
    rng = np.random.default_rng(1)
    c = compare(noisy(clock, 1e-3, rng), noisy(clock, 2e-3, rng), seed=0, clock=clock)
    assert c.ci_low <= 2.0 <= c.ci_high
    assert c.ratio == pytest.approx(2.0, rel=0.02)  # lognormal σ=0.05, 200 samples a side
    assert c.verdict == "B slower"
    assert not c.noisy
    d = c.to_dict(batch_size=4)
    json.dumps(d)
    assert d["ratio"] == c.ratio and d["speedup"] == pytest.approx(1 / c.ratio)
    assert d["a"]["median_ms"] == pytest.approx(1.0, rel=0.02)
    assert d["verdict"] == "B slower" and d["bootstrap"] == "paired rounds"


def test_compare_identical_interval_contains_one() -> None:
    clock = FakeClock()
    rng = np.random.default_rng(2)
    c = compare(noisy(clock, 1e-3, rng), noisy(clock, 1e-3, rng), seed=0, clock=clock)
    assert c.ci_low <= 1.0 <= c.ci_high
    assert c.ci_low >= 1 / 1.02 and c.ci_high <= 1.02
    assert c.verdict == "no difference"
    assert not fails_slower(c, 1.0)


def test_compare_b_faster() -> None:
    clock = FakeClock()
    rng = np.random.default_rng(3)
    c = compare(noisy(clock, 1e-3, rng), noisy(clock, 0.5e-3, rng), clock=clock)
    assert c.ci_high < 1.0 and c.verdict == "B faster"


def test_interleaving_cancels_drift() -> None:
    """The machine slows down 2× during the run; B is 1.5× A throughout. Alternating rounds
    see the same drift on both sides, so the interval still holds the true 1.5."""
    clock = FakeClock()
    rng = np.random.default_rng(4)

    def drifting(base: float):
        def run() -> None:
            slow = 1.0 + clock.ns / 1e9  # +100 % per simulated second
            clock.advance(base * slow * rng.lognormal(0.0, 0.03))

        return run

    c = compare(drifting(2e-3), drifting(3e-3), rounds=20, iters_per_round=10, clock=clock)
    assert clock.ns > 0.9e9  # the drift really reached ~+90 %
    assert c.ci_low <= 1.5 <= c.ci_high


def test_bootstrap_coverage_near_nominal() -> None:
    """Over 60 seeded identical-runner comparisons the 95 % interval holds 1.0 in ≥ 85 %
    (binomial: P(< 51 of 60 | p = 0.95) ≈ 0.3 %); deterministic, since every draw is seeded."""
    hits = 0
    for trial in range(60):
        rng = np.random.default_rng(100 + trial)
        a = 1e-3 * rng.lognormal(0.0, 0.1, size=(20, 10))
        b = 1e-3 * rng.lognormal(0.0, 0.1, size=(20, 10))
        _, low, high = bootstrap_ratio(a, b, seed=trial)
        hits += low <= 1.0 <= high
    assert hits >= 51


def test_noisy_flag() -> None:
    clock = FakeClock()
    rng = np.random.default_rng(5)
    steady = compare(noisy(clock, 1e-3, rng), noisy(clock, 1e-3, rng), clock=clock)
    noisy_b = compare(noisy(clock, 1e-3, rng), noisy(clock, 1e-3, rng, 0.6), clock=clock)
    assert not steady.noisy
    assert noisy_b.b.robust_cv > NOISY_CV and noisy_b.noisy
    assert noisy_b.to_dict()["noisy"] is True


def test_noisy_but_far_slower_is_still_a_verdict() -> None:
    # The case seen under load: B ~5× slower with a noisy timer. The interval, wide as it is,
    # lies wholly above the threshold, so the answer is not in doubt.
    clock = FakeClock()
    rng = np.random.default_rng(6)
    c = compare(noisy(clock, 1e-3, rng, 0.6), noisy(clock, 5e-3, rng, 0.6), clock=clock)
    assert c.noisy and c.ci_low > 1.1
    assert c.verdict == "B slower" and fails_slower(c, 1.1)


def test_compare_real_spin_runners() -> None:
    # Wall-clock check of the whole path: a 5× effect, of which only the direction is
    # asserted, so a loaded machine (a preempted spin lasts longer) cannot flip it.
    c = compare(spin(1e-3), spin(5e-3), rounds=10, iters_per_round=5, warmup=3)
    assert c.ratio > 1.5 and c.ci_low > 1.1
    assert c.verdict == "B slower"


def test_compare_progress_per_round() -> None:
    clock = FakeClock()
    seen: list[tuple[int, int]] = []
    compare(
        lambda: clock.advance(1e-3),
        lambda: clock.advance(1e-3),
        rounds=5,
        warmup=0,
        clock=clock,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


# --- fails_slower / peak_rss -----------------------------------------------------------------


def _comparison(low: float, high: float) -> Comparison:
    s = Samples(np.full(10, 1e-3))
    return Comparison(s, s, (low + high) / 2, low, high, 0.95, 2, 5, 2000)


@pytest.mark.parametrize(
    ("low", "high", "ratio", "fails"),
    [
        (1.06, 1.20, 1.05, True),  # lower bound clears 1.05: fail
        (1.04, 1.30, 1.05, False),  # point estimate 17 % slower, but the bound is within noise
        (1.05, 1.30, 1.05, False),  # exactly at the threshold is not above it
        (0.90, 1.10, 1.0, False),  # an interval holding 1 never fails
        (0.70, 0.90, 1.0, False),  # B faster
        (1.01, 1.02, 1.0, True),  # any significant slowdown fails --fail-if-slower 1
        (4.80, 9.00, 1.1, True),  # wide (noisy) but wholly above: fails
    ],
)
def test_fails_slower(low: float, high: float, ratio: float, fails: bool) -> None:
    assert fails_slower(_comparison(low, high), ratio) is fails


@pytest.mark.parametrize(
    ("low", "high", "threshold", "expected"),
    [
        (4.80, 9.00, 1.1, "B slower"),  # wholly above
        (1.03, 1.05, 1.02, "B slower"),
        (0.50, 0.90, 1.02, "B faster"),  # wholly below 1 / 1.02
        (0.99, 1.01, 1.02, "no difference"),  # inside [1/1.02, 1.02]
        (1.03, 1.08, 1.10, "no difference"),  # significant, but within the user's 1.1
        (0.99, 1.05, 1.02, "inconclusive"),  # straddles 1.02
        (0.95, 1.00, 1.02, "inconclusive"),  # straddles 1 / 1.02
        (0.50, 3.00, 1.02, "inconclusive"),  # straddles both
        (1.00, 1.00, 1.0, "no difference"),
    ],
)
def test_verdict_follows_the_interval(
    low: float, high: float, threshold: float, expected: str
) -> None:
    assert verdict(low, high, threshold) == expected
    c = Comparison(
        Samples(np.full(10, 1e-3)),
        Samples(np.full(10, 1e-3)),
        1.0,
        low,
        high,
        0.95,
        2,
        5,
        2000,
        threshold=threshold,
    )
    assert c.verdict == expected and c.to_dict()["threshold"] == threshold


def test_verdict_threshold_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        verdict(0.9, 1.1, 0.9)


def test_peak_rss_bytes_units() -> None:
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs Linux /proc")
    peak = peak_rss_bytes()
    text = status.read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024
    hwm = int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) * 1024
    assert peak is not None
    # The peak is at least what we hold now, in bytes not KiB; the kernel refreshes ru_maxrss
    # lazily, so RSS read a moment later may sit a few pages above it (1% slack).
    assert rss <= peak * 1.01
    assert peak == pytest.approx(hwm, rel=0.1)  # the kernel's own high-water mark


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        measure(lambda: None, max_iters=0)
    with pytest.raises(ValueError):
        compare(lambda: None, lambda: None, rounds=1)
    with pytest.raises(ValueError):
        compare(lambda: None, lambda: None, resamples=100)
