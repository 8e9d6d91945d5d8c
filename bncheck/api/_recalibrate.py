"""``recalibrate``: replace BN running statistics by exact population statistics of the data.

Semantics (the "precise BN" of Wu & Johnson 2021; AdaBN of Li et al. 2016 after a shift): the
new statistics of each BN are the mean and variance of that layer's input over the whole data
set, while every BN normalizes with the statistics of its current batch (the behaviour the
layers were trained with) and every other layer runs in inference mode. Moments accumulate in
float64 with Chan's merge, so any batching or number of processes gives the same figures.
``running_var`` is written unbiased, ``M2/(n-1)`` — PyTorch's convention, used for ONNX too so
the .pt2 and .onnx forms of one model end with the same numbers.

``mode="ema"`` instead replays PyTorch's moving average from the stored statistics:
``running = (1-m)·running + m·batch`` with the unbiased batch variance.

Under ``torchrun`` each process reads every WORLD_SIZE-th batch, the per-layer moment vectors
are all-gathered and merged in rank order, and only rank 0 writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bncheck.api._common import as_handle, check_output_path
from bncheck.backends import ModelHandle
from bncheck.errors import InputError
from bncheck.layers import ModelInfo
from bncheck.mismatch import LayerMismatch, channel_metrics, summarize_layer
from bncheck.numerics import Moments

# Precise-BN papers find 10^3–10^4 samples enough; beyond that the estimate barely moves.
DEFAULT_MAX_SAMPLES = 4096
SMALL_BATCH = 16  # batch statistics of smaller batches are noisy (Wu & Johnson 2021, §4)
# The estimate from the first half of the data and the final one differ by less than this
# (mean in running-std units, variance relatively) when it has settled.
SETTLED = 0.05

Progress = Callable[[int, "int | None"], None]


@dataclass
class LayerRecalibration:
    name: str
    before: LayerMismatch | None  # stored stats vs what the layer sees on the data
    after: LayerMismatch | None  # new stats vs what the layer sees with them
    mean_change: float | None  # last-half change of the mean, in std units (max over channels)
    var_change: float | None  # last-half relative change of the variance (max over channels)

    @property
    def converged(self) -> bool | None:
        if self.mean_change is None or self.var_change is None:
            return None
        return self.mean_change < SETTLED and self.var_change < SETTLED


@dataclass
class RecalibrateResult:
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


def _merge(acc: dict[str, Moments], new: dict[str, Moments]) -> None:
    for k, m in new.items():
        acc[k] = acc[k] + m if k in acc else m


def _rel_change(half: Moments, full: Moments) -> tuple[float, float]:
    std = np.sqrt(np.maximum(full.var(1), 1e-12))
    mean_change = float(np.max(np.abs(full.mean - half.mean) / std))
    var_change = float(np.max(np.abs(full.var(1) - half.var(1)) / np.maximum(full.var(1), 1e-12)))
    return mean_change, var_change


def _inference_pass(
    handle: ModelHandle, source: Any, labels: np.ndarray | None, shard: Callable[[int], bool]
) -> tuple[dict[str, Moments], float | None]:
    runner = handle.moment_runner(batch_stats=False)
    acc: dict[str, Moments] = {}
    hits = seen = 0
    for i, batch in enumerate(source):
        if not shard(i):
            continue
        outs, moments = runner(batch)
        _merge(acc, moments)
        if labels is not None:
            n = len(next(iter(batch.values())))
            start = i * source.batch_size
            pred = np.asarray(outs[0]).reshape(n, -1).argmax(axis=1)
            hits += int((pred == labels[start : start + n]).sum())
            seen += n
    return acc, (hits / seen if seen else None)


def _mismatch(info: ModelInfo, stats: dict[str, tuple[np.ndarray, np.ndarray]] | None,
              moments: dict[str, Moments]) -> dict[str, LayerMismatch]:  # fmt: skip
    out = {}
    for layer in info.bn_layers:
        m = moments.get(layer.name)
        if m is None or m.count < 2:
            continue
        if stats is not None and layer.name in stats:
            mean, var = stats[layer.name]
        elif layer.running_mean is not None and layer.running_var is not None:
            mean, var = layer.running_mean, layer.running_var
        else:
            continue
        metrics = channel_metrics(m.mean, m.var(0), mean, var, layer.eps)
        out[layer.name] = summarize_layer(layer.name, metrics)
    return out


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
    in_place: bool = False,
    progress: Progress | None = None,
    **open_options: Any,
) -> RecalibrateResult:
    """Recompute every BN's running statistics on ``data``; write ``output`` if given.

    Statistics are committed only after the whole pass: an interrupted run writes nothing.
    ``compare`` adds a pass before and after in inference mode for the mismatch figures (and the
    accuracy, with ``labels``).
    """
    from bncheck import distributed
    from bncheck.data import open_data

    if mode not in ("exact", "ema"):
        raise InputError(f"--mode {mode!r}: choose exact or ema")
    if momentum is not None and not 0.0 < momentum <= 1.0:
        raise InputError(f"--momentum {momentum}: must be in (0, 1]")
    if batch_size < 2:
        raise InputError(
            "--batch-size must be at least 2: batch statistics of one sample are undefined"
        )
    handle = as_handle(model, **open_options)
    suffix = Path(handle.path).suffix.lower()
    out = check_output_path(handle, output, in_place=in_place, allowed=(suffix,) if suffix else ())
    info = handle.info()
    targets = [
        layer
        for layer in info.bn_layers
        if layer.track_running_stats and not layer.frozen and layer.running_var is not None
    ]
    if not targets:
        raise InputError(f"{handle.path}: no BN layer with running statistics to recalibrate")
    notes: list[str] = []
    warnings: list[str] = []
    source = open_data(
        data,
        inputs=info.inputs,
        batch_size=batch_size,
        max_samples=max_samples,
        max_batches=max_batches,
        input_shapes=open_options.get("input_shapes"),
    )
    if source.num_samples < 2:
        raise InputError(f"{data}: {source.num_samples} sample: batch statistics need at least 2")
    if source.min_batch == 1:
        # A trailing batch of one sample has no batch statistics: leave that sample out.
        source = open_data(
            data,
            inputs=info.inputs,
            batch_size=batch_size,
            max_samples=source.num_samples - 1,
            input_shapes=open_options.get("input_shapes"),
        )
        notes.append("left out the last sample: a batch of one has no batch statistics")
    if source.batch_size < SMALL_BATCH:
        warnings.append(
            f"batch size {source.batch_size} < {SMALL_BATCH}: batch statistics are noisy, "
            "and the layers normalize differently than in training"
        )
    notes += list(source.notes)
    label_arr = None
    if labels is not None:
        label_arr = np.load(labels, allow_pickle=False).reshape(-1)
        if len(label_arr) < source.num_samples:
            raise InputError(f"{labels}: {len(label_arr)} labels for {source.num_samples} samples")

    rank, world = distributed.world()
    if world > 1:
        distributed.init()

    def shard(i: int) -> bool:
        return i % world == rank

    runner = handle.moment_runner(batch_stats=True)
    acc: dict[str, Moments] = {}
    half: dict[str, Moments] | None = None
    ema = {x.name: (np.asarray(x.running_mean, np.float64), np.asarray(x.running_var, np.float64))
           for x in targets}  # fmt: skip
    done = 0
    total = source.num_batches
    for i, batch in enumerate(source):
        if shard(i):
            _, moments = runner(batch)
            for name, m in moments.items():
                if m.count < 2:
                    raise InputError(
                        f"BN '{name}' sees a single value per channel in a batch: "
                        "its batch variance is undefined"
                    )
            if mode == "ema":
                for x in targets:
                    m = moments.get(x.name)
                    if m is None:
                        continue
                    mom = momentum if momentum is not None else (x.momentum or 0.1)
                    mean, var = ema[x.name]
                    ema[x.name] = (
                        (1 - mom) * mean + mom * m.mean,
                        (1 - mom) * var + mom * m.var(1),
                    )
            _merge(acc, moments)
            done += len(next(iter(batch.values())))
            if half is None and done * world >= source.num_samples / 2 and world == 1:
                half = dict(acc)
        if progress:
            progress(i + 1, total)
    if world > 1:
        acc = distributed.allgather_moments(acc)
    missing = [x.name for x in targets if x.name not in acc]
    if missing:
        raise InputError(f"{handle.path}: BN layer '{missing[0]}' was never reached by the data")
    if mode == "exact":
        stats = {x.name: (acc[x.name].mean, acc[x.name].var(1)) for x in targets}
    else:
        stats = {x.name: ema[x.name] for x in targets}
    new = handle.with_stats(stats, num_batches=source.num_batches)

    before_m: dict[str, LayerMismatch] = {}
    after_m: dict[str, LayerMismatch] = {}
    acc_before = acc_after = None
    if compare:
        mom_before, acc_before = _inference_pass(handle, source, label_arr, shard)
        mom_after, acc_after = _inference_pass(new, source, label_arr, shard)
        if world > 1:
            mom_before = distributed.allgather_moments(mom_before)
            mom_after = distributed.allgather_moments(mom_after)
            acc_before = acc_after = None  # accuracy is per shard; not merged
        before_m = _mismatch(info, None, mom_before)
        after_m = _mismatch(info, stats, mom_after)
    layers = []
    for x in targets:
        changes = (
            _rel_change(half[x.name], acc[x.name]) if half and x.name in half else (None, None)
        )
        layers.append(
            LayerRecalibration(x.name, before_m.get(x.name), after_m.get(x.name), *changes)
        )
    origin = {x.name: x.origin or x.name for x in info.bn_layers}
    unsettled = [origin[x.name] for x in layers if x.converged is False]
    if unsettled:
        warnings.append(
            f"{len(unsettled)} layer(s) had not settled over the last half of the data "
            f"(e.g. {unsettled[0]}): use more samples (--max-samples)"
        )
    result = RecalibrateResult(
        info=info,
        handle=new,
        data=source.description,
        samples=source.num_samples,
        batches=source.num_batches,
        batch_size=source.batch_size,
        mode=mode,
        layers=layers,
        accuracy_before=acc_before,
        accuracy_after=acc_after,
        world_size=world,
        notes=notes,
        warnings=warnings,
    )
    if out is not None and rank == 0:
        new.save(out)
        result.output = out
    if world > 1:
        distributed.finish()
    return result
