"""Verification: run the original and the transformed model on the same input and judge the
difference per output with :mod:`bncheck.numerics.verify` (the bound and its default tolerance
are defined there).

Its cost is sized to the model: batches that fit in memory (:data:`BATCH_ELEMENTS` input
elements), as many samples as :data:`VERIFY_SECONDS` of running allows by the first batch's time
(at most :data:`VERIFY_SAMPLES`; at least that one batch), one onnxruntime
session per model (an ONNX model and its folded copy share their unchanged large weights:
``backends.onnx.run.SharedWeights``; handles that can ``release`` their sessions do so once
the verdict is in), and the model's own rounding
spread measured (one more run, on the batch with the largest error) only when an error is above
the dtype's floor. A graph that runs only at batch 1 (a batch size baked into a Reshape) is
verified sample by sample.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bncheck.backends import ModelHandle
from bncheck.errors import InputError
from bncheck.layers import ModelInfo
from bncheck.numerics.verify import (
    FLOOR_ULPS,
    SPREAD_FACTOR,
    ErrorTally,
    OutputVerdict,
    Tolerance,
    judge,
    max_difference,
    needs_spread,
    passing_tolerance,
    sample_budget,
    worst_output,
)

VERIFY_SAMPLES = 32  # at most this many samples
VERIFY_BATCH = 8  # at most this many samples per batch
VERIFY_SECONDS = 2.0  # more batches only while the runs are estimated to stay within this
BATCH_ELEMENTS = 2**21  # input elements per batch (8 MB of float32): activations stay small


@dataclass
class Verification:
    """Original vs transformed outputs on the same input.

    ``max_abs_error``, ``max_rel_error`` (``err`` and ``err/max|ref|`` over every sample),
    ``rtol``, ``atol`` and ``basis`` are all those of ``worst_output``, the output furthest
    towards or past its bound, so they can be read together; ``outputs`` has every output's
    figures. ``suggested`` is the tolerance that would pass a failed verification.
    """

    inputs: str  # what was fed
    samples: int
    batch_size: int
    rtol: float
    atol: float
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float | None
    passed: bool
    worst_output: str | None = None
    basis: str = ""
    outputs: list[OutputVerdict] = field(default_factory=list)
    suggested: Tolerance | None = None
    notes: list[str] = field(default_factory=list)
    # set when the tensors compared are where the changes end, not the outputs: what was left
    region: str | None = None

    @property
    def worst(self) -> OutputVerdict | None:
        return next((o for o in self.outputs if o.name == self.worst_output), None)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("outputs", "suggested")}
        d["outputs"] = [o.to_dict() for o in self.outputs]
        d["suggested"] = None if self.suggested is None else self.suggested._asdict()
        return d


def model_dtype(info: ModelInfo) -> str:
    """The float dtype verification judges in: the first float input's, else the BN parameters'."""
    for spec in info.inputs:
        if spec.dtype in ("float16", "bfloat16", "float32", "float64"):
            return spec.dtype
    for layer in info.bn_layers:
        if layer.param_dtype in ("float16", "bfloat16", "float32", "float64"):
            return layer.param_dtype
    return "float32"


def verify_same_function(
    original: ModelHandle,
    candidate: ModelHandle,
    *,
    data: str | os.PathLike[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_samples: int = VERIFY_SAMPLES,
    seconds: float | None = None,
    seed: int = 0,
    whole: bool = False,
) -> Verification:
    """Run both models on ``data`` (or seeded N(0, 1) input) and judge every output.

    Passes when each output k has ``max|c − r| ≤ atol + rtol_k·max|r|``; ``rtol_k`` is derived
    from the dtype and the model unless ``rtol`` is given (``numerics.verify``). The batch is
    ``input_shapes``' batch dim when given, else what fits :data:`BATCH_ELEMENTS`; a model that
    fails at that batch but runs at batch 1 is verified sample by sample. ``seconds`` (default
    :data:`VERIFY_SECONDS`) is the run-time budget that sets how many samples run.

    Where the candidate ends in a large part that is provably the original's (the same nodes
    on bit-identical weights: ``ModelHandle.changed_part``), the tensors it starts from are
    judged instead of the outputs, unless ``whole``: both models apply that same part to them.
    """
    part = None if whole else original.changed_part(candidate)
    region = None
    if part is not None:
        original, candidate, region = part
    info = original.info()
    dtype = model_dtype(info)

    def open_source(batch: int, samples: int) -> Any:
        from bncheck.data import open_data

        return open_data(
            data,
            inputs=info.inputs,
            batch_size=batch,
            max_samples=samples,
            synthetic=data is None,
            seed=seed,
            input_shapes=input_shapes,
        )

    run = _Comparison(original, candidate, ErrorTally([o.name for o in info.outputs]))
    try:
        source = _sized_source(open_source, _given_batch(input_shapes), max_samples)
        source, per_sample = run.first_batch(source, open_source)
        budget = VERIFY_SECONDS if seconds is None else seconds
        source = run.budgeted(source, per_sample, budget, open_source)
        run.remaining_batches(source)
        spread, how = None, ""
        if rtol is None and needs_spread(run.tally, dtype, atol=atol or 0.0):
            spread, how = run.spread()
    finally:
        # The sessions (an ONNX model's weights, packed again by onnxruntime) are not needed
        # once the verdict is in: freed here, before the caller writes the folded model.
        for handle in (original, candidate):
            release = getattr(handle, "release", None)
            if release is not None:
                release()
    verdicts = judge(run.tally, dtype, spread=spread, rtol=rtol, atol=atol)
    top = worst_output(verdicts)
    return Verification(
        inputs=source.description,
        samples=source.num_samples,
        batch_size=source.batch_size,
        rtol=top.rtol if top else (rtol or 0.0),
        atol=top.atol if top else (atol or 0.0),
        max_abs_error=top.max_abs_error if top else 0.0,
        max_rel_error=top.max_rel_error if top else 0.0,
        top1_agreement=None if region else run.tally.top1,  # argmax of a hidden tensor: noise
        passed=all(v.passed for v in verdicts),
        worst_output=top.name if top else None,
        basis=_basis_text(top, dtype, how) if top else "",
        outputs=verdicts,
        suggested=passing_tolerance(verdicts),
        notes=run.notes,
        region=region,
    )


def _sized_source(open_source: Any, given_batch: int | None, max_samples: int) -> Any:
    """The data at ``--input-shape``'s batch, else at the batch that fits BATCH_ELEMENTS (a
    model that fixes its batch keeps it: ``open_data`` forces it)."""
    asked = given_batch or VERIFY_BATCH
    source = open_source(asked, max_samples)
    batch = given_batch or _fitting_batch(source)
    if batch != source.batch_size and source.batch_size == asked:
        source = open_source(batch, max_samples)
    return source


@dataclass
class _Comparison:
    """Both models run batch by batch into one tally; ``worst`` keeps the batch with the largest
    ``err/scale`` (its feeds and reference outputs), where the model's own spread is measured."""

    original: ModelHandle
    candidate: ModelHandle
    tally: ErrorTally
    worst: tuple[float, Mapping[str, np.ndarray], list[np.ndarray], list[np.ndarray]] | None = None
    notes: list[str] = field(default_factory=list)

    def batch(self, feeds: Mapping[str, np.ndarray], ref: list[np.ndarray] | None = None) -> None:
        ref = self.original.run(feeds) if ref is None else ref
        got = self.candidate.run(feeds)
        if len(got) != len(ref):
            raise InputError(f"the folded model has {len(got)} outputs, the original {len(ref)}")
        ratio = self.tally.add(ref, got)
        if self.worst is None or ratio > self.worst[0]:
            self.worst = (ratio, feeds, ref, got)

    def first_batch(self, source: Any, open_source: Any) -> tuple[Any, float]:
        """Run the first batch, timed once both models are built: where a graph that only runs
        at batch 1 shows itself (then the source becomes batch 1). Returns (source, seconds per
        sample)."""
        self.original.prepare()
        self.candidate.prepare()
        feeds = source.first_batch()
        start = time.perf_counter()
        try:
            ref = self.original.run(feeds)
        except InputError:
            if source.batch_size == 1:
                raise
            single = open_source(1, source.num_samples)
            feeds = single.first_batch()
            start = time.perf_counter()
            ref = self.original.run(feeds)  # an error here is the model's, not the batch's
            self.notes.append(
                f"the model does not run at batch {source.batch_size} (its graph fixes batch 1 "
                "somewhere): verified sample by sample"
            )
            source = single
        self.batch(feeds, ref)
        return source, (time.perf_counter() - start) / len(next(iter(feeds.values())))

    def budgeted(self, source: Any, per_sample: float, seconds: float, open_source: Any) -> Any:
        """The source cut to the samples ``seconds`` of runs allow (``sample_budget``)."""
        n = sample_budget(
            per_sample,
            batch=source.batch_size,
            done=min(source.batch_size, source.num_samples),
            max_samples=source.num_samples,
            seconds=seconds,
        )
        if n >= source.num_samples:
            return source
        self.notes.append(
            f"{n} of {source.num_samples} samples: the first took {per_sample:.2g} s each "
            f"through both models, and verification runs for about {seconds:g} s"
        )
        return open_source(source.batch_size, n)

    def remaining_batches(self, source: Any) -> None:
        for index, feeds in enumerate(source):
            if index:  # the first batch ran already
                self.batch(feeds)

    def spread(self) -> tuple[list[float] | None, str]:
        """Per output ``max |r' − r|`` on the worst batch, ``r'`` the original's second
        evaluation, and how it ran; (None, "") with a note when there is none.

        Where the original's second evaluation is bit-identical (onnxruntime found nothing to
        fuse: a bias computed at run time blocks its Conv+BN fusion), the folded model's own
        spread stands in: it is the float noise of the same network at the same magnitudes,
        and a wrong fold does not make it larger."""
        assert self.worst is not None
        _, feeds, ref, got = self.worst
        spread, how = self._spread_of(self.original, feeds, ref)
        if spread is not None and not any(spread):
            alt, alt_how = self._spread_of(self.candidate, feeds, got)
            if alt is not None and any(alt):
                return alt, f"{alt_how}, of the folded model: the original's is identical"
        return spread, how

    def _spread_of(
        self, handle: ModelHandle, feeds: Mapping[str, np.ndarray], outputs: list[np.ndarray]
    ) -> tuple[list[float] | None, str]:
        try:
            alt, how = handle.run_reference(feeds)
            if len(alt) != len(outputs):
                raise InputError(
                    f"its second evaluation gave {len(alt)} outputs, not {len(outputs)}"
                )
            return [max_difference(r, a)[0] for r, a in zip(outputs, alt, strict=True)], how
        except (NotImplementedError, InputError, ValueError) as exc:
            self.notes.append(f"the model's own rounding spread could not be measured: {exc}")
            return None, ""


