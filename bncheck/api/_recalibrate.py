"""``recalibrate``: replace BN running statistics by exact population statistics of the data.

Semantics (the "precise BN" of Wu & Johnson 2021; AdaBN of Li et al. 2016 after a shift): the
new statistics of each BN are the mean and variance of that layer's input over the whole data
set, while every BN normalizes with the statistics of its current batch (the behaviour the
layers were trained with) and every other layer runs in inference mode. Moments accumulate in
float64 with Chan's merge, so any batching or number of processes gives the same figures.
``running_var`` is written unbiased, ``M2/(n-1)`` — PyTorch's convention, used for ONNX too so
the .pt2 and .onnx forms of one model end with the same numbers (the population variance
``M2/n`` differs by the factor n/(n−1): under 1e-3 once a channel has seen 1000 values).

``mode="ema"`` instead replays PyTorch's moving average from the stored statistics:
``running = (1-m)·running + m·batch`` with the unbiased batch variance.

Under ``torchrun`` each process reads every WORLD_SIZE-th batch, the per-layer moment vectors
are all-gathered and merged in rank order, and only rank 0 writes.

The result is judged before it is written (``bncheck.rules_data``): with labels, a fall of
top-1 accuracy on the data beyond ``accuracy-drop`` points is BN405 and nothing is written
unless ``force``; without labels, an output change beyond ``output-change`` is BN406, a warning.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bncheck.api._common import as_handle, check_output_path
from bncheck.api._recalibrate_passes import (
    SETTLED,
    Calibration,
    Comparison,
    Ema,
    LayerRecalibration,
    Progress,
    calibration_pass,
    compare_models,
    convergence_warnings,
    gatherer,
    layer_figures,
    new_statistics,
)
from bncheck.backends import ModelHandle
from bncheck.errors import InputError
from bncheck.layers import BNLayer, Finding, ModelInfo
from bncheck.rules_data import (
    RecalibrateThresholds,
    RecalibrationEvidence,
    run_recalibrate_rules,
)
from bncheck.wording import plural

__all__ = ["SETTLED", "LayerRecalibration", "RecalibrateResult", "describe_batches", "recalibrate"]

# Precise-BN papers find 10^3–10^4 samples enough; beyond that the estimate barely moves.
DEFAULT_MAX_SAMPLES = 4096
SMALL_BATCH = 16  # batch statistics of smaller batches are noisy (Wu & Johnson 2021, §4)
# Small batches are worth a warning when they hold more than this share of the samples: a
# trailing batch of 8 after a thousand samples in batches of 32 barely moves the estimate.
SMALL_SHARE = 0.1


@dataclass
class RecalibrateResult:
    """What ``recalibrate`` measured and decided. ``batch_sizes`` holds (size, count) of the
    batches the data formed, largest first; ``output_change`` the relative L2 between the old
    and new model's outputs on the data; ``refused`` is True when BN405 stopped the write."""

    info: ModelInfo
    handle: ModelHandle  # the recalibrated model, usable without writing it
    data: str
    samples: int
    batches: int
    batch_size: int
    mode: str
    layers: list[LayerRecalibration]
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    output: Path | None = None
    world_size: int = 1
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    batch_sizes: list[tuple[int, int]] = field(default_factory=list)
    output_change: float | None = None
    thresholds: RecalibrateThresholds = field(default_factory=RecalibrateThresholds)
    findings: list[Finding] = field(default_factory=list)
    forced: bool = False
    refused: bool = False


@dataclass
class _Data:
    """The batches of this run and what was said about them."""

    source: Any  # DataSource
    labels: np.ndarray | None
    notes: list[str]
    warnings: list[str]


