"""ONNX backend: BN discovery, fold decisions, norm inventory, sessions and atomic saves.

Graphs are built with onnx.helper in each test; BN statistics and affine parameters are
random so that a default-valued BN cannot hide a mistake.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bncheck.backends import open_model
from bncheck.backends.onnx import open_onnx
from bncheck.backends.onnx import run as onnx_run
from bncheck.backends.onnx.discover import fold_plan
from bncheck.backends.onnx.run import make_session, save_onnx
from bncheck.errors import InputError
from bncheck.layers import FoldDecision, Neighbour, TensorSpec

F32 = TensorProto.FLOAT


def vi(name: str, shape: list, elem: int = F32) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def init(name: str, arr: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def bn_params(prefix: str, c: int, rng: np.random.Generator, dtype=np.float32) -> dict:
    return {
        f"{prefix}_scale": rng.uniform(0.5, 2.0, c).astype(dtype),
        f"{prefix}_bias": rng.normal(0, 1, c).astype(dtype),
        f"{prefix}_mean": rng.normal(0, 1, c).astype(dtype),
        f"{prefix}_var": rng.uniform(0.5, 2.0, c).astype(dtype),
    }


def bn_node(prefix: str, x: str, y: str, **attrs) -> onnx.NodeProto:
    ins = [x, f"{prefix}_scale", f"{prefix}_bias", f"{prefix}_mean", f"{prefix}_var"]
    return helper.make_node("BatchNormalization", ins, [y], name=prefix, **attrs)


def model(nodes, inputs, outputs, consts: dict, opset: int = 17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, [init(k, v) for k, v in consts.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8 if opset < 21 else 10
    return m


def save(tmp_path: Path, m: onnx.ModelProto, name: str = "m.onnx") -> Path:
    p = tmp_path / name
    p.write_bytes(m.SerializeToString())
    return p


def only_bn(tmp_path: Path, m: onnx.ModelProto):
    info = open_onnx(save(tmp_path, m)).info()
    assert len(info.bn_layers) == 1
    return info.bn_layers[0]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def conv_bn_model(rng, *, extra_nodes=(), outputs=None, pads=1):
    consts = {"w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "b": np.zeros(4, np.float32)}
    consts |= bn_params("bn1", 4, rng)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv1", pads=[pads] * 4),
        bn_node("bn1", "c", "y", epsilon=1e-3),
        *extra_nodes,
    ]
    outs = outputs or [vi("y", ["N", 4, 8, 8])]
    return model(nodes, [vi("x", ["N", 3, 8, 8])], outs, consts), consts


def test_conv_bn_exact_fields(tmp_path, rng):
    m, consts = conv_bn_model(rng)
    h = open_onnx(save(tmp_path, m))
    info = h.info()
    bn = info.bn_layers[0]
    assert (bn.name, bn.kind, bn.channels) == ("bn1", "BatchNormalization", 4)
    assert bn.eps == 1e-3 and bn.momentum == 0.1  # ONNX default momentum 0.9 -> torch 0.1
    assert (bn.affine, bn.track_running_stats, bn.training) == (True, True, False)
    assert bn.num_batches_tracked is None and bn.call_sites == 1 and bn.frozen is False
    np.testing.assert_array_equal(bn.running_mean, consts["bn1_mean"])
    np.testing.assert_array_equal(bn.running_var, consts["bn1_var"])
    np.testing.assert_array_equal(bn.weight, consts["bn1_scale"])
    np.testing.assert_array_equal(bn.bias, consts["bn1_bias"])
    assert (bn.stats_dtype, bn.param_dtype) == ("float32", "float32")
    assert bn.producer == Neighbour("conv1", "Conv", True)
    assert bn.consumers == (Neighbour("y", "output"),)
    assert bn.fold == FoldDecision("producer", "conv1", None)
    # model-level facts
    assert info.inputs == (TensorSpec("x", ("N", 3, 8, 8), "float32"),)
    assert info.outputs == (TensorSpec("y", ("N", 4, 8, 8), "float32"),)
    assert (info.opset, info.nodes, info.parameters) == (17, 2, 4 * 27 + 4 + 4 * 4)
    assert (info.format, info.framework, info.training, info.graph_error) == (
        "onnx",
        "onnx",
        False,
        None,
    )
    assert info.path == str(h.path) and h.info() is info  # cached


@pytest.mark.parametrize("chain", [["Add"], ["Mul", "Add"]])
def test_conv_through_constant_add_mul_chain(tmp_path, rng, chain):
    consts = {"w": rng.normal(size=(4, 3, 1, 1)).astype(np.float32)} | bn_params("bn", 4, rng)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t0"], name="conv")]
    for i, op in enumerate(chain):
        consts[f"k{i}"] = rng.normal(size=(4, 1, 1)).astype(np.float32)  # per channel
        nodes.append(helper.make_node(op, [f"t{i}", f"k{i}"], [f"t{i + 1}"], name=f"{op}{i}"))
    nodes.append(bn_node("bn", f"t{len(chain)}", "y"))
    m = model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 4, 4])], consts)
    h = open_onnx(save(tmp_path, m))
    bn = h.info().bn_layers[0]
    assert bn.producer == Neighbour("conv", "Conv", True)
    assert bn.fold == FoldDecision("producer", "conv")
    plan = fold_plan(h.index, h.model.graph.node[-1])
    assert [n.name for n in plan.chain] == [f"{op}{i}" for i, op in enumerate(chain)]


def test_add_not_per_channel_stops_the_walk(tmp_path, rng):
    consts = {"w": rng.normal(size=(4, 3, 1, 1)).astype(np.float32)} | bn_params("bn", 4, rng)
    consts["k"] = rng.normal(size=(1, 4, 4)).astype(np.float32)  # varies over H, W
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Add", ["c", "k"], ["a"], name="add"),
        bn_node("bn", "a", "y"),
    ]
    m = model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 4, 4])], consts)
    bn = only_bn(tmp_path, m)
    assert bn.producer == Neighbour("add", "Add", False)
    assert bn.fold.into is None
    assert "no producer with weights (input comes from Add 'add')" in bn.fold.reason


def test_chain_fan_out_names_the_other_consumer(tmp_path, rng):
    consts = {"w": rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "k": np.ones((4, 1, 1))}
    consts["k"] = consts["k"].astype(np.float32)
    consts |= bn_params("bn", 4, rng)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Add", ["c", "k"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["r"], name="side"),
        bn_node("bn", "a", "y"),
    ]
    outs = [vi("y", [1, 4, 4, 4]), vi("r", [1, 4, 4, 4])]
    bn = only_bn(tmp_path, model(nodes, [vi("x", [1, 3, 4, 4])], outs, consts))
    assert bn.fold.into is None
    assert "Add 'add' between producer Conv 'conv'" in bn.fold.reason
    assert "Relu 'side'" in bn.fold.reason


def test_conv_fan_out_not_foldable(tmp_path, rng):
    extra = [helper.make_node("Relu", ["c"], ["r1"], name="relu1")]
    outs = [vi("y", ["N", 4, 8, 8]), vi("r1", ["N", 4, 8, 8])]
    m, _ = conv_bn_model(rng, extra_nodes=extra, outputs=outs)
    bn = only_bn(tmp_path, m)
    assert bn.producer == Neighbour("conv1", "Conv", True)
    assert bn.fold.into is None and bn.fold.target is None
    assert "producer Conv 'conv1' output also feeds Relu 'relu1'" in bn.fold.reason
    assert "BN output 'y' is a graph output" in bn.fold.reason


def test_producer_output_is_graph_output(tmp_path, rng):
    outs = [vi("y", ["N", 4, 8, 8]), vi("c", ["N", 4, 8, 8])]
    m, _ = conv_bn_model(rng, outputs=outs)
    bn = only_bn(tmp_path, m)
    assert bn.fold.into is None
    assert bn.fold.reason.startswith("producer output 'c' is a graph output")


def test_gemm_transb_and_matmul_into_producer(tmp_path, rng):
    consts = {"B": rng.normal(size=(4, 5)).astype(np.float32), "C": np.ones(4, np.float32)}
    consts |= {"W": rng.normal(size=(5, 4)).astype(np.float32)}
    consts |= bn_params("bng", 4, rng) | bn_params("bnm", 4, rng)
    nodes = [
        helper.make_node("Gemm", ["x", "B", "C"], ["g"], name="gemm", transB=1),
        bn_node("bng", "g", "y1"),
        helper.make_node("MatMul", ["x", "W"], ["mm"], name="matmul"),
        bn_node("bnm", "mm", "y2"),
    ]
    outs = [vi("y1", ["N", 4]), vi("y2", ["N", 4])]
    info = open_onnx(save(tmp_path, model(nodes, [vi("x", ["N", 5])], outs, consts))).info()
    g, mm = info.bn_layers
    assert g.producer == Neighbour("gemm", "Gemm", True)
    assert g.fold == FoldDecision("producer", "gemm")
    assert mm.producer == Neighbour("matmul", "MatMul", True)
    assert mm.fold == FoldDecision("producer", "matmul")


def test_gemm_feature_count_mismatch_is_reported(tmp_path, rng):
    # transB=0 reads B as (K, N) = (4, 5): 5 output features, but the BN has 4 channels
    consts = {"B": rng.normal(size=(4, 5)).astype(np.float32)} | bn_params("bn", 4, rng)
    nodes = [helper.make_node("Gemm", ["x", "B"], ["g"], name="gemm"), bn_node("bn", "g", "y")]
    bn = only_bn(tmp_path, model(nodes, [vi("x", [2, 4])], [vi("y", [2, 5])], consts))
    assert bn.fold.reason.startswith("producer Gemm 'gemm' has 5 output channels, the BN 4")


def bn_conv_model(rng, *, pads: int, zero_shift: bool = False, op: str = "Conv"):
    consts = bn_params("bn", 3, rng)
    if zero_shift:
        consts["bn_mean"] = np.zeros(3, np.float32)
        consts["bn_bias"] = np.zeros(3, np.float32)
    wshape = (4, 3, 3, 3) if op == "Conv" else (3, 4, 3, 3)
    consts["w2"] = rng.normal(size=wshape).astype(np.float32)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu0"),
        bn_node("bn", "r", "b"),
        helper.make_node(op, ["b", "w2"], ["y"], name="c2", pads=[pads] * 4),
    ]
    size = 8 - 2 + 2 * pads if op == "Conv" else 8 + 2 - 2 * pads
    return model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, size, size])], consts)


def test_bn_into_consumer_conv(tmp_path, rng):
    bn = only_bn(tmp_path, bn_conv_model(rng, pads=0))
    assert bn.producer == Neighbour("relu0", "Relu", False)
    assert bn.consumers == (Neighbour("c2", "Conv", True),)
    assert bn.fold == FoldDecision("consumer", "c2")


def test_bn_consumer_padded_conv_needs_zero_shift(tmp_path, rng):
    bn = only_bn(tmp_path, bn_conv_model(rng, pads=1))
    assert bn.fold.into is None
    assert "no producer with weights (input comes from Relu 'relu0')" in bn.fold.reason
    assert "consumer Conv 'c2' zero-pads its input and the BN shift is non-zero" in bn.fold.reason
    # mean = beta = 0 makes the shift exactly zero: padding no longer matters
    bn0 = only_bn(tmp_path, bn_conv_model(rng, pads=1, zero_shift=True))
    assert bn0.fold == FoldDecision("consumer", "c2")


def test_bn_consumer_conv_transpose_only_with_zero_shift(tmp_path, rng):
    bn = only_bn(tmp_path, bn_conv_model(rng, pads=0, op="ConvTranspose"))
    assert bn.fold.into is None and "ConvTranspose 'c2'" in bn.fold.reason
    bn0 = only_bn(tmp_path, bn_conv_model(rng, pads=0, op="ConvTranspose", zero_shift=True))
    assert bn0.fold == FoldDecision("consumer", "c2")


def test_bn_between_relus_has_no_weighted_neighbour(tmp_path, rng):
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu3"),
        bn_node("bn", "r", "b"),
        helper.make_node("Relu", ["b"], ["y"], name="relu4"),
    ]
    m = model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 3, 4, 4])], bn_params("bn", 3, rng))
    bn = only_bn(tmp_path, m)
    assert bn.consumers == (Neighbour("relu4", "Relu", False),)
    assert bn.fold.reason == (
        "no producer with weights (input comes from Relu 'relu3'); "
        "no weighted consumer (output feeds Relu 'relu4')"
    )


def test_bn_on_graph_input(tmp_path, rng):
    nodes = [bn_node("bn", "x", "y")]
    m = model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 3, 4, 4])], bn_params("bn", 3, rng))
    bn = only_bn(tmp_path, m)
    assert bn.producer == Neighbour("x", "input")
    assert bn.fold.reason.startswith("no producer with weights (input comes from graph input 'x')")


def test_weights_from_constant_nodes(tmp_path, rng):
    consts = {"w": rng.normal(size=(4, 3, 1, 1)).astype(np.float32)} | bn_params("bn", 4, rng)
    nodes = [
        helper.make_node("Constant", [], [k], value=init(k, v), name=f"const_{k}")
        for k, v in consts.items()
    ]
    nodes += [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    m = model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 4, 4])], {})
    bn = only_bn(tmp_path, m)
    assert bn.producer == Neighbour("conv", "Conv", True)
    assert bn.fold == FoldDecision("producer", "conv")
    np.testing.assert_array_equal(bn.running_var, consts["bn_var"])
    np.testing.assert_array_equal(bn.weight, consts["bn_scale"])


def test_statistics_computed_at_run_time(tmp_path, rng):
    consts = bn_params("bn", 3, rng)
    del consts["bn_mean"]
    nodes = [bn_node("bn", "x", "y")]
    ins = [vi("x", [1, 3, 4, 4]), vi("bn_mean", [3])]
    bn = only_bn(tmp_path, model(nodes, ins, [vi("y", [1, 3, 4, 4])], consts))
    assert bn.running_mean is None and bn.running_var is not None and bn.channels == 3
    assert bn.fold.reason.startswith("statistics are not constant (mean computed at run time)")


def test_training_mode_and_momentum(tmp_path, rng):
    consts = bn_params("bn", 3, rng)
    node = bn_node("bn", "x", "y", training_mode=1, momentum=0.99)
    node.output.extend(["rm", "rv"])
    outs = [vi("y", [2, 3, 4, 4]), vi("rm", [3]), vi("rv", [3])]
    info = open_onnx(save(tmp_path, model([node], [vi("x", [2, 3, 4, 4])], outs, consts, 15)))
    bn = info.info().bn_layers[0]
    assert bn.training is True and info.info().training is True
    assert bn.momentum == pytest.approx(0.01, abs=1e-12)  # ONNX 0.99 -> torch 0.01
    assert bn.fold == FoldDecision(None, None, "BN is in training mode")


def test_fp16_bn_tensors(tmp_path, rng):
    consts = {"w": rng.normal(size=(4, 3, 1, 1)).astype(np.float16)}
    consts |= bn_params("bn", 4, rng, np.float16)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    f16 = TensorProto.FLOAT16
    m = model(nodes, [vi("x", [1, 3, 4, 4], f16)], [vi("y", [1, 4, 4, 4], f16)], consts)
    bn = only_bn(tmp_path, m)
    assert (bn.stats_dtype, bn.param_dtype) == ("float16", "float16")
    assert bn.running_mean.dtype == np.float16 and bn.weight.dtype == np.float16
    np.testing.assert_array_equal(bn.running_mean, consts["bn_mean"])


def test_norm_inventory(tmp_path, rng):
    consts = {
        "ln_s": np.ones(8, np.float32),
        "ln_b": np.zeros(8, np.float32),
        "gn_s": np.ones(4, np.float32),
        "gn_b": np.zeros(4, np.float32),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln_s", "ln_b"], ["l"], name="ln", axis=-1),
        helper.make_node("Reshape", ["l", "shape"], ["l4"], name="reshape"),
        helper.make_node(
            "GroupNormalization",
            ["l4", "gn_s", "gn_b"],
            ["y"],
            name="gn",
            num_groups=2,
            epsilon=1e-6,
        ),
    ]
    consts["shape"] = np.array([2, 4, 2, 1], np.int64)
    m = model(nodes, [vi("x", [2, 8])], [vi("y", [2, 4, 2, 1])], consts, opset=21)
    info = open_onnx(save(tmp_path, m)).info()
    assert info.bn_layers == ()
    ln, gn = info.norm_layers
    assert (ln.name, ln.kind, ln.shape, ln.eps, ln.affine) == (
        "ln",
        "LayerNormalization",
        "8, axis -1",
        1e-5,
        True,
    )
    assert (gn.name, gn.kind, gn.shape, gn.eps) == (
        "gn",
        "GroupNormalization",
        "2 groups, scale 4",
        1e-6,
    )


def test_session_and_run_numbers(tmp_path, rng):
    """Gemm(transB=1) -> BN computed by onnxruntime equals numpy; float32, rtol 1e-5."""
    consts = {"B": rng.normal(size=(4, 5)).astype(np.float32), "C": rng.normal(size=4)}
    consts["C"] = consts["C"].astype(np.float32)
    consts |= bn_params("bn", 4, rng)
    nodes = [
        helper.make_node("Gemm", ["x", "B", "C"], ["g"], name="gemm", transB=1),
        bn_node("bn", "g", "y", epsilon=1e-3),
    ]
    h = open_model(save(tmp_path, model(nodes, [vi("x", ["N", 5])], [vi("y", ["N", 4])], consts)))
    x = rng.normal(size=(3, 5)).astype(np.float32)
    (y,) = h.run({"x": x})
    g = x.astype(np.float64) @ consts["B"].T + consts["C"]
    s = consts["bn_scale"] / np.sqrt(consts["bn_var"].astype(np.float64) + np.float32(1e-3))
    expected = (g - consts["bn_mean"]) * s + consts["bn_bias"]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert h.session() is h.session()
    with pytest.raises(InputError, match="onnxruntime run failed"):
        h.run({"x": np.zeros((3, 7), np.float32)})


def test_make_session_errors_become_input_errors(rng):
    m = model([helper.make_node("NoSuchOp", ["x"], ["y"])], [vi("x", [1])], [vi("y", [1])], {})
    with pytest.raises(InputError, match=r"^m\.onnx: onnxruntime cannot load it: .*NoSuchOp"):
        make_session(m, source="m.onnx")
    with pytest.raises(InputError, match="has no NoSuchExecutionProvider"):
        make_session(m, providers=["NoSuchExecutionProvider"])


def test_save_round_trip(tmp_path, rng):
    m, _ = conv_bn_model(rng)
    out = tmp_path / "out.onnx"
    save_onnx(m, out)
    assert onnx.load(str(out)).SerializeToString() == m.SerializeToString()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_save_external_data_above_threshold(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(onnx_run, "EXTERNAL_DATA_THRESHOLD", 100)
    monkeypatch.setattr(onnx_run, "EXTERNAL_TENSOR_MIN_BYTES", 256)  # w (432 B) goes out
    m, consts = conv_bn_model(rng)
    before = m.SerializeToString()
    out = tmp_path / "out.onnx"
    save_onnx(m, out)
    save_onnx(m, out)  # a second write replaces the data file instead of appending to it
    assert m.SerializeToString() == before  # the caller's model is untouched
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[1] == "out.onnx"
    assert names[0].startswith("out.") and names[0].endswith(".data")
    h = open_onnx(out)
    assert h.external_data is True
    np.testing.assert_array_equal(h.index.const("w"), consts["w"])
    np.testing.assert_array_equal(h.info().bn_layers[0].running_var, consts["bn1_var"])
    # a handle loaded with external data saves with external data again
    monkeypatch.setattr(onnx_run, "EXTERNAL_DATA_THRESHOLD", 2_000_000_000)
    h.save(tmp_path / "again.onnx")
    assert len(list(tmp_path.glob("again.*.data"))) == 1


def test_failed_write_leaves_previous_file(tmp_path, rng, monkeypatch):
    m, _ = conv_bn_model(rng)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_run.os, "fsync", boom)
    with pytest.raises(InputError, match=r"out\.onnx: cannot write"):
        save_onnx(m, out)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    # external-data path: fail after the data file was written
    monkeypatch.undo()
    monkeypatch.setattr(onnx_run.os, "replace", boom)
    with pytest.raises(InputError):
        save_onnx(m, out, external_data=True)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_a_write_is_flushed_to_disk_only_when_it_replaces_a_file(tmp_path, rng, monkeypatch):
    # A crash must leave the old file or the new one; a new file it may cost, as onnx.save.
    m, _ = conv_bn_model(rng)
    synced = []
    real = os.fsync
    monkeypatch.setattr(onnx_run.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    out = tmp_path / "out.onnx"
    save_onnx(m, out)
    assert synced == [] and onnx.load(out) == m
    save_onnx(m, out)
    assert len(synced) == 1 and onnx.load(out) == m
    monkeypatch.setattr(onnx_run, "EXTERNAL_TENSOR_MIN_BYTES", 1)  # every tensor goes out
    save_onnx(m, tmp_path / "ext.onnx", external_data=True)
    assert len(synced) == 1
    save_onnx(m, tmp_path / "ext.onnx", external_data=True)
    assert len(synced) == 3  # the data file and the .onnx


def test_input_shapes_normalized(tmp_path, rng):
    m, _ = conv_bn_model(rng)
    p = save(tmp_path, m)
    assert open_onnx(p, input_shapes={"": (2, 3, 8, 8)}).input_shapes == {"x": (2, 3, 8, 8)}
    with pytest.raises(InputError, match="no input named 'z'"):
        open_onnx(p, input_shapes={"z": (1,)})
    with pytest.raises(InputError, match="has size 3 in dim 1"):
        open_onnx(p, input_shapes={"x": (1, 4, 8, 8)})


def test_onnx_path_never_imports_torch(tmp_path, rng):
    m, _ = conv_bn_model(rng)
    p = save(tmp_path, m)
    code = (
        "import sys; from bncheck.backends import open_model; "
        f"h = open_model({str(p)!r}); h.info(); "
        "print('torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_bn_into_consumer_gemm_and_depthwise_conv(tmp_path, rng):
    consts = bn_params("bna", 5, rng) | bn_params("bnb", 3, rng)
    consts["B"] = rng.normal(size=(4, 5)).astype(np.float32)  # transB=1: (N, K)
    consts["dw"] = rng.normal(size=(3, 1, 3, 3)).astype(np.float32)  # depthwise, group=3
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        bn_node("bna", "r", "a"),
        helper.make_node("Gemm", ["a", "B"], ["y1"], name="gemm", transB=1),
        helper.make_node("Relu", ["z"], ["rz"], name="reluz"),
        bn_node("bnb", "rz", "b"),
        helper.make_node("Conv", ["b", "dw"], ["y2"], name="dwconv", group=3),
    ]
    ins = [vi("x", [2, 5]), vi("z", [1, 3, 6, 6])]
    outs = [vi("y1", [2, 4]), vi("y2", [1, 3, 4, 4])]
    info = open_onnx(save(tmp_path, model(nodes, ins, outs, consts))).info()
    a, b = info.bn_layers
    assert a.fold == FoldDecision("consumer", "gemm")
    assert b.fold == FoldDecision("consumer", "dwconv")


def test_conv_transpose_producer_with_groups(tmp_path, rng):
    # ConvTranspose weight (C_in, C_out/group, k, k): 2 groups x 3 = 6 output channels
    consts = {"w": rng.normal(size=(4, 3, 2, 2)).astype(np.float32)} | bn_params("bn", 6, rng)
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["c"], name="up", group=2, strides=[2, 2]),
        bn_node("bn", "c", "y"),
    ]
    m = model(nodes, [vi("x", [1, 4, 3, 3])], [vi("y", [1, 6, 6, 6])], consts)
    bn = only_bn(tmp_path, m)
    assert bn.producer == Neighbour("up", "ConvTranspose", True)
    assert bn.fold == FoldDecision("producer", "up")


def test_matmul_on_rank3_is_not_folded(tmp_path, rng):
    consts = {"W": rng.normal(size=(5, 4)).astype(np.float32)} | bn_params("bn", 3, rng)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"), bn_node("bn", "m", "y")]
    m = model(nodes, [vi("x", [2, 3, 5])], [vi("y", [2, 3, 4])], consts)
    bn = only_bn(tmp_path, m)
    assert bn.producer == Neighbour("mm", "MatMul", True)
    assert bn.fold.reason.startswith("producer MatMul 'mm' output is not known to be rank 2")


def test_initializers_listed_as_inputs_are_overridable(tmp_path, rng):
    m, consts = conv_bn_model(rng)
    m.graph.input.extend([vi("w", [4, 3, 3, 3]), vi("bn1_mean", [4])])
    h = open_onnx(save(tmp_path, m))
    info = h.info()
    assert [i.name for i in info.inputs] == ["x"]  # initializers are not model inputs
    bn = info.bn_layers[0]
    np.testing.assert_array_equal(bn.running_mean, consts["bn1_mean"])  # stored default shown
    assert bn.fold.reason.startswith(
        "statistics are not constant (mean can be overridden as graph inputs)"
    )
    # IR version 3: initializers are always constants, as onnxruntime treats them (and the
    # checker wants every initializer listed as an input)
    m.ir_version = 3
    listed = {i.name for i in m.graph.input}
    m.graph.input.extend(
        vi(t.name, list(t.dims)) for t in m.graph.initializer if t.name not in listed
    )
    assert only_bn(tmp_path, m).fold == FoldDecision("producer", "conv1")


def test_make_session_via_file_for_large_models(rng, monkeypatch):
    """Above the threshold the session is built from a temporary file with external data;
    results equal the in-memory session's exactly (same graph, same kernels)."""
    m, _ = conv_bn_model(rng)
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    (direct,) = make_session(m).run(None, {"x": x})
    monkeypatch.setattr(onnx_run, "EXTERNAL_DATA_THRESHOLD", 100)
    monkeypatch.setattr(onnx_run, "EXTERNAL_TENSOR_MIN_BYTES", 256)
    session = make_session(m)
    tmpdir = Path(session._bncheck_tmpdir.name)
    assert len(list(tmpdir.glob("model.*.data"))) == 1
    (via_file,) = session.run(None, {"x": x})
    np.testing.assert_array_equal(via_file, direct)


