"""The two passes of ``recalibrate`` and the figures taken from them.

The calibration pass runs every BN on its batch's own statistics and merges the moments of each
BN input (float64, Chan's merge); the new statistics are read from them, or from the moving
average replayed alongside. The comparison pass runs the old and the new model in inference
mode on the same batches: per-layer mismatch, the outputs' change and top-1 hits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bncheck.api._check import _DivergenceSums
from bncheck.backends import ModelHandle
from bncheck.errors import InputError
from bncheck.layers import BNLayer, ModelInfo
from bncheck.mismatch import LayerMismatch, channel_metrics, summarize_layer
from bncheck.numerics import Moments
from bncheck.wording import plural

# A layer has settled when the estimate from the first half of the data and the final one
# differ by less than this (RMS over channels; mean in std units, variance relatively; see
# _rel_change). Sampling noise alone puts the variance change near √(1/n_eff): with the sample
# ResNet's 256 images the deepest layers sit at ≈5%, with 4096 images well under 2%.
SETTLED = 0.05

Progress = Callable[[int, "int | None"], None]
Stats = dict[str, tuple[np.ndarray, np.ndarray]]
Gather = Callable[[dict[str, Moments]], dict[str, Moments]]


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
class Calibration:
    """Moments of every BN input with batch statistics: over all the data, and over the first
    ⌈B/2⌉ batches (for convergence)."""

    moments: dict[str, Moments]
    half: dict[str, Moments]


@dataclass
class Comparison:
    """The old and the new model in inference mode on the same batches."""

    before: dict[str, LayerMismatch]
    after: dict[str, LayerMismatch]
    accuracy_before: float | None
    accuracy_after: float | None
    output_change: float | None


def _batches(source: Any) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """(first sample, end, batch) for every batch of ``source`` (a DataSource or shard)."""
    for (start, stop), batch in zip(source.bounds, source, strict=True):
        yield start, stop, batch


def gatherer(targets: list[BNLayer], world: int) -> Gather:
    """Merges per-process moments under torchrun (identity in one process)."""
    from bncheck import distributed

    channels = {x.name: x.channels for x in targets}

    def gather(moments: dict[str, Moments]) -> dict[str, Moments]:
        return distributed.allgather_moments(moments, channels) if world > 1 else moments

    return gather


# --- the pass and the statistics -----------------------------------------------------------


def _merge(acc: dict[str, Moments], new: Mapping[str, Moments]) -> None:
    for k, m in new.items():
        acc[k] = acc[k] + m if k in acc else m


class Ema:
    """PyTorch's moving average replayed from the stored statistics: per batch,
    ``running ← (1−m)·running + m·(batch mean, unbiased batch variance)``, ``m`` the given
    momentum, else the layer's, else (momentum None) ``1/batches seen``, a cumulative average."""

    def __init__(self, targets: list[BNLayer], momentum: float | None) -> None:
        self.targets = targets
        self.momentum = momentum
        self.stats: Stats = {
            x.name: (np.asarray(x.running_mean, np.float64), np.asarray(x.running_var, np.float64))
            for x in targets
        }
        self.seen = {x.name: x.num_batches_tracked or 0 for x in targets}

    def update(self, moments: Mapping[str, Moments]) -> None:
        for x in self.targets:
            m = moments.get(x.name)
            if m is None:
                continue
            self.seen[x.name] += 1
            mom = self.momentum if self.momentum is not None else x.momentum
            if mom is None:  # PyTorch's momentum=None: cumulative average
                mom = 1.0 / self.seen[x.name]
            mean, var = self.stats[x.name]
            self.stats[x.name] = ((1 - mom) * mean + mom * m.mean, (1 - mom) * var + mom * m.var(1))

    def num_batches(self) -> int | None:
        """The layers' common ``num_batches_tracked`` after the pass (None when they differ)."""
        counts = set(self.seen.values())
        return counts.pop() if len(counts) == 1 else None


def calibration_pass(
    handle: ModelHandle,
    source: Any,
    where: tuple[int, int, int],
    ema: Ema | None,
    progress: Progress | None,
) -> Calibration:
    """Every BN normalizing by its batch's statistics, the moments of every BN input over this
    process's batches; the EMA replayed alongside. ``where`` = (rank, world size, the global
    index of the first batch of the second half)."""
    rank, world, half_at = where
    runner = handle.moment_runner(batch_stats=True)
    acc: dict[str, Moments] = {}
    half: dict[str, Moments] | None = None
    for j, (_start, _stop, batch) in enumerate(_batches(source)):
        if half is None and rank + j * world >= half_at:
            half = dict(acc)
        _, moments = runner(batch)
        for name, m in moments.items():
            if m.count < 2:
                raise InputError(
                    f"{handle.path}: BN '{name}' sees a single value per channel in a batch: "
                    "its batch variance is undefined"
                )
        if ema is not None:
            ema.update(moments)
        _merge(acc, moments)
        if progress:
            progress(j + 1, source.num_batches)
    return Calibration(acc, acc if half is None else half)


