"""ONNX models as other projects export them, end to end from the CLI.

* Paddle's exporter writes ``-1`` for the batch dim; older converters write ``0``; Netron shows
  an unknown dim as ``?`` and some files carry that as a dim_param. All are dynamic.
* Paddle (and older exporters) store every weight as a ``Constant`` node, no initializers:
  recalibrate must write the statistics there, without changing a Constant another node reads.

The models are built here: two 1×1 Conv → BN → Relu branches on one input, added, plus the first
BN's mean (reshaped) — so that mean tensor has a reader other than its BN — and both BNs share
one variance tensor. With 1×1 convs the BN inputs are a matrix product, so the exact population
statistics have a float64 numpy reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import assert_clean_error
from onnx import TensorProto, helper, numpy_helper

from bncheck.backends.onnx import open_onnx
from bncheck.errors import InputError

C_IN, C_OUT = 3, 4


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {}
    for i in (1, 2):
        w[f"w{i}"] = rng.normal(size=(C_OUT, C_IN, 1, 1)).astype(np.float32)
        w[f"b{i}"] = rng.normal(size=C_OUT).astype(np.float32)
        w[f"s{i}"] = rng.uniform(0.5, 2.0, C_OUT).astype(np.float32)
        w[f"beta{i}"] = rng.normal(size=C_OUT).astype(np.float32)
        w[f"m{i}"] = rng.normal(size=C_OUT).astype(np.float32)
    w["v"] = rng.uniform(0.5, 2.0, C_OUT).astype(np.float32)  # read by both BNs
    w["shape"] = np.array([1, C_OUT, 1, 1], np.int64)
    return w


def build(dims: list, *, constant_nodes: bool, seed: int = 0) -> onnx.ModelProto:
    """The two-branch model; input dims as given (``-1``, ``0``, ``"?"`` …), opset 11 as Paddle."""
    w = weights(seed)
    nodes = []
    for i in (1, 2):
        nodes += [
            helper.make_node("Conv", ["x", f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}"),
            helper.make_node(
                "BatchNormalization",
                [f"c{i}", f"s{i}", f"beta{i}", f"m{i}", "v"],
                [f"n{i}"],
                name=f"bn{i}",
                epsilon=1e-5,
            ),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
    nodes += [
        helper.make_node("Add", ["r1", "r2"], ["sum"], name="add"),
        helper.make_node("Reshape", ["m1", "shape"], ["m1_4d"], name="reshape"),
        helper.make_node("Add", ["sum", "m1_4d"], ["y"], name="shift"),
    ]
    tensors = [numpy_helper.from_array(v, k) for k, v in w.items()]
    if constant_nodes:
        consts = [
            helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
            for t in tensors
        ]
        nodes, tensors = consts + nodes, []
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], C_OUT, dims[2], dims[3]])
    g = helper.make_graph(nodes, "paddle_like", [x], [y], tensors)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    m.ir_version = 6
    onnx.checker.check_model(m)
    return m


def bn_inputs(x: np.ndarray, w: dict[str, np.ndarray], i: int) -> np.ndarray:
    """Input of BN ``i`` (the 1×1 conv), float64."""
    k = w[f"w{i}"].astype(np.float64)[:, :, 0, 0]
    return np.einsum("oc,nchw->nohw", k, x.astype(np.float64)) + w[f"b{i}"][None, :, None, None]


def population_stats(x: np.ndarray, w: dict[str, np.ndarray], i: int):
    """Exact mean and unbiased variance of BN ``i``'s input over all of ``x`` (float64)."""
    c = bn_inputs(x, w, i).transpose(1, 0, 2, 3).reshape(C_OUT, -1)
    return c.mean(axis=1), c.var(axis=1, ddof=1)


def forward(x: np.ndarray, w: dict, stats: dict, m1: np.ndarray) -> np.ndarray:
    """The model in float64 with BN statistics ``stats`` ({1: (mean, var), 2: …})."""
    out = 0.0
    for i in (1, 2):
        mean, var = (a[None, :, None, None] for a in stats[i])
        g, b = w[f"s{i}"][None, :, None, None], w[f"beta{i}"][None, :, None, None]
        out = out + np.maximum((bn_inputs(x, w, i) - mean) / np.sqrt(var + 1e-5) * g + b, 0)
    return out + m1[None, :, None, None]