def test_exporter_constant_chains_count_as_constants(tmp_path, rng):
    """Legacy torch export shares equal parameters through Identity; the dynamo export builds
    a bias-free Conv's zero bias as Expand(CastLike(0, x), Shape(W)). Both are constants."""
    consts = {"w": rng.normal(size=(4, 3, 1, 1)).astype(np.float32)} | bn_params("bn", 4, rng)
    consts["zero"] = np.zeros((), np.float32)
    scale = consts.pop("bn_scale")
    consts["shared_scale"] = scale
    nodes = [
        helper.make_node("Identity", ["shared_scale"], ["bn_scale"], name="dedup"),
        helper.make_node("Shape", ["w"], ["wshape"], start=0, end=1),
        helper.make_node("Constant", [], ["one"], value_ints=[1]),
        helper.make_node("Expand", ["wshape", "one"], ["bshape"]),
        helper.make_node("CastLike", ["zero", "x"], ["zero_like"]),
        helper.make_node("Expand", ["zero_like", "bshape"], ["b"]),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
        bn_node("bn", "c", "y"),
    ]
    m = model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 4, 4])], consts)
    h = open_onnx(save(tmp_path, m))
    bn = h.info().bn_layers[0]
    np.testing.assert_array_equal(bn.weight, scale)
    np.testing.assert_array_equal(h.index.const("b"), np.zeros(4, np.float32))
    assert bn.fold == FoldDecision("producer", "conv")
