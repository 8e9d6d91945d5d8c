"""``bncheck recalibrate`` end to end: exit codes, outputs written only on success, formats.

The figures themselves are tested in tests/test_recalibrate.py and tests/test_stats.py.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import SAMPLES, assert_clean_error
from onnx import numpy_helper

from bncheck.backends.onnx import OnnxHandle

ONNX = SAMPLES / "resnet.onnx"
CALIB = SAMPLES / "resnet_calib.npy"
LABELS = SAMPLES / "resnet_labels.npy"
SMALL = ("--max-samples", "64", "--no-compare")  # fast runs where the figures do not matter


def bn_stats(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    names = {
        n.input[i] for n in model.graph.node if n.op_type == "BatchNormalization" for i in (3, 4)
    }
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in names}


def test_json_report_and_output(tmp_path, run_cli):
    out = tmp_path / "r.onnx"
    res = run_cli("recalibrate", ONNX, "--data", CALIB, "--labels", LABELS, "-o", out,
                  "--format", "json")  # fmt: skip
    assert res.code == 0, res
    doc = json.loads(res.out)
    assert doc["schema"] == "bncheck.recalibrate/1"
    assert (doc["samples"], doc["batches"], doc["batch_size"], doc["mode"]) == (256, 8, 32, "exact")
    assert doc["output"] == str(out) and doc["running_var"] == "unbiased"
    assert len(doc["layers"]) == 9 and all(x["after"]["score"] >= 0 for x in doc["layers"])
    assert doc["accuracy_before"] == doc["accuracy_after"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.onnx"]
    # The sample's statistics already are the exact ones: recalibrating keeps them (1e-5).
    new, old = bn_stats(out), bn_stats(ONNX)
    assert new.keys() == old.keys()
    assert all(np.abs(new[k] - old[k]).max() <= 1e-5 * np.abs(old[k]).max() for k in old)


@pytest.mark.parametrize("fmt", ["text", "markdown", "github"])
def test_other_formats(tmp_path, run_cli, fmt):
    res = run_cli("recalibrate", ONNX, "--data", CALIB, "-o", tmp_path / "r.onnx", "--format",
                  fmt, "--batch-size", "8", *SMALL)  # fmt: skip
    assert res.code == 0, res
    assert "recalibrated 9 BN layers (exact) on 64 samples in 8 batches of 8" in res.out
    if fmt == "github":
        assert "::warning file=" in res.out and "batch size 8 < 16" in res.out
    if fmt == "markdown":
        assert res.out.startswith("### bncheck recalibrate")


def test_quiet_prints_one_line(tmp_path, run_cli):
    res = run_cli("recalibrate", ONNX, "--data", CALIB, "-o", tmp_path / "r.onnx", "-q", *SMALL)
    assert res.code == 0, res
    assert len(res.out.strip().splitlines()) == 1 and "wrote" in res.out


def test_output_is_required_and_the_input_is_protected(tmp_path, run_cli):
    assert_clean_error(run_cli("recalibrate", ONNX, "--data", CALIB), "-o", "--in-place")
    copy = tmp_path / "m.onnx"
    copy.write_bytes(ONNX.read_bytes())
    res = run_cli("recalibrate", copy, "--data", CALIB, "-o", copy, *SMALL)
    assert_clean_error(res, "--in-place")
    assert copy.read_bytes() == ONNX.read_bytes()
    res = run_cli("recalibrate", copy, "--data", CALIB, "--in-place", "--mode", "ema", *SMALL)
    assert res.code == 0, res
    assert copy.read_bytes() != ONNX.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary left


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--batch-size", "1"), "at least 2"),
        (("--mode", "median"), "exact or ema"),
        (("--momentum", "0.1"), "--mode ema"),
        (("--mode", "ema", "--momentum", "1.5"), "(0, 1]"),
        (("--labels", "nothing.npy"), "nothing.npy"),
        (("--data", "missing.npy"), "missing.npy"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, run_cli, args, needle):
    out = tmp_path / "r.onnx"
    data = () if "--data" in args else ("--data", CALIB)
    res = run_cli("recalibrate", ONNX, *data, "-o", out, *args)
    assert_clean_error(res, needle)
    assert list(tmp_path.iterdir()) == []


def test_wrong_output_suffix_and_bad_labels(tmp_path, run_cli):
    res = run_cli("recalibrate", ONNX, "--data", CALIB, "-o", tmp_path / "x.pt2")
    assert_clean_error(res, ".onnx")
    floats = tmp_path / "labels.npy"
    np.save(floats, np.zeros(256, np.float32))
    res = run_cli("recalibrate", ONNX, "--data", CALIB, "-o", tmp_path / "r.onnx",
                  "--labels", floats)  # fmt: skip
    assert_clean_error(res, "integer class indices")
    few = tmp_path / "few.npy"
    np.save(few, np.zeros(10, np.int64))
    res = run_cli("recalibrate", ONNX, "--data", CALIB, "-o", tmp_path / "r.onnx", "--labels", few)
    assert_clean_error(res, "10 labels for 256 samples")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["few.npy", "labels.npy"]


def test_interrupt_mid_pass_leaves_nothing(tmp_path, run_cli, monkeypatch):
    """Ctrl-C during the pass: exit 130, no output, no temporary file."""
    real = OnnxHandle.moment_runner

    def interrupting(self, *, batch_stats):
        run = real(self, batch_stats=batch_stats)
        calls = []

        def go(feeds):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return run(feeds)

        return go

    monkeypatch.setattr(OnnxHandle, "moment_runner", interrupting)
    out = tmp_path / "r.onnx"
    res = run_cli("recalibrate", ONNX, "--data", CALIB, "-o", out)
    assert res.code == 130, res
    assert list(tmp_path.iterdir()) == []
