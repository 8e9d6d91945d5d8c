"""``fold``: remove every BN that can be removed exactly, then prove the result is the same
function by running both models on the same input (:mod:`bncheck.api._verify`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bncheck.api._common import as_handle, check_output_path
from bncheck.api._verify import Verification, verify_same_function
from bncheck.backends import ModelHandle
from bncheck.errors import InputError
from bncheck.layers import FoldStep, ModelInfo

__all__ = ["FoldResult", "Verification", "fold", "verify_same_function"]


@dataclass
class FoldResult:
    """What ``fold`` did: one step per BN layer, the per-channel Mul/Add runs merged into their
    producers (``merges``: not BN, counted apart), the models' sizes and the verification.

    ``changed`` is False when nothing was folded or merged: the model is the input as it was,
    and ``unverified`` says why no verification ran (also ``--no-verify``).
    """

    source: ModelInfo
    folded: ModelInfo
    steps: list[FoldStep]
    verification: Verification | None
    output: Path | None = None
    notes: list[str] = field(default_factory=list)
    merges: list[FoldStep] = field(default_factory=list)
    changed: bool = True
    unverified: str | None = None

    @property
    def folded_count(self) -> int:
        """BN layers folded into a neighbour (not counting those made a scale and shift)."""
        return sum(1 for s in self.steps if s.into in ("producer", "consumer"))

    @property
    def affine_count(self) -> int:
        return sum(1 for s in self.steps if s.into == "affine")

    @property
    def kept_count(self) -> int:
        return sum(1 for s in self.steps if s.into is None)

    @property
    def passed(self) -> bool:
        return self.verification is None or self.verification.passed


def fold(
    model: str | os.PathLike[str] | ModelHandle,
    output: str | os.PathLike[str] | None = None,
    *,
    data: str | os.PathLike[str] | None = None,
    verify: bool = True,
    verify_whole: bool = False,
    affine: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
    in_place: bool = False,
    **open_options: Any,
) -> FoldResult:
    """Fold BN layers into their neighbours and verify the folded model.

    The output file is written only when verification passes (or ``verify=False``): a fold
    that changes the function leaves nothing behind. ``affine`` turns BNs that cannot fold
    into a per-channel scale and shift. ``rtol``/``atol`` replace the derived tolerance
    (``numerics.verify``). A model in which nothing folds is not verified (it is unchanged);
    with ``output`` it is written as it is. Where the fold leaves a large tail of the model as
    it was, the tensors that tail starts from are compared instead of the outputs
    (``verify_same_function``), unless ``verify_whole``.
    """
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not value >= 0:
            raise InputError(f"--{name} must be a number ≥ 0, not {value}")
    handle = as_handle(model, data=data, **open_options)
    out = check_output_path(handle, output, in_place=in_place, allowed=_allowed_suffixes(handle))
    folded, all_steps = handle.folded(affine=affine)
    steps = [s for s in all_steps if s.kind == "bn"]
    merges = [s for s in all_steps if s.kind != "bn" and s.into is not None]
    changed = bool(merges) or any(s.into is not None for s in steps)
    source = handle.info()
    if not changed and steps and source.graph_error:
        # Nothing folded because nothing could be traced: that is no "nothing to fold".
        raise InputError(f"{handle.path}: cannot fold: {source.graph_error}")
    if not changed:
        folded = handle  # the very input: nothing to re-export, nothing to verify
    result = FoldResult(source, folded.info(), steps, None, merges=merges, changed=changed)
    result.notes += getattr(folded, "notes", [])  # e.g. which checkpoint entry, a pinned batch
    if not changed:
        result.unverified = "nothing changed"
    elif not verify:
        result.unverified = "--no-verify"
    else:
        # A torch model traced with dynamic dims is verified at its example's shape.
        shapes = open_options.get("input_shapes") or getattr(handle, "example_shapes", None)
        result.verification = verify_same_function(
            handle, folded, data=data, input_shapes=shapes, rtol=rtol, atol=atol, whole=verify_whole
        )
    if out is not None and result.passed:
        if folded is not handle and not isinstance(model, ModelHandle):
            # the input opened here is not needed to write: one model in memory, not two,
            # while the folded one is encoded (a 500 MB model's peak: 1.9 GB, not 2.4)
            del handle
        folded.save(out)
        result.output = out
    return result


def _allowed_suffixes(handle: ModelHandle) -> tuple[str, ...]:
    # A folded PyTorch model has a new architecture: it cannot go back into the user's
    # state-dict factory, so it is written as a pickle-free .pt2 or as ONNX.
    return (".onnx",) if handle.framework == "onnx" else (".pt2", ".onnx")
