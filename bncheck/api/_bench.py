"""``bench``: latency of a model, or of two models against each other, with honest statistics.

Alone, a model is timed per batch size by ``bncheck.bench.measure`` (warm-up by count and until
the median settles, then a time budget). With ``vs``, A and B run interleaved in alternating
rounds (``bncheck.bench.compare``) so machine drift hits both alike, and the ratio
``median(B) / median(A)`` comes with a paired-round bootstrap 95% CI. Every runner's ``sync``
(``torch.cuda.synchronize`` on CUDA) is handed to the harness, so completed work is timed, not
kernel launches.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bncheck.api._bench_inputs import (
    bench_feeds,
    check_device,
    check_engine,
    check_options,
    check_same_inputs,
    feeds_for,
    latency_runner_for,
)
from bncheck.api._bench_stats import CONFIDENCE, RESAMPLES, hierarchical_bootstrap_ratio
from bncheck.api._common import as_handle, use_data_shapes
from bncheck.backends import ModelHandle
from bncheck.bench import (
    DEFAULT_MARGIN,
    NOISY_CV,
    Comparison,
    Samples,
    compare,
    fails_slower,
    measure,
)
from bncheck.bench import peak_rss_bytes as _peak_rss
from bncheck.errors import InputError
from bncheck.wording import plural

Progress = Callable[[int, "int | None"], None]

DEFAULT_TIME_BUDGET_S = 1.0  # seconds of timed calls per engine and batch size
DEFAULT_ROUNDS = 20  # interleaved A/B rounds
DEFAULT_WARMUP = 10
#: Independent instance pairs (fresh session / module copy per side) a comparison is spread
#: over: where a model's weights land in memory moves its latency by a few percent (±1–6 %
#: measured between two onnxruntime sessions of one small model), a difference the rounds of a
#: single pair cannot see, so the interval must be taken across instances too.
DEFAULT_REPLICATES = 5
MAX_ITERS_PER_ROUND = 200  # beyond this the bootstrap costs more than the extra precision buys
PROGRESS_UNITS = 1000  # progress units per table row


@dataclass
class BenchSide:
    """One model as benchmarked."""

    path: str
    format: str
    framework: str
    engine: str
    bn_layers: int
    folds_bn_itself: bool


@dataclass
class BenchRow:
    """One batch size: A's samples, and with ``vs`` B's and their comparison."""

    batch_size: int
    a: Samples
    b: Samples | None = None
    comparison: Comparison | None = None
    memory_bytes: int | None = None
    memory_kind: str = "peak RSS of the process"

    @property
    def noisy(self) -> bool:
        """The timer's spread is high: a side's robust CV exceeds ``bench.NOISY_CV``. A flag
        beside the figures, not a verdict: the interval already widens with the noise."""
        if self.comparison is not None:
            return self.comparison.noisy
        return self.a.robust_cv > NOISY_CV

    @property
    def verdict(self) -> str | None:
        """With ``vs``, what the ratio's interval allows against the comparison's threshold
        (``B slower`` / ``B faster`` / ``no difference`` / ``inconclusive``); None alone."""
        return None if self.comparison is None else self.comparison.verdict


@dataclass
class BenchResult:
    """What ``bench`` measured: one row per batch size."""

    a: BenchSide
    b: BenchSide | None
    device: str
    threads: int | None
    inputs: str
    rows: list[BenchRow]
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    fail_if_slower: float | None = None

    @property
    def noisy(self) -> bool:
        return any(r.noisy for r in self.rows)

    @property
    def threshold(self) -> float:
        """The ratio the verdicts are judged against: ``fail_if_slower``, else the default
        margin of ``bench.DEFAULT_MARGIN``."""
        return DEFAULT_MARGIN if self.fail_if_slower is None else self.fail_if_slower

    @property
    def failed(self) -> bool:
        """``--fail-if-slower R``: some row's ratio interval lies wholly above ``R``
        (``bench.fails_slower``): its lower bound is above ``R``. Noise widens the interval, so
        it alone never fails; a slowdown whose whole interval is beyond ``R`` always does."""
        if self.fail_if_slower is None:
            return False
        return any(
            r.comparison is not None and fails_slower(r.comparison, self.fail_if_slower)
            for r in self.rows
        )


def _probe(runner: Any, calls: int = 3) -> float:
    """Median seconds of a few calls (sync included), to size warm-up and rounds."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        runner.run()
        if runner.sync is not None:
            runner.sync()
        times.append(time.perf_counter() - t0)
    return max(float(np.median(times)), 1e-7)


