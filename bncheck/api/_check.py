"""``check``: how far the statistics each BN layer sees on data are from its running statistics.

One streamed pass over the data. Each batch runs twice through the backend's moment runner:

- in inference mode (BN uses its running statistics), collecting per BN layer the per-channel
  moments of the layer's *input* (float64, Chan merge across batches) — what the layer actually
  sees at inference on this data;
- with every BN normalizing by the batch's own statistics, to measure how far the outputs move
  (relative L2 over all outputs; top-1 agreement too when the outputs are class scores,
  ``task="classify"``), accumulated as sums of squares so nothing but the current batch is held.

The moments are compared with the running statistics by :mod:`bncheck.mismatch`; the BN4xx
rules (:mod:`bncheck.rules_data`) turn the figures into findings.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bncheck.api._common import as_handle
from bncheck.api._inspect import InspectRun, ModelEntry, each_model
from bncheck.backends import ModelHandle
from bncheck.backends.base import MomentRunner
from bncheck.errors import InputError
from bncheck.layers import BNLayer, Finding, ModelInfo, Severity
from bncheck.mismatch import LayerMismatch, channel_metrics, first_diverging, summarize_layer
from bncheck.numerics import Moments
from bncheck.rules import validate_codes
from bncheck.rules_data import CheckThresholds, DataEvidence, run_data_rules
from bncheck.wording import plural

Progress = Callable[[int, "int | None"], None]
# What the model's outputs are: "classify" (class scores: top-1 agreement is judged) or "other"
# (an embedding, a feature map, boxes: the relative L2 alone).
TASKS = ("classify", "other")


@dataclass
class LayerCheck:
    """One BN layer's figures. ``mismatch`` is None when the layer could not be measured
    (``skipped`` says why: no running statistics, or no call reached it)."""

    layer: BNLayer
    index: int  # position in graph order
    moments: Moments | None = None
    metrics: dict[str, np.ndarray] | None = None  # per channel: mean_shift, log_var_ratio, kl
    mismatch: LayerMismatch | None = None
    skipped: str | None = None

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def data_mean(self) -> np.ndarray | None:
        return None if self.moments is None else self.moments.mean

    @property
    def data_var(self) -> np.ndarray | None:
        """Population variance ``M2/n`` of the layer's input per channel (float64)."""
        return None if self.moments is None else self.moments.var(ddof=0)


@dataclass
class OutputDivergence:
    """Inference-mode outputs (a) against batch-statistics outputs (b), over every sample.

    ``rel_l2 = √Σ‖a − b‖² / √Σ‖a‖²`` over all outputs and batches; ``outputs`` the same per
    output (name, figure); ``top1_agreement`` pooled over the ``[N, classes > 1]`` outputs when
    the task is ``classify``, else None.
    """

    rel_l2: float
    outputs: list[tuple[str, float]]
    top1_agreement: float | None
    samples: int


@dataclass
class CheckResult:
    """What ``check`` measured: per-layer figures in graph order, outputs, findings."""

    info: ModelInfo
    data: str  # what was fed (DataSource.description)
    synthetic: bool
    samples: int
    batches: int
    thresholds: CheckThresholds
    task: str = "other"
    layers: list[LayerCheck] = field(default_factory=list)
    first_diverging: str | None = None
    divergence: OutputDivergence | None = None
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def measured(self) -> list[LayerCheck]:
        return [lc for lc in self.layers if lc.mismatch is not None]

    @property
    def over(self) -> list[LayerCheck]:
        return [lc for lc in self.measured if lc.mismatch is not None and lc.mismatch.over]

    def count(self, severity: Severity) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    def worst(self) -> Severity | None:
        return max((f.severity for f in self.findings), key=lambda s: s.rank, default=None)


class _DivergenceSums:
    """Streamed sums for :class:`OutputDivergence`: Σ(a − b)², Σa² per output, and with
    ``classify`` the top-1 counts over ``[N, classes > 1]`` outputs."""

    def __init__(self, classify: bool = False) -> None:
        self.classify = classify
        self.num: list[float] = []
        self.den: list[float] = []
        self.agree = 0
        self.rows = 0
        self.samples = 0

    def add(self, ref: Sequence[np.ndarray], cand: Sequence[np.ndarray], samples: int) -> None:
        if len(ref) != len(cand):
            raise RuntimeError(f"{len(ref)} inference outputs but {len(cand)} batch-stat ones")
        if not self.num:
            self.num, self.den = [0.0] * len(ref), [0.0] * len(ref)
        for k, (r, c) in enumerate(zip(ref, cand, strict=True)):
            a = np.asarray(r, dtype=np.float64)
            b = np.asarray(c, dtype=np.float64)
            d = a - b
            self.num[k] += float(np.einsum("i,i->", d.ravel(), d.ravel()))
            self.den[k] += float(np.einsum("i,i->", a.ravel(), a.ravel()))
            if self.classify and a.ndim == 2 and a.shape[1] > 1:
                self.agree += int(np.count_nonzero(a.argmax(axis=1) == b.argmax(axis=1)))
                self.rows += a.shape[0]
        self.samples += samples

    def result(self, names: Sequence[str]) -> OutputDivergence | None:
        if not self.samples:
            return None
        labels = [names[k] if k < len(names) else f"output {k}" for k in range(len(self.num))]
        return OutputDivergence(
            rel_l2=_rel(sum(self.num), sum(self.den)),
            outputs=[
                (lab, _rel(n, d)) for lab, n, d in zip(labels, self.num, self.den, strict=True)
            ],
            top1_agreement=self.agree / self.rows if self.rows else None,
            samples=self.samples,
        )


