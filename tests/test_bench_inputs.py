"""``bench --vs`` refuses, before timing, two models that do not take the same inputs."""

from __future__ import annotations

import onnx
import pytest
from conftest import assert_clean_error
from onnx import TensorProto, helper

from bncheck.api import open_model
from bncheck.api._bench_inputs import check_same_inputs
from bncheck.errors import InputError


def _relu(path, shape, dtype=TensorProto.FLOAT, name="x"):
    g = helper.make_graph(
        [helper.make_node("Relu", [name], ["y"])],
        "g",
        [helper.make_tensor_value_info(name, dtype, shape)],
        [helper.make_tensor_value_info("y", dtype, shape)],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.fixture
def a(tmp_path):
    return _relu(tmp_path / "a.onnx", ["n", 3, 8, 8])


@pytest.mark.parametrize(
    "shape, dtype, name, needle",
    [
        (["n", 4, 8, 8], TensorProto.FLOAT, "x", "input 'x' has size 4 in dim 1, "),
        (["n", 3, 8], TensorProto.FLOAT, "x", "input 'x' has rank 3, "),
        (["n", 3, 8, 8], TensorProto.DOUBLE, "x", "input 'x' is float64, "),
    ],
)
def test_different_inputs_are_refused(tmp_path, a, shape, dtype, name, needle):
    b = _relu(tmp_path / "b.onnx", shape, dtype, name)
    with pytest.raises(InputError, match=needle):
        check_same_inputs(open_model(a), open_model(b))


def test_same_inputs_pass_dynamic_dims_fit_any_size(tmp_path, a):
    for k, shape in enumerate((["batch", 3, 8, 8], [1, 3, 8, 8], [None, 3, "h", 8])):
        b = _relu(tmp_path / f"b{k}.onnx", shape)
        check_same_inputs(open_model(a), open_model(b))
    # one input each: paired by position whatever its name
    check_same_inputs(
        open_model(a), open_model(_relu(tmp_path / "z.onnx", ["n", 3, 8, 8], name="z"))
    )


def test_two_inputs_pair_by_name(tmp_path, a):
    def two(path, names):
        g = helper.make_graph(
            [helper.make_node("Add", names, ["y"])],
            "g",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in names],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        )
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
        return open_model(path)

    check_same_inputs(two(tmp_path / "p.onnx", ["u", "v"]), two(tmp_path / "q.onnx", ["v", "u"]))
    with pytest.raises(InputError, match=r"its inputs \(u, w\) differ"):
        check_same_inputs(
            two(tmp_path / "p.onnx", ["u", "v"]), two(tmp_path / "r.onnx", ["u", "w"])
        )


def test_bench_vs_refuses_before_timing(run_cli, tmp_path, a):
    b = _relu(tmp_path / "b.onnx", ["n", 3, 8, 8], TensorProto.DOUBLE)
    res = run_cli("bench", a, "--vs", b, "--time-budget", "0.05")
    assert_clean_error(
        res, "b.onnx: input 'x' is float64,", "both models must take the same inputs"
    )
