"""Verification where a fold's changes end: both models cut at the frontier of the rewrites
when the unchanged tail holds most of the weights (``backends/onnx/region.py``)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bncheck import api
from bncheck.backends.onnx import open_onnx, region
from bncheck.backends.onnx.region import changed_part

HIDDEN = 4 * 8 * 8  # the flattened conv output the head reads


def big_head_model(bn_before_head: bool = False) -> onnx.ModelProto:
    """Conv → BN → Relu → Flatten → Gemm (the bulk of the weights) → Relu → Gemm; with
    ``bn_before_head`` a second BN sits right before the large Gemm (it folds into it, so the
    Gemm changes and no large tail is left)."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int, low: float | None = None) -> onnx.TensorProto:
        a = rng.uniform(low, 2.0, shape) if low is not None else rng.normal(size=shape)
        return numpy_helper.from_array(a.astype(np.float32), name)

    inits = [
        init("w", 4, 3, 3, 3),
        init("cb", 4),
        init("g", 4),
        init("b", 4),
        init("m", 4),
        init("v", 4, low=0.5),
        init("W1", 256, HIDDEN),
        init("b1", 256),
        init("W2", 10, 256),
        init("b2", 10),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn"),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
    ]
    head_in = "f"
    if bn_before_head:
        inits += [init("g2", HIDDEN), init("b2n", HIDDEN), init("m2", HIDDEN)]
        inits.append(init("v2", HIDDEN, low=0.5))
        nodes.append(helper.make_node("BatchNormalization", ["f", "g2", "b2n", "m2", "v2"], ["fn"]))
        head_in = "fn"
    nodes += [
        helper.make_node("Gemm", [head_in, "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu2"),
        helper.make_node("Gemm", ["hr", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "big_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def model_path(tmp_path):
    p = tmp_path / "big_head.onnx"
    onnx.save(big_head_model(), p)
    return p


def test_the_frontier_is_where_the_rewrites_end(model_path):
    h = open_onnx(model_path)
    folded, _ = h.folded()
    part = changed_part(h.model, folded.model, min_bytes=0)
    assert part is not None
    # the conv absorbed the BN and writes the BN's output; the Relu after it is the original's
    assert part.frontier == ["n"]
    assert part.tail_nodes == 5  # relu, flatten, fc1, relu2, fc2
    assert part.tail_bytes == 4 * (256 * HIDDEN + 256 + 10 * 256 + 10)
    assert [n.op_type for n in part.original.graph.node] == ["Conv", "BatchNormalization"]
    assert [n.op_type for n in part.folded.graph.node] == ["Conv"]
    for cut in (part.original, part.folded):
        assert [o.name for o in cut.graph.output] == ["n"]
        assert {t.name for t in cut.graph.initializer}.isdisjoint({"W1", "b1", "W2", "b2"})
        onnx.checker.check_model(cut)
    # the default thresholds: a 0.6 MB tail is not worth leaving out
    assert changed_part(h.model, folded.model) is None
    # at most half the weights in the tail: compared whole
    assert changed_part(h.model, folded.model, min_bytes=0, share=0.999) is None


def test_no_region_when_the_fold_changes_the_large_layer(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(big_head_model(bn_before_head=True), p)
    h = open_onnx(p)
    folded, steps = h.folded()
    assert [s.into for s in steps] == ["producer", "consumer"]
    # fc1 took the second BN: its weights changed, and only fc2 and a Relu stay the same
    assert changed_part(h.model, folded.model, min_bytes=0) is None


def test_no_region_when_nothing_changed(model_path):
    h = open_onnx(model_path)
    assert changed_part(h.model, h.model, min_bytes=0) is None


def test_a_tail_with_a_subgraph_is_compared_whole(model_path):
    # A subgraph may read any tensor above it by name: the tail is not provably the same.
    m = onnx.load(model_path)
    then = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch", 10])],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    m.graph.initializer.append(cond)
    m.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=then))
    m.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 10]))
    h = open_onnx(_save(m, model_path.parent / "if.onnx"))
    folded, _ = h.folded()
    assert changed_part(h.model, folded.model, min_bytes=0) is None


def _save(model, path):
    onnx.save(model, path)
    return path