def _rel(num_sq: float, den_sq: float) -> float:
    # Same conventions as mismatch.output_divergence: 0 when equal, inf against a zero reference.
    if num_sq == 0.0:
        return 0.0
    if den_sq == 0.0:
        return float("inf")
    return float(np.sqrt(num_sq) / np.sqrt(den_sq))


def moment_runner(handle: ModelHandle, *, batch_stats: bool) -> MomentRunner:
    """The backend's moment runner for ``handle`` (see phase-2 contract).

    A handle method ``moment_runner(batch_stats=...)`` wins; otherwise the module function
    ``bncheck.backends.<framework>.stats.moment_runner(handle, batch_stats=...)``.
    """
    method = getattr(handle, "moment_runner", None)
    if callable(method):
        return method(batch_stats=batch_stats)
    stats = importlib.import_module(f"bncheck.backends.{handle.framework}.stats")
    return stats.moment_runner(handle, batch_stats=batch_stats)


def _thresholds(value: CheckThresholds | Mapping[str, Any] | None) -> CheckThresholds:
    if value is None:
        return CheckThresholds()
    if isinstance(value, CheckThresholds):
        return value
    return CheckThresholds.from_mapping(value)


def _skip_reason(layer: BNLayer) -> str | None:
    if layer.running_mean is None or layer.running_var is None:
        return "no running statistics (track_running_stats=False): nothing to compare"
    return None


def check(
    model: str | os.PathLike[str] | ModelHandle,
    *,
    data: str | os.PathLike[str] | None = None,
    synthetic: bool = False,
    batch_size: int = 32,
    max_samples: int | None = None,
    max_batches: int | None = None,
    thresholds: CheckThresholds | Mapping[str, Any] | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    progress: Progress | None = None,
    select: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None,
    divergence: bool = True,
    seed: int = 0,
    task: str | None = None,
    **open_options: Any,
) -> CheckResult:
    """Measure the train/test mismatch of every BN layer of ``model`` on ``data``.

    Per layer and channel c, over every element the layer's input holds for c on all the data
    (model in inference mode): ``μ_c``, ``σ²_c = M2_c/n_c`` (float64, Chan merge), compared with
    the running statistics by :func:`bncheck.mismatch.channel_metrics` and summarized by
    :func:`~bncheck.mismatch.summarize_layer`; the first layer over the threshold in graph order
    is ``first_diverging``. With ``divergence``, each batch of ≥ 2 samples also runs with
    batch statistics and the output distance is accumulated (:class:`OutputDivergence`).

    ``data`` is what ``open_data`` reads (a file, a folder of images, a ``DataSpec``, a data
    hook), or ``synthetic=True`` for seeded N(0, 1) input; ``thresholds`` a
    :class:`CheckThresholds` or a ``[tool.bncheck]`` style table; ``progress(done, total)`` is
    called after every batch. ``task`` says what the outputs are: ``classify`` (class scores,
    so top-1 agreement is judged too) or ``other`` (the default: the relative L2 alone).

    A model without BN layers has nothing to check: the data is opened (so bad data is still an
    error) but not run, and the result has no layers and no findings.
    """
    from bncheck.data import open_data

    validate_codes([*(select or []), *(ignore or [])])
    th = _thresholds(thresholds)
    task = task or "other"
    if task not in TASKS:
        raise InputError(f"--task {task!r}: choose {' or '.join(TASKS)}")
    # The CLI's shared open options carry input_shapes too; data needs them as well.
    input_shapes = input_shapes or open_options.pop("input_shapes", None)
    open_options.pop("input_shapes", None)
    if data is None and not synthetic:
        raise InputError("check needs data: pass a data file (--data D) or --synthetic")
    if data is not None and synthetic:
        raise InputError("give either a data file (--data) or --synthetic, not both")
    handle = as_handle(model, data=data, input_shapes=input_shapes, **open_options)
    info = handle.info()
    source = open_data(
        data,
        inputs=info.inputs,
        batch_size=batch_size,
        max_batches=max_batches,
        max_samples=max_samples,
        synthetic=synthetic,
        seed=seed,
        input_shapes=input_shapes,
    )
    # A data hook's sample count is known after its pass: counting first would read it twice.
    sized = source.sized or not info.bn_layers
    result = CheckResult(
        info=info,
        data=source.description,
        synthetic=source.synthetic,
        samples=source.num_samples if sized else 0,
        batches=source.num_batches if sized else 0,
        thresholds=th,
        task=task,
        notes=list(source.notes),
    )
    if not info.bn_layers:
        return result  # the data is checked (bad data is still an error), not run

    if info.training:
        result.notes.append(
            "the model is saved in train mode (see `bncheck inspect`, BN201): its BN layers "
            "normalize by batch statistics at inference, so the output comparison shows little"
        )
    acc = _stream(handle, source, divergence, progress, result)
    result.data, result.samples = source.description, source.num_samples
    result.batches = source.num_batches
    for index, layer in enumerate(info.bn_layers):
        lc = LayerCheck(layer=layer, index=index, skipped=_skip_reason(layer))
        mom = acc.get(layer.name)
        if lc.skipped is None and (mom is None or mom.count == 0):
            lc.skipped = "no call of this layer was reached by the data"
        if lc.skipped is None and mom is not None:
            if mom.channels != layer.channels:
                raise RuntimeError(
                    f"backend returned {mom.channels} channels for {layer.name}, "
                    f"which has {layer.channels}"
                )
            lc.moments = mom
            lc.metrics = channel_metrics(
                mom.mean, mom.var(ddof=0), layer.running_mean, layer.running_var, layer.eps
            )
            lc.mismatch = summarize_layer(layer.name, lc.metrics, th.layer)
        elif mom is not None:
            lc.moments = mom
        result.layers.append(lc)
    result.first_diverging = first_diverging([lc.mismatch for lc in result.measured])
    result.findings = run_data_rules(_evidence(result), select=select, ignore=ignore)
    return result


