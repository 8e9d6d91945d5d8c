"""``optimize``: inspect → recalibrate (with data) → fold → verify → bench, one result.

The output is written only when the fold's verification passes; the latency comparison and
the remaining findings are taken on the file as written (reopened), so they describe what the
user gets.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bncheck.api._bench import BenchResult, Progress, bench
from bncheck.api._bench_inputs import check_device
from bncheck.api._common import as_handle, check_output_path, open_model
from bncheck.api._fold import FoldResult, _allowed_suffixes, fold
from bncheck.api._inspect import InspectResult, inspect
from bncheck.backends import ModelHandle
from bncheck.layers import Finding

#: Default latency budget (seconds per engine and batch size): enough for the interleaved
#: comparison of a small model, short enough that ``make demo`` stays quick.
OPTIMIZE_TIME_BUDGET_S = 0.5


@dataclass
class OptimizeResult:
    """Every stage's result; a stage that did not run is None and says why in ``notes``."""

    before: InspectResult
    fold: FoldResult
    recalibration: Any | None = None  # RecalibrateResult
    bench: BenchResult | None = None
    after: InspectResult | None = None
    output: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """The fold's verification passed (or was not asked for)."""
        return self.fold.passed

    @property
    def findings(self) -> list[Finding]:
        """The findings that remain: on the written model, else on the input."""
        return (self.after or self.before).findings


def _recalibrate(
    handle: ModelHandle, data: str | os.PathLike[str], batch_size: int, notes: list[str]
) -> tuple[Any | None, ModelHandle]:
    from bncheck import api

    recalibrate = getattr(api, "recalibrate", None)
    if recalibrate is None:
        notes.append("recalibration skipped: this bncheck has no recalibrate")
        return None, handle
    if not any(
        layer.track_running_stats and not layer.frozen and layer.running_var is not None
        for layer in handle.info().bn_layers
    ):
        notes.append("recalibration skipped: no BN layer has running statistics")
        return None, handle
    result = recalibrate(handle, None, data=data, batch_size=batch_size)
    return result, result.handle


def optimize(
    model: str | os.PathLike[str] | ModelHandle,
    output: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    calib_batch_size: int = 32,
    affine: bool = False,
    verify: bool = True,
    run_bench: bool = True,
    device: str = "cpu",
    threads: int | None = None,
    batch_sizes: Sequence[int] = (1,),
    time_budget_s: float = OPTIMIZE_TIME_BUDGET_S,
    rounds: int | None = None,
    select: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None,
    in_place: bool = False,
    progress: Progress | None = None,
    **open_options: Any,
) -> OptimizeResult:
    """Make ``model`` as fast as its BN layers allow and prove nothing else changed.

    1. ``inspect`` the input; 2. with ``data``, ``recalibrate`` (exact population statistics,
    batches of ``calib_batch_size``) in memory; 3. ``fold`` that model into ``output``,
    verified on ``data`` (or seeded random input): nothing is written when verification
    fails, and the later stages are skipped; 4. ``bench`` the input against the written model
    on the same engine (interleaved, ratio with its 95% CI); 5. ``inspect`` the written model
    for the findings that remain.
    """
    handle = as_handle(model, **open_options)
    out = check_output_path(handle, output, in_place=in_place, allowed=_allowed_suffixes(handle))
    assert out is not None
    if run_bench:
        check_device(handle, device)  # before anything is written, not after
    notes: list[str] = []
    before = inspect(handle, select=select, ignore=ignore)
    recal = None
    work = handle
    if data is not None:
        recal, work = _recalibrate(handle, data, calib_batch_size, notes)
    else:
        notes.append("recalibration skipped: no --data")
    folded = fold(
        work,
        out,
        data=data,
        verify=verify,
        affine=affine,
        in_place=in_place,
        input_shapes=open_options.get("input_shapes"),  # the verification batch too
    )
    result = OptimizeResult(before=before, fold=folded, recalibration=recal, notes=notes)
    if not folded.passed or folded.output is None:
        notes.append("nothing written: the folded model does not compute the same outputs")
        return result
    result.output = folded.output
    shapes = open_options.get("input_shapes")
    written = open_model(folded.output, input_shapes=shapes)
    result.after = inspect(written, select=select, ignore=ignore)
    if not run_bench:
        notes.append("latency not measured (--no-bench)")
    elif written.framework != handle.framework:
        notes.append(
            f"latency not measured: the input runs on {handle.framework}, the output on "
            f"{written.framework}; compare them with `bncheck bench`"
        )
    else:
        result.bench = bench(
            handle,
            vs=written,
            device=device,
            threads=threads,
            batch_sizes=batch_sizes,
            input_shapes=shapes,
            time_budget_s=time_budget_s,
            rounds=rounds,
            data=data,
            progress=progress,
        )
    return result
