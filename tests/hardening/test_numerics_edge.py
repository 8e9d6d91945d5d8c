"""Numerical edges: half-precision models, degenerate variances, overflow, huge activations.

tests/test_numerics.py holds the fold-vs-torch and Moments-split properties; this file adds
the fold ∘ unfold round trip per dtype, Moments on float16 input and mixed-scale channels,
and the same edges end to end through ``inspect`` and ``fold``.
"""

from __future__ import annotations

import itertools
import json

import ml_dtypes
import numpy as np
import onnx
from corpus import conv_bn_onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper

from bncheck.numerics import Moments, bn_scale_shift, fold_into_producer

# ---- fold ∘ unfold -----------------------------------------------------------------------

DTYPES = {
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float32": np.float32,
    "float64": np.float64,
}


@st.composite
def producer_cases(draw):
    op = draw(st.sampled_from(["conv", "conv_transpose", "linear", "gemm_t", "matmul"]))
    groups = draw(st.sampled_from([1, 2, 3])) if op in ("conv", "conv_transpose") else 1
    per = draw(st.integers(1, 3))
    k = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))
    cout = groups * per
    cin = groups * draw(st.integers(1, 3))
    if op == "conv":
        shape = (cout, cin // groups, *k)
    elif op == "conv_transpose":
        shape = (cin, cout // groups, *k)
    elif op == "linear":
        shape = (cout, cin)
    else:
        shape = (cin, cout)
    return op, groups, shape, cout, draw(st.sampled_from(sorted(DTYPES))), draw(st.integers(0, 9))


def _out_axis_view(w: np.ndarray, op: str, groups: int) -> np.ndarray:
    """``w`` rearranged so that axis 0 is the producer's output channel."""
    if op in ("conv", "linear"):
        return w
    if op in ("gemm_t", "matmul"):
        return w.T
    cin, per_out = w.shape[:2]
    g = w.reshape(groups, cin // groups, per_out, *w.shape[2:])
    return np.moveaxis(g, 2, 1).reshape(groups * per_out, cin // groups, *w.shape[2:])


@settings(max_examples=60, deadline=None)
@given(producer_cases())
def test_fold_then_unfold_recovers_the_weights_in_their_dtype(case):
    """Folding computes W' = s·W, b' = s·b + t in float64 from weights stored in ``dtype``.
    Undoing it (W = W'/s, b = (b' − t)/s) in float64 and casting back gives the stored weights
    bit for bit: the float64 round-trip error (~1e-16 relative) is far below half an ulp of
    float16/bfloat16/float32, and within 1e-13 relative for float64 itself. Statistics cover
    γ < 0, var ≈ 0 and |s| from 1e-3 to 1e3."""
    op, groups, shape, cout, dtype_name, seed = case
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(dtype)
    b = rng.normal(size=cout).astype(dtype)
    gamma = rng.choice([-1.0, 1.0], cout) * 10 ** rng.uniform(-3, 3, cout)
    var = np.where(rng.random(cout) < 0.3, 0.0, rng.uniform(0.01, 4, cout))
    s, t = bn_scale_shift(rng.normal(size=cout), var, gamma, rng.normal(size=cout), eps=1e-5)
    w2, b2 = fold_into_producer(w, b, s, t, op=op, groups=groups)
    assert w2.dtype == np.float64 and b2.dtype == np.float64
    view = _out_axis_view(w2, op, groups)
    w_back = view / s.reshape(-1, *([1] * (view.ndim - 1)))
    b_back = (b2 - t) / s
    w_ref = _out_axis_view(w.astype(np.float64), op, groups)
    if dtype_name == "float64":
        np.testing.assert_allclose(w_back, w_ref, rtol=1e-13, atol=0)
        np.testing.assert_allclose(b_back, b, rtol=1e-9, atol=1e-12)  # t − t cancels
    else:
        np.testing.assert_array_equal(w_back.astype(dtype), w_ref.astype(dtype))
        # b' − t loses |t|·2^-52 absolutely; relative to b that is still below half an ulp
        # of the stored dtype unless |t| ≫ |b|·2^40, which these ranges never reach.
        np.testing.assert_array_equal(b_back.astype(dtype), b)


# ---- Moments ------------------------------------------------------------------------------


def test_moments_of_float16_input_accumulate_in_float64():
    """4096 values of 60000 in float16: a float16 sum overflows (max 65504) at the 2nd value;
    the moments are exact (mean 60000, var of ±32 around it = 1024)."""
    x = np.full((4096, 1, 1), 60000, np.float16)
    x[::2] += np.float16(32)
    x[1::2] -= np.float16(32)
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.sum(x, dtype=np.float16))
    m = Moments.merge_all(Moments.from_batch(x[i : i + 1000]) for i in range(0, 4096, 1000))
    assert m.count == 4096
    assert m.mean[0] == 60000.0  # exact: halves of ±32 cancel in float64
    assert m.var()[0] == 1024.0


@settings(max_examples=40, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 60), min_size=0, max_size=6),
    seed=st.integers(0, 99),
    scale=st.sampled_from([1e-30, 1.0, 1e30]),
)
def test_moments_mixed_scales_any_split(cuts, seed, scale):
    """Channels at 1e30, 1e-30 and order 1 in one tensor, merged from any split (empty pieces
    included): every channel's mean and variance match numpy's float64 figures to 1e-9
    relative — the huge channel neither overflows nor swamps the small ones."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(60, 3, 2))
    x[:, 0] *= 1e30
    x[:, 1] = x[:, 1] * 1e-30 + 5e-30
    x[:, 2] *= scale
    edges = [0, *sorted(cuts), 60]
    m = Moments.merge_all(
        (Moments.from_batch(x[a:b]) for a, b in itertools.pairwise(edges)),
        channels=3,
    )
    ref = np.moveaxis(x, 1, 0).reshape(3, -1)
    assert m.count == 120
    np.testing.assert_allclose(m.mean, ref.mean(axis=1), rtol=1e-9, atol=0)
    np.testing.assert_allclose(m.var(), ref.var(axis=1), rtol=1e-9, atol=0)


# ---- end to end: inspect and fold ---------------------------------------------------------


def _set(m: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    t = next(t for t in m.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array(value, name))


def _cast_model(m: onnx.ModelProto, elem: int, dtype) -> onnx.ModelProto:
    for t in m.graph.initializer:
        _set(m, t.name, numpy_helper.to_array(t).astype(dtype))
    for v in [*m.graph.input, *m.graph.output]:
        v.type.tensor_type.elem_type = elem
    return m


def _findings(result) -> list[tuple[str, str]]:
    return [(f["code"], f["message"]) for f in json.loads(result.out)["findings"]]


def _fold_json(run_cli, src, out, *extra):
    result = run_cli("fold", src, "-o", out, "--format", "json", *extra)
    assert result.code == 0, result
    return json.loads(result.out)


def test_fp16_onnx_inspect_and_fold(run_cli, tmp_path):
    src = tmp_path / "h.onnx"
    src.write_bytes(
        _cast_model(conv_bn_onnx(), TensorProto.FLOAT16, np.float16).SerializeToString()
    )
    result = run_cli("inspect", src, "--format", "json")
    assert result.code == 0, result
    assert _findings(result) == [("BN204", "statistics in float16; parameters in float16")]
    report = _fold_json(run_cli, src, tmp_path / "f.onnx")
    (step,) = report["steps"]
    assert (step["into"], step["target"]) == ("producer", "conv")
    v = report["verification"]
    # float16's floor: 16 rounding units (2⁻¹¹) of the output scale, no absolute part
    assert v["passed"] and (v["rtol"], v["atol"]) == (16 * 2.0**-11, 0.0)
    assert v["max_abs_error"] <= 0.02  # a few float16 ulps of outputs of order 1–10
    folded = onnx.load(str(tmp_path / "f.onnx"))
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]
    assert {t.data_type for t in folded.graph.initializer} == {TensorProto.FLOAT16}


def test_bf16_onnx_inspect_and_fold(run_cli, tmp_path):
    src = tmp_path / "b.onnx"
    m = _cast_model(conv_bn_onnx(), TensorProto.BFLOAT16, ml_dtypes.bfloat16)
    src.write_bytes(m.SerializeToString())
    result = run_cli("inspect", src, "--format", "json")
    assert result.code == 0, result
    assert _findings(result) == [("BN204", "statistics in bfloat16; parameters in bfloat16")]
    # onnxruntime's CPU provider has no bfloat16 Conv: verification cannot run, and says so.
    result = run_cli("fold", src, "-o", tmp_path / "f.onnx")
    assert result.code == 2 and "onnxruntime cannot load it" in result.err, result
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "f.onnx").exists()


def test_fp16_pt2_inspect_and_fold(run_cli, tmp_path):
    import torch
    from torch_fixtures import conv_bn, randomize_bn

    src = tmp_path / "h.pt2"
    module = randomize_bn(conv_bn(4).eval()).half()
    torch.export.save(torch.export.export(module, (torch.randn(2, 3, 8, 8).half(),)), src)
    result = run_cli("inspect", src, "--format", "json")
    assert result.code == 0, result
    assert _findings(result) == [("BN204", "statistics in float16; parameters in float16")]
    report = _fold_json(run_cli, src, tmp_path / "f.pt2")
    assert [(s["into"], s["target"]) for s in report["steps"]] == [("producer", "conv1")]
    assert report["verification"]["passed"] and report["verification"]["rtol"] == 16 * 2.0**-11


def test_bf16_pt2_fold(run_cli, tmp_path):
    import torch
    from torch_fixtures import conv_bn, randomize_bn

    src = tmp_path / "b.pt2"
    module = randomize_bn(conv_bn(4).eval()).to(torch.bfloat16)
    x = torch.randn(2, 3, 8, 8).to(torch.bfloat16)
    torch.export.save(torch.export.export(module, (x,)), src)
    report = _fold_json(run_cli, src, tmp_path / "f.pt2")
    assert [(s["into"], s["target"]) for s in report["steps"]] == [("producer", "conv1")]


def test_fold_with_zero_and_subeps_variance_is_exact(run_cli, tmp_path):
    """var = 0 and var = 1e-9 < eps fold like any other channel: s = γ/√(var + ε) is finite
    (≈ 316·γ); the folded weights equal s·W computed in float64, rounded to float32."""
    m = conv_bn_onnx()
    var = np.array([0.0, 1e-9, 1.0], np.float32)
    _set(m, "var", var)
    src = tmp_path / "v.onnx"
    src.write_bytes(m.SerializeToString())
    inspect = run_cli("inspect", src, "--format", "json")
    assert inspect.code == 0  # var 0 is a dead channel, not corruption: BN103 warns
    assert [c for c, _ in _findings(inspect)] == ["BN103"]
    report = _fold_json(run_cli, src, tmp_path / "f.onnx")
    assert report["verification"]["passed"]
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    s, _ = bn_scale_shift(init["mean"], var, init["scale"], init["beta"], 1e-5)
    folded = onnx.load(str(tmp_path / "f.onnx"))
    (w,) = [
        numpy_helper.to_array(t)
        for t in folded.graph.initializer
        if t.dims[:1] == [3] and len(t.dims) == 4
    ]
    expected = (init["w"].astype(np.float64) * s[:, None, None, None]).astype(np.float32)
    np.testing.assert_array_equal(w, expected)


def test_fold_refuses_negative_variance(run_cli, tmp_path):
    m = conv_bn_onnx()
    _set(m, "var", np.array([-1.0, 1.0, 1.0], np.float32))
    src = tmp_path / "n.onnx"
    src.write_bytes(m.SerializeToString())
    report = _fold_json(run_cli, src, tmp_path / "f.onnx")
    (step,) = report["steps"]
    assert step["into"] is None and "non-finite scale or shift" in step["reason"]


def test_fp16_fold_that_would_overflow_is_skipped(run_cli, tmp_path):
    """W = 300, γ = 2, var = 0: s·W ≈ 2·316·300 = 1.9e5 > 65504, the float16 maximum. The BN
    stays (a skip with its reason), nothing becomes inf, and the model is still written."""
    m = _cast_model(conv_bn_onnx(), TensorProto.FLOAT16, np.float16)
    _set(m, "w", np.full((3, 2, 3, 3), 300, np.float16))
    _set(m, "scale", np.array([2, 1, 1], np.float16))
    _set(m, "var", np.array([0, 1, 1], np.float16))
    src = tmp_path / "o.onnx"
    src.write_bytes(m.SerializeToString())
    report = _fold_json(run_cli, src, tmp_path / "f.onnx")
    (step,) = report["steps"]
    assert step["into"] is None and step["reason"] == "folded weights overflow float16"
    # Nothing folded: the model is the input as it was, written without a verification run.
    assert report["verification"] is None and report["unverified"] == "nothing changed"
    folded = onnx.load(str(tmp_path / "f.onnx"))
    assert [n.op_type for n in folded.graph.node] == ["Conv", "BatchNormalization", "Relu"]
    assert all(np.isfinite(numpy_helper.to_array(t)).all() for t in folded.graph.initializer)