def test_fold_verifies_the_changed_part_and_says_so(model_path, tmp_path, monkeypatch):
    monkeypatch.setattr(region, "TAIL_MIN_BYTES", 0)
    out = tmp_path / "folded.onnx"
    result = api.fold(model_path, out)
    v = result.verification
    assert v.passed and out.exists()
    assert [o.name for o in v.outputs] == ["n"]
    assert v.region == (
        f"where the changes end: the 5 nodes after it are the original's, on the same "
        f"{(256 * HIDDEN + 256 + 10 * 256 + 10) * 4 / 2**20:,.0f} MiB of weights"
    )
    assert v.top1_agreement is None  # the argmax of a hidden tensor says nothing
    assert v.max_rel_error < 1e-5
    # the written model is the whole folded model, and computes what the original does
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    ref = open_onnx(model_path).run({"x": x})[0]
    got = open_onnx(out).run({"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)

    whole = api.fold(model_path, tmp_path / "whole.onnx", verify_whole=True).verification
    assert whole.region is None and [o.name for o in whole.outputs] == ["y"]
    assert whole.top1_agreement == 1.0


def test_a_wrong_fold_fails_at_the_frontier_and_writes_nothing(model_path, tmp_path, monkeypatch):
    monkeypatch.setattr(region, "TAIL_MIN_BYTES", 0)
    from bncheck.backends.onnx import OnnxHandle

    real = OnnxHandle.folded

    def off_by_one_percent(self, **kw):
        handle, steps = real(self, **kw)
        for t in handle.model.graph.initializer:
            if t.name.startswith("w"):  # the conv weight the BN went into
                a = numpy_helper.to_array(t).copy()
                a[1] *= 1.01
                t.CopyFrom(numpy_helper.from_array(a, t.name))
        return handle, steps

    monkeypatch.setattr(OnnxHandle, "folded", off_by_one_percent)
    out = tmp_path / "folded.onnx"
    result = api.fold(model_path, out)
    assert not result.passed and result.verification.region is not None
    assert result.verification.worst_output == "n"
    assert not out.exists()


def test_cli_fold_reports_the_tensor_it_compared(run_cli, model_path, tmp_path, monkeypatch):
    monkeypatch.setattr(region, "TAIL_MIN_BYTES", 0)
    out = tmp_path / "folded.onnx"
    r = run_cli("fold", model_path, "-o", out, "--format", "json")
    assert r.code == 0, r.err
    import json

    v = json.loads(r.out)["verification"]
    assert v["region"].startswith("where the changes end: the 5 nodes after it")
    assert [o["name"] for o in v["outputs"]] == ["n"]
    r = run_cli("fold", model_path, "-o", tmp_path / "w.onnx", "--verify-whole", "-q")
    assert r.code == 0, r.err
    r = run_cli("fold", model_path, "-o", tmp_path / "t.onnx")
    assert r.code == 0, r.err
    assert "worst tensor 'n' (where the changes end" in " ".join(r.out.split())
    r = run_cli("inspect", out, "--fail-on", "error")
    assert r.code == 0, r.err


def test_fold_frees_the_input_it_opened_before_writing(model_path, tmp_path, monkeypatch):
    # Encoding a 500 MB model takes twice its size: the input must not be held beside it.
    import gc
    import weakref

    from bncheck.backends.onnx import OnnxHandle

    opened, seen = [], []
    real_folded, real_save = OnnxHandle.folded, OnnxHandle.save

    def folded(self, **kw):
        opened.append(weakref.ref(self))
        return real_folded(self, **kw)

    def save(self, path):
        gc.collect()
        seen.append(opened[-1]() is None)
        real_save(self, path)

    monkeypatch.setattr(OnnxHandle, "folded", folded)
    monkeypatch.setattr(OnnxHandle, "save", save)
    assert api.fold(model_path, tmp_path / "a.onnx").passed
    mine = open_onnx(model_path)  # a caller's handle stays the caller's
    assert api.fold(mine, tmp_path / "b.onnx").passed
    assert seen == [True, False]
    assert mine.info().bn_layers  # still usable


def test_a_frontier_tensor_that_is_not_a_float_is_compared_whole(model_path):
    # The tail reads an int64 tensor the head makes (a shape): the bound is one for floats.
    from bncheck.backends.onnx.region import _frontier_types

    h = open_onnx(model_path)
    folded, _ = h.folded()
    m = folded.model
    assert _frontier_types(m, ["n"])["n"].type.tensor_type.elem_type == TensorProto.FLOAT
    m.graph.node.append(helper.make_node("Shape", ["n"], ["n_shape"]))
    assert _frontier_types(m, ["n_shape"]) is None