def _stream(
    handle: ModelHandle,
    source: Any,
    divergence: bool,
    progress: Progress | None,
    result: CheckResult,
) -> dict[str, Moments]:
    """One pass over ``source``: merged input moments per layer; divergence into ``result``."""
    run_inf = moment_runner(handle, batch_stats=False)
    run_bs = moment_runner(handle, batch_stats=True) if divergence else None
    acc: dict[str, Moments] = {}
    sums = _DivergenceSums(classify=result.task == "classify")
    singles = 0
    total = source.num_batches if source.sized else None
    for done, batch in enumerate(source, start=1):
        outputs, moments = run_inf(batch)
        for name, m in moments.items():
            acc[name] = acc[name].merge(m) if name in acc else m
        n = len(next(iter(batch.values())))
        if run_bs is not None:
            # Batch statistics of a single sample are undefined for BN1d (one value per
            # channel) and pure noise for BN2d: such a batch is left out of the comparison.
            if n >= 2:
                batch_outputs, _ = run_bs(batch)
                sums.add(outputs, batch_outputs, n)
            else:
                singles += 1
        del outputs
        if progress is not None:
            progress(done, total)
    if singles:
        result.notes.append(
            f"output divergence leaves out {plural(singles, 'single-sample batch')} "
            "(batch statistics need at least 2 samples)"
        )
    if run_bs is not None:
        result.divergence = sums.result([t.name for t in result.info.outputs])
    return acc


def _evidence(result: CheckResult) -> DataEvidence:
    div = result.divergence
    return DataEvidence(
        layers=tuple(lc.mismatch for lc in result.measured if lc.mismatch is not None),
        thresholds=result.thresholds,
        first=result.first_diverging,
        output_rel_l2=None if div is None else div.rel_l2,
        top1_agreement=None if div is None else div.top1_agreement,
        synthetic=result.synthetic,
        samples=result.samples if div is None else div.samples,
        names={x.name: x.origin for x in result.info.bn_layers},
    )


def check_paths(
    paths: Sequence[str | os.PathLike[str]],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    arch: str | Mapping[str, str] | None = None,
    root: str | os.PathLike[str] | None = None,
    on_error: Callable[[ModelEntry], None] | None = None,
    **check_options: Any,
) -> InspectRun:
    """``check`` every model in ``paths`` on the same data (``check_options`` are ``check``'s),
    as ``inspect_paths`` walks them: files and folders, ``include``/``exclude`` globs, ``arch``
    one factory or a ``{glob: factory}`` table; a model that cannot be read or run becomes an
    error entry and the others are still checked."""

    def one(path: Any, factory: str | None) -> CheckResult:
        return check(path, arch=factory, **check_options)

    return each_model(
        paths,
        one,
        include=include,
        exclude=exclude,
        arch=arch,
        root=root,
        on_error=on_error,
        done="checked",
    )