def recalibrate(
    model: str | os.PathLike[str] | ModelHandle,
    output: str | os.PathLike[str] | None = None,
    *,
    data: str | os.PathLike[str],
    batch_size: int = 32,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
    max_batches: int | None = None,
    mode: str = "exact",
    momentum: float | None = None,
    labels: str | os.PathLike[str] | None = None,
    compare: bool = True,
    force: bool = False,
    thresholds: RecalibrateThresholds | Mapping[str, Any] | None = None,
    in_place: bool = False,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    progress: Progress | None = None,
    **open_options: Any,
) -> RecalibrateResult:
    """Recompute every BN's running statistics on ``data``; write ``output`` if given.

    ``mode="exact"``: per BN, over all N elements per channel its input takes in the pass
    (every BN normalizing by batch statistics), ``running_mean = Σx/N`` and
    ``running_var = M2/(N−1)``, accumulated in float64 with Chan's merge. ``mode="ema"``:
    per batch b, ``running ← (1−m)·running + m·stat_b`` from the stored statistics, ``stat_b``
    the batch mean and unbiased batch variance, ``m`` = ``momentum``, else the layer's own
    momentum (a cumulative average, ``m = 1/(num_batches_tracked+1)``, where it is None).
    Statistics are committed only after the whole pass: an interrupted run writes nothing.

    ``compare`` adds one inference-mode pass of the old and the new model over the same
    batches: per-layer mismatch figures, the outputs' relative L2 change and, with ``labels``,
    top-1 accuracy before and after. The result is judged with ``thresholds`` (BN405/BN406,
    see :mod:`bncheck.rules_data`): when accuracy fell (BN405) ``output`` is not written unless
    ``force``. Under torchrun only rank 0 writes ``output``.
    """
    from bncheck import distributed

    rank, world = distributed.world()
    _check_options(mode, momentum, batch_size, world, labels is not None, compare)
    limits = _thresholds(thresholds)
    if input_shapes is not None:
        open_options["input_shapes"] = input_shapes
    handle = as_handle(model, data=data, **open_options)
    suffix = Path(handle.path).suffix.lower()
    out = check_output_path(handle, output, in_place=in_place, allowed=(suffix,) if suffix else ())
    info = handle.info()
    targets = _targets(handle.path, info)
    batches = _open_batches(data, info, labels, batch_size, max_samples, max_batches,
                            open_options.get("input_shapes"))  # fmt: skip
    source = batches.source

    if world > 1:
        distributed.init()
    mine = distributed.shard(source, rank, world)
    gather = gatherer(targets, world)
    ema = Ema(targets, momentum) if mode == "ema" else None
    half_at = (source.num_batches + 1) // 2  # convergence: the first ⌈B/2⌉ batches
    calibration = calibration_pass(handle, mine, (rank, world, half_at), ema, progress)
    calibration = Calibration(gather(calibration.moments), gather(calibration.half))
    stats, num_batches = new_statistics(handle.path, targets, calibration, ema, source.num_batches)
    new = handle.with_stats(stats, num_batches=num_batches)
    comparison = None
    if compare:
        comparison = compare_models(handle, new, info, stats, mine, batches.labels, gather, world)

    result = _result(info, new, mode, world, batches, targets, calibration, comparison)
    _judge(result, limits, force)
    if out is not None and rank == 0:
        _write(result, new, out)
    if world > 1:
        distributed.finish()
    return result


# --- options and data ----------------------------------------------------------------------


def _check_options(
    mode: str, momentum: float | None, batch_size: int, world: int, labels: bool, compare: bool
) -> None:
    if mode not in ("exact", "ema"):
        raise InputError(f"--mode {mode!r}: choose exact or ema")
    if momentum is not None and mode != "ema":
        raise InputError("--momentum applies to --mode ema only")
    if momentum is not None and not 0.0 < momentum <= 1.0:
        raise InputError(f"--momentum {momentum}: must be in (0, 1]")
    if batch_size < 2:
        raise InputError(
            "--batch-size must be at least 2: batch statistics of one sample are undefined"
        )
    if mode == "ema" and world > 1:
        raise InputError("--mode ema replays batches in order: run it in one process")
    if labels and not compare:
        raise InputError("--labels measures accuracy in the before/after pass: drop --no-compare")


def _thresholds(value: RecalibrateThresholds | Mapping[str, Any] | None) -> RecalibrateThresholds:
    if isinstance(value, RecalibrateThresholds):
        return value
    return RecalibrateThresholds.from_mapping(value)


def _targets(path: str, info: ModelInfo) -> list[BNLayer]:
    """The BN layers whose running statistics recalibration replaces."""
    targets = [
        layer
        for layer in info.bn_layers
        if layer.track_running_stats and not layer.frozen and layer.running_var is not None
    ]
    if not targets:
        raise InputError(f"{path}: no BN layer with running statistics to recalibrate")
    return targets


