"""Casting back to a model's dtype; judging whether a transformed model computes the same function.

**The bound.** A fold is exact in real arithmetic; in the model's dtype it only changes rounding
(each folded weight ``s·W`` is rounded once, sums see other magnitudes). Verification tells that
float noise from a wrong fold. Per output ``k``, over every sample verified, in float64, with
``r`` the original model's outputs and ``c`` the folded model's::

    err_k = max |c_k − r_k|        scale_k = max |r_k|  (over finite values)
    passed  ⇔  err_k ≤ atol + rtol_k · scale_k   for every output k

One bound per tensor, relative to the output's scale, never per element: an element near zero
carries the same absolute rounding error as its neighbours, so a per-element test
(``np.isclose``: ``|c − r| ≤ atol + rtol·|r|``) rejects correct folds whose outputs cross zero.

**The default tolerance** (``atol`` defaults to 0; a user's ``rtol`` replaces steps 1–3), with
``u`` the dtype's unit roundoff (float32 ``2⁻²⁴``, float16 ``2⁻¹¹``, bfloat16 ``2⁻⁸``, float64
``2⁻⁵³``):

1. *floor* — ``err_k ≤ 16·u·scale_k`` (float32: 9.5e-7 of the scale) passes without more work.
2. *spread* — above the floor, the unfolded model's own rounding noise is measured on the same
   input: its outputs computed a second, equally valid way ``r'`` (onnxruntime with its graph
   optimizations, which fuse Conv+BN and reorder sums as a fold does; a float64 run for torch),
   ``spread_k = max |r'_k − r_k|`` — or, where that second run is bit-identical, the folded
   model's own spread (the same network at the same magnitudes). Float rounding error grows
   with depth and with the size of intermediate activations; the spread grows with them, as it
   is the same kind of error. Then
   ``rtol_k = max(16·u, 10·spread_k / scale_k)``: the fold is one more valid evaluation, so its
   error is of the spread's order (measured: 0.8–2.3× on 8–32-layer convnets and a detector);
   10× leaves room for a fold that reorders more than the second evaluation does. A wrong fold
   (one channel's scale off by 1%) errs at 1e-4–1e-2 of the output scale, 100–1000× the float32
   spread of the same model, and still fails.
3. *fallback* — no second evaluation possible, or it was bit-identical (nothing measured):
   a fixed per-tensor ``rtol``/``atol`` by dtype (:data:`TOLERANCES`; float32 1e-4 / 1e-5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from bncheck.numerics._util import _f64


class Tolerance(NamedTuple):
    rtol: float
    atol: float


#: Step 3 (fallback) of the default tolerance: a fixed per-tensor bound by dtype, used only when
#: the model's own spread cannot be measured.
TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-9, atol=1e-12),
    "float32": Tolerance(rtol=1e-4, atol=1e-5),
    "float16": Tolerance(rtol=1e-2, atol=1e-3),
    "bfloat16": Tolerance(rtol=5e-2, atol=1e-2),
}

#: Unit roundoff ``u`` (half the distance from 1 to the next representable number).
UNIT_ROUNDOFF: dict[str, float] = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}
FLOOR_ULPS = 16  # step 1: errors below 16·u of the output scale pass outright
SPREAD_FACTOR = 10.0  # step 2: the fold may differ by up to 10× the model's own spread

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


def _dtype_name(dtype: Any) -> str:
    name = _canonical_dtype(dtype)
    if name is None:
        raise ValueError(f"no verification tolerance for dtype {dtype!r}")
    return name


def tolerance_for(dtype: Any) -> Tolerance:
    """The fallback (step 3) tolerance for a model dtype (numpy dtype or name, e.g. ``"fp16"``)."""
    return TOLERANCES[_dtype_name(dtype)]


def floor_rtol(dtype: Any) -> float:
    """Step 1's relative floor ``16·u`` for ``dtype`` (float32: 2⁻²⁰ ≈ 9.5e-7)."""
    return FLOOR_ULPS * UNIT_ROUNDOFF[_dtype_name(dtype)]


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
    # Only a non-finite output can be an overflow: when there is none (the usual case, and a
    # fold casts every folded weight of a model) the float64 input is not scanned at all.
    lost = ~np.isfinite(out.astype(np.float32) if name == "bfloat16" else out)
    if not lost.any():
        return out, 0
    return out, int(np.count_nonzero(np.isfinite(a) & lost))


def top1_agreement(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]
) -> float | None:
    """Share of rows whose argmax agrees, pooled over every classifier-shaped output.

    An output is classifier-shaped when it is 2-D ``[N, classes]`` with ``classes > 1``. Returns
    ``Σ_outputs #{n: argmax ref[n] = argmax cand[n]} / Σ_outputs N``, or None when no output is
    classifier-shaped (or all have N = 0).
    """
    agree, rows = _top1_counts(reference, candidate)
    return agree / rows if rows else None