def _given_batch(input_shapes: Mapping[str, Sequence[int]] | None) -> int | None:
    """The batch dim of ``--input-shape`` (all given shapes must agree), or None."""
    batches = {int(s[0]) for s in (input_shapes or {}).values() if len(s) > 0}
    if len(batches) > 1:
        raise InputError(f"--input-shape gives different batch sizes: {sorted(batches)}")
    return batches.pop() if batches else None


def _fitting_batch(source: Any) -> int:
    """Samples per batch so a batch holds at most BATCH_ELEMENTS input elements (1..8)."""
    per_sample = sum(math.prod(col.sample_shape) for col in source.columns.values())
    return max(1, min(VERIFY_BATCH, BATCH_ELEMENTS // max(per_sample, 1)))


def _basis_text(v: OutputVerdict, dtype: str, how: str) -> str:
    """Where ``v.rtol`` came from, in words."""
    if v.basis == "given":
        return "as given"
    if v.basis == "floor":
        return f"{FLOOR_ULPS} rounding units of {dtype}"
    if v.basis == "spread":
        spread = v.spread if v.spread is not None else 0.0
        rel = spread / v.max_ref if v.max_ref > 0 else math.inf
        return f"{SPREAD_FACTOR:g}× the model's own spread {rel:.2g} ({how})"
    why = "identical" if v.spread == 0.0 else "not measured"
    return f"fixed {dtype} tolerance: the model's own spread is {why}"