def _warmup_calls(warmup: int, budget: float, per_call: float) -> int:
    # Warm-up by count, but never more than one time budget's worth on a slow model.
    return max(min(warmup, 2), min(warmup, int(budget / per_call)))


def _side(handle: ModelHandle, runner: Any) -> BenchSide:
    return BenchSide(
        path=str(handle.path),
        format=handle.format,
        framework=handle.framework,
        engine=runner.engine,
        bn_layers=len(handle.info().bn_layers),
        folds_bn_itself=bool(runner.folds_bn_itself),
    )


def _memory(runners: Sequence[Any]) -> tuple[int | None, str]:
    device = [m for m in (r.peak_memory() for r in runners) if m is not None]
    if device:
        return max(device), "CUDA max allocated"
    return _peak_rss(), "peak RSS of the process"


def bench(
    model: str | os.PathLike[str] | ModelHandle,
    *,
    vs: str | os.PathLike[str] | ModelHandle | None = None,
    device: str = "cpu",
    threads: int | None = None,
    batch_sizes: Sequence[int] = (1,),
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    engine: str | None = None,
    compile: bool = False,
    optimize: bool = True,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
    rounds: int | None = None,
    replicates: int = DEFAULT_REPLICATES,
    warmup: int = DEFAULT_WARMUP,
    data: str | os.PathLike[str] | None = None,
    seed: int = 0,
    fail_if_slower: float | None = None,
    progress: Progress | None = None,
    **open_options: Any,
) -> BenchResult:
    """Time ``model`` (and ``vs``) for each batch size on its own engine.

    Engines: torch eager (``compile``: ``torch.compile``) for PyTorch models, onnxruntime at
    its default optimization level (``optimize=False``: ORT_DISABLE_ALL) for ONNX; ``engine``
    only checks that the model runs on the engine named. Input: seeded N(0, 1) of the model's
    input shape (``input_shapes`` fixes dynamic dims) with the batch dim set to each batch
    size, or the first batch of ``data``.

    Budget, per engine and batch size: alone, ``time_budget_s`` seconds of timed calls, or
    exactly ``rounds`` timed calls when given. With ``vs``: ``rounds`` (default 20)
    interleaved rounds of ``k`` calls per side, ``k = clamp(round(time_budget_s /
    (rounds · t)), 1, 200)`` with ``t`` the mean of the two sides' probed call times, spread
    over ``replicates`` independent instance pairs (``max(2, rounds // replicates)`` rounds
    each); the interval is ``hierarchical_bootstrap_ratio`` over instances and rounds.
    Warm-up of every instance: ``warmup`` calls (fewer when they would exceed the budget), then
    until the median settles.

    Verdicts (``bench.verdict``) are judged against ``fail_if_slower``, a ratio ``R ≥ 1`` of
    B to A, or else ``bench.DEFAULT_MARGIN``; the result fails when some row's interval lies
    wholly above ``R``.
    """
    check_options(
        device, threads, batch_sizes, time_budget_s, rounds, warmup, replicates, vs, fail_if_slower
    )
    shapes = dict(input_shapes) if input_shapes else None
    handle, other = _open_sides(model, vs, shapes, engine, device, compile, open_options)
    if data is not None:
        use_data_shapes(handle, data)  # a state dict runs at its data's shape
    plan = _Plan(
        runner_options=dict(device=device, threads=threads, compile=compile, optimize=optimize),
        time_budget_s=time_budget_s,
        rounds=rounds if rounds is not None else (DEFAULT_ROUNDS if other is not None else None),
        replicates=replicates,
        warmup=warmup,
        seed=seed,
        threshold=DEFAULT_MARGIN if fail_if_slower is None else fail_if_slower,
    )
    rows: list[BenchRow] = []
    notes: list[str] = []
    for i, batch in enumerate(int(b) for b in batch_sizes):
        feeds, inputs = bench_feeds(handle, batch, data, shapes, seed)
        got = len(next(iter(feeds.values())))
        if got != batch:
            notes.append(f"batch size {batch}: ran {plural(got, 'sample')} (all the input had)")
        row_progress = _row_progress(progress, i, len(batch_sizes))
        row, side_a, side_b = _time_batch(handle, other, feeds, got, plan, row_progress)
        rows.append(row)
    return BenchResult(
        a=side_a,
        b=side_b,
        device=device,
        threads=threads,
        inputs=inputs,
        rows=rows,
        settings=plan.settings(compile, optimize, other is not None),
        notes=notes + _engine_notes(side_a, side_b, threads),
        fail_if_slower=fail_if_slower,
    )


