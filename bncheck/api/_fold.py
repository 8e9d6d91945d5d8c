"""``fold``: remove every BN that can be removed exactly, then prove the result is the same
function by running both models on the same input."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bncheck.api._common import as_handle, check_output_path
from bncheck.backends import ModelHandle
from bncheck.errors import InputError
from bncheck.layers import FoldStep, ModelInfo
from bncheck.numerics import Tolerance, tolerance_for, verify_close

# Verification runs on at most this many samples: enough to exercise every channel, cheap.
VERIFY_SAMPLES = 32
VERIFY_BATCH = 8


@dataclass
class Verification:
    """Original vs folded outputs on the same input. Errors are maxima over every batch."""

    inputs: str  # description of what was fed
    samples: int
    rtol: float
    atol: float
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float | None
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class FoldResult:
    """What ``fold`` did: one step per BN, the models' sizes, and the verification."""

    source: ModelInfo
    folded: ModelInfo
    steps: list[FoldStep]
    verification: Verification | None
    output: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def folded_count(self) -> int:
        return sum(1 for s in self.steps if s.into is not None)

    @property
    def passed(self) -> bool:
        return self.verification is None or self.verification.passed


def _model_dtype(info: ModelInfo) -> str:
    for spec in info.inputs:
        if spec.dtype in ("float16", "bfloat16", "float32", "float64"):
            return spec.dtype
    for layer in info.bn_layers:
        if layer.param_dtype:
            return layer.param_dtype
    return "float32"


def verify_same_function(
    original: ModelHandle,
    candidate: ModelHandle,
    *,
    data: str | os.PathLike[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    tolerance: Tolerance | None = None,
    samples: int = VERIFY_SAMPLES,
    seed: int = 0,
) -> Verification:
    """Run both models on ``data`` (or seeded random input) and compare every output.

    Passes when every element satisfies ``|c - r| <= atol + rtol * max|r|`` (numerics'
    ``verify_close``), with tolerances for the model's dtype unless given.
    """
    from bncheck.data import open_data

    info = original.info()
    tol = tolerance or tolerance_for(_model_dtype(info))
    source = open_data(
        data,
        inputs=info.inputs,
        batch_size=VERIFY_BATCH,
        max_samples=samples,
        synthetic=data is None,
        seed=seed,
        input_shapes=input_shapes,
    )
    worst_abs = worst_rel = 0.0
    agree_hits = agree_total = 0.0
    any_top1 = False
    passed = True
    for batch in source:
        ref = original.run(batch)
        got = candidate.run(batch)
        if len(ref) != len(got):
            raise InputError(f"folded model has {len(got)} outputs, the original {len(ref)}")
        report = verify_close(ref, got, rtol=tol.rtol, atol=tol.atol)
        worst_abs = max(worst_abs, float(report["max_abs_error"]))
        worst_rel = max(worst_rel, float(report["max_rel_error"]))
        passed = passed and bool(report["allclose"])
        if report.get("top1_agreement") is not None:
            n = len(next(iter(batch.values())))
            any_top1 = True
            agree_hits += float(report["top1_agreement"]) * n
            agree_total += n
    return Verification(
        inputs=source.description,
        samples=source.num_samples,
        rtol=tol.rtol,
        atol=tol.atol,
        max_abs_error=worst_abs,
        max_rel_error=worst_rel,
        top1_agreement=(agree_hits / agree_total) if any_top1 and agree_total else None,
        passed=bool(passed and np.isfinite(worst_abs)),
    )


def fold(
    model: str | os.PathLike[str] | ModelHandle,
    output: str | os.PathLike[str] | None = None,
    *,
    data: str | os.PathLike[str] | None = None,
    verify: bool = True,
    affine: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
    in_place: bool = False,
    **open_options: Any,
) -> FoldResult:
    """Fold BN layers into their neighbours and verify the folded model.

    The output file is written only when verification passes (or ``verify=False``): a fold
    that changes the function leaves nothing behind. ``affine`` turns BNs that cannot be folded
    into a per-channel scale and shift.
    """
    handle = as_handle(model, data=data, **open_options)
    out = check_output_path(handle, output, in_place=in_place, allowed=_allowed_suffixes(handle))
    source = handle.info()
    folded, steps = handle.folded(affine=affine)
    verification = None
    # A torch model traced with dynamic dims is verified at its example's shape.
    shapes = open_options.get("input_shapes") or getattr(handle, "example_shapes", None)
    if verify:
        base = tolerance_for(_model_dtype(source))
        tol = Tolerance(
            rtol if rtol is not None else base.rtol, atol if atol is not None else base.atol
        )
        verification = verify_same_function(
            handle,
            folded,
            data=data,
            input_shapes=shapes,
            tolerance=tol,
        )
    result = FoldResult(source=source, folded=folded.info(), steps=steps, verification=verification)
    result.notes += getattr(folded, "notes", [])  # e.g. which checkpoint entry, a pinned batch
    if out is not None and result.passed:
        folded.save(out)
        result.output = out
    return result


def _allowed_suffixes(handle: ModelHandle) -> tuple[str, ...]:
    # A folded PyTorch model has a new architecture: it cannot go back into the user's
    # state-dict factory, so it is written as a pickle-free .pt2 or as ONNX.
    return (".onnx",) if handle.framework == "onnx" else (".pt2", ".onnx")