def declared_dims(path: Path) -> list[list]:
    """Dims of each graph input and output: int, dim_param, or None (unknown)."""
    m = onnx.load(str(path))
    return [
        [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in vi.type.tensor_type.shape.dim
        ]
        for vi in (*m.graph.input, *m.graph.output)
    ]


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def assert_written_file_ok(run_cli, path: Path, source: Path, samples: list[np.ndarray]) -> None:
    """A file bncheck wrote: its inputs and outputs declare the source's dims, each dynamic one
    (``-1``, ``0``, a name) still dynamic and none fixed to a size; it passes bncheck's own
    inspect with no error; onnxruntime runs it at every given shape."""
    dynamic = [[None if isinstance(d, int) and d <= 0 else d for d in dims]
               for dims in declared_dims(source)]  # fmt: skip
    assert declared_dims(path) == dynamic
    res = run_cli("inspect", path, "--format", "json")
    assert res.code == 0, res
    assert json.loads(res.out)["summary"]["error"] == 0
    for x in samples:
        assert ort_run(path, x).shape == (len(x), C_OUT, *x.shape[2:])


@pytest.fixture
def data(tmp_path) -> tuple[Path, np.ndarray]:
    x = np.random.default_rng(7).normal(1.0, 2.0, size=(24, C_IN, 8, 8)).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, x)
    return path, x


def save(tmp_path: Path, m: onnx.ModelProto, name: str) -> Path:
    path = tmp_path / name
    onnx.save(m, str(path))
    return path


