"""``bncheck.api.bench`` on fake and tiny runners: sync inside the timed region, the two-level
bootstrap, option checks. CPU only, a few seconds."""

from __future__ import annotations

import math
import statistics
import threading
import time

import numpy as np
import onnx
import pytest
from conftest import tiny_onnx_model

from bncheck.api import _bench
from bncheck.api._bench import BenchRow, bench
from bncheck.api._bench_inputs import feeds_for
from bncheck.api._bench_stats import expanded_alpha, hierarchical_bootstrap_ratio, t_quantile
from bncheck.backends.base import LatencyRunner
from bncheck.bench import Samples
from bncheck.errors import InputError

WORK_S = 0.004  # what the fake device "computes" per call, after run() has returned


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_onnx_model(), str(path))
    return path


class AsyncFake:
    """run() only queues WORK_S of work on another thread (like a CUDA launch) and returns
    at once; sync() waits for it (like torch.cuda.synchronize)."""

    def __init__(self) -> None:
        self.pending: list[threading.Thread] = []
        self.syncs = 0
        self.runs = 0

    def run(self) -> None:
        t = threading.Thread(target=time.sleep, args=(WORK_S,))
        t.start()
        self.pending.append(t)
        self.runs += 1

    def sync(self) -> None:
        self.syncs += 1
        while self.pending:
            self.pending.pop().join()

    def runner(self) -> LatencyRunner:
        return LatencyRunner(run=self.run, sync=self.sync, engine="fake async")


@pytest.mark.parametrize("with_vs", [False, True])
def test_bench_passes_sync_to_the_harness(tiny, monkeypatch, with_vs):
    fakes: list[AsyncFake] = []

    def fake_runner(handle, feeds, **kw):
        fakes.append(AsyncFake())
        return fakes[-1].runner()

    monkeypatch.setattr(_bench, "latency_runner_for", fake_runner)
    result = bench(
        tiny,
        vs=tiny if with_vs else None,
        time_budget_s=0.05,
        rounds=4 if with_vs else 12,
        replicates=2,
        warmup=0,
    )
    row = result.rows[0]
    samples = [row.a] + ([row.b] if with_vs else [])
    for s in samples:
        # Without sync the harness would time the launch (~0.1 ms); with it, the work.
        assert s.median >= WORK_S, s.median
        assert s.percentile(10) >= WORK_S
    # Every run was followed by a sync: nothing was left queued or timed unfinished.
    assert all(f.syncs == f.runs for f in fakes)
    assert all(not f.pending for f in fakes)


def test_bench_alone_figures(tiny):
    result = bench(tiny, threads=1, batch_sizes=(1,), time_budget_s=0.05, warmup=2)
    (row,) = result.rows
    assert row.batch_size == 1 and row.comparison is None and row.b is None
    assert row.a.n >= 20
    assert row.a.throughput(1) == pytest.approx(1 / row.a.median, rel=1e-12)
    assert row.memory_bytes is not None and row.memory_bytes > 10 * 2**20
    assert row.memory_kind == "peak RSS of the process"
    assert result.a.bn_layers == 1 and result.a.folds_bn_itself  # Conv → BN: ORT fuses it
    assert any("fuses Conv+BN itself" in n for n in result.notes)


def test_fixed_iteration_budget(tiny):
    result = bench(tiny, threads=1, rounds=7, warmup=0, time_budget_s=5.0)
    assert result.rows[0].a.n == 7


def test_optimize_off_is_not_said_to_fold(tiny):
    result = bench(tiny, threads=1, rounds=3, warmup=0, optimize=False)
    assert not result.a.folds_bn_itself
    assert "ORT_DISABLE_ALL" in result.a.engine


def test_hierarchical_bootstrap_point_and_widths():
    rng = np.random.default_rng(1)
    shape = (6, 4, 50)
    a = 1.0 + 0.01 * rng.standard_normal(shape)
    b = 1.1 * (1.0 + 0.01 * rng.standard_normal(shape))
    ratio, low, high = hierarchical_bootstrap_ratio(a, b)
    assert ratio == pytest.approx(float(np.median(b) / np.median(a)), rel=1e-12)
    assert low < ratio < high and low > 1.09 and high < 1.11
    # The same data plus a ±3 % effect per instance pair on B: the interval must widen to
    # cover that spread, not stay at the within-pair width.
    effect = 1.0 + 0.03 * np.array([-1, 1, -1, 1, -1, 1])[:, None, None]
    _, low2, high2 = hierarchical_bootstrap_ratio(a, b * effect)
    assert (high2 - low2) > 3 * (high - low)
    assert low2 < 1.1 < high2


def test_expanded_alpha_andt_quantile():
    # Student-t 97.5 % quantiles from tables: df 4, 10, 30.
    for df, exact in ((4, 2.7764), (10, 2.2281), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(exact, abs=0.01)
    assert expanded_alpha(0.05, 1) == 0.05
    # 2·Φ(−sqrt(5/4)·t_{4,0.975}) with the exact t: 0.00191 (our t is 0.007 short of it).
    exact = 2 * statistics.NormalDist().cdf(-math.sqrt(5 / 4) * 2.7764)
    assert expanded_alpha(0.05, 5) == pytest.approx(exact, abs=1e-4)
    assert expanded_alpha(0.05, 1000) == pytest.approx(0.05, abs=1e-3)


def test_noisy_row_is_flagged_not_judged():
    noisy = Samples(np.array([1.0, 2.0, 3.0, 1.0, 2.5, 0.5, 3.0] * 5))
    row = BenchRow(1, noisy)
    assert noisy.robust_cv > 0.25 and row.noisy and row.verdict is None


def test_feeds_follow_position_when_names_differ(tiny):
    from bncheck.api import open_model

    handle = open_model(tiny)
    x = np.ones((1, 2, 5, 5), np.float32)
    assert feeds_for(handle, {"input": x})["x"] is x


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"fail_if_slower": 1.05}, "--fail-if-slower needs --vs"),
        ({"device": "tpu"}, "--device 'tpu'"),
        ({"batch_sizes": (0,)}, "at least 1"),
        ({"time_budget_s": 0.0}, "--time-budget"),
        ({"threads": 0}, "--threads 0"),
        ({"engine": "torch"}, "engine torch runs PyTorch models"),
    ],
)
def test_bad_options(tiny, kwargs, needle):
    with pytest.raises(InputError) as exc:
        bench(tiny, **kwargs)
    assert needle in str(exc.value)
