"""What no rewrite can fold exactly (pre-activation BN→ReLU→Conv, BN after a nonlinearity)
stays with a reason per layer, and ``--affine`` turns it into a per-channel Mul and Add.

Outputs compared under onnxruntime at ORT_DISABLE_ALL (fp32: |Δ| ≤ 1e-5 + 1e-4·max|ref|:
``s·x + t`` in float32 against the BN's own float32 arithmetic).
"""

from __future__ import annotations

import json

import onnx
from onnx import helper
from test_onnx_fold import assert_same, bn_inits, bn_node, model_of, n_bn, w


def preact():
    """ResNetV2-style: x → BN → Relu → Conv(3×3, padded) → Sigmoid → BN → Conv(1×1) … → y,
    with the second BN after a nonlinearity whose consumer pads (a shift would leak)."""
    inits = [*bn_inits("bn_pre", 4), w("W1", 6, 4, 3, 3), *bn_inits("bn_act", 6)]
    inits.append(w("W2", 5, 6, 3, 3))
    nodes = [
        bn_node("bn_pre", "x", "a"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "W1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Sigmoid", ["c1"], ["g"], name="gate"),
        bn_node("bn_act", "g", "b"),
        helper.make_node("Conv", ["b", "W2"], ["y"], name="conv2", pads=[1] * 4),
    ]
    return model_of(nodes, inits, (2, 4, 6, 6))


def test_unfoldable_bns_keep_a_reason_each():
    _, steps = assert_same(preact(), bn_left=2)
    assert [(s.layer, s.into) for s in steps] == [("bn_pre", None), ("bn_act", None)]
    assert steps[0].reason == (
        "no producer with weights (input comes from graph input 'x'); "
        "no weighted consumer (output feeds Relu 'relu')"
    )
    assert steps[1].reason == (
        "no producer with weights (input comes from Sigmoid 'gate'); "
        "consumer Conv 'conv2' zero-pads its input and the BN shift is non-zero"
    )


def test_affine_turns_them_into_scale_and_shift():
    folded, steps = assert_same(preact(), affine=True)
    assert [s.into for s in steps] == ["affine", "affine"]
    assert [n.op_type for n in folded.model.graph.node] == [
        "Mul", "Add", "Relu", "Conv", "Sigmoid", "Mul", "Add", "Conv"
    ]  # fmt: skip


def test_cli_affine_writes_a_bn_free_model(tmp_path, run_cli):
    src, out = tmp_path / "preact.onnx", tmp_path / "affine.onnx"
    onnx.save(preact().model, src)
    result = run_cli("fold", src, "-o", out, "--affine", "--format", "json")
    assert result.code == 0, result
    doc = json.loads(result.out)
    assert [s["into"] for s in doc["steps"]] == ["affine", "affine"]
    assert doc["after"]["bn_layers"] == 0 and doc["verification"]["passed"]
    assert n_bn(onnx.load(str(out))) == 0
    assert run_cli("inspect", out).code == 0
    # without --affine nothing can be done: the file is written unchanged in BN count
    result = run_cli("fold", src, "-o", tmp_path / "kept.onnx", "--format", "json")
    assert json.loads(result.out)["after"]["bn_layers"] == 2