@dataclass(frozen=True)
class _Plan:
    """How every batch size is timed (the options of one ``bench`` call)."""

    runner_options: dict[str, Any]
    time_budget_s: float
    rounds: int | None  # None: alone, by time budget
    replicates: int
    warmup: int
    seed: int
    threshold: float

    def settings(self, compile: bool, optimize: bool, versus: bool) -> dict[str, Any]:
        return {
            "time_budget_s": self.time_budget_s,
            "rounds": self.rounds,
            "warmup": self.warmup,
            "optimize": optimize,
            "compile": compile,
            "replicates": self.replicates if versus else None,
            "threshold": self.threshold if versus else None,
        }


def _open_sides(
    model: str | os.PathLike[str] | ModelHandle,
    vs: str | os.PathLike[str] | ModelHandle | None,
    shapes: dict[str, Sequence[int]] | None,
    engine: str | None,
    device: str,
    compile: bool,
    open_options: dict[str, Any],
) -> tuple[ModelHandle, ModelHandle | None]:
    """Open A (and B), refusing an engine, device or --compile they cannot run on."""
    handle = as_handle(model, input_shapes=shapes, **open_options)
    other = None if vs is None else as_handle(vs, input_shapes=shapes, **open_options)
    for h in (handle, other):
        if h is not None:
            check_engine(h, engine)
            check_device(h, device)
    if other is not None:
        check_same_inputs(handle, other)  # before anything is timed
    if compile and all(h is None or h.framework == "onnx" for h in (handle, other)):
        raise InputError(f"{handle.path}: --compile is for PyTorch models; onnxruntime has none")
    return handle, other


