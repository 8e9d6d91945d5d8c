"""Errors name their cause: an output folder is "a folder", onnxruntime's message arrives
whole (its figures come after the first line) and alone (no log lines of its own)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT, SAMPLES, assert_clean_error
from onnx import TensorProto, helper, numpy_helper

from bncheck.backends.onnx.run import ort_message
from bncheck.errors import one_line

ONNX = SAMPLES / "resnet.onnx"


@pytest.mark.parametrize("slash", ["", "/"])
def test_output_folder_is_called_a_folder(run_cli, tmp_path, slash):
    folder = tmp_path / "out"
    folder.mkdir()
    for args in (("fold", ONNX), ("recalibrate", ONNX, "--data", SAMPLES / "resnet_calib.npy")):
        res = run_cli(*args[:2], "-o", f"{folder}{slash}", *args[2:])
        assert_clean_error(res, f"{folder}{slash}: is a folder, not a file name", "resnet.onnx")
    res = run_cli("check", ONNX, "--synthetic", "--report", f"{folder}{slash}")
    assert_clean_error(res, "is a folder, not a file name", "check.html")


def test_a_missing_folder_written_with_a_slash_is_a_folder_too(run_cli, tmp_path):
    res = run_cli("fold", ONNX, "-o", f"{tmp_path}/new/")
    assert_clean_error(res, "new/: is a folder, not a file name; give one, e.g.")
    assert "must end in" not in res.err


def _session(nodes, inputs, inits):
    g = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    ort.set_default_logger_severity(4)
    return ort.InferenceSession(model.SerializeToString())


def _error(session, feeds) -> Exception:
    with pytest.raises(Exception) as info:
        session.run(None, feeds)
    return info.value


def test_ort_message_keeps_the_lines_after_the_first():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])
    s = _session([helper.make_node("Relu", ["x"], ["y"])], [x], [])
    exc = _error(s, {"x": np.ones((1, 4, 8, 8), np.float32)})
    assert "\n" in str(exc)  # onnxruntime puts the figures on the next line
    assert ort_message(exc) == (
        "Got invalid dimensions for input: x for the following indices index: 1 Got: 4 "
        "Expected: 3 Please fix either the inputs/outputs or the model."
    )


def test_ort_message_drops_the_cpp_location_inside_the_text():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])
    shape = numpy_helper.from_array(np.array([-1, 100], np.int64), "s")
    s = _session([helper.make_node("Reshape", ["x", "s"], ["y"])], [x], [shape])
    msg = ort_message(_error(s, {"x": np.ones((1, 3, 8, 8), np.float32)}))
    assert msg.startswith("Non-zero status code returned while running Reshape node.")
    assert msg.endswith("Input shape:{1,3,8,8}, requested shape:{-1,100}")
    assert ".h:" not in msg and "onnxruntime::" not in msg


def test_one_line_cuts_the_middle_not_the_end():
    exc = ValueError("start " + "x" * 3000 + " the figures")
    text = one_line(exc, limit=200)
    assert len(text) <= 200 and text.startswith("start ") and text.endswith(" the figures")
    assert one_line(ValueError("a\n  b\n\nc")) == "a b c"
    assert one_line(ValueError()) == "ValueError"


def test_a_failed_run_is_one_line_on_stderr(tmp_path):
    """The channel count is dynamic in the file, so only onnxruntime finds the mismatch: its
    text (with the figures) is the one line, and its own error log stays silent."""
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "c", 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 6, 6])],
        [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")],
    )
    path = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bncheck", "bench", str(path), "--input-shape", "1,4,8,8"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("bncheck: error: ") and "C: 4 kernel channels: 3" in lines[0]
