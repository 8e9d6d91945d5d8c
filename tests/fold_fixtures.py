"""ONNX models built in code for the fold and verification tests: a deep convnet whose correct
fold a per-element check rejects, a way to corrupt one channel of a fold, and broken exports."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inits, x_shape, y_shape, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _bn(prefix: str, x: str, y: str, c: int, rng) -> tuple[onnx.NodeProto, list]:
    """A BN with random signed γ, β, μ and σ² (the defaults would hide a broken fold)."""
    arrays = {
        "g": rng.uniform(0.5, 2.0, c) * rng.choice([-1, 1], c),
        "b": rng.normal(0, 1.0, c),
        "m": rng.normal(0, 1.0, c),
        "v": rng.uniform(0.2, 2.0, c),
    }
    inits = [
        numpy_helper.from_array(v.astype(np.float32), f"{prefix}_{k}") for k, v in arrays.items()
    ]
    node = helper.make_node(
        "BatchNormalization", [x, *(f"{prefix}_{k}" for k in "gbmv")], [y], name=prefix
    )
    return node, inits


def deep_convnet(
    depth: int = 24, channels: int = 16, hw: int = 16, seed: int = 0, runtime_bias: bool = False
):
    """``depth`` × (3×3 Conv → BN → ReLU), the last without ReLU so the output crosses zero;
    activations grow to ~1e4 by depth 24, as in real deep models whose folds float32 rounding
    makes differ by ~1e-5 of the output scale.

    ``runtime_bias``: each Conv gets the zero bias torch's exporter builds at run time,
    ``Expand(CastLike(0, x), Shape(W)[:1])``, which keeps onnxruntime from fusing Conv+BN."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x, cin = "x", 3
    if runtime_bias:
        inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    for i in range(depth):
        w = rng.normal(0, np.sqrt(2.0 / (cin * 9)), (channels, cin, 3, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        conv_in = [x, f"w{i}"]
        if runtime_bias:
            nodes += [
                helper.make_node("Shape", [f"w{i}"], [f"ws{i}"], start=0, end=1),
                helper.make_node("CastLike", ["zero", x], [f"z{i}"]),
                helper.make_node("Expand", [f"z{i}", f"ws{i}"], [f"bias{i}"]),
            ]
            conv_in.append(f"bias{i}")
        nodes.append(helper.make_node("Conv", conv_in, [f"c{i}"], pads=[1] * 4, name=f"conv{i}"))
        out = "y" if i == depth - 1 else f"n{i}"
        bn, bn_inits = _bn(f"bn{i}", f"c{i}", out, channels, rng)
        nodes.append(bn)
        inits += bn_inits
        if i < depth - 1:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
        cin = channels
    model = _model(nodes, inits, ["N", 3, hw, hw], ["N", channels, hw, hw])
    if runtime_bias:  # the activations' types, as an exporter records them
        model.graph.value_info.extend(
            helper.make_tensor_value_info(f"r{i}", TensorProto.FLOAT, None)
            for i in range(depth - 1)
        )
    return model


def conv_bias_add(with_bn: bool = False) -> onnx.ModelProto:
    """Conv → Add(per-channel constant) → Relu: the bias a converter split off, no BN."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 1, (1, 4, 1, 1)).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4, name="conv"),
        helper.make_node("Add", ["c", "b"], ["a"], name="bias_add"),
        helper.make_node("Relu", ["a"], ["y"], name="relu"),
    ]
    return _model(nodes, inits, ["N", 3, 8, 8], ["N", 4, 8, 8])


def conv_relu() -> onnx.ModelProto:
    """Nothing to fold: a Conv and a ReLU."""
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4, name="conv"),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    return _model(nodes, [w], ["N", 3, 8, 8], ["N", 4, 8, 8])


def conv3d_bad_bias(c: int = 8, computed: bool = False) -> onnx.ModelProto:
    """A Conv3d → BN whose zero bias has shape (c, 2), as torch's exporter wrote it for
    torchvision's r3d_18 (the ONNX spec wants (c,); onnxruntime refuses the file): stored
    (the constant-folded copy), or ``computed`` at run time as the export itself does,
    ``Expand(CastLike(0, x), Concat(Shape(W)[:1], [2]))``."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (c, 2, 3, 3, 3)).astype(np.float32), "w")]
    nodes = []
    if computed:
        inits += [
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.array([2], np.int64), "two"),
        ]
        nodes += [
            helper.make_node("Shape", ["w"], ["w_out"], start=0, end=1),
            helper.make_node("Concat", ["w_out", "two"], ["bias_shape"], axis=0),
            helper.make_node("CastLike", ["zero", "x"], ["z"]),
            helper.make_node("Expand", ["z", "bias_shape"], ["zero_bias"]),
        ]
    else:
        inits.append(numpy_helper.from_array(np.zeros((c, 2), np.float32), "zero_bias"))
    bn, bn_inits = _bn("bn", "c", "y", c, rng)
    nodes += [
        helper.make_node("Conv", ["x", "w", "zero_bias"], ["c"], pads=[1] * 6, name="conv3d"),
        bn,
    ]
    return _model(nodes, inits + bn_inits, ["N", 2, 4, 6, 6], ["N", c, 4, 6, 6])


def batch_one_reshape() -> onnx.ModelProto:
    """Declares a dynamic batch but bakes batch 1 into a Reshape (to (1, C·H·W)): it runs only
    at batch 1."""
    rng = np.random.default_rng(4)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([1, 4 * 8 * 8], np.int64), "flat"),
    ]
    bn, bn_inits = _bn("bn", "c", "n", 4, rng)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4, name="conv"),
        bn,
        helper.make_node("Reshape", ["n", "flat"], ["y"], name="flatten"),
    ]
    return _model(nodes, inits + bn_inits, ["N", 3, 8, 8], [1, 256])


def corrupt_one_channel(monkeypatch, call: int, channel: int = 3, factor: float = 1.01) -> None:
    """Make the ``call``-th producer fold of the ONNX backend scale one output channel of its
    weight and bias by ``factor``: a fold wrong by 1% in one channel of one layer."""
    from bncheck.backends.onnx import fold as fold_mod

    real = fold_mod.fold_into_producer
    calls = {"n": 0}

    def corrupt(*args, **kwargs):
        w, b = real(*args, **kwargs)
        if calls["n"] == call:
            w, b = w.copy(), b.copy()
            w[channel] *= factor
            b[channel] *= factor
        calls["n"] += 1
        return w, b

    monkeypatch.setattr(fold_mod, "fold_into_producer", corrupt)


@pytest.fixture
def unlimited_verification_time(monkeypatch):
    """No time budget cuts verification short, so sample counts do not depend on machine speed."""
    monkeypatch.setattr("bncheck.api._verify.VERIFY_SECONDS", 1e9)