def _row_progress(progress: Progress | None, row: int, rows: int) -> Progress:
    """``progress`` in units of the whole run: each row owns ``PROGRESS_UNITS`` of it."""

    def report(done: int, total: int | None) -> None:
        if progress is not None and total:
            units = min(PROGRESS_UNITS, PROGRESS_UNITS * done // total)
            progress(row * PROGRESS_UNITS + units, rows * PROGRESS_UNITS)

    return report


def _time_batch(
    handle: ModelHandle,
    other: ModelHandle | None,
    feeds: dict[str, np.ndarray],
    batch: int,
    plan: _Plan,
    progress: Progress,
) -> tuple[BenchRow, BenchSide, BenchSide | None]:
    """One table row: A alone (``measure``), or A against B over instance pairs."""
    run_a = latency_runner_for(handle, feeds, **plan.runner_options)
    side_a = _side(handle, run_a)
    if other is None:
        samples = _time_alone(run_a, plan, progress)
        memory, kind = _memory([run_a])
        return BenchRow(batch, samples, memory_bytes=memory, memory_kind=kind), side_a, None
    cmp, side_b, memory, kind = _compare_pairs(
        handle, other, feeds, first=run_a, plan=plan, progress=progress
    )
    row = BenchRow(batch, cmp.a, cmp.b, cmp, memory_bytes=memory, memory_kind=kind)
    return row, side_a, side_b


def _time_alone(runner: Any, plan: _Plan, progress: Progress) -> Samples:
    """A time budget of calls (or exactly ``plan.rounds`` calls when given), after warm-up."""
    fixed = plan.rounds is not None
    return measure(
        runner.run,
        warmup=_warmup_calls(plan.warmup, plan.time_budget_s, _probe(runner)),
        min_time_s=0.0 if fixed else plan.time_budget_s,
        min_iters=plan.rounds if fixed else 20,
        max_iters=plan.rounds if fixed else 100_000,
        sync=runner.sync,
        progress=progress,
    )


def _engine_notes(a: BenchSide, b: BenchSide | None, threads: int | None) -> list[str]:
    notes = []
    for side in (a, b):
        if side is not None and side.folds_bn_itself and side.bn_layers:
            notes.append(
                f"{side.path}: onnxruntime at its default level (ORT_ENABLE_ALL) fuses Conv+BN "
                "itself, so folding BN with bncheck cannot make this model faster on this "
                "engine: expect no significant difference"
            )
    if b is not None and a.framework != b.framework:
        notes.append("the two models run on different engines: the ratio compares engines too")
    if threads is None:
        notes.append("threads not fixed (--threads): figures depend on the machine's other load")
    return notes


def _warm(runner: Any, warmup: int, cap_s: float) -> int:
    """Warm one instance up (``warmup`` calls, then until the median settles, at most
    ``cap_s`` seconds more); returns the number of warm-up calls."""
    done = measure(
        runner.run, warmup=warmup, min_time_s=cap_s, min_iters=1, max_iters=1, sync=runner.sync
    )
    return done.warmup_iters + 1


def _compare_pairs(
    handle: ModelHandle,
    other: ModelHandle,
    feeds: dict[str, np.ndarray],
    *,
    first: Any,
    plan: _Plan,
    progress: Progress,
) -> tuple[Comparison, BenchSide, int | None, str]:
    """A against B over ``plan.replicates`` fresh instance pairs, each timed by
    ``bench.compare`` (alternating AB / BA rounds); one instance pair alive at a time."""
    opts, rounds, time_budget_s = plan.runner_options, plan.rounds, plan.time_budget_s
    assert rounds is not None
    feeds_b = feeds_for(other, feeds)
    pairs = max(1, min(plan.replicates, rounds // 2))
    per = max(2, rounds // pairs)
    a_blocks: list[np.ndarray] = []
    b_blocks: list[np.ndarray] = []
    order: list[str] = []
    warm_a = warm_b = 0
    memory: int | None = None
    kind = ""
    side_b: BenchSide | None = None
    k = w = 1
    run_a = first
    for p in range(pairs):
        if run_a is None:
            run_a = latency_runner_for(handle, feeds, **opts)
        run_b = latency_runner_for(other, feeds_b, **opts)
        if side_b is None:
            side_b = _side(other, run_b)
            t_a, t_b = _probe(run_a), _probe(run_b)
            k = min(max(round(time_budget_s / (pairs * per * (t_a + t_b) / 2)), 1), 200)
            w = _warmup_calls(plan.warmup, time_budget_s, max(t_a, t_b))
        cap = time_budget_s / (4 * pairs)
        warm_a += _warm(run_a, w, cap)
        warm_b += _warm(run_b, w, cap)
        done = p * per

        def pair_progress(d: int, _t: int, done: int = done) -> None:
            progress(done + d, pairs * per)

        cmp = compare(
            run_a.run,
            run_b.run,
            rounds=per,
            iters_per_round=k,
            warmup=0,  # warmed above, once per instance
            sync_a=run_a.sync,
            sync_b=run_b.sync,
            seed=plan.seed + p,
            resamples=RESAMPLES,
            confidence=CONFIDENCE,
            progress=pair_progress,
        )
        a_blocks.append(cmp.a.seconds.reshape(per, k))
        b_blocks.append(cmp.b.seconds.reshape(per, k))
        order += cmp.order
        mem, kind = _memory([run_a, run_b])
        memory = mem if memory is None or mem is None else max(memory, mem)
        run_a = run_b = None  # free this pair before the next is built
    a_all, b_all = np.stack(a_blocks), np.stack(b_blocks)
    ratio, low, high = hierarchical_bootstrap_ratio(a_all, b_all, seed=plan.seed)
    comparison = Comparison(
        a=Samples(a_all.ravel(), warmup_iters=warm_a),
        b=Samples(b_all.ravel(), warmup_iters=warm_b),
        ratio=ratio,
        ci_low=low,
        ci_high=high,
        confidence=CONFIDENCE,
        rounds=pairs * per,
        iters_per_round=k,
        resamples=RESAMPLES,
        threshold=plan.threshold,
        order=order,
    )
    assert side_b is not None
    return comparison, side_b, memory, kind
