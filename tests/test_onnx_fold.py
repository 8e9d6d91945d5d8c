"""ONNX folding: every pattern folds exactly, every guard holds, nothing dead is left.

Outputs are compared under onnxruntime at ORT_DISABLE_ALL (OnnxHandle.run), so ORT's own
fusions cannot hide a wrong fold. Tolerance, as ``verify_close`` states it: every element has
|Δ| ≤ atol + rtol·max|ref|, fp32 rtol 1e-4 / atol 1e-5 (the fold is exact in float64; the rest
is float32 rounding of the rewritten weights and a reordered sum), fp16 rtol 1e-2 / atol 1e-3
(fp16 keeps 11 bits: each rounded weight and the ORT accumulation add ~1e-3 relative).
BN statistics and affine parameters are always random: with the defaults a broken fold passes.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import SAMPLES
from fold_fixtures import unlimited_verification_time  # noqa: F401  (a fixture)
from onnx import TensorProto, helper, numpy_helper

import bncheck
from bncheck.backends.onnx import OnnxHandle, open_onnx
from bncheck.backends.onnx.graph import iter_graphs
from bncheck.samples import PATTERN_FOLDS

RNG = np.random.default_rng(7)

# Sample counts must not depend on machine speed (the time budget is tested with seconds=0).
pytestmark = pytest.mark.usefixtures("unlimited_verification_time")


def bn_inits(prefix: str, c: int, dtype=np.float32) -> list[onnx.TensorProto]:
    """Randomized BN tensors (signed γ, β, μ ≠ 0, σ² ≠ 1)."""
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


def model_of(
    nodes, inits, x_shape, outputs=("y",), dtype=TensorProto.FLOAT, opset=17
) -> OnnxHandle:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", dtype, list(x_shape))],
        [helper.make_tensor_value_info(o, dtype, None) for o in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
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


def n_bn(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def unused_initializers(model: onnx.ModelProto) -> list[str]:
    """Initializers no node of any (sub)graph reads and no graph output names."""
    read = {i for g in iter_graphs(model.graph) for n in g.node for i in n.input}
    read |= {o.name for g in iter_graphs(model.graph) for o in g.output}
    return [t.name for t in model.graph.initializer if t.name not in read]


def max_errors(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    """(max |Δ|, max |Δ| / max|ref|) over all outputs."""
    abs_err = rel_err = 0.0
    for r, g in zip(ref, got, strict=True):
        r, g = r.astype(np.float64), g.astype(np.float64)
        err = float(np.max(np.abs(r - g)))
        abs_err, rel_err = max(abs_err, err), max(rel_err, err / float(np.max(np.abs(r))))
    return abs_err, rel_err


def assert_structure(source: onnx.ModelProto, m: onnx.ModelProto) -> None:
    """Checker-valid, nothing orphaned, interface and opsets unchanged."""
    onnx.checker.check_model(m, full_check=True)
    assert unused_initializers(m) == unused_initializers(source)
    read = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    assert [
        n.name for n in m.graph.node if n.op_type == "Constant" and n.output[0] not in read
    ] == []
    produced = {o for n in m.graph.node for o in n.output} | {i.name for i in m.graph.input}
    produced |= {t.name for t in m.graph.initializer}
    assert [v.name for v in m.graph.value_info if v.name not in produced] == []
    assert [i.name for i in m.graph.input] == [i.name for i in source.graph.input]
    assert [o.name for o in m.graph.output] == [o.name for o in source.graph.output]
    assert list(m.opset_import) == list(source.opset_import)


def assert_same(
    handle: OnnxHandle, *, affine=False, rtol=1e-4, atol=1e-5, bn_left=0, dtype=np.float32
):
    folded, steps = handle.folded(affine=affine)
    assert_structure(handle.model, folded.model)
    assert n_bn(folded.model) == bn_left, steps
    spec = handle.info().inputs[0]
    shape = [d if isinstance(d, int) else 2 for d in spec.shape]
    for _ in range(2):
        x = RNG.normal(0, 1, shape).astype(dtype)
        for ref, got in zip(handle.run({"x": x}), folded.run({"x": x}), strict=True):
            scale = float(np.max(np.abs(ref.astype(np.float64))))
            err = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64))))
            assert err <= atol + rtol * scale, (err, scale)
    return folded, steps


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2, 4])  # 4 = depthwise
def test_conv_bn(bias, group):
    inits = [w("W", 4, 4 // group, 3, 3), *bn_inits("bn", 4)]
    ins = ["x", "W"]
    if bias:
        inits.append(w("B", 4))
        ins.append("B")
    conv = helper.make_node(
        "Conv", ins, ["c"], name="conv", group=group, pads=[1, 1, 1, 1], strides=[2, 1]
    )
    if group == 2:
        conv.attribute.append(helper.make_attribute("dilations", [2, 2]))
    _, steps = assert_same(model_of([conv, bn_node("bn", "c", "y")], inits, (2, 4, 7, 7)))
    assert [(s.layer, s.into, s.target) for s in steps] == [("bn", "producer", "conv")]


@pytest.mark.parametrize("kdims", [(3,), (3, 3, 3)])
def test_conv1d_and_3d(kdims):
    inits = [w("W", 6, 3, *kdims), *bn_inits("bn", 6)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    assert_same(model_of(nodes, inits, (2, 3, *([5] * len(kdims)))))


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_groups_and_stride(group):
    inits = [w("W", 4, 6 // group, 3, 3), w("B", 6), *bn_inits("bn", 6)]
    ct = helper.make_node(
        "ConvTranspose", ["x", "W", "B"], ["c"], name="ct", group=group, strides=[2, 2]
    )
    folded, _ = assert_same(model_of([ct, bn_node("bn", "c", "y")], inits, (2, 4, 5, 5)))
    assert [n.op_type for n in folded.model.graph.node] == ["ConvTranspose"]


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [True, False])
def test_gemm_with_alpha_beta(trans_b, with_c):
    shape = (5, 3) if trans_b else (3, 5)
    inits = [w("W", *shape), *bn_inits("bn", 5)] + ([w("C", 1, 5)] if with_c else [])
    ins = ["x", "W", "C"] if with_c else ["x", "W"]
    gemm = helper.make_node("Gemm", ins, ["g"], name="gemm", transB=trans_b, alpha=0.7, beta=1.3)
    folded, _ = assert_same(model_of([gemm, bn_node("bn", "g", "y")], inits, (4, 3)))
    gemm = next(n for n in folded.model.graph.node if n.op_type == "Gemm")
    assert {a.name for a in gemm.attribute} == {"transB"} and len(gemm.input) == 3


def test_gemm_alpha_kept_when_the_fold_is_refused():
    # The fold overflows fp16, so the Gemm must stay exactly as it was (alpha included).
    inits = [w("W", 2, 2, dtype=np.float16)]
    inits += [
        numpy_helper.from_array(np.array(v, np.float16), f"bn_{k}")
        for k, v in (("scale", [3e4, 1]), ("beta", [0, 0]), ("mean", [0, 0]), ("var", [1e-4, 1]))
    ]
    gemm = helper.make_node("Gemm", ["x", "W"], ["g"], name="gemm", transB=1, alpha=2.0)
    handle = model_of([gemm, bn_node("bn", "g", "y")], inits, (3, 2), dtype=TensorProto.FLOAT16)
    folded, steps = handle.folded()
    assert steps[0].into is None and steps[0].reason == "folded weights overflow float16"
    assert folded.model.graph.node[0] == handle.model.graph.node[0]


def test_matmul_gains_a_bias_add():
    inits = [w("W", 3, 5), *bn_inits("bn", 5)]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"), bn_node("bn", "m", "y")]
    folded, _ = assert_same(model_of(nodes, inits, (4, 3)))
    assert [n.op_type for n in folded.model.graph.node] == ["MatMul", "Add"]


def per_channel(name, c, shape=None):
    return numpy_helper.from_array(RNG.normal(0, 1, shape or (1, c, 1, 1)).astype(np.float32), name)


def test_conv_add_bn_chain_and_decomposed_bn():
    c = 4
    inits = [w("W", c, 2, 3, 3), per_channel("b0", c), *bn_inits("bn", c), w("W2", c, c, 1, 1)]
    inits += [per_channel("m2", c, (c, 1, 1)), per_channel("a2", c)]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("Add", ["c", "b0"], ["cb"], name="bias_add"),
        bn_node("bn", "cb", "z"),
        helper.make_node("Conv", ["z", "W2"], ["c2"], name="conv2"),
        helper.make_node("Mul", ["m2", "c2"], ["c3"], name="mul2"),
        helper.make_node("Add", ["c3", "a2"], ["y"], name="add2"),
    ]
    folded, steps = assert_same(model_of(nodes, inits, (2, 2, 6, 6)))
    assert [n.op_type for n in folded.model.graph.node] == ["Conv", "Conv"]
    # One step per decomposed BN, named after its Mul.
    assert [(s.layer, s.into, s.target) for s in steps] == [
        ("bn", "producer", "conv"),
        ("mul2", "producer", "conv2"),
    ]


def test_conv_mul_add_chain_before_bn_with_constant_nodes():
    c = 3
    mul = numpy_helper.from_array(RNG.normal(0, 1, (1, c, 1, 1)).astype(np.float32))
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("Constant", [], ["mc"], name="mc", value=mul),
        helper.make_node("Mul", ["c", "mc"], ["cm"], name="mul"),
        helper.make_node("Add", ["cm", "ac"], ["ca"], name="add"),
        bn_node("bn", "ca", "y"),
    ]
    inits = [w("W", c, 2, 3, 3), per_channel("ac", c, (c, 1, 1)), *bn_inits("bn", c)]
    folded, steps = assert_same(model_of(nodes, inits, (2, 2, 5, 5)))
    assert [n.op_type for n in folded.model.graph.node] == ["Conv"]
    assert [(s.layer, s.into) for s in steps] == [("bn", "producer")]


def test_mul_that_broadcasts_to_a_higher_rank_is_not_folded():
    inits = [w("W", 3, 2, 1, 1), per_channel("m", 3, (1, 1, 1, 1, 1))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("Mul", ["c", "m"], ["y"], name="mul"),
    ]
    _, steps = assert_same(model_of(nodes, inits, (2, 2, 4, 4)))
    assert steps == []


@pytest.mark.parametrize("op", ["Conv", "Gemm", "MatMul"])
def test_bn_folds_into_its_consumer(op):
    if op == "Conv":
        x_shape, inits = (2, 3, 6, 6), [w("W", 4, 3, 3, 3), w("B", 4)]
        cons = helper.make_node("Conv", ["b", "W", "B"], ["y"], name="cons", pads=[0] * 4)
    elif op == "Gemm":
        x_shape, inits = (4, 3), [w("W", 5, 3), w("B", 5)]
        cons = helper.make_node("Gemm", ["b", "W", "B"], ["y"], name="cons", transB=1)
    else:
        x_shape, inits = (4, 3), [w("W", 3, 5)]
        cons = helper.make_node("MatMul", ["b", "W"], ["y"], name="cons")
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("bn", "r", "b"), cons]
    folded, steps = assert_same(model_of(nodes, inits + bn_inits("bn", 3), x_shape))
    assert (steps[0].into, steps[0].target) == ("consumer", "cons")
    assert folded.model.graph.node[1].input[0] == "r"


def test_bn_before_padded_conv_stays():
    inits = [*bn_inits("bn", 3), w("W", 4, 3, 3, 3)]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        bn_node("bn", "r", "b"),
        helper.make_node("Conv", ["b", "W"], ["y"], name="conv", pads=[1] * 4),
    ]
    _, steps = assert_same(model_of(nodes, inits, (2, 3, 6, 6)), bn_left=1)
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
    assert steps[0].reason.startswith("producer Conv 'conv' output also feeds Relu 'relu'")


def test_shared_weight_and_bias_are_copied_not_mutated():
    inits = [w("W", 3, 3, 1, 1), w("B", 3), *bn_inits("bn", 3)]
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c1"], name="conv1"),
        bn_node("bn", "c1", "y"),
        helper.make_node("Conv", ["x", "W", "B"], ["y2"], name="conv2"),
    ]
    handle = model_of(nodes, inits, (2, 3, 4, 4), outputs=("y", "y2"))
    folded, _ = assert_same(handle)
    x = RNG.normal(0, 1, (2, 3, 4, 4)).astype(np.float32)
    # The other reader computes bit-identical outputs, and W and B themselves are unchanged.
    assert np.array_equal(handle.run({"x": x})[1], folded.run({"x": x})[1])
    by_name = {t.name: t for t in folded.model.graph.initializer}
    assert by_name["W"] == inits[0] and by_name["B"] == inits[1]
    assert list(folded.model.graph.node[0].input) == [
        "x",
        "conv1.weight_folded",
        "conv1.bias_folded",
    ]


def test_weight_read_by_a_subgraph_is_not_mutated():
    inits = [w("W", 3, 3, 1, 1), *bn_inits("bn", 3)]
    inits.append(numpy_helper.from_array(np.array(True), "cond"))
    branch = helper.make_graph(
        [helper.make_node("Identity", ["W"], ["wo"])],
        "branch",
        [],
        [helper.make_tensor_value_info("wo", TensorProto.FLOAT, [3, 3, 1, 1])],
    )
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        bn_node("bn", "c", "y"),
        helper.make_node("If", ["cond"], ["y2"], name="if", then_branch=branch, else_branch=branch),
    ]
    handle = model_of(nodes, inits, (2, 3, 4, 4), outputs=("y", "y2"))
    folded, _ = assert_same(handle)
    assert {t.name: t for t in folded.model.graph.initializer}["W"] == inits[0]


def test_constant_node_weights_fold_and_leave_nothing_dead():
    weight = RNG.normal(0, 0.5, (3, 2, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node(
            "Constant", [], ["W"], name="wconst", value=numpy_helper.from_array(weight)
        ),
        helper.make_node("Identity", ["W"], ["Wi"], name="wid"),
        helper.make_node("Conv", ["x", "Wi"], ["c"], name="conv"),
        bn_node("bn", "c", "y"),
    ]
    folded, _ = assert_same(model_of(nodes, bn_inits("bn", 3), (2, 2, 5, 5)))
    assert [n.op_type for n in folded.model.graph.node] == ["Conv"]
    names = ["conv.weight_folded", "conv.bias_folded"]
    assert [t.name for t in folded.model.graph.initializer] == names


def test_unrelated_dead_initializer_is_left_alone():
    inits = [w("W", 3, 2, 1, 1), *bn_inits("bn", 3), w("unused", 7)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    folded, _ = assert_same(model_of(nodes, inits, (2, 2, 4, 4)))
    assert unused_initializers(folded.model) == ["unused"]


def test_affine_replaces_unfoldable_bns():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("bn", "r", "y")]
    handle = model_of(nodes, bn_inits("bn", 3), (2, 3, 4, 4))
    _, steps = assert_same(handle, bn_left=1)
    assert steps[0].into is None and "BN output 'y' is a graph output" in steps[0].reason
    folded, steps = assert_same(handle, affine=True)
    assert steps[0].into == "affine"
    assert [n.op_type for n in folded.model.graph.node] == ["Relu", "Mul", "Add"]
    assert [tuple(t.dims) for t in folded.model.graph.initializer] == [(3, 1, 1), (3, 1, 1)]


def test_affine_uses_the_input_type_when_stats_are_float32():
    # Opset 15 lets X be float16 while scale/mean are float32: Mul/Add must be float16.
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("bn", "r", "y")]
    handle = model_of(nodes, bn_inits("bn", 3), (2, 3, 4), dtype=TensorProto.FLOAT16, opset=15)
    folded, _ = assert_same(handle, affine=True, rtol=1e-2, atol=1e-3, dtype=np.float16)
    assert {t.data_type for t in folded.model.graph.initializer} == {TensorProto.FLOAT16}


def test_fp16_model():
    inits = [w("W", 4, 2, 3, 3, dtype=np.float16), *bn_inits("bn", 4, np.float16)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    handle = model_of(nodes, inits, (2, 2, 5, 5), dtype=TensorProto.FLOAT16)
    folded, _ = assert_same(handle, rtol=1e-2, atol=1e-3, dtype=np.float16)
    assert all(t.data_type == TensorProto.FLOAT16 for t in folded.model.graph.initializer)


def test_non_finite_statistics_are_not_folded():
    inits = [w("W", 2, 2, 1, 1), *bn_inits("bn", 2)]
    inits[-1] = numpy_helper.from_array(np.array([1.0, -5.0], np.float32), "bn_var")
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    _, steps = model_of(nodes, inits, (1, 2, 3, 3)).folded(affine=True)
    assert steps[0].into is None
    assert steps[0].reason == "BN statistics give a non-finite scale or shift in 1 channel"
    # Folding fails and so does the affine form; the step says both.
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("bn", "r", "y")]
    _, steps = model_of(nodes, inits[1:], (1, 2, 3, 3)).folded(affine=True)
    assert steps[0].into is None and steps[0].reason.endswith(
        "; not made affine: BN statistics give a non-finite scale or shift in 1 channel"
    )


def test_source_model_and_file_are_not_modified(tmp_path):
    path = tmp_path / "resnet.onnx"
    path.write_bytes((SAMPLES / "resnet.onnx").read_bytes())
    handle = open_onnx(path)
    before = handle.model.SerializeToString()
    folded, _ = handle.folded()
    assert handle.model.SerializeToString() == before
    assert path.read_bytes() == (SAMPLES / "resnet.onnx").read_bytes()
    assert (folded.path, folded.format, folded.external_data) == (path, "onnx", False)


def test_external_data_source_saves_external_data(tmp_path):
    src = onnx.load(str(SAMPLES / "resnet.onnx"))
    onnx.save_model(src, str(tmp_path / "src.onnx"), save_as_external_data=True, size_threshold=0)
    folded, _ = open_onnx(tmp_path / "src.onnx").folded()
    assert folded.external_data
    folded.save(tmp_path / "out.onnx")
    assert len(list(tmp_path.glob("out.*.data"))) == 1
    x = RNG.normal(0, 1, (2, 3, 24, 24)).astype(np.float32)
    reloaded = open_onnx(tmp_path / "out.onnx")
    assert np.array_equal(reloaded.run({"input": x})[0], folded.run({"input": x})[0])


@pytest.mark.parametrize("stem, left", [("resnet", 0), ("patterns", 3)])
def test_sample_models_fold_exactly(stem, left):
    handle = bncheck.open_model(SAMPLES / f"{stem}.onnx")
    folded, steps = handle.folded()
    assert n_bn(folded.model) == left
    assert_structure(handle.model, folded.model)
    calib = np.load(SAMPLES / f"{stem}_calib.npy")[:32]
    rand = RNG.normal(0, 2, calib.shape).astype(np.float32)
    for x in (calib, rand):
        ref = handle.run({"input": x})
        abs_err, rel_err = max_errors(ref, folded.run({"input": x}))
        scale = max(float(np.abs(r).max()) for r in ref)
        assert abs_err <= 1e-5 + 1e-4 * scale, (abs_err, scale)
        assert rel_err < 1e-5  # tighter than the fp32 tolerance: the fold itself is exact
    if stem == "patterns":  # BNLayer.origin is the torch module name PATTERN_FOLDS uses
        origin = {b.name: b.origin for b in handle.info().bn_layers}
        kept = sorted(origin[s.layer] for s in steps if s.into is None)
        assert kept == sorted(k for k, (into, _) in PATTERN_FOLDS.items() if into is None)
        for s in steps:
            assert s.into == PATTERN_FOLDS[origin[s.layer]][0]


def test_patterns_affine_leaves_no_bn():
    handle = bncheck.open_model(SAMPLES / "patterns.onnx")
    folded, steps = handle.folded(affine=True)
    assert n_bn(folded.model) == 0 and sum(s.into == "affine" for s in steps) == 3
    assert_structure(handle.model, folded.model)
    x = np.load(SAMPLES / "patterns_calib.npy")[:16]
    _, rel_err = max_errors(handle.run({"input": x}), folded.run({"input": x}))
    assert rel_err <= 1e-5


def test_api_fold_writes_a_verified_model(tmp_path):
    out = tmp_path / "resnet.onnx"
    result = bncheck.fold(SAMPLES / "resnet.onnx", out, data=SAMPLES / "resnet_calib.npy")
    assert result.passed and result.output == out and result.verification.samples == 32
    assert result.verification.max_rel_error < 1e-5
    assert n_bn(onnx.load(str(out))) == 0


def test_corrupted_fold_is_caught_and_nothing_is_written(tmp_path, monkeypatch, run_cli):
    from bncheck.backends.onnx import fold as fold_mod

    real = fold_mod.fold_into_producer

    def corrupt(*args, **kwargs):
        w_, b_ = real(*args, **kwargs)
        return w_ + 1e-2, b_

    monkeypatch.setattr(fold_mod, "fold_into_producer", corrupt)
    out = tmp_path / "out.onnx"
    result = bncheck.fold(SAMPLES / "patterns.onnx", out)
    assert result.passed is False and result.verification.max_rel_error > 1e-3
    assert list(tmp_path.iterdir()) == []
    cli = run_cli("fold", SAMPLES / "patterns.onnx", "-o", out)
    assert cli.code == 1, cli
    assert "verification FAILED" in cli.out
    assert list(tmp_path.iterdir()) == []


def test_cli_fold_writes_a_model_with_the_right_bn_count(tmp_path, run_cli):
    out = tmp_path / "folded.onnx"
    result = run_cli("fold", SAMPLES / "patterns.onnx", "-o", out, "--format", "json")
    assert result.code == 0, result
    doc = json.loads(result.out)
    assert doc["schema"] == "bncheck.fold/1"
    summary = dict(bn_layers=13, folded=10, affine=0, skipped=3, merged=0, changed=True)
    assert doc["summary"] == {**summary, "passed": True}
    assert doc["after"]["bn_layers"] == 3 and doc["verification"]["max_abs_error"] < 1e-4
    assert n_bn(onnx.load(str(out))) == 3


# ------------------------------------------------ verification on deep models, accounting


def test_deep_model_correct_fold_passes_the_default_verification():
    """24 conv-BN-ReLU layers, outputs up to ~1e4 crossing zero: the correct fold differs by
    float32 rounding (~1e-5 of the output scale, ~1e-2 absolute), which a per-element check
    with rtol 1e-4 / atol 1e-5 rejects. The per-output bound, derived from the model's own
    engine-to-engine spread, passes it and names the output."""
    from fold_fixtures import deep_convnet

    result = bncheck.fold(OnnxHandle("deep.onnx", deep_convnet(24)))
    v = result.verification
    assert v.passed, v
    assert v.worst_output == "y" and v.samples == 32
    assert v.max_rel_error < 1e-4 and v.max_abs_error <= v.atol + v.rtol * v.worst.max_ref
    assert result.folded_count == 24


@pytest.mark.parametrize("layer", [0, 12, 23])
def test_deep_model_with_one_channel_off_by_one_percent_fails(monkeypatch, layer, tmp_path):
    from fold_fixtures import corrupt_one_channel, deep_convnet

    corrupt_one_channel(monkeypatch, call=layer)
    out = tmp_path / "out.onnx"
    result = bncheck.fold(OnnxHandle("deep.onnx", deep_convnet(24)), out)
    v = result.verification
    assert not v.passed and v.worst_output == "y"
    assert v.max_rel_error > 10 * v.rtol  # far outside the bound, not a near miss
    assert result.output is None and not out.exists()
    # The tolerance the report suggests does pass, and no smaller one.
    assert v.suggested.rtol >= v.max_rel_error and v.suggested.rtol < 1.1 * v.max_rel_error
    again = bncheck.fold(OnnxHandle("deep.onnx", deep_convnet(24)), rtol=v.suggested.rtol)
    assert again.passed


@pytest.mark.parametrize("corrupt", [False, True])
def test_when_ort_cannot_fuse_the_original_the_folded_models_spread_is_the_yardstick(
    monkeypatch, corrupt
):
    """Zero biases built at run time (as torch's exporter writes them) keep onnxruntime from
    fusing anything: its optimized run of the original is bit-identical. The folded model's
    own engine spread (same network, same magnitudes) sets the bound instead of the fixed
    1e-4; a fold 1% off in one channel still fails."""
    from fold_fixtures import corrupt_one_channel, deep_convnet

    if corrupt:
        corrupt_one_channel(monkeypatch, call=12)
    result = bncheck.fold(OnnxHandle("deep.onnx", deep_convnet(24, runtime_bias=True)))
    v = result.verification
    assert v.worst.basis == "spread" and "of the folded model" in v.basis
    assert v.rtol < 1e-4 and v.passed is not corrupt


def test_bias_add_merge_is_not_counted_as_bn():
    from fold_fixtures import conv_bias_add

    result = bncheck.fold(OnnxHandle("m.onnx", conv_bias_add()))
    assert result.steps == [] and result.folded_count == 0
    assert [(s.layer, s.into, s.target) for s in result.merges] == [
        ("bias_add", "producer", "conv")
    ]
    assert result.changed and result.verification.passed
    assert [
        n.op_type for n in OnnxHandle("m.onnx", conv_bias_add()).folded()[0].model.graph.node
    ] == [
        "Conv",
        "Relu",
    ]


def test_nothing_to_fold_runs_no_session_and_writes_the_input(tmp_path, monkeypatch):
    from fold_fixtures import conv_relu

    from bncheck.backends.onnx import run as run_mod

    def no_session(*args, **kwargs):
        raise AssertionError("no onnxruntime session is needed when nothing changed")

    monkeypatch.setattr(run_mod, "make_session", no_session)
    monkeypatch.setattr(bncheck.backends.onnx, "make_session", no_session)
    src = tmp_path / "m.onnx"
    onnx.save(conv_relu(), str(src))
    out = tmp_path / "out.onnx"
    result = bncheck.fold(src, out)
    assert not result.changed and result.verification is None
    assert result.unverified == "nothing changed" and result.passed
    assert result.output == out and onnx.load(str(out)).graph == onnx.load(str(src)).graph


@pytest.mark.parametrize("computed", [False, True])
def test_conv_bias_of_the_wrong_shape_is_an_input_error(computed):
    """A Conv3d whose zero bias has shape (8, 2), stored or computed at run time: inspect does
    not call the BN foldable, fold refuses the file naming the shapes as they are (not the
    flattened (16,))."""
    from fold_fixtures import conv3d_bad_bias

    from bncheck.errors import InputError

    handle = OnnxHandle("bad.onnx", conv3d_bad_bias(computed=computed))
    (layer,) = handle.info().bn_layers
    assert not layer.fold.foldable
    assert "bias has shape (8, 2), expected (8,)" in layer.fold.reason
    with pytest.raises(InputError, match=r"bias has shape \(8, 2\), expected \(8,\)"):
        bncheck.fold(handle)


def test_graph_that_runs_only_at_batch_one_is_verified_sample_by_sample():
    from fold_fixtures import batch_one_reshape

    result = bncheck.fold(OnnxHandle("b1.onnx", batch_one_reshape()))
    v = result.verification
    assert v.passed and v.batch_size == 1 and v.samples == 32
    assert any("does not run at batch 8" in n for n in v.notes)


def test_input_shape_batch_sets_the_verification_batch(tmp_path):
    src = SAMPLES / "resnet.onnx"
    shape = open_onnx(src).info().inputs[0].shape
    result = bncheck.fold(src, input_shapes={"": (2, *shape[1:])})
    assert result.verification.batch_size == 2 and result.verification.samples == 32


def test_verification_batches_fit_in_memory_and_the_budget_stops_early():
    """A 3×640×640 input: one sample per batch (2²¹ input elements at most); with no time
    budget the run stops after the first batch, which measures the cost."""
    from bncheck.api._verify import verify_same_function

    inits = [w("W", 4, 3, 1, 1), *bn_inits("bn", 4)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("bn", "c", "y")]
    handle = model_of(nodes, inits, ["N", 3, 640, 640])
    folded, _ = handle.folded()
    v = verify_same_function(handle, folded, seconds=0.0)
    assert (v.batch_size, v.samples, v.passed) == (1, 1, True)
    assert "1 sample of x" in v.inputs and any(n.startswith("1 of 32 samples") for n in v.notes)


def test_one_session_per_model(monkeypatch):
    """Each model gets one onnxruntime session, reused for every batch; the model's own spread
    (ORT_ENABLE_ALL) costs a third only when an error is above the float32 floor."""
    from fold_fixtures import deep_convnet

    from bncheck.backends.onnx import run as run_mod

    made: list[bool] = []
    real = run_mod.make_session

    def counting(model, **kwargs):
        made.append(bool(kwargs.get("optimize")))
        return real(model, **kwargs)

    monkeypatch.setattr(bncheck.backends.onnx, "make_session", counting)
    bncheck.fold(SAMPLES / "resnet.onnx")
    assert made == [False, False]
    made.clear()
    result = bncheck.fold(OnnxHandle("deep.onnx", deep_convnet(24)))
    assert sorted(made) == [False, False, True] and result.verification.samples == 32


def test_top_level_figures_are_the_worst_outputs_and_read_together():
    """Two outputs judged on different bases (a shallow one on the floor, the deep one on the
    spread): the top-level error, rtol and atol are all the worst output's, so they never
    contradict the verdict (e.g. a max rel error from one output beside another's rtol)."""
    from fold_fixtures import deep_convnet

    model = deep_convnet(24)
    model.graph.output.append(helper.make_tensor_value_info("n0", TensorProto.FLOAT, None))
    v = bncheck.fold(OnnxHandle("two.onnx", model)).verification
    assert [o.name for o in v.outputs] == ["y", "n0"] and v.passed
    w = v.worst
    assert (v.max_abs_error, v.max_rel_error, v.rtol, v.atol) == (
        w.max_abs_error,
        w.max_rel_error,
        w.rtol,
        w.atol,
    )
    assert w.excess == max(o.excess for o in v.outputs)
    assert v.max_abs_error <= v.atol + v.rtol * w.max_ref
