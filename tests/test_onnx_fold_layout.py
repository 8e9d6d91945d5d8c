"""A BN behind layout ops (LeViT's ``Linear → flatten → BatchNorm1d → reshape``) folds into the
producer when the shapes prove the channel axis survives one to one, and says why when not.

Outputs compared under onnxruntime at ORT_DISABLE_ALL with test_onnx_fold's ``assert_same``
(fp32: |Δ| ≤ 1e-5 + 1e-4·max|ref|; the fold is exact in float64, what is left is float32
rounding of the rewritten weights). BN statistics and γ/β are random and signed.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_onnx_fold import assert_same, bn_inits, bn_node, model_of, w

from bncheck.numerics.layout import axis_through_reshape, axis_through_transpose


def ints(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def levit(x_shape=(2, 5, 6), c=8, *, flat=(-1, 8), torch_weight=False):
    """x (B, N, Cin) → MatMul + Add bias → Reshape flat → BN → Reshape back; ``torch_weight``:
    the weight is ``Transpose(W)`` of a stored (out, in) matrix, as torch.onnx writes Linear."""
    shape = (c, x_shape[-1]) if torch_weight else (x_shape[-1], c)
    inits = [w("W", *shape), w("B", c), *bn_inits("bn", c), ints("flat", list(flat))]
    inits.append(ints("back", [-1, x_shape[1], c]))
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], name="wt", perm=[1, 0])]
    nodes = nodes if torch_weight else []
    nodes += [
        helper.make_node("MatMul", ["x", "Wt" if torch_weight else "W"], ["mm"], name="linear"),
        helper.make_node("Add", ["mm", "B"], ["lin"], name="linear_bias"),
        helper.make_node("Reshape", ["lin", "flat"], ["f"], name="flatten"),
        bn_node("bn", "f", "b"),
        helper.make_node("Reshape", ["b", "back"], ["y"], name="unflatten"),
    ]
    return model_of(nodes, inits, x_shape)


@pytest.mark.parametrize("torch_weight", [False, True])
def test_levit_linear_flatten_bn_reshape_folds(torch_weight):
    folded, steps = assert_same(levit(torch_weight=torch_weight))
    assert [(s.layer, s.into, s.target) for s in steps] == [
        ("bn", "producer", "linear (through Reshape 'flatten')")
    ]
    assert [n.op_type for n in folded.model.graph.node] == ["MatMul", "Add", "Reshape", "Reshape"]


def test_symbolic_batch_and_tokens():
    inits = [w("W", 6, 8), *bn_inits("bn", 8), ints("flat", [-1, 8])]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], name="linear"),
        helper.make_node("Reshape", ["mm", "flat"], ["f"], name="flatten"),
        bn_node("bn", "f", "y"),
    ]
    folded, steps = assert_same(model_of(nodes, inits, ("batch", "tokens", 6)))
    assert steps[0].into == "producer"
    assert [n.op_type for n in folded.model.graph.node] == ["MatMul", "Add", "Reshape"]


def test_gemm_unsqueeze_bn_squeeze():
    inits = [w("W", 8, 6), w("C", 8), *bn_inits("bn", 8), ints("ax", [2])]
    nodes = [
        helper.make_node("Gemm", ["x", "W", "C"], ["g"], name="fc", transB=1, alpha=0.5),
        helper.make_node("Unsqueeze", ["g", "ax"], ["u"], name="unsq"),
        bn_node("bn", "u", "b"),
        helper.make_node("Squeeze", ["b", "ax"], ["y"], name="sq"),
    ]
    _, steps = assert_same(model_of(nodes, inits, (3, 6)))
    assert steps[0].target == "fc (through Unsqueeze 'unsq')"


def test_matmul_transpose_bn_folds():
    # (B, N, C) → Transpose(0, 2, 1) → BN over C (BatchNorm1d on (B, C, N))
    inits = [w("W", 6, 8), *bn_inits("bn", 8)]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], name="linear"),
        helper.make_node("Transpose", ["mm"], ["t"], name="tr", perm=[0, 2, 1]),
        bn_node("bn", "t", "y"),
    ]
    _, steps = assert_same(model_of(nodes, inits, (2, 5, 6)))
    assert steps[0].into == "producer"


def test_conv_flatten_spatial_bn_folds():
    inits = [w("Wc", 4, 3, 3, 3), *bn_inits("bn", 4), ints("s", [0, 4, -1])]
    nodes = [
        helper.make_node("Conv", ["x", "Wc"], ["c"], name="conv", pads=[1] * 4),
        helper.make_node("Reshape", ["c", "s"], ["r"], name="flat_hw"),
        bn_node("bn", "r", "y"),
    ]
    _, steps = assert_same(model_of(nodes, inits, (2, 3, 5, 5)))
    assert steps[0].target == "conv (through Reshape 'flat_hw')"


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        (
            "reshape_mixes",
            "Reshape 'mix' is not proven to keep the feature axis of MatMul 'linear'",
        ),
        ("transpose_moves", "reaches the BN as axis 0, not 1"),
        ("fan_out", "output of Reshape 'mix' is also read elsewhere"),
    ],
)
def test_layout_ops_that_do_not_keep_the_channel_are_kept_with_reason(kind, reason):
    # (2, 3, 4) → Reshape to (2, 4, 3) is not a transpose: channel 4 gets mixed with tokens
    inits = [w("W", 5, 4), *bn_inits("bn", 4), ints("s", [2, 4, 3])]
    outputs = ("y",)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="linear")]
    if kind == "transpose_moves":  # features land on axis 0
        inits = [w("W", 5, 3), *bn_inits("bn", 3)]
        nodes.append(helper.make_node("Transpose", ["mm"], ["r"], name="mix", perm=[2, 1, 0]))
    else:
        nodes.append(helper.make_node("Reshape", ["mm", "s"], ["r"], name="mix"))
    nodes.append(bn_node("bn", "r", "y"))
    if kind == "fan_out":
        inits[-1] = ints("s", [6, 4])
        nodes.append(helper.make_node("Relu", ["r"], ["y2"], name="tap"))
        outputs = ("y", "y2")
    handle = model_of(nodes, inits, (2, 3, 5), outputs=outputs)
    _, steps = assert_same(handle, bn_left=1)
    assert steps[0].into is None and reason in steps[0].reason, steps[0].reason


def test_axis_through_reshape_and_transpose():
    assert axis_through_reshape((2, 3, 4), 2, (6, 4)) == 1
    assert axis_through_reshape(("B", "N", 8), 2, ("M", 8)) == 1
    assert axis_through_reshape((2, 3, 4), 2, (2, 4, 3)) is None  # mixes channels
    assert axis_through_reshape(("B", 4, "H", "W"), 1, ("B", 4, None)) is None  # unknown
    assert axis_through_reshape(("B", 4, 5, 6), 1, ("B", 4, 30)) == 1
    assert axis_through_reshape(("B", 4, "H", 6), 1, ("B", 4, 6, "H")) == 1
    assert axis_through_transpose((0, 2, 1), 2) == 1
    assert axis_through_transpose((0, 2, 1), 1) == 2
    assert axis_through_transpose((0, 0, 1), 1) is None


def test_written_file_inspects_clean(tmp_path, run_cli):
    src, out = tmp_path / "levit.onnx", tmp_path / "folded.onnx"
    onnx.save(levit().model, src)
    result = run_cli("fold", src, "-o", out)
    assert result.code == 0, result
    assert "verification passed" in result.out
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(out)).graph.node) == 0
    assert run_cli("inspect", out).code == 0


def test_fp16_matmul_layout_fold():
    inits = [w("W", 6, 8, dtype=np.float16), *bn_inits("bn", 8, np.float16), ints("f", [-1, 8])]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], name="linear"),
        helper.make_node("Reshape", ["mm", "f"], ["r"], name="flatten"),
        bn_node("bn", "r", "y"),
    ]
    handle = model_of(nodes, inits, (2, 5, 6), dtype=TensorProto.FLOAT16)
    assert_same(handle, rtol=1e-2, atol=1e-3, dtype=np.float16)


@pytest.mark.parametrize("tap", [False, True])
def test_bn_identity_linear_head_folds_into_the_consumer(tap):
    # LeViT's head as exported: ReduceMean → BatchNorm1d → Identity (dropout) → MatMul(Wᵀ)
    inits = [*bn_inits("bn", 6), w("W", 4, 6), w("B", 4), ints("ax", [2])]
    nodes = [
        helper.make_node("ReduceMean", ["x", "ax"], ["m"], name="pool", keepdims=0),
        bn_node("bn", "m", "b"),
        helper.make_node("Identity", ["b"], ["d"], name="dropout"),
        helper.make_node("Transpose", ["W"], ["Wt"], name="wt", perm=[1, 0]),
        helper.make_node("MatMul", ["d", "Wt"], ["mm"], name="head"),
        helper.make_node("Add", ["mm", "B"], ["y"], name="head_bias"),
    ]
    outputs = ("y", "d") if tap else ("y",)
    handle = model_of(nodes, inits, (2, 6, 5), outputs=outputs, opset=18)
    folded, steps = assert_same(handle, bn_left=int(tap))
    if tap:  # the Identity's output is also a graph output: the BN stays, with the reason
        assert steps[0].into is None and "through Identity" in steps[0].reason
    else:
        assert (steps[0].into, steps[0].target) == ("consumer", "head")
        assert "Identity" not in [n.op_type for n in folded.model.graph.node]


def test_reshape_to_a_runtime_shape_is_not_proven():
    # the target shape is computed from x at run time: shape inference cannot name the dims
    inits = [w("W", 6, 8), *bn_inits("bn", 8), ints("tail", [8, -1])]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], name="linear"),
        helper.make_node("Shape", ["x"], ["sx"], name="shape", end=1),
        helper.make_node("Concat", ["sx", "tail"], ["target"], name="target", axis=0),
        helper.make_node("Reshape", ["mm", "target"], ["r"], name="dyn"),
        bn_node("bn", "r", "y"),
    ]
    handle = model_of(nodes, inits, ("batch", 5, 6))
    _, steps = assert_same(handle, bn_left=1)  # (b, 5, 8) → (b, 8, 5) mixes them, in fact
    assert steps[0].into is None
    assert "Reshape 'dyn' is not proven to keep the feature axis" in steps[0].reason
