"""bncheck.numerics against float64 references computed here (torch float64 for convolutions).

Fold tolerances: folding is exact algebra, so in float64 the folded layer must match
BN(P(x)) / C(BN(x)) to rounding: max |error| ≤ 1e-10 · max |reference| (float64 rounding after
a few hundred multiply-adds is ~1e-14 relative; a wrong fold errs at ~1e-1). Moments: 1e-9
relative to numpy's one-shot float64 mean/var, as DESIGN.md promises.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bncheck.numerics import (
    TOLERANCES,
    Moments,
    bn_as_affine,
    bn_scale_shift,
    cast_checked,
    fold_into_consumer,
    fold_into_producer,
    tolerance_for,
    top1_agreement,
    verify_close,
)

FOLD_RTOL = 1e-10
SETTINGS = settings(max_examples=50, deadline=None)

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def _random_bn(rng: np.random.Generator, c: int) -> dict:
    """BN statistics and affine far from the defaults (mean 0, var 1, γ 1, β 0)."""
    return {
        "mean": rng.normal(0.5, 2.0, c),
        "var": rng.uniform(0.05, 4.0, c),
        "gamma": rng.normal(0.0, 1.5, c),
        "beta": rng.normal(0.3, 1.0, c),
        "eps": float(rng.choice([1e-5, 1e-3, 0.1])),
    }


def _bn_ref(y: torch.Tensor, bn: dict) -> torch.Tensor:
    return F.batch_norm(
        y,
        _t(bn["mean"]),
        _t(bn["var"]),
        _t(bn["gamma"]),
        _t(bn["beta"]),
        training=False,
        eps=bn["eps"],
    )


def _assert_fold_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= FOLD_RTOL * max(scale, 1e-300), (err, scale)


@st.composite
def conv_cases(draw):
    dim = draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["g1", "g2", "depthwise"]))
    if mode == "depthwise":
        groups = draw(st.integers(1, 4))
        cin_g, cout_g = 1, draw(st.integers(1, 3))
    else:
        groups = 1 if mode == "g1" else 2
        cin_g, cout_g = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    k = [draw(st.integers(1, 3)) for _ in range(dim)]
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 1))
    size = [dilation * (kk - 1) + 1 + draw(st.integers(0, 3)) for kk in k]
    return {
        "dim": dim,
        "groups": groups,
        "cin": cin_g * groups,
        "cout": cout_g * groups,
        "k": k,
        "stride": stride,
        "dilation": dilation,
        "padding": padding,
        "size": size,
        "bias": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@SETTINGS
@given(conv_cases())
def test_fold_into_conv_producer_matches_bn_of_conv(case):
    rng = np.random.default_rng(case["seed"])
    g, cin, cout = case["groups"], case["cin"], case["cout"]
    w = rng.normal(size=(cout, cin // g, *case["k"]))
    b = rng.normal(size=cout) if case["bias"] else None
    x = _t(rng.normal(size=(2, cin, *case["size"])))
    bn = _random_bn(rng, cout)
    conv = CONV[case["dim"]]
    kw = {"stride": case["stride"], "padding": case["padding"], "dilation": case["dilation"]}
    ref = _bn_ref(conv(x, _t(w), None if b is None else _t(b), groups=g, **kw), bn)

    s, t = bn_scale_shift(bn["mean"], bn["var"], bn["gamma"], bn["beta"], bn["eps"])
    w2, b2 = fold_into_producer(w, b, s, t, op="conv", groups=g)
    assert w2.shape == w.shape and b2.shape == (cout,)
    _assert_fold_close(conv(x, _t(w2), _t(b2), groups=g, **kw), ref)


@SETTINGS
@given(conv_cases())
def test_fold_into_conv_transpose_producer_matches_bn_of_conv_transpose(case):
    rng = np.random.default_rng(case["seed"])
    g, cin, cout = case["groups"], case["cin"], case["cout"]
    w = rng.normal(size=(cin, cout // g, *case["k"]))
    b = rng.normal(size=cout) if case["bias"] else None
    x = _t(rng.normal(size=(2, cin, *case["size"])))
    bn = _random_bn(rng, cout)
    conv_t = CONV_T[case["dim"]]
    st_, dil = case["stride"], case["dilation"]
    out = [(n - 1) * st_ + dil * (k - 1) + 1 for n, k in zip(case["size"], case["k"], strict=True)]
    pad = case["padding"] if min(out) > 2 * case["padding"] else 0  # keep the output non-empty
    kw = {"stride": st_, "padding": pad, "dilation": dil}
    ref = _bn_ref(conv_t(x, _t(w), None if b is None else _t(b), groups=g, **kw), bn)

    s, t = bn_scale_shift(bn["mean"], bn["var"], bn["gamma"], bn["beta"], bn["eps"])
    w2, b2 = fold_into_producer(w, b, s, t, op="conv_transpose", groups=g)
    assert w2.shape == w.shape
    _assert_fold_close(conv_t(x, _t(w2), _t(b2), groups=g, **kw), ref)


def test_conv_transpose_grouped_scaling_is_per_group_not_flat():
    # groups=3, Cout/g=2: output channel o = 2g + j lives at column j of group g's rows. A flat
    # "scale axis 1 by s[:Cout/g]" would pass with groups=1 and fail here.
    rng = np.random.default_rng(7)
    w = rng.normal(size=(6, 2, 3, 3))
    s = np.arange(1.0, 7.0)
    w2, b2 = fold_into_producer(w, None, s, np.zeros(6), op="conv_transpose", groups=3)
    for grp in range(3):
        for j in range(2):
            np.testing.assert_array_equal(
                w2[2 * grp : 2 * grp + 2, j], w[2 * grp : 2 * grp + 2, j] * s[2 * grp + j]
            )
    np.testing.assert_array_equal(b2, np.zeros(6))


@SETTINGS
@given(
    op=st.sampled_from(["linear", "gemm_t", "matmul"]),
    n_in=st.integers(1, 9),
    n_out=st.integers(1, 9),
    bias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_fold_into_linear_producer_matches_bn_of_linear(op, n_in, n_out, bias, seed):
    rng = np.random.default_rng(seed)
    x = _t(rng.normal(size=(5, n_in)))
    w = rng.normal(size=(n_out, n_in) if op == "linear" else (n_in, n_out))
    b = rng.normal(size=n_out) if bias else None
    bn = _random_bn(rng, n_out)

    def layer(weight, bias_):
        if op == "linear":
            return F.linear(x, _t(weight), None if bias_ is None else _t(bias_))
        y = torch.matmul(x, _t(weight))
        return y if bias_ is None else y + _t(bias_)

    ref = _bn_ref(layer(w, b), bn)
    s, t = bn_scale_shift(bn["mean"], bn["var"], bn["gamma"], bn["beta"], bn["eps"])
    w2, b2 = fold_into_producer(w, b, s, t, op=op)
    _assert_fold_close(layer(w2, b2), ref)


@SETTINGS
@given(conv_cases())
def test_fold_into_unpadded_conv_consumer_matches_conv_of_bn(case):
    rng = np.random.default_rng(case["seed"])
    g, cin, cout = case["groups"], case["cin"], case["cout"]
    w = rng.normal(size=(cout, cin // g, *case["k"]))
    b = rng.normal(size=cout) if case["bias"] else None
    x = _t(rng.normal(size=(2, cin, *case["size"])))
    bn = _random_bn(rng, cin)
    conv = CONV[case["dim"]]
    kw = {"stride": case["stride"], "padding": 0, "dilation": case["dilation"]}
    ref = conv(_bn_ref(x, bn), _t(w), None if b is None else _t(b), groups=g, **kw)

    s, t = bn_scale_shift(bn["mean"], bn["var"], bn["gamma"], bn["beta"], bn["eps"])
    w2, b2 = fold_into_consumer(w, b, s, t, op="conv", groups=g)
    assert w2.shape == w.shape and b2.shape == (cout,)
    _assert_fold_close(conv(x, _t(w2), _t(b2), groups=g, **kw), ref)


@SETTINGS
@given(
    op=st.sampled_from(["linear", "gemm_t", "matmul"]),
    n_in=st.integers(1, 9),
    n_out=st.integers(1, 9),
    bias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_fold_into_linear_consumer_matches_linear_of_bn(op, n_in, n_out, bias, seed):
    rng = np.random.default_rng(seed)
    x = _t(rng.normal(size=(5, n_in)))
    w = rng.normal(size=(n_out, n_in) if op == "linear" else (n_in, n_out))
    b = rng.normal(size=n_out) if bias else None
    bn = _random_bn(rng, n_in)

    def layer(inp, weight, bias_):
        if op == "linear":
            return F.linear(inp, _t(weight), None if bias_ is None else _t(bias_))
        y = torch.matmul(inp, _t(weight))
        return y if bias_ is None else y + _t(bias_)

    ref = layer(_bn_ref(x, bn), w, b)
    s, t = bn_scale_shift(bn["mean"], bn["var"], bn["gamma"], bn["beta"], bn["eps"])
    w2, b2 = fold_into_consumer(w, b, s, t, op=op)
    _assert_fold_close(layer(x, w2, b2), ref)


def test_consumer_fold_into_zero_padded_conv_is_wrong_at_the_border_only():
    # Why the caller must check padding: with t ≠ 0 the padded border sees zeros where the
    # original conv saw BN(0) = t, so only the border outputs differ.
    rng = np.random.default_rng(3)
    x = _t(rng.normal(size=(1, 3, 8, 8)))
    w = rng.normal(size=(4, 3, 3, 3))
    bn = _random_bn(rng, 3)
    ref = F.conv2d(_bn_ref(x, bn), _t(w), padding=1)
    s, t = bn_scale_shift(bn["mean"], bn["var"], bn["gamma"], bn["beta"], bn["eps"])
    assert np.abs(t).max() > 0.1
    w2, b2 = fold_into_consumer(w, None, s, t, op="conv")
    got = F.conv2d(x, _t(w2), _t(b2), padding=1)
    _assert_fold_close(got[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1])  # interior exact
    border_err = (got - ref).abs().max().item()
    assert border_err > 1e-2 * ref.abs().max().item()

    # With t = 0 the same padded fold is exact everywhere.
    w3, b3 = fold_into_consumer(w, None, s, np.zeros(3), op="conv")
    ref0 = F.conv2d(x * _t(s).view(1, 3, 1, 1), _t(w), padding=1)
    _assert_fold_close(F.conv2d(x, _t(w3), _t(b3), padding=1), ref0)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_transpose_consumer_exact_with_zero_shift_and_refused_otherwise(groups):
    rng = np.random.default_rng(groups)
    cin, cout = 4, 2 * groups
    w = rng.normal(size=(cin, cout // groups, 3, 3))
    b = rng.normal(size=cout)
    x = _t(rng.normal(size=(2, cin, 5, 5)))
    s = rng.normal(size=cin)
    kw = {"stride": 2, "padding": 1, "groups": groups}
    ref = F.conv_transpose2d(x * _t(s).view(1, cin, 1, 1), _t(w), _t(b), **kw)
    w2, b2 = fold_into_consumer(w, b, s, np.zeros(cin), op="conv_transpose", groups=groups)
    _assert_fold_close(F.conv_transpose2d(x, _t(w2), _t(b2), **kw), ref)
    with pytest.raises(ValueError, match="fewer kernel taps"):
        fold_into_consumer(w, b, s, np.full(cin, 0.5), op="conv_transpose", groups=groups)


def test_bn_scale_shift_formula_and_defaults():
    s, t = bn_scale_shift(np.array([1.0, -2.0]), np.array([3.0, 0.0]), eps=1.0)
    np.testing.assert_array_equal(s, [0.5, 1.0])
    np.testing.assert_array_equal(t, [-0.5, 2.0])
    s, t = bn_as_affine(np.array([2.0]), np.array([0.25]), np.array([3.0]), np.array([1.0]), 0.0)
    np.testing.assert_array_equal(s, [6.0])
    np.testing.assert_array_equal(t, [-11.0])
    assert s.dtype == np.float64
    # fp16 statistics are promoted, not computed in fp16
    s16, _ = bn_scale_shift(np.zeros(1, np.float16), np.full(1, 3.0, np.float16), eps=1e-5)
    assert s16.dtype == np.float64 and s16[0] == pytest.approx(1 / np.sqrt(3.0 + 1e-5), rel=1e-15)


def test_fold_shape_errors_are_clear():
    w = np.ones((4, 2, 3, 3))
    with pytest.raises(ValueError, match=r"BN scale has shape \(3,\), expected \(4,\)"):
        fold_into_producer(w, None, np.ones(3), np.zeros(3), op="conv")
    with pytest.raises(ValueError, match="not divisible by groups"):
        fold_into_producer(w, None, np.ones(4), np.zeros(4), op="conv", groups=3)
    with pytest.raises(ValueError, match="conv bias has shape"):
        fold_into_producer(w, np.ones(5), np.ones(4), np.zeros(4), op="conv")
    with pytest.raises(ValueError, match="unknown op"):
        fold_into_producer(w, None, np.ones(4), np.zeros(4), op="pool")
    with pytest.raises(ValueError, match="linear has no groups"):
        fold_into_producer(np.ones((4, 2)), None, np.ones(4), np.zeros(4), op="linear", groups=2)
    with pytest.raises(ValueError, match="must be 2-D"):
        fold_into_consumer(w, None, np.ones(2), np.zeros(2), op="matmul")
    with pytest.raises(ValueError, match="expected \\(4,\\)"):  # consumer conv: Cin = 2·groups
        fold_into_consumer(w, None, np.ones(2), np.zeros(2), op="conv", groups=2)


# ---------------------------------------------------------------- Moments


@st.composite
def split_datasets(draw):
    n = draw(st.integers(1, 40))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=6))) if n > 1 else []
    return {
        "n": n,
        "c": draw(st.integers(1, 5)),
        "l": draw(st.integers(1, 6)),
        "offset": draw(st.sampled_from([0.0, -50.0, 1e3])),
        "scale": draw(st.sampled_from([1e-3, 1.0, 1e2])),
        "bounds": [0, *cuts, n],
        "order_seed": draw(st.integers(0, 2**32 - 1)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _check_against_numpy(m: Moments, x: np.ndarray, axes: tuple[int, ...]) -> None:
    ref_mean = np.mean(x, axis=axes, dtype=np.float64)
    np.testing.assert_allclose(m.mean, ref_mean, rtol=1e-9, atol=1e-9 * np.abs(x).max())
    np.testing.assert_allclose(m.var(), np.var(x, axis=axes, dtype=np.float64), rtol=1e-9)
    if m.count > 1:
        np.testing.assert_allclose(m.var(1), np.var(x, axis=axes, ddof=1), rtol=1e-9)


@SETTINGS
@given(split_datasets())
def test_moments_any_split_any_order_equals_one_shot(case):
    rng = np.random.default_rng(case["seed"])
    x = case["offset"] + case["scale"] * rng.normal(size=(case["n"], case["c"], case["l"]))
    b = case["bounds"]
    parts = [Moments.from_batch(x[b[i] : b[i + 1]]) for i in range(len(b) - 1)]
    order = np.random.default_rng(case["order_seed"]).permutation(len(parts))
    shuffled = [parts[i] for i in order]

    sequential = Moments.merge_all(shuffled)
    assert sequential.count == case["n"] * case["l"]
    _check_against_numpy(sequential, x, (0, 2))

    # pairwise tree, as an all-reduce across processes would combine them
    level = shuffled
    while len(level) > 1:
        level = [
            level[i] + level[i + 1] if i + 1 < len(level) else level[i]
            for i in range(0, len(level), 2)
        ]
    _check_against_numpy(level[0], x, (0, 2))

    # through the flat vector an all-gather moves
    gathered = np.stack([p.to_array() for p in shuffled])
    _check_against_numpy(Moments.merge_all(Moments.from_array(r) for r in gathered), x, (0, 2))


@pytest.mark.parametrize(("axis", "axes"), [(0, (1, 2)), (-1, (0, 1)), (1, (0, 2))])
def test_moments_channel_axis(axis, axes):
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(6, 4, 5))
    _check_against_numpy(Moments.from_batch(x, channel_axis=axis), x, axes)


def test_moments_huge_activations_stay_finite():
    # float32 data near its range: a float32 sum overflows, the float64 accumulation does not.
    x32 = np.full((64, 2, 1), 3e37, dtype=np.float32)
    x32[:, 1] = -2e37
    x32[::2, 0] *= 2
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.sum(x32[:, 0], dtype=np.float32))
    m = Moments.from_batch(x32[:32]) + Moments.from_batch(x32[32:])
    assert np.all(np.isfinite(m.mean)) and np.all(np.isfinite(m.var()))
    _check_against_numpy(m, x32.astype(np.float64), (0, 2))

    x = 1e30 * np.random.default_rng(2).normal(size=(50, 3, 4))
    m = Moments.merge_all(Moments.from_batch(x[i : i + 7]) for i in range(0, 50, 7))
    assert np.all(np.isfinite(m.m2))
    _check_against_numpy(m, x, (0, 2))


def test_moments_constant_channel_has_exactly_zero_variance():
    # 0.1 is not representable: a plain two-pass mean (Σ0.1)/n ≠ 0.1 leaves a tiny M2 > 0.
    batches = [np.full((n, 2, 3), 0.1) for n in (3, 7, 5)]
    for b_ in batches:
        b_[:, 1] = np.arange(b_.shape[0] * 3).reshape(-1, 3)
    m = Moments.merge_all(Moments.from_batch(b_) for b_ in batches)
    assert m.mean[0] == 0.1
    assert m.var()[0] == 0.0 and m.var(1)[0] == 0.0
    assert m.var()[1] > 0


def test_moments_large_mean_small_spread_where_float32_naive_fails():
    x = 1e6 + 1e-2 * np.random.default_rng(4).normal(size=(1000, 1, 1))
    x32 = x.astype(np.float32)
    true_var32 = np.var(x32.astype(np.float64))  # the variance of what a float32 model sees
    naive = np.mean(x32 * x32, dtype=np.float32) - np.mean(x32, dtype=np.float32) ** 2
    assert abs(float(naive) - true_var32) > 0.5 * true_var32  # E[x²] − E[x]² is garbage
    m32 = Moments.merge_all(Moments.from_batch(x32[i : i + 100]) for i in range(0, 1000, 100))
    assert m32.var()[0] == pytest.approx(true_var32, rel=1e-9)
    m = Moments.merge_all(Moments.from_batch(x[i : i + 100]) for i in range(0, 1000, 100))
    assert m.var()[0] == pytest.approx(np.var(x), rel=1e-9)
    assert m.var()[0] == pytest.approx(1e-4, rel=0.1)


def test_moments_bookkeeping_and_errors():
    e = Moments.empty(3)
    assert e.count == 0 and e.channels == 3
    assert np.isnan(e.var()).all() and np.isnan(Moments.from_batch(np.ones((1, 3))).var(1)).all()
    m = Moments.from_batch(np.arange(12.0).reshape(4, 3))
    assert (e + m) is m and (m + e) is m
    assert Moments.merge_all([], channels=2).count == 0
    with pytest.raises(ValueError, match="no items"):
        Moments.merge_all([])
    with pytest.raises(ValueError, match="3 and 2 channels"):
        m.merge(Moments.empty(2))
    np.testing.assert_array_equal(m.to_array(), [4, 4.5, 5.5, 6.5, 45, 45, 45])
    back = Moments.from_array(m.to_array())
    assert back.count == 4 and isinstance(back.count, int)
    np.testing.assert_array_equal(back.mean, m.mean)
    with pytest.raises(ValueError, match="odd length"):
        Moments.from_array(np.zeros(4))
    with pytest.raises(ValueError, match="non-negative integer"):
        Moments.from_array(np.array([2.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="must be equal 1-D"):
        Moments(1, np.zeros(2), np.zeros(3))


# ---------------------------------------------------------------- casting and verification


def test_cast_checked_counts_overflow():
    a = np.array([1.0, 7e4, -1e5, np.inf, np.nan, 65504.0, 65519.0, 65520.0])
    out, n = cast_checked(a, "float16")
    assert out.dtype == np.float16
    assert n == 3  # 7e4, -1e5 and 65520 (rounds up past fp16's max); inf/nan were already so
    assert out[5] == 65504 and out[6] == 65504
    out, n = cast_checked(np.array([1e39, 1.0]), np.float32)
    assert n == 1 and out.dtype == np.float32
    out, n = cast_checked(np.array([1e39, 3e38, 1.0]), "bf16")
    assert n == 1 and str(out.dtype) == "bfloat16"
    assert cast_checked(np.array([1e300]), "float64")[1] == 0
    with pytest.raises(ValueError, match="unsupported target dtype"):
        cast_checked(np.ones(2), "int8")


def test_tolerances_by_dtype():
    assert TOLERANCES["float32"] == (1e-4, 1e-5)
    assert tolerance_for("fp16") == (1e-2, 1e-3)
    assert tolerance_for(np.float32).rtol == 1e-4
    assert tolerance_for("bfloat16").atol == 1e-2
    with pytest.raises(ValueError):
        tolerance_for("int32")


def test_verify_close_figures():
    ref = [np.array([[1.0, 3.0, 2.0], [4.0, -8.0, 0.0]]), np.array([0.5, np.nan])]
    cand = [np.array([[1.0, 2.9, 2.0], [4.0, -8.0, 5.0]]), np.array([0.5, np.nan])]
    r = verify_close(ref, cand, rtol=1e-4, atol=1e-5)
    assert r["max_abs_error"] == pytest.approx(5.0, rel=1e-15)
    assert r["outputs"][0]["max_rel_error"] == pytest.approx(5.0 / 8.0, rel=1e-15)
    assert r["outputs"][1] == {"max_abs_error": 0.0, "max_rel_error": 0.0, "allclose": True}
    assert r["allclose"] is False
    assert r["top1_agreement"] == 0.5  # row 0: argmax 1 vs 1; row 1: argmax 0 vs 2
    ok = verify_close([ref[0]], [ref[0] * (1 + 5e-5)], rtol=1e-4, atol=0.0)
    assert ok["allclose"] is True and ok["top1_agreement"] == 1.0
    one_sided = verify_close([np.array([1.0])], [np.array([np.inf])], rtol=1, atol=1)
    assert one_sided["max_abs_error"] == np.inf and one_sided["allclose"] is False
    assert verify_close([np.zeros(3)], [np.ones(3)], rtol=0, atol=0)["max_rel_error"] == np.inf
    with pytest.raises(ValueError, match="shape"):
        verify_close([np.zeros(3)], [np.zeros(4)], rtol=0, atol=0)
    assert top1_agreement([np.zeros((4, 1))], [np.zeros((4, 1))]) is None
