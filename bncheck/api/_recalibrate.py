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
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
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
# A layer has settled when the estimate from the first half of the data and the final one
# differ by less than this (RMS over channels; mean in std units, variance relatively; see
# _rel_change). Sampling noise alone puts the variance change near √(1/n_eff): with the sample
# ResNet's 256 images the deepest layers sit at ≈5%, with 4096 images well under 2%.
SETTLED = 0.05

Progress = Callable[[int, "int | None"], None]


@dataclass
class LayerRecalibration:
    name: str
    before: LayerMismatch | None  # stored stats vs what the layer sees on the data
    after: LayerMismatch | None  # new stats vs what the layer sees with them
    mean_change: float | None  # last-half change of the mean, std units (RMS over channels)
    var_change: float | None  # last-half relative change of the variance (RMS over channels)

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


def _merge(acc: dict[str, Moments], new: Mapping[str, Moments]) -> None:
    for k, m in new.items():
        acc[k] = acc[k] + m if k in acc else m


def _rel_change(half: Moments, full: Moments, eps: float) -> tuple[float, float]:
    """How far the estimate at half the data is from the final one, as a root mean square
    over the C channels (σ² unbiased, final; ε the layer's eps, so dead channels do not
    dominate)::

        mean_change = √(Σ_c ((μ_c − μ½_c)/√(σ²_c + ε))² / C)
        var_change  = √(Σ_c ((σ²_c − σ²½_c)/(σ²_c + ε))² / C)
    """
    var = full.var(1) + eps
    mean_change = float(np.sqrt(np.mean(((full.mean - half.mean) / np.sqrt(var)) ** 2)))
    var_change = float(np.sqrt(np.mean(((full.var(1) - half.var(1)) / var) ** 2)))
    return mean_change, var_change


def _batches(source: Any) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """(first sample, end, batch) for every batch of ``source`` (a DataSource or shard)."""
    for (start, stop), batch in zip(source.bounds, source, strict=True):
        yield start, stop, batch


def _inference_pass(
    handle: ModelHandle, source: Any, labels: np.ndarray | None
) -> tuple[dict[str, Moments], tuple[int, int]]:
    """Inference-mode moments of every BN input, and (correct, seen) top-1 with ``labels``."""
    runner = handle.moment_runner(batch_stats=False)
    acc: dict[str, Moments] = {}
    hits = seen = 0
    for start, stop, batch in _batches(source):
        outs, moments = runner(batch)
        _merge(acc, moments)
        if labels is not None:
            pred = np.asarray(outs[0]).reshape(stop - start, -1).argmax(axis=1)
            hits += int((pred == labels[start:stop]).sum())
            seen += stop - start
    return acc, (hits, seen)


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


