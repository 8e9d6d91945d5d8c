"""A BN after a channel Concat folds slice by slice into the Concat's producers, and only
when each producer's output is read by the Concat alone.

Outputs compared under onnxruntime at ORT_DISABLE_ALL with test_onnx_fold's ``assert_same``
(fp32: |Δ| ≤ 1e-5 + 1e-4·max|ref|; the fold is exact in float64, the rest is float32 rounding
of the rewritten weights). BN statistics and γ/β are random and signed.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from test_onnx_fold import RNG, assert_same, bn_inits, bn_node, model_of, n_bn, w

import bncheck


def mixed_conv(axis: int = 1, *, share: bool = False, relu_input: bool = False, tap=False):
    """x → three convs (3×3 with bias, 1×1, depthwise 5×5) → Concat → BN(10) → y.

    ``share``: conv_b's output also feeds a Relu added to the result (DenseNet-like reuse);
    ``relu_input``: the Concat's last input is a Relu of x instead of conv_c; ``tap``: the
    Concat's output is also a second graph output.
    """
    inits = [w("Wa", 4, 4, 3, 3), w("Ba", 4), w("Wb", 2, 4, 1, 1), w("Wc", 4, 1, 5, 5)]
    nodes = [
        helper.make_node("Conv", ["x", "Wa", "Ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "Wb"], ["b"], name="conv_b"),
    ]
    if relu_input:
        nodes.append(helper.make_node("Relu", ["x"], ["c"], name="relu_c"))
    else:
        nodes.append(
            helper.make_node("Conv", ["x", "Wc"], ["c"], name="conv_c", group=4, pads=[2] * 4)
        )
    nodes.append(helper.make_node("Concat", ["a", "b", "c"], ["cat"], name="cat", axis=axis))
    inits += bn_inits("bn", 10)
    outputs = ["y"]
    if share:
        nodes += [
            bn_node("bn", "cat", "z"),
            helper.make_node("ReduceMean", ["b"], ["bm"], name="mean_b", axes=[1]),
            helper.make_node("Add", ["z", "bm"], ["y"], name="add"),
        ]
    else:
        nodes.append(bn_node("bn", "cat", "y"))
    if tap:
        outputs.append("cat")
    return model_of(nodes, inits, (2, 4, 6, 6), outputs=outputs)


@pytest.mark.parametrize("axis", [1, -3])
def test_bn_after_concat_folds_into_each_producer(axis):
    handle = mixed_conv(axis)
    decision = handle.info().bn_layers[0].fold
    assert decision.into == "producer"
    assert decision.target == "conv_a, conv_b, conv_c (through Concat 'cat')"
    folded, steps = assert_same(handle)
    assert [(s.layer, s.into) for s in steps] == [("bn", "producer")]
    kinds = [n.op_type for n in folded.model.graph.node]
    assert kinds == ["Conv", "Conv", "Conv", "Concat"]
    assert folded.model.graph.node[-1].output[0] == "y"
    # conv_b and conv_c had no bias: each gains its slice of the BN shift
    assert [len(n.input) for n in folded.model.graph.node[:3]] == [3, 3, 3]


def test_gemm_producers_of_a_feature_concat():
    inits = [w("Wa", 3, 5), w("Wb", 5, 2), w("Cb", 2), *bn_inits("bn", 5)]
    nodes = [
        helper.make_node("Gemm", ["x", "Wa"], ["a"], name="fc_a", transB=1, alpha=0.5),
        helper.make_node("Gemm", ["x", "Wb", "Cb"], ["b"], name="fc_b", beta=2.0),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
        bn_node("bn", "cat", "y"),
    ]
    _, steps = assert_same(model_of(nodes, inits, (3, 5)))
    assert [(s.layer, s.into, s.target) for s in steps] == [
        ("bn", "producer", "fc_a, fc_b (through Concat 'cat')")
    ]


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"share": True}, "producer Conv 'conv_b' output also feeds ReduceMean 'mean_b'"),
        ({"relu_input": True}, "Concat input Relu 'relu_c' is not a Conv, ConvTranspose or Gemm"),
        ({"axis": 2}, "Concat 'cat' does not join along the channel axis"),
        ({"tap": True}, "Concat 'cat' output also feeds other nodes"),
    ],
)
def test_guards_keep_the_bn_and_say_why(kwargs, reason):
    handle = mixed_conv(**kwargs) if kwargs.get("axis") != 2 else None
    if handle is None:  # along H the BN has 4 channels, the concat makes 10 rows
        inits = [w("Wa", 4, 4, 3, 3), w("Wb", 4, 4, 1, 1), *bn_inits("bn", 4)]
        nodes = [
            helper.make_node("Conv", ["x", "Wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["x", "Wb"], ["b"], name="conv_b"),
            helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=2),
            bn_node("bn", "cat", "y"),
        ]
        handle = model_of(nodes, inits, (2, 4, 6, 6))
    decision = handle.info().bn_layers[0].fold
    assert decision.into is None and reason in decision.reason, decision.reason
    _, steps = assert_same(handle, bn_left=1)
    assert reason in steps[0].reason


def test_concat_fold_end_to_end_is_verified(tmp_path):
    src, out = tmp_path / "mixed.onnx", tmp_path / "folded.onnx"
    onnx.save(mixed_conv().model, str(src))
    result = bncheck.fold(src, out)
    assert result.passed and result.folded_count == 1
    assert result.verification.max_rel_error < 1e-5
    assert n_bn(onnx.load(str(out))) == 0
    # and the written file runs the original function on fresh input
    from bncheck.backends import open_model

    x = RNG.normal(0, 1, (2, 4, 6, 6)).astype(np.float32)
    (ref,), (got,) = open_model(src).run({"x": x}), open_model(out).run({"x": x})
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