def _top1_counts(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]
) -> tuple[int, int]:
    agree = rows = 0
    for r, c in zip(reference, candidate, strict=True):
        r, c = np.asarray(r), np.asarray(c)
        if r.ndim == 2 and r.shape[1] > 1 and r.shape == c.shape:
            agree += int(np.count_nonzero(r.argmax(axis=1) == c.argmax(axis=1)))
            rows += r.shape[0]
    return agree, rows


def max_difference(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """``(max |c − r|, max |r|)`` in float64 for one output.

    Positions where both are equal (nan = nan included) count as 0; a non-finite value on one
    side only makes the difference inf. ``max |r|`` is over finite reference values (0 if none).
    """
    r, c = _f64(reference), _f64(candidate)
    if r.shape != c.shape:
        raise ValueError(f"reference shape {r.shape} != candidate {c.shape}")
    same = (r == c) | (np.isnan(r) & np.isnan(c))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(same, 0.0, np.abs(c - r))
    diff = np.where(np.isnan(diff), np.inf, diff)
    max_abs = float(diff.max()) if diff.size else 0.0
    finite = np.abs(r[np.isfinite(r)])
    return max_abs, float(finite.max()) if finite.size else 0.0


def _rel(err: float, scale: float) -> float:
    if err == 0.0:
        return 0.0
    return err / scale if scale > 0.0 else math.inf


@dataclass
class ErrorTally:
    """Running maxima of :func:`max_difference` per output over the batches seen, and top-1
    counts (as :func:`top1_agreement`). ``add`` returns this batch's worst ``err/scale``."""

    names: list[str]
    max_abs: list[float] = field(default_factory=list)
    max_ref: list[float] = field(default_factory=list)
    top1_agree: int = 0
    top1_rows: int = 0

    def add(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
        if len(reference) != len(candidate):
            raise ValueError(f"{len(reference)} reference outputs but {len(candidate)} candidate")
        if not self.max_abs:
            self.max_abs, self.max_ref = [0.0] * len(reference), [0.0] * len(reference)
        worst = 0.0
        for k, (r, c) in enumerate(zip(reference, candidate, strict=True)):
            try:
                err, scale = max_difference(r, c)
            except ValueError as exc:
                raise ValueError(f"output {self.name(k)}: {exc}") from None
            self.max_abs[k] = max(self.max_abs[k], err)
            self.max_ref[k] = max(self.max_ref[k], scale)
            worst = max(worst, _rel(err, scale))
        agree, rows = _top1_counts(reference, candidate)
        self.top1_agree += agree
        self.top1_rows += rows
        return worst

    def name(self, k: int) -> str:
        return self.names[k] if k < len(self.names) else f"output {k}"

    @property
    def top1(self) -> float | None:
        return self.top1_agree / self.top1_rows if self.top1_rows else None


def needs_spread(tally: ErrorTally, dtype: Any, *, atol: float = 0.0) -> bool:
    """Step 2 is needed: some output's error is finite and above the floor ``atol + 16·u·scale``."""
    f = floor_rtol(dtype)
    return any(
        math.isfinite(err) and err > atol + f * scale
        for err, scale in zip(tally.max_abs, tally.max_ref, strict=True)
    )


@dataclass(frozen=True)
class OutputVerdict:
    """One output's figures and bound. ``basis`` says where ``rtol`` came from: ``floor``,
    ``spread``, ``fallback`` (steps 1–3 of the module docstring) or ``given``."""

    name: str
    max_abs_error: float
    max_ref: float
    spread: float | None
    rtol: float
    atol: float
    basis: str

    @property
    def max_rel_error(self) -> float:
        """``err / scale`` (0 when err = 0; inf when the reference is all zero and err > 0)."""
        return _rel(self.max_abs_error, self.max_ref)

    @property
    def bound(self) -> float:
        return self.atol + self.rtol * self.max_ref

    @property
    def passed(self) -> bool:
        return math.isfinite(self.max_abs_error) and self.max_abs_error <= self.bound

    @property
    def excess(self) -> float:
        """``err / bound``: ≤ 1 passes; how many times over the bound a failure is."""
        if self.max_abs_error == 0.0:
            return 0.0
        return self.max_abs_error / self.bound if self.bound > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "max_abs_error": self.max_abs_error,
            "max_ref": self.max_ref,
            "max_rel_error": self.max_rel_error,
            "spread": self.spread,
            "rtol": self.rtol,
            "atol": self.atol,
            "bound": self.bound,
            "basis": self.basis,
            "passed": self.passed,
        }


def judge(
    tally: ErrorTally,
    dtype: Any,
    *,
    spread: Sequence[float] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> list[OutputVerdict]:
    """Each output's bound and verdict, as the module docstring defines them.

    ``spread`` is step 2's per-output ``max |r' − r|`` (None: not measured). A given ``rtol``
    replaces the derived one; ``atol`` defaults to 0 (to the fallback's atol in step 3).
    """
    name = _dtype_name(dtype)
    floor = floor_rtol(name)
    out = []
    for k, (err, scale) in enumerate(zip(tally.max_abs, tally.max_ref, strict=True)):
        s = None if spread is None else float(spread[k])
        a = 0.0 if atol is None else float(atol)
        if rtol is not None:
            r, basis = float(rtol), "given"
        elif err <= a + floor * scale:
            r, basis = floor, "floor"
        elif s is not None and s > 0.0 and math.isfinite(s):
            basis = "spread"
            if scale > 0.0:
                r = max(floor, SPREAD_FACTOR * s / scale)
            else:  # an all-zero reference: the spread bounds the error absolutely
                r, a = floor, a + SPREAD_FACTOR * s
        else:
            fallback = TOLERANCES[name]
            r, basis = max(floor, fallback.rtol), "fallback"
            a = fallback.atol if atol is None else a
        out.append(OutputVerdict(tally.name(k), err, scale, s, r, a, basis))
    return out


def worst_output(verdicts: Sequence[OutputVerdict]) -> OutputVerdict | None:
    """The output furthest towards (or past) its bound: largest ``err / bound``, then ``err``."""
    if not verdicts:
        return None
    return max(verdicts, key=lambda v: (v.excess, v.max_abs_error))


def _ceil_sig(x: float, digits: int = 2) -> float:
    """The smallest float ≥ ``x`` that prints exactly with ``digits`` significant digits."""
    if x <= 0 or not math.isfinite(x):
        return x
    e = math.floor(math.log10(x)) - digits + 1
    m = math.ceil(x / 10.0**e)
    out = float(f"{m}e{e}")  # the decimal value itself, not m·10^e's rounding
    return out if out >= x else float(f"{m + 1}e{e}")


def passing_tolerance(verdicts: Sequence[OutputVerdict]) -> Tolerance | None:
    """The smallest ``--rtol`` (2 significant digits, rounded up) with which every output passes,
    keeping each output's ``atol``; where an output's reference is all zero, an ``--atol`` too.
    None when every output passed already, or when an error is not finite (no tolerance helps).
    """
    if all(v.passed for v in verdicts) or any(not math.isfinite(v.max_abs_error) for v in verdicts):
        return None
    atol = max(v.atol for v in verdicts)
    need_rtol = need_atol = 0.0
    for v in verdicts:
        over = v.max_abs_error - atol
        if over <= 0:
            continue
        if v.max_ref > 0:
            need_rtol = max(need_rtol, over / v.max_ref)
        else:
            need_atol = max(need_atol, v.max_abs_error)
    return Tolerance(_ceil_sig(need_rtol), _ceil_sig(need_atol) if need_atol else atol)


def sample_budget(
    seconds_per_sample: float, *, batch: int, done: int, max_samples: int, seconds: float
) -> int:
    """How many samples verification runs in all, once ``done`` have run and showed that a
    sample costs ``seconds_per_sample`` (through both models).

    ``n = clamp(⌊seconds / seconds_per_sample⌋, done, max_samples)``, rounded down to whole
    batches of ``batch`` (never below ``done``, never above ``max_samples``): a small model runs
    ``max_samples``; one whose samples cost a second each stops after about ``seconds``.
    """
    if max_samples <= done:
        return max_samples
    n = max_samples if seconds_per_sample <= 0 else int(seconds / seconds_per_sample)
    n = min(max(n, done), max_samples)
    if n < max_samples and batch > 0:
        n = max(done, done + (n - done) // batch * batch)
    return n


def verify_close(
    reference: list[np.ndarray],
    candidate: list[np.ndarray],
    *,
    rtol: float,
    atol: float,
) -> dict[str, Any]:
    """Compare a transformed model's outputs with the original's under a given per-tensor bound.

    Per output k (float64): ``max_abs_k = max |c − r|`` (:func:`max_difference`),
    ``max_rel_k = max_abs_k / max |r|`` (0 when max_abs_k = 0, inf when r is all zero and c is
    not), ``allclose_k = max_abs_k ≤ atol + rtol·max |r|``. Returns ``{"max_abs_error",
    "max_rel_error", "allclose", "top1_agreement", "rtol", "atol", "outputs": [{"max_abs_error",
    "max_rel_error", "allclose"}, …]}`` with the maxima over outputs and ``allclose`` the AND.
    """
    tally = ErrorTally([])
    try:
        tally.add(reference, candidate)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    verdicts = judge(tally, "float64", rtol=rtol, atol=atol)
    outputs = [
        {"max_abs_error": v.max_abs_error, "max_rel_error": v.max_rel_error, "allclose": v.passed}
        for v in verdicts
    ]
    return {
        "max_abs_error": max((o["max_abs_error"] for o in outputs), default=0.0),
        "max_rel_error": max((o["max_rel_error"] for o in outputs), default=0.0),
        "allclose": all(o["allclose"] for o in outputs),
        "top1_agreement": tally.top1,
        "rtol": rtol,
        "atol": atol,
        "outputs": outputs,
    }