def _load_labels(path: str | os.PathLike[str], samples: int) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read labels ({exc})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iu":
        raise InputError(f"{path}: labels must be a .npy of integer class indices")
    arr = arr.reshape(-1)
    if len(arr) < samples:
        raise InputError(f"{path}: {len(arr)} labels for {samples} samples")
    return arr


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
    ``compare`` adds a pass before and after in inference mode for the mismatch figures (and
    the accuracy, with ``labels``). Under torchrun only rank 0 writes ``output``.
    """
    from bncheck import distributed
    from bncheck.data import open_data

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
    rank, world = distributed.world()
    if mode == "ema" and world > 1:
        raise InputError("--mode ema replays batches in order: run it in one process")
    if input_shapes is not None:
        open_options["input_shapes"] = input_shapes
    handle = as_handle(model, data=data, **open_options)
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

    def open_source(limit: int | None, batches: int | None) -> Any:
        return open_data(
            data,
            inputs=info.inputs,
            batch_size=batch_size,
            max_samples=limit,
            max_batches=batches,
            input_shapes=open_options.get("input_shapes"),
        )

    source = open_source(max_samples, max_batches)
    if source.num_samples < 2:
        raise InputError(f"{data}: {source.num_samples} sample: batch statistics need at least 2")
    if source.min_batch == 1:
        # A trailing batch of one sample has no batch statistics: leave that sample out.
        source = open_source(source.num_samples - 1, None)
        notes.append("left out the last sample: a batch of one has no batch statistics")
    if source.batch_size < SMALL_BATCH:
        warnings.append(
            f"batch size {source.batch_size} < {SMALL_BATCH}: batch statistics are noisy, "
            "and the layers normalize differently than in training"
        )
    notes += list(source.notes)
    label_arr = None if labels is None else _load_labels(labels, source.num_samples)

    if world > 1:
        distributed.init()
    mine = distributed.shard(source, rank, world)
    channels = {x.name: x.channels for x in targets}

    def gather(moments: dict[str, Moments]) -> dict[str, Moments]:
        return distributed.allgather_moments(moments, channels) if world > 1 else moments

    runner = handle.moment_runner(batch_stats=True)
    acc: dict[str, Moments] = {}
    # Convergence: the moments of the first ⌈B/2⌉ batches (on every rank: its share of them).
    half_at = (source.num_batches + 1) // 2
    half: dict[str, Moments] | None = None
    ema = {x.name: (np.asarray(x.running_mean, np.float64), np.asarray(x.running_var, np.float64))
           for x in targets}  # fmt: skip
    seen_batches = {x.name: x.num_batches_tracked or 0 for x in targets}
    for j, (_start, _stop, batch) in enumerate(_batches(mine)):
        if half is None and rank + j * world >= half_at:
            half = dict(acc)
        _, moments = runner(batch)
        for name, m in moments.items():
            if m.count < 2:
                raise InputError(
                    f"{handle.path}: BN '{name}' sees a single value per channel in a batch: "
                    "its batch variance is undefined"
                )
        if mode == "ema":
            for x in targets:
                m = moments.get(x.name)
                if m is None:
                    continue
                seen_batches[x.name] += 1
                mom = momentum if momentum is not None else x.momentum
                if mom is None:  # PyTorch's momentum=None: cumulative average
                    mom = 1.0 / seen_batches[x.name]
                mean, var = ema[x.name]
                ema[x.name] = ((1 - mom) * mean + mom * m.mean, (1 - mom) * var + mom * m.var(1))
        _merge(acc, moments)
        if progress:
            progress(j + 1, mine.num_batches)
    if half is None:
        half = dict(acc)
    acc, half = gather(acc), gather(half)
    missing = [x.name for x in targets if x.name not in acc]
    if missing:
        raise InputError(f"{handle.path}: BN layer '{missing[0]}' was never reached by the data")
    if mode == "exact":
        stats = {x.name: (acc[x.name].mean, acc[x.name].var(1)) for x in targets}
        num_batches: int | None = source.num_batches
    else:
        stats = {x.name: ema[x.name] for x in targets}
        counts = set(seen_batches.values())
        num_batches = counts.pop() if len(counts) == 1 else None
    new = handle.with_stats(stats, num_batches=num_batches)

    before_m: dict[str, LayerMismatch] = {}
    after_m: dict[str, LayerMismatch] = {}
    acc_before = acc_after = None
    if compare:
        mom_before, hits_before = _inference_pass(handle, mine, label_arr)
        mom_after, hits_after = _inference_pass(new, mine, label_arr)
        mom_before, mom_after = gather(mom_before), gather(mom_after)
        if world > 1:
            total = distributed.allreduce_sum(np.array([*hits_before, *hits_after]))
            hits_before, hits_after = (int(total[0]), int(total[1])), (int(total[2]), int(total[3]))
        if label_arr is not None and hits_before[1]:
            acc_before = hits_before[0] / hits_before[1]
            acc_after = hits_after[0] / hits_after[1]
        before_m = _mismatch(info, None, mom_before)
        after_m = _mismatch(info, stats, mom_after)
    layers = []
    for x in targets:
        settled = source.num_batches >= 2 and x.name in half and half[x.name].count >= 2
        changes = _rel_change(half[x.name], acc[x.name], x.eps) if settled else (None, None)
        layers.append(
            LayerRecalibration(x.name, before_m.get(x.name), after_m.get(x.name), *changes)
        )
    origin = {x.name: x.origin or x.name for x in info.bn_layers}
    unsettled = [origin[x.name] for x in layers if x.converged is False]
    if unsettled:
        warnings.append(
            f"{len(unsettled)} layer(s) had not settled over the last half of the data "
            f"(statistics moved by more than {SETTLED:.0%}; e.g. {unsettled[0]}): "
            "use more samples (--max-samples)"
        )
    if source.num_batches < 2:
        notes.append("one batch only: convergence over the last half cannot be judged")
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
