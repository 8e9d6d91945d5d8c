"""Casting back to a model's dtype; comparing a transformed model's outputs with the original."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from bncheck.numerics._util import _f64


class Tolerance(NamedTuple):
    rtol: float
    atol: float


# Tolerances for verifying a fold in the model's own dtype: folding reassociates each output as
# (s·W)·x + (s·b + t) instead of s·(W·x + b) + t, so the error is a few rounding units of the dtype
# times the accumulation length; these leave ~10-100x headroom over that for typical layer sizes
# and still catch a wrong fold (which errs at the size of the activations themselves).
TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-9, atol=1e-12),
    "float32": Tolerance(rtol=1e-4, atol=1e-5),
    "float16": Tolerance(rtol=1e-2, atol=1e-3),
    "bfloat16": Tolerance(rtol=5e-2, atol=1e-2),
}

_DTYPE_ALIASES = {
    "float64": "float64",
    "double": "float64",
    "fp64": "float64",
    "float32": "float32",
    "float": "float32",
    "fp32": "float32",
    "float16": "float16",
    "half": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def _canonical_dtype(dtype: Any) -> str | None:
    try:
        key = dtype if isinstance(dtype, str) else str(np.dtype(dtype))
    except TypeError:
        return None
    return _DTYPE_ALIASES.get(key.lower())


def tolerance_for(dtype: Any) -> Tolerance:
    """The verification tolerance for a model dtype (numpy dtype or name, e.g. ``"fp16"``)."""
    name = _canonical_dtype(dtype)
    if name is None:
        raise ValueError(f"no verification tolerance for dtype {dtype!r}")
    return TOLERANCES[name]


def cast_checked(array_f64: np.ndarray, dtype: Any) -> tuple[np.ndarray, int]:
    """Cast float64 values to ``dtype`` and count the elements that overflowed.

    ``dtype`` is float16/float32/float64 (numpy dtype or name; aliases half, fp16, fp32, …) or
    bfloat16 (needs ``ml_dtypes``). Returns ``(cast, n)`` where ``n`` counts elements finite in
    the input and non-finite after the cast (|x| beyond the dtype's range, after rounding).
    """
    a = _f64(array_f64)
    name = _canonical_dtype(dtype)
    if name is None:
        raise ValueError(f"unsupported target dtype {dtype!r}: float16, bfloat16, float32, float64")
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as exc:  # optional dependency
            raise ValueError("casting to bfloat16 needs the ml_dtypes package") from exc
        target: Any = ml_dtypes.bfloat16
    else:
        target = np.dtype(name)
    with np.errstate(over="ignore", invalid="ignore"):
        out = a.astype(target)
    overflowed = int(np.count_nonzero(np.isfinite(a) & ~np.isfinite(out.astype(np.float64))))
    return out, overflowed


def top1_agreement(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]
) -> float | None:
    """Share of rows whose argmax agrees, pooled over every classifier-shaped output.

    An output is classifier-shaped when it is 2-D ``[N, classes]`` with ``classes > 1``. Returns
    ``Σ_outputs #{n: argmax ref[n] = argmax cand[n]} / Σ_outputs N``, or None when no output is
    classifier-shaped (or all have N = 0).
    """
    agree = rows = 0
    for r, c in zip(reference, candidate, strict=True):
        r, c = np.asarray(r), np.asarray(c)
        if r.ndim == 2 and r.shape[1] > 1 and r.shape == c.shape:
            agree += int(np.count_nonzero(r.argmax(axis=1) == c.argmax(axis=1)))
            rows += r.shape[0]
    return agree / rows if rows else None


def _pair_errors(r: np.ndarray, c: np.ndarray) -> tuple[float, float]:
    """max |c − r| and that over max |r| (definitions in :func:`verify_close`)."""
    same = (r == c) | (np.isnan(r) & np.isnan(c))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(same, 0.0, np.abs(c - r))
    diff = np.where(np.isnan(diff), np.inf, diff)  # a non-finite on one side only
    max_abs = float(diff.max()) if diff.size else 0.0
    finite_ref = np.abs(r[np.isfinite(r)])
    scale = float(finite_ref.max()) if finite_ref.size else 0.0
    if max_abs == 0.0:
        max_rel = 0.0
    elif scale == 0.0:
        max_rel = float("inf")
    else:
        max_rel = max_abs / scale
    return max_abs, max_rel


def verify_close(
    reference: list[np.ndarray],
    candidate: list[np.ndarray],
    *,
    rtol: float,
    atol: float,
) -> dict[str, Any]:
    """Compare a transformed model's outputs with the original's, output by output.

    Per output k (in float64; positions where both are equal, nan = nan included, count as 0):

    - ``max_abs_k = max |cand − ref|`` (inf where only one side is non-finite),
    - ``max_rel_k = max_abs_k / max |ref|`` over finite ref values (0 when max_abs_k = 0, inf
      when ref is all zero and cand is not). This is relative to the output's scale, not per
      element, so tiny reference values do not blow it up.
    - ``allclose_k``: every element satisfies ``|cand − ref| ≤ atol + rtol·|ref|`` (numpy's
      ``isclose`` with equal_nan).

    Returns ``{"max_abs_error", "max_rel_error", "allclose", "top1_agreement", "rtol", "atol",
    "outputs": [{"max_abs_error", "max_rel_error", "allclose"}, …]}`` with the maxima over
    outputs and ``allclose`` the AND; ``top1_agreement`` as :func:`top1_agreement`.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference outputs but {len(candidate)} candidate ones")
    outputs = []
    for k, (ref, cand) in enumerate(zip(reference, candidate, strict=True)):
        r, c = _f64(ref), _f64(cand)
        if r.shape != c.shape:
            raise ValueError(f"output {k}: reference shape {r.shape} != candidate {c.shape}")
        max_abs, max_rel = _pair_errors(r, c)
        close = bool(np.all(np.isclose(c, r, rtol=rtol, atol=atol, equal_nan=True)))
        outputs.append({"max_abs_error": max_abs, "max_rel_error": max_rel, "allclose": close})
    return {
        "max_abs_error": max((o["max_abs_error"] for o in outputs), default=0.0),
        "max_rel_error": max((o["max_rel_error"] for o in outputs), default=0.0),
        "allclose": all(o["allclose"] for o in outputs),
        "top1_agreement": top1_agreement(reference, candidate),
        "rtol": rtol,
        "atol": atol,
        "outputs": outputs,
    }
