"""ONNX folding: every pattern folds exactly, every guard holds, nothing dead is left.

Outputs are compared under onnxruntime at ORT_DISABLE_ALL (OnnxHandle.run), so ORT's own
fusions cannot hide a wrong fold. fp32 tolerance: |Δ| ≤ 1e-5 + 1e-4·max|ref| (the fold is exact
in float64; the rest is float32 rounding of the rewritten weights and a reordered sum).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import SAMPLES
from onnx import TensorProto, helper, numpy_helper

import bncheck
from bncheck.backends.onnx import OnnxHandle

RNG = np.random.default_rng(7)


def bn_inits(prefix: str, c: int, dtype=np.float32) -> list[onnx.TensorProto]:
    """Randomized BN tensors: never the defaults, so a wrong fold shows."""
    arrays = {
        "scale": RNG.uniform(0.5, 1.5, c) * RNG.choice([-1, 1], c),
        "beta": RNG.normal(0, 0.5, c),
        "mean": RNG.normal(0.5, 1.0, c),
        "var": RNG.uniform(0.5, 2.0, c),
    }
    return [numpy_helper.from_array(v.astype(dtype), f"{prefix}_{k}") for k, v in arrays.items()]


def bn_node(prefix: str, x: str, y: str) -> onnx.NodeProto:
    ins = [x] + [f"{prefix}_{k}" for k in ("scale", "beta", "mean", "var")]
    return helper.make_node("BatchNormalization", ins, [y], name=prefix, epsilon=1e-3)


def model_of(nodes, inits, x_shape, outputs=("y",), dtype=TensorProto.FLOAT) -> OnnxHandle:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", dtype, list(x_shape))],
        [helper.make_tensor_value_info(o, dtype, None) for o in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    # Give the outputs their inferred types, as an exporter would (full_check wants shapes).
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type for v in inferred.graph.output}
    for out in model.graph.output:
        out.type.CopyFrom(types[out.name])
    onnx.checker.check_model(model, full_check=True)
    return OnnxHandle("test.onnx", model)


def w(name, *shape, dtype=np.float32):
    return numpy_helper.from_array(RNG.normal(0, 0.5, shape).astype(dtype), name)


def assert_same(
    handle: OnnxHandle, *, affine=False, rtol=1e-4, atol=1e-5, bn_left=0, dtype=np.float32
):
    folded, steps = handle.folded(affine=affine)
    m = folded.model
    onnx.checker.check_model(m, full_check=True)
    assert sum(n.op_type == "BatchNormalization" for n in m.graph.node) == bn_left, steps
    read = {i for n in m.graph.node for i in n.input}
    assert [t.name for t in m.graph.initializer if t.name not in read] == []
    assert [i.name for i in m.graph.input] == [i.name for i in handle.model.graph.input]
    assert [o.name for o in m.graph.output] == [o.name for o in handle.model.graph.output]
    assert list(m.opset_import) == list(handle.model.opset_import)
    spec = handle.info().inputs[0]
    shape = [d if isinstance(d, int) else 2 for d in spec.shape]
    x = RNG.normal(0, 1, shape).astype(dtype)
    for ref, got in zip(handle.run({"x": x}), folded.run({"x": x}), strict=True):
        scale = float(np.max(np.abs(ref.astype(np.float64))))
        err = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64))))
        assert err <= atol + rtol * scale, (err, scale)
    return folded, steps


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_conv_bn(bias, group):
    inits = [w("W", 4, 4 // group, 3, 3), *bn_inits("bn", 4)]
    ins = ["x", "W"]
    if bias:
        inits.append(w("B", 4))
        ins.append("B")
    nodes = [
        helper.make_node("Conv", ins, ["c"], name="conv", group=group, pads=[1, 1, 1, 1]),
        bn_node("bn", "c", "y"),
    ]
    _, steps = assert_same(model_of(nodes, inits, (2, 4, 6, 6)))
    assert [(s.layer, s.into, s.target) for s in steps] == [("bn", "producer", "conv")]


@pytest.mark.parametrize("kdims", [(3,), (3, 3, 3)])
def test_conv1d_and_3d(kdims):
    inits = [w("W", 6, 3, *kdims), *bn_inits("bn", 6)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    assert_same(model_of(nodes, inits, (2, 3, *([5] * len(kdims)))))


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_groups_and_stride(group):
    inits = [w("W", 4, 6 // group, 3, 3), *bn_inits("bn", 6)]
    nodes = [
        helper.make_node(
            "ConvTranspose", ["x", "W"], ["c"], name="ct", group=group, strides=[2, 2]
        ),
        bn_node("bn", "c", "y"),
    ]
    assert_same(model_of(nodes, inits, (2, 4, 5, 5)))


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_with_alpha_beta(trans_b):
    shape = (5, 3) if trans_b else (3, 5)
    inits = [w("W", *shape), w("C", 5), *bn_inits("bn", 5)]
    nodes = [
        helper.make_node(
            "Gemm", ["x", "W", "C"], ["g"], name="gemm", transB=trans_b, alpha=0.7, beta=1.3
        ),
        bn_node("bn", "g", "y"),
    ]
    folded, _ = assert_same(model_of(nodes, inits, (4, 3)))
    gemm = next(n for n in folded.model.graph.node if n.op_type == "Gemm")
    assert {a.name for a in gemm.attribute} == {"transB"}


def test_matmul_gains_a_bias_add():
    inits = [w("W", 3, 5), *bn_inits("bn", 5)]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"), bn_node("bn", "m", "y")]
    folded, _ = assert_same(model_of(nodes, inits, (4, 3)))
    assert [n.op_type for n in folded.model.graph.node] == ["MatMul", "Add"]


def test_conv_add_bn_chain_and_decomposed_bn():
    c = 4
    per_channel = lambda name: numpy_helper.from_array(  # noqa: E731
        RNG.normal(0, 1, (1, c, 1, 1)).astype(np.float32), name
    )
    inits = [w("W", c, 2, 3, 3), per_channel("b0"), *bn_inits("bn", c), w("W2", c, c, 1, 1)]
    inits += [per_channel("m2"), per_channel("a2")]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("Add", ["c", "b0"], ["cb"], name="bias_add"),
        bn_node("bn", "cb", "z"),
        helper.make_node("Conv", ["z", "W2"], ["c2"], name="conv2"),
        helper.make_node("Mul", ["c2", "m2"], ["c3"], name="mul2"),
        helper.make_node("Add", ["c3", "a2"], ["y"], name="add2"),
    ]
    folded, steps = assert_same(model_of(nodes, inits, (2, 2, 6, 6)))
    assert [n.op_type for n in folded.model.graph.node] == ["Conv", "Conv"]
    assert [(s.layer, s.into) for s in steps] == [
        ("bn", "producer"),
        ("mul2", "producer"),
        ("add2", "producer"),
    ]


def test_bn_before_conv_folds_into_consumer_only_when_exact():
    def graph(pads):
        inits = [*bn_inits("bn", 3), w("W", 4, 3, 3, 3)]
        nodes = [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            bn_node("bn", "r", "b"),
            helper.make_node("Conv", ["b", "W"], ["y"], name="conv", pads=[pads] * 4),
        ]
        return model_of(nodes, inits, (2, 3, 6, 6))

    _, steps = assert_same(graph(0))
    assert (steps[0].into, steps[0].target) == ("consumer", "conv")
    _, steps = assert_same(graph(1), bn_left=1)
    assert steps[0].into is None and "zero-pads" in steps[0].reason


def test_fan_out_is_skipped_with_reason():
    inits = [w("W", 3, 2, 1, 1), *bn_inits("bn", 3)]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        bn_node("bn", "c", "b"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Add", ["b", "r"], ["y"], name="add"),
    ]
    _, steps = assert_same(model_of(nodes, inits, (2, 2, 4, 4)), bn_left=1)
    assert "also feeds Relu 'relu'" in steps[0].reason


def test_shared_weight_is_copied_not_mutated():
    inits = [w("W", 3, 3, 1, 1), *bn_inits("bn", 3)]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c1"], name="conv1"),
        bn_node("bn", "c1", "y"),
        helper.make_node("Conv", ["x", "W"], ["y2"], name="conv2"),
    ]
    handle = model_of(nodes, inits, (2, 3, 4, 4), outputs=("y", "y2"))
    folded, _ = assert_same(handle)
    x = RNG.normal(0, 1, (2, 3, 4, 4)).astype(np.float32)
    # The other reader of W computes bit-identical outputs, and W itself is unchanged.
    assert np.array_equal(handle.run({"x": x})[1], folded.run({"x": x})[1])
    by_name = {t.name: numpy_helper.to_array(t) for t in folded.model.graph.initializer}
    assert np.array_equal(by_name["W"], numpy_helper.to_array(inits[0]))


def test_constant_node_weights_fold_and_leave_nothing_dead():
    weight = RNG.normal(0, 0.5, (3, 2, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node(
            "Constant", [], ["W"], name="wconst", value=numpy_helper.from_array(weight)
        ),
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        bn_node("bn", "c", "y"),
    ]
    folded, _ = assert_same(model_of(nodes, bn_inits("bn", 3), (2, 2, 5, 5)))
    assert [n.op_type for n in folded.model.graph.node] == ["Conv"]


def test_affine_replaces_unfoldable_bns():
    inits = bn_inits("bn", 3)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("bn", "r", "y")]
    folded, steps = assert_same(model_of(nodes, inits, (2, 3, 4, 4)), affine=True)
    assert steps[0].into == "affine"
    assert [n.op_type for n in folded.model.graph.node] == ["Relu", "Mul", "Add"]


def test_fp16_model():
    inits = [w("W", 4, 2, 3, 3, dtype=np.float16), *bn_inits("bn", 4, np.float16)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    handle = model_of(nodes, inits, (2, 2, 5, 5), dtype=TensorProto.FLOAT16)
    folded, _ = assert_same(handle, rtol=1e-2, atol=1e-3, dtype=np.float16)
    assert all(t.data_type == TensorProto.FLOAT16 for t in folded.model.graph.initializer)


def test_fp16_overflow_leaves_the_layer_unfolded():
    inits = [w("W", 2, 2, 1, 1, dtype=np.float16)]
    inits += [
        numpy_helper.from_array(np.array([3e4, 1.0], np.float16), "bn_scale"),
        numpy_helper.from_array(np.zeros(2, np.float16), "bn_beta"),
        numpy_helper.from_array(np.zeros(2, np.float16), "bn_mean"),
        numpy_helper.from_array(np.array([1e-4, 1.0], np.float16), "bn_var"),
    ]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    handle = model_of(nodes, inits, (1, 2, 3, 3), dtype=TensorProto.FLOAT16)
    _, steps = handle.folded()
    assert steps[0].into is None and "overflow float16" in steps[0].reason


def test_source_model_is_not_modified():
    handle = OnnxHandle(SAMPLES / "resnet.onnx", onnx.load(str(SAMPLES / "resnet.onnx")))
    before = handle.model.SerializeToString()
    handle.folded()
    assert handle.model.SerializeToString() == before


@pytest.mark.parametrize("stem, left", [("resnet", 0), ("patterns", 3)])
def test_sample_models_fold_and_verify_on_their_data(tmp_path, stem, left):
    out = tmp_path / f"{stem}.onnx"
    result = bncheck.fold(SAMPLES / f"{stem}.onnx", out, data=SAMPLES / f"{stem}_calib.npy")
    assert result.passed and result.output == out
    v = result.verification
    assert v.max_rel_error < 1e-5 and v.samples == 32
    model = onnx.load(str(out))
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == left
    onnx.checker.check_model(model, full_check=True)


def test_patterns_onnx_skips_exactly_the_unfoldable_three():
    handle = bncheck.open_model(SAMPLES / "patterns.onnx")
    _, steps = handle.folded()
    kept = [s for s in steps if s.into is None]
    assert len(kept) == 3
    reasons = " | ".join(s.reason for s in kept)
    assert "zero-pads" in reasons and "also feeds" in reasons


def test_corrupted_fold_is_caught_and_nothing_is_written(tmp_path, monkeypatch, run_cli):
    from bncheck.backends.onnx import fold as fold_mod

    real = fold_mod.fold_into_producer

    def corrupt(*args, **kwargs):
        w_, b_ = real(*args, **kwargs)
        return w_ + 1e-2, b_

    monkeypatch.setattr(fold_mod, "fold_into_producer", corrupt)
    out = tmp_path / "out.onnx"
    result = run_cli("fold", SAMPLES / "patterns.onnx", "-o", out)
    assert result.code == 1, result
    assert "verification FAILED" in result.out
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_fold_writes_a_model_with_the_right_bn_count(tmp_path, run_cli):
    out = tmp_path / "folded.onnx"
    result = run_cli("fold", SAMPLES / "patterns.onnx", "-o", out, "--format", "json")
    assert result.code == 0, result
    import json

    doc = json.loads(result.out)
    assert doc["schema"] == "bncheck.fold/1"
    assert doc["summary"] == {"bn_layers": 13, "folded": 10, "skipped": 3, "passed": True}
    assert doc["after"]["bn_layers"] == 3 and doc["verification"]["max_abs_error"] < 1e-4
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(out)).graph.node) == 3


def test_written_model_is_readable_like_any_new_file(tmp_path):
    import os

    from bncheck.atomic import umask

    out = tmp_path / "folded.onnx"
    assert bncheck.fold(SAMPLES / "resnet.onnx", out, verify=False).output == out
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask()
    assert os.listdir(tmp_path) == ["folded.onnx"]