def new_statistics(
    path: str, targets: list[BNLayer], calibration: Calibration, ema: Ema | None, batches: int
) -> tuple[Stats, int | None]:
    """The new (running_mean, running_var) per layer and the num_batches_tracked to store."""
    missing = [x.name for x in targets if x.name not in calibration.moments]
    if missing:
        raise InputError(f"{path}: BN layer '{missing[0]}' was never reached by the data")
    if ema is not None:
        return dict(ema.stats), ema.num_batches()
    acc = calibration.moments
    return {x.name: (acc[x.name].mean, acc[x.name].var(1)) for x in targets}, batches


# --- comparison and result -----------------------------------------------------------------


def compare_models(
    old: ModelHandle,
    new: ModelHandle,
    info: ModelInfo,
    stats: Stats,
    source: Any,
    labels: np.ndarray | None,
    gather: Gather,
    world: int,
) -> Comparison:
    """One inference-mode pass of the old and the new model over the same batches: the input
    moments of every BN under each (for the mismatch figures), the outputs' change
    ``√Σ‖y_new − y_old‖² / √Σ‖y_old‖²`` and, with ``labels``, the top-1 hits of each."""
    from bncheck import distributed

    run_old = old.moment_runner(batch_stats=False)
    run_new = new.moment_runner(batch_stats=False)
    mom_old: dict[str, Moments] = {}
    mom_new: dict[str, Moments] = {}
    change = _DivergenceSums()
    hits = np.zeros(3)  # correct before, correct after, labelled samples
    for start, stop, batch in _batches(source):
        outs_old, moments = run_old(batch)
        _merge(mom_old, moments)
        outs_new, moments = run_new(batch)
        _merge(mom_new, moments)
        change.add(outs_old, outs_new, stop - start)
        if labels is not None:
            truth = labels[start:stop]
            hits += (_top1_hits(outs_old[0], truth), _top1_hits(outs_new[0], truth), len(truth))
    if world > 1:
        width = len(change.num)
        sums = distributed.allreduce_sum(
            np.array([*hits, change.samples, *change.num, *change.den])
        )
        hits, change.samples = sums[:3], int(sums[3])
        change.num, change.den = list(sums[4 : 4 + width]), list(sums[4 + width :])
    divergence = change.result([t.name for t in info.outputs])
    return Comparison(
        before=_mismatch(info, None, gather(mom_old)),
        after=_mismatch(info, stats, gather(mom_new)),
        accuracy_before=float(hits[0] / hits[2]) if labels is not None and hits[2] else None,
        accuracy_after=float(hits[1] / hits[2]) if labels is not None and hits[2] else None,
        output_change=None if divergence is None else divergence.rel_l2,
    )


def _top1_hits(scores: np.ndarray, truth: np.ndarray) -> int:
    pred = np.asarray(scores).reshape(len(truth), -1).argmax(axis=1)
    return int((pred == truth).sum())


def _mismatch(info: ModelInfo, stats: Stats | None, moments: dict[str, Moments]
              ) -> dict[str, LayerMismatch]:  # fmt: skip
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


def layer_figures(
    targets: list[BNLayer], calibration: Calibration, comparison: Comparison | None, batches: int
) -> list[LayerRecalibration]:
    """Per layer: mismatch before/after and how far the estimate moved over the last half."""
    before = comparison.before if comparison else {}
    after = comparison.after if comparison else {}
    half, full = calibration.half, calibration.moments
    layers = []
    for x in targets:
        settled = batches >= 2 and x.name in half and half[x.name].count >= 2
        changes = _rel_change(half[x.name], full[x.name], x.eps) if settled else (None, None)
        layers.append(LayerRecalibration(x.name, before.get(x.name), after.get(x.name), *changes))
    return layers


def convergence_warnings(info: ModelInfo, layers: list[LayerRecalibration]) -> list[str]:
    origin = {x.name: x.origin or x.name for x in info.bn_layers}
    unsettled = [origin[x.name] for x in layers if x.converged is False]
    if not unsettled:
        return []
    return [
        f"{plural(len(unsettled), 'layer')} had not settled over the last half of the data "
        f"(statistics moved by more than {SETTLED:.0%}; e.g. {unsettled[0]}): "
        "use more samples (--max-samples)"
    ]