def _open_batches(
    data: str | os.PathLike[str],
    info: ModelInfo,
    labels: str | os.PathLike[str] | None,
    batch_size: int,
    max_samples: int | None,
    max_batches: int | None,
    input_shapes: dict[str, tuple[int, ...]] | None,
) -> _Data:
    """The data as batches that all have batch statistics (≥ 2 samples), with the labels."""
    from bncheck.data import open_data

    def open_source(limit: int | None, batches: int | None) -> Any:
        return open_data(data, inputs=info.inputs, batch_size=batch_size, max_samples=limit,
                         max_batches=batches, input_shapes=input_shapes)  # fmt: skip

    source = open_source(max_samples, max_batches)
    notes: list[str] = []
    if source.num_samples < 2:
        raise InputError(f"{data}: {source.num_samples} sample: batch statistics need at least 2")
    if source.min_batch == 1:
        # A trailing batch of one sample has no batch statistics: leave that sample out.
        source = open_source(source.num_samples - 1, None)
        notes.append("left out the last sample: a batch of one has no batch statistics")
    warnings = _small_batch_warnings(source.bounds)
    label_arr = None if labels is None else _load_labels(labels, source.num_samples)
    return _Data(source, label_arr, notes + list(source.notes), warnings)


def batch_sizes(bounds: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(size, count) of the batches ``bounds`` forms, largest size first."""
    return sorted(Counter(stop - start for start, stop in bounds).items(), reverse=True)


def describe_batches(sizes: list[tuple[int, int]]) -> str:
    """``[(32, 7), (8, 1)]`` → "7 batches of 32 and 1 of 8"; ``[(8, 1)]`` → "1 batch of 8"."""
    parts = [f"{n} of {size}" for size, n in sizes]
    if parts:
        n = sizes[0][1]
        parts[0] = f"{n} batch{'es' if n != 1 else ''} of {sizes[0][0]}"
    return " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 2 else parts)


def _small_batch_warnings(bounds: list[tuple[int, int]]) -> list[str]:
    """A warning when batches of fewer than SMALL_BATCH samples hold more than SMALL_SHARE of
    the data: judged on the batches the data actually formed, not on --batch-size."""
    small = [(size, n) for size, n in batch_sizes(bounds) if size < SMALL_BATCH]
    total = bounds[-1][1] - bounds[0][0]
    if not small or sum(size * n for size, n in small) <= SMALL_SHARE * total:
        return []
    samples = "sample" if small == [(1, 1)] else "samples"
    return [
        f"batch statistics from {describe_batches(small)} {samples} (fewer than {SMALL_BATCH} "
        "per batch) are noisy, and the layers normalize differently than in training: use "
        "more data or a larger --batch-size"
    ]


def _load_labels(path: str | os.PathLike[str], samples: int) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read labels ({exc})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iu":
        raise InputError(f"{path}: labels must be a .npy of integer class indices")
    arr = arr.reshape(-1)
    if len(arr) < samples:
        raise InputError(f"{path}: {plural(len(arr), 'label')} for {plural(samples, 'sample')}")
    return arr


def _result(
    info: ModelInfo,
    new: ModelHandle,
    mode: str,
    world: int,
    batches: _Data,
    targets: list[BNLayer],
    calibration: Calibration,
    comparison: Comparison | None,
) -> RecalibrateResult:
    source = batches.source
    layers = layer_figures(targets, calibration, comparison, source.num_batches)
    notes = list(batches.notes)
    if source.num_batches < 2:
        notes.append("one batch only: convergence over the last half cannot be judged")
    if comparison is None:
        notes.append("no before/after pass (--no-compare): accuracy and output change unchecked")
    return RecalibrateResult(
        info=info,
        handle=new,
        data=source.description,
        samples=source.num_samples,
        batches=source.num_batches,
        batch_size=source.batch_size,
        batch_sizes=batch_sizes(source.bounds),
        mode=mode,
        layers=layers,
        accuracy_before=comparison.accuracy_before if comparison else None,
        accuracy_after=comparison.accuracy_after if comparison else None,
        output_change=comparison.output_change if comparison else None,
        world_size=world,
        notes=notes,
        warnings=batches.warnings + convergence_warnings(info, layers),
    )


def _judge(result: RecalibrateResult, limits: RecalibrateThresholds, force: bool) -> None:
    """BN405/BN406 on the comparison's figures; BN405 refuses the write unless ``force``."""
    evidence = RecalibrationEvidence(
        accuracy_before=result.accuracy_before,
        accuracy_after=result.accuracy_after,
        output_change=result.output_change,
        samples=result.samples,
        thresholds=limits,
    )
    result.thresholds, result.forced = limits, force
    result.findings = run_recalibrate_rules(evidence)
    result.refused = not force and any(f.code == "BN405" for f in result.findings)


def _write(result: RecalibrateResult, new: ModelHandle, out: Path) -> None:
    """Write the recalibrated model, unless the guard refused it (BN405 without force)."""
    if result.refused:
        result.notes.append(f"nothing written to {out}: recalibration lowered accuracy (--force "
                            "writes it anyway)")  # fmt: skip
        return
    new.save(out)
    result.output = out