# --- the dims -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dims", "seen"),
    [
        ([-1, 3, 8, 8], (None, 3, 8, 8)),
        (["?", 3, 0, -1], ("?", 3, None, None)),
        ([0, 3, -7, "N"], (None, 3, None, "N")),
    ],
)
def test_non_positive_dims_are_dynamic(tmp_path, dims, seen):
    m = build(dims, constant_nodes=False)
    m.graph.value_info.append(
        helper.make_tensor_value_info("c1", TensorProto.FLOAT, [dims[0], C_OUT, dims[2], dims[3]])
    )
    h = open_onnx(save(tmp_path, m, "m.onnx"))
    assert h.info().inputs[0].shape == seen
    assert h.info().outputs[0].shape[0] == seen[0]
    # Shape inference sees no size below 1 either (it names unknown dims itself).
    assert not any(isinstance(d, int) and d < 1 for d in h.index.shape("c1"))
    # Every dim the handle's model declares is a positive size or has no value at all.
    for vi in (*h.model.graph.input, *h.model.graph.output, *h.model.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            assert not d.HasField("dim_value") or d.dim_value > 0


def test_input_shape_fixes_minus_one_dims_and_is_checked_against_fixed_ones(tmp_path, data):
    path = save(tmp_path, build([-1, 3, 8, 8], constant_nodes=False), "m.onnx")
    assert open_onnx(path, input_shapes={"": (5, 3, 8, 8)}).input_shapes == {"x": (5, 3, 8, 8)}
    with pytest.raises(InputError, match="has size 8 in dim 2, --input-shape says 9"):
        open_onnx(path, input_shapes={"": (5, 3, 9, 8)})


def test_minus_one_batch_model_through_every_command(tmp_path, run_cli, data):
    """Paddle's export: batch dim -1, weights as initializers."""
    npy, x = data
    w = weights()
    model = save(tmp_path, build([-1, 3, 8, 8], constant_nodes=False), "paddle.onnx")

    res = run_cli("inspect", model, "--format", "json")
    assert res.code == 0, res
    doc = json.loads(res.out)
    assert doc["model"]["inputs"][0]["shape"] == [None, 3, 8, 8]
    assert doc["summary"]["bn_layers"] == 2 and doc["summary"]["error"] == 0

    for shape in ([], ["--input-shape", "1,3,8,8"]):
        res = run_cli("check", model, "--data", npy, *shape, "--format", "json", "--fail-on",
                      "never")  # fmt: skip
        assert res.code == 0, res
        layers = json.loads(res.out)["layers"]
        assert [lay["count"] for lay in layers] == [24 * 64] * 2
        for i, lay in enumerate(layers, start=1):  # check measures the data's exact moments
            mean, _ = population_stats(x, w, i)
            np.testing.assert_allclose(lay["per_channel"]["data_mean"], mean, rtol=1e-5, atol=1e-5)

    out = tmp_path / "recal.onnx"
    res = run_cli("recalibrate", model, "--data", npy, "-o", out, "--batch-size", "5")
    assert res.code == 0, res
    assert_exact_stats(out, x, w)
    assert_written_file_ok(run_cli, out, model, [x[:2], x[:7]])

    folded = tmp_path / "folded.onnx"
    res = run_cli("fold", model, "-o", folded, "--format", "json")
    assert res.code == 0, res
    assert json.loads(res.out)["verification"]["passed"] is True
    assert_written_file_ok(run_cli, folded, model, [x[:1], x[:9]])
    np.testing.assert_allclose(ort_run(folded, x), ort_run(model, x), rtol=1e-4, atol=1e-4)

    res = run_cli("bench", model, "--threads", "1", "--time-budget", "0.2", "--warmup", "2",
                  "--batch-size", "1,4")  # fmt: skip
    assert res.code == 0, res

    opt = tmp_path / "opt.onnx"
    res = run_cli("optimize", model, "--data", npy, "-o", opt, "--threads", "1",
                  "--time-budget", "0.2")  # fmt: skip
    assert res.code == 0, res
    assert_written_file_ok(run_cli, opt, model, [x[:3]])
    stats = {i: population_stats(x, w, i) for i in (1, 2)}
    np.testing.assert_allclose(ort_run(opt, x), forward(x, w, stats, w["m1"]), rtol=1e-4, atol=1e-4)


def test_question_mark_and_zero_dims_through_every_command(tmp_path, run_cli):
    """Batch ``?`` (a dim_param), H written as 0, W as -1: the data or --input-shape gives them."""
    x = np.random.default_rng(3).normal(size=(10, C_IN, 6, 10)).astype(np.float32)
    npy = tmp_path / "x.npy"
    np.save(npy, x)
    w = weights()
    model = save(tmp_path, build(["?", 3, 0, -1], constant_nodes=False), "q.onnx")

    res = run_cli("check", model, "--data", npy, "--format", "json", "--fail-on", "never")
    assert res.code == 0, res
    assert [lay["count"] for lay in json.loads(res.out)["layers"]] == [10 * 60] * 2

    out = tmp_path / "recal.onnx"
    assert run_cli("recalibrate", model, "--data", npy, "-o", out, "--batch-size", "4").code == 0
    assert_exact_stats(out, x, w)
    assert_written_file_ok(run_cli, out, model, [x[:2], x[:3, :, :5, :7]])
    assert declared_dims(out)[0] == ["?", 3, None, None]

    # Nothing fixes H and W: synthetic verification input needs --input-shape, and says so.
    assert_clean_error(run_cli("fold", model, "-o", tmp_path / "f.onnx"), "--input-shape")
    assert not (tmp_path / "f.onnx").exists()
    folded = tmp_path / "folded.onnx"
    res = run_cli("fold", model, "-o", folded, "--input-shape", "1,3,6,10")
    assert res.code == 0, res
    # --input-shape sized the check only: the written file does not carry it.
    assert_written_file_ok(run_cli, folded, model, [x[:2], x[:3, :, :5, :7]])
    assert declared_dims(folded)[0] == ["?", 3, None, None]

    res = run_cli("bench", model, "--input-shape", "1,3,6,10", "--threads", "1",
                  "--time-budget", "0.2", "--warmup", "2")  # fmt: skip
    assert res.code == 0, res
    opt = tmp_path / "opt.onnx"
    res = run_cli("optimize", model, "--data", npy, "-o", opt, "--threads", "1",
                  "--time-budget", "0.2")  # fmt: skip
    assert res.code == 0, res
    assert_written_file_ok(run_cli, opt, model, [x[:1, :, :4, :4]])


def assert_exact_stats(path: Path, x: np.ndarray, w: dict) -> None:
    """The written BN statistics are the population mean and unbiased variance of each BN's
    input over ``x`` (float64 reference; 1e-5: onnxruntime's float32 conv feeds them)."""
    h = open_onnx(path)
    layers = {lay.name: lay for lay in h.info().bn_layers}
    for i in (1, 2):
        mean, var = population_stats(x, w, i)
        np.testing.assert_allclose(layers[f"bn{i}"].running_mean, mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(layers[f"bn{i}"].running_var, var, rtol=1e-5)


# --- statistics stored as Constant nodes ----------------------------------------------------


def constant_values(path: Path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))
    return {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in m.graph.node
        if n.op_type == "Constant"
    }


def test_constant_node_model_through_every_command(tmp_path, run_cli, data):
    """Paddle-style: every weight a Constant node, no initializer, batch -1."""
    npy, x = data
    w = weights()
    model = save(tmp_path, build([-1, 3, 8, 8], constant_nodes=True), "const.onnx")
    assert not onnx.load(str(model)).graph.initializer

    res = run_cli("inspect", model, "--format", "json")
    assert res.code == 0, res
    doc = json.loads(res.out)
    # Every weight counts as a parameter (was 0 with no initializers).
    assert doc["model"]["parameters"] == sum(v.size for v in w.values())
    assert doc["summary"]["foldable"] == 2

    out = tmp_path / "recal.onnx"
    res = run_cli("recalibrate", model, "--data", npy, "-o", out, "--batch-size", "6")
    assert res.code == 0, res
    assert_exact_stats(out, x, w)
    written = onnx.load(str(out))
    assert not written.graph.initializer  # written where the old ones lived: Constant nodes
    consts = constant_values(out)
    bn = {n.name: n for n in written.graph.node if n.op_type == "BatchNormalization"}
    # bn2's mean was its own: overwritten in place, under its name.
    assert bn["bn2"].input[3] == "m2"
    np.testing.assert_allclose(consts["m2"], population_stats(x, w, 2)[0], rtol=1e-5, atol=1e-5)
    # m1 is also read by the Reshape: kept as it was for it; bn1 reads a copy.
    assert bn["bn1"].input[3] != "m1"
    np.testing.assert_array_equal(consts["m1"], w["m1"])
    # v was shared by both BNs: each now reads its own, and the old one (unread) is gone.
    assert "v" not in consts and bn["bn1"].input[4] != bn["bn2"].input[4]
    stats = {i: population_stats(x, w, i) for i in (1, 2)}
    np.testing.assert_allclose(ort_run(out, x), forward(x, w, stats, w["m1"]), rtol=1e-4, atol=1e-4)
    assert_written_file_ok(run_cli, out, model, [x[:2], x[:5]])

    folded = tmp_path / "folded.onnx"
    res = run_cli("fold", out, "-o", folded, "--format", "json")
    assert res.code == 0, res
    assert json.loads(res.out)["after"]["bn_layers"] == 0
    assert_written_file_ok(run_cli, folded, model, [x[:4]])
    np.testing.assert_allclose(ort_run(folded, x), ort_run(out, x), rtol=1e-4, atol=1e-4)

    opt = tmp_path / "opt.onnx"
    res = run_cli("optimize", model, "--data", npy, "-o", opt, "--threads", "1",
                  "--time-budget", "0.2")  # fmt: skip
    assert res.code == 0, res
    np.testing.assert_allclose(ort_run(opt, x), forward(x, w, stats, w["m1"]), rtol=1e-4, atol=1e-4)


def test_recalibrating_one_bn_leaves_a_shared_constant_to_the_other(tmp_path):
    model = save(tmp_path, build([-1, 3, 8, 8], constant_nodes=True), "const.onnx")
    h = open_onnx(model)
    source = h.model.SerializeToString()
    new = h.with_stats({"bn1": (np.full(C_OUT, 0.5), np.full(C_OUT, 3.0))})
    layers = {lay.name: lay for lay in new.info().bn_layers}
    w = weights()
    np.testing.assert_array_equal(layers["bn1"].running_var, np.full(C_OUT, 3.0, np.float32))
    np.testing.assert_array_equal(layers["bn2"].running_var, w["v"])  # the shared one, as it was
    nodes = {n.name: n for n in new.model.graph.node}
    assert nodes["bn2"].input[4] == "v" and nodes["bn1"].input[4] != "v"
    # The copy is a Constant node placed before the BN (the graph stays topologically sorted).
    order = [n.output[0] for n in new.model.graph.node]
    assert order.index(nodes["bn1"].input[4]) < order.index("n1")
    assert h.model.SerializeToString() == source  # the handle's own model is not changed
    onnx.checker.check_model(new.model)


def test_statistic_behind_an_identity_becomes_an_initializer(tmp_path):
    """torch's exporter puts deduplicated parameters behind Identity: the chain is replaced and
    the nodes and tensors nothing reads any more are dropped."""
    m = build([-1, 3, 8, 8], constant_nodes=False)
    g = m.graph
    g.node.insert(0, helper.make_node("Identity", ["m2"], ["m2_id"], name="ident"))
    bn2 = next(n for n in g.node if n.name == "bn2")
    bn2.input[3] = "m2_id"
    h = open_onnx(save(tmp_path, m, "ident.onnx"))
    new = h.with_stats({"bn2": (np.full(C_OUT, 0.25), np.full(C_OUT, 2.0))})
    g2 = new.model.graph
    assert "ident" not in {n.name for n in g2.node}
    inits = {t.name: numpy_helper.to_array(t) for t in g2.initializer}
    assert "m2" not in inits
    bn = next(n for n in g2.node if n.name == "bn2")
    np.testing.assert_array_equal(inits[bn.input[3]], np.full(C_OUT, 0.25, np.float32))
    onnx.checker.check_model(new.model)


def test_statistic_computed_at_run_time_is_refused(tmp_path, run_cli, data):
    m = build([1, 3, 8, 8], constant_nodes=False)
    g = m.graph
    bn1 = next(n for n in g.node if n.name == "bn1")
    g.node.insert(list(g.node).index(bn1), helper.make_node("Abs", ["m1"], ["m1_abs"]))
    bn1.input[3] = "m1_abs"
    model = save(tmp_path, m, "abs.onnx")
    res = run_cli("recalibrate", model, "--data", data[0], "-o", tmp_path / "r.onnx")
    assert_clean_error(res, "bn1", "computed at run time")
    assert not (tmp_path / "r.onnx").exists()


def test_parameters_are_counted_the_same_in_constants_and_initializers(tmp_path):
    a = open_onnx(save(tmp_path, build([1, 3, 8, 8], constant_nodes=True), "a.onnx")).info()
    b = open_onnx(save(tmp_path, build([1, 3, 8, 8], constant_nodes=False), "b.onnx")).info()
    assert a.parameters == b.parameters == sum(v.size for v in weights().values())


# --- onnxruntime's own log lines ------------------------------------------------------------


@pytest.mark.parametrize("command", [["bench", "--time-budget", "0.2"], ["check", "--synthetic"]])
def test_onnxruntime_logs_nothing_before_our_error_line(tmp_path, run_cli_fd, command):
    """A Conv bias of the wrong shape passes onnx's checker and fails in onnxruntime's run,
    which logs a coloured ERROR line of its own unless told not to."""
    m = build([1, 3, 8, 8], constant_nodes=False)
    bias = next(t for t in m.graph.initializer if t.name == "b1")
    bias.CopyFrom(numpy_helper.from_array(np.zeros((C_OUT, 2), np.float32), "b1"))
    model = save(tmp_path, m, "broken.onnx")
    res = run_cli_fd(command[0], model, *command[1:])
    assert_clean_error(res, "onnxruntime run failed", "bias")
    assert "\x1b[" not in res.err
