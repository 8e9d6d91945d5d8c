"""bncheck.numerics.verify: the per-output bound, its default tolerance, the suggestion a failed
verification prints, and the sample budget. Pure numpy: every figure is computed here by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bncheck.numerics.verify import (
    FLOOR_ULPS,
    SPREAD_FACTOR,
    ErrorTally,
    floor_rtol,
    judge,
    max_difference,
    needs_spread,
    passing_tolerance,
    sample_budget,
    verify_close,
    worst_output,
)

U32 = 2.0**-24


def zero_crossing_pair(scale: float = 20.0, rel_noise: float = 2e-6, seed: int = 0):
    """Outputs spanning ±scale (so many elements sit near zero) and a candidate off by float
    noise of ``rel_noise`` of the scale everywhere — a correct fold of a deep model."""
    rng = np.random.default_rng(seed)
    ref = rng.uniform(-scale, scale, (8, 1000))
    noise = rng.uniform(-1, 1, ref.shape) * rel_noise * scale
    return ref, ref + noise


def test_bound_is_per_tensor_not_per_element():
    """A per-element test (np.isclose) fails this correct result at the near-zero elements;
    the documented bound max|c−r| ≤ atol + rtol·max|r| passes it."""
    ref, cand = zero_crossing_pair()
    assert not np.all(np.isclose(cand, ref, rtol=1e-4, atol=1e-5))
    report = verify_close([ref], [cand], rtol=1e-4, atol=1e-5)
    assert report["allclose"] is True
    err, scale = max_difference(ref, cand)
    assert report["max_rel_error"] == pytest.approx(err / scale, rel=1e-12)
    assert err <= 1e-5 + 1e-4 * scale


def test_floor_passes_without_a_spread():
    ref = np.linspace(-10, 10, 101)
    cand = ref + 8 * U32 * 10 * np.sign(ref)  # 8 ulp of the scale: under the 16-ulp floor
    tally = ErrorTally(["y"])
    tally.add([ref], [cand])
    assert not needs_spread(tally, "float32")
    (v,) = judge(tally, "float32")
    assert (v.basis, v.rtol, v.atol) == ("floor", FLOOR_ULPS * U32, 0.0)
    assert v.passed and v.bound == pytest.approx(FLOOR_ULPS * U32 * 10, rel=1e-12)


def test_spread_sets_the_bound_and_still_catches_a_wrong_result():
    ref, cand = zero_crossing_pair(rel_noise=5e-6)
    tally = ErrorTally(["boxes"])
    tally.add([ref], [cand])
    assert needs_spread(tally, "float32")
    err, scale = max_difference(ref, cand)
    spread = 3e-6 * scale  # the model's own engine-to-engine difference
    (v,) = judge(tally, "float32", spread=[spread])
    assert v.basis == "spread" and v.rtol == pytest.approx(SPREAD_FACTOR * 3e-6, rel=1e-12)
    assert v.passed and v.max_rel_error == pytest.approx(err / scale, rel=1e-12)
    # One tenth of the outputs 1% off: far past 10× the spread.
    wrong = cand.copy()
    wrong[:, :100] *= 1.01
    bad = ErrorTally(["boxes"])
    bad.add([ref], [wrong])
    (v,) = judge(bad, "float32", spread=[spread])
    assert not v.passed and v.excess > 10


def test_fallback_when_the_spread_is_unmeasured_or_identical():
    ref, cand = zero_crossing_pair(rel_noise=5e-5)
    tally = ErrorTally(["y"])
    tally.add([ref], [cand])
    for spread in (None, [0.0]):
        (v,) = judge(tally, "float32", spread=spread)
        assert (v.basis, v.rtol, v.atol) == ("fallback", 1e-4, 1e-5)
        assert v.passed


def test_given_rtol_replaces_the_derived_one_and_atol_defaults_to_zero():
    ref, cand = zero_crossing_pair(rel_noise=5e-5)
    tally = ErrorTally(["y"])
    tally.add([ref], [cand])
    (v,) = judge(tally, "float32", rtol=1e-5)
    assert (v.basis, v.rtol, v.atol) == ("given", 1e-5, 0.0) and not v.passed


def test_worst_output_by_name_and_a_suggestion_that_passes():
    ref_a, cand_a = zero_crossing_pair(rel_noise=1e-7, seed=1)
    ref_b, cand_b = zero_crossing_pair(scale=3.0, rel_noise=4e-4, seed=2)
    tally = ErrorTally(["scores", "boxes"])
    tally.add([ref_a, ref_b], [cand_a, cand_b])
    verdicts = judge(tally, "float32", rtol=1e-4)
    assert [v.passed for v in verdicts] == [True, False]
    assert worst_output(verdicts).name == "boxes"
    tol = passing_tolerance(verdicts)
    need = verdicts[1].max_rel_error
    assert need <= tol.rtol <= need * 1.1  # rounded up to two significant digits
    assert float(f"{tol.rtol:.2g}") == tol.rtol  # what is printed is what passes
    assert all(v.passed for v in judge(tally, "float32", rtol=tol.rtol, atol=tol.atol))
    assert passing_tolerance(judge(tally, "float32", rtol=1e-3)) is None


def test_all_zero_reference_and_non_finite_outputs():
    tally = ErrorTally(["mask"])
    tally.add([np.zeros(4)], [np.array([0.0, 1e-6, 0.0, 0.0])])
    (v,) = judge(tally, "float32", spread=[0.0])  # nothing measured: the fixed atol 1e-5
    assert (v.basis, v.atol, v.passed) == ("fallback", 1e-5, True)
    (v,) = judge(tally, "float32", rtol=1e-4)
    assert v.max_rel_error == math.inf and v.passed is False
    tol = passing_tolerance([v])
    assert tol.atol >= 1e-6 and judge(tally, "float32", rtol=tol.rtol, atol=tol.atol)[0].passed
    (v,) = judge(tally, "float32", spread=[2e-7])  # the spread bounds it absolutely
    assert v.basis == "spread" and v.bound == pytest.approx(SPREAD_FACTOR * 2e-7) and v.passed
    inf = ErrorTally(["y"])
    inf.add([np.array([1.0, np.nan])], [np.array([np.inf, np.nan])])
    (v,) = judge(inf, "float32")
    assert v.max_abs_error == math.inf and not v.passed and passing_tolerance([v]) is None


def test_floor_by_dtype():
    assert floor_rtol("float32") == 16 * 2.0**-24
    assert floor_rtol("fp16") == 16 * 2.0**-11
    assert floor_rtol(np.float64) == 16 * 2.0**-53
    with pytest.raises(ValueError):
        floor_rtol("int8")


def test_tally_keeps_maxima_over_batches_and_returns_the_batch_ratio():
    tally = ErrorTally(["y"])
    assert tally.add([np.array([1.0, -2.0])], [np.array([1.0, -2.5])]) == pytest.approx(0.25)
    assert tally.add([np.array([4.0])], [np.array([4.1])]) == pytest.approx(0.025)
    assert tally.max_abs == [pytest.approx(0.5)] and tally.max_ref == [4.0]
    with pytest.raises(ValueError, match="output y"):
        tally.add([np.zeros(2)], [np.zeros(3)])


@pytest.mark.parametrize(
    "per_sample, done, expected",
    [
        (1e-4, 16, 32),  # a small model: every sample
        (0.5, 2, 4),  # 2 s of half-second samples, in whole batches of 1
        (0.3, 16, 16),  # the two batches already run exceed the budget: stop there
        (0.05, 16, 32),  # 40 samples' worth of budget, capped at 32
        (0.09, 16, 16),  # 22 samples' worth: not a whole further batch of 8 → 16
        (0.0, 8, 32),
    ],
)
def test_sample_budget(per_sample, done, expected):
    batch = 1 if done == 2 else 8
    n = sample_budget(per_sample, batch=batch, done=done, max_samples=32, seconds=2.0)
    assert n == expected
