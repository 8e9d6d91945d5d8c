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
        assert "::warning file=" in res.out and "8 batches of 8 samples (fewer than 16" in res.out
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


# --- the guard (issue 13, items 9 and 10) ---------------------------------------------------


@pytest.fixture(scope="module")
def one_class(tmp_path_factory):
    """The 29 calibration images of class 0 and their labels: recalibrated on them, the sample
    ResNet falls from 100% to 27.6% on those very images."""
    folder = tmp_path_factory.mktemp("one_class")
    x, y = np.load(CALIB), np.load(LABELS)
    np.save(folder / "x.npy", x[y == 0])
    np.save(folder / "y.npy", y[y == 0])
    return folder / "x.npy", folder / "y.npy"


def test_lower_accuracy_exits_1_and_writes_nothing(tmp_path, run_cli, one_class):
    x, y = one_class
    out = tmp_path / "r.onnx"
    res = run_cli("recalibrate", ONNX, "--data", x, "--labels", y, "-o", out, "--format", "json")
    assert res.code == 1, res
    assert list(tmp_path.iterdir()) == []
    doc = json.loads(res.out)
    assert doc["output"] is None and doc["refused"] is True and doc["forced"] is False
    assert doc["accuracy_before"] == 1.0 and doc["accuracy_after"] < 0.5
    assert [(f["code"], f["severity"]) for f in doc["findings"]] == [("BN405", "error")]
    assert "accuracy on the data fell from 100.0% to" in doc["findings"][0]["message"]
    # A refusal is never a success: --fail-on never does not make it one.
    res = run_cli("recalibrate", ONNX, "--data", x, "--labels", y, "-o", out, "--fail-on",
                  "never")  # fmt: skip
    assert res.code == 1, res
    assert "error BN405" in res.out and "NOT written" in res.out
    assert list(tmp_path.iterdir()) == []


def test_force_writes_and_the_exit_code_follows_fail_on(tmp_path, run_cli, one_class):
    x, y = one_class
    out = tmp_path / "r.onnx"
    args = ("recalibrate", ONNX, "--data", x, "--labels", y, "-o", out, "--force")
    res = run_cli(*args, "--format", "json")
    assert res.code == 1, res  # BN405 is an error: --fail-on error (the default) is reached
    doc = json.loads(res.out)
    assert doc["output"] == str(out) and doc["forced"] is True and doc["refused"] is False
    assert [f["code"] for f in doc["findings"]] == ["BN405"]
    new, old = bn_stats(out), bn_stats(ONNX)
    assert new.keys() == old.keys() and any(not np.allclose(new[k], old[k]) for k in old)
    out.unlink()
    res = run_cli(*args, "--fail-on", "never", "-q")
    assert res.code == 0, res
    assert out.is_file() and "wrote" in res.out


def test_accuracy_drop_threshold_from_pyproject(tmp_path, run_cli, one_class, monkeypatch):
    x, y = one_class
    (tmp_path / "pyproject.toml").write_text("[tool.bncheck.thresholds]\naccuracy-drop = 80\n")
    monkeypatch.chdir(tmp_path)
    res = run_cli("recalibrate", ONNX, "--data", x, "--labels", y, "-o", "r.onnx",
                  "--format", "json")  # fmt: skip
    assert res.code == 0, res
    doc = json.loads(res.out)
    assert doc["thresholds"]["accuracy_drop"] == 80 and doc["findings"] == []
    assert (tmp_path / "r.onnx").is_file()
    # The table is shared: check reads it too, and takes the recalibration keys in its stride.
    res = run_cli("check", ONNX, "--data", CALIB, "--max-samples", "32", "--format", "json")
    assert res.code == 0, res
    (tmp_path / "pyproject.toml").write_text("[tool.bncheck.thresholds]\naccuracy-drop = -1\n")
    res = run_cli("recalibrate", ONNX, "--data", x, "--labels", y, "-o", "s.onnx")
    assert_clean_error(res, "[tool.bncheck.thresholds]", "accuracy-drop must be in [0, 100]")
    assert not (tmp_path / "s.onnx").exists()


def test_recalibration_that_raises_accuracy_is_written(tmp_path, run_cli):
    """Dimmed input (gain 0.4, offset +0.3, as in benchmarks/adabn_digits.py): the stored
    statistics no longer fit and recalibration repairs them."""
    dim = tmp_path / "dim.npy"
    np.save(dim, (np.load(CALIB) * 0.4 + 0.3).astype(np.float32))
    out = tmp_path / "r.onnx"
    res = run_cli("recalibrate", ONNX, "--data", dim, "--labels", LABELS, "-o", out,
                  "--format", "json")  # fmt: skip
    assert res.code == 0, res
    doc = json.loads(res.out)
    assert doc["accuracy_before"] < 0.8 and doc["accuracy_after"] == 1.0
    assert doc["output_change"] > 0.5  # a large change, judged by the labels: no BN406
    assert doc["findings"] == [] and doc["output"] == str(out) and out.is_file()


def test_without_labels_a_large_output_change_warns(tmp_path, run_cli, one_class):
    x, _ = one_class
    out = tmp_path / "r.onnx"
    res = run_cli("recalibrate", ONNX, "--data", x, "-o", out, "--format", "json")
    assert res.code == 0, res  # a warning, below --fail-on error; the model is written
    doc = json.loads(res.out)
    assert [(f["code"], f["severity"]) for f in doc["findings"]] == [("BN406", "warning")]
    assert doc["output_change"] > 0.9 and out.is_file()
    res = run_cli("recalibrate", ONNX, "--data", x, "-o", out, "--fail-on", "warning")
    assert res.code == 1, res
    assert "warning BN406" in res.out and "relative L2 of" in res.out


def test_small_batch_warning_names_the_batch_formed(tmp_path, run_cli):
    eight = tmp_path / "eight.npy"
    np.save(eight, np.load(CALIB)[:8])
    res = run_cli("recalibrate", ONNX, "--data", eight, "-o", tmp_path / "r.onnx", "--no-compare")
    assert res.code == 0, res
    assert "on 8 samples in 1 batch of 8" in res.out
    assert "batch statistics from 1 batch of 8 samples (fewer than 16 per batch)" in res.out


def test_optimize_applies_the_same_guard(tmp_path, run_cli, one_class):
    x, y = one_class
    out = tmp_path / "o.onnx"
    args = ("optimize", ONNX, "-o", out, "--data", x, "--no-bench", "--format", "json")
    res = run_cli(*args, "--labels", y)
    assert res.code == 1, res
    doc = json.loads(res.out)
    assert [f["code"] for f in doc["findings"]] == ["BN405"]
    assert doc["fold"] is None and doc["summary"]["written"] is False
    assert doc["recalibration"]["accuracy_after"] < 0.5 and list(tmp_path.iterdir()) == []
    res = run_cli(*args, "--labels", y, "--force", "--fail-on", "never")
    assert res.code == 0, res
    assert json.loads(res.out)["fold"]["verification"]["passed"] is True and out.is_file()
    out.unlink()
    res = run_cli(*args)  # no labels: the output change warns, the model is written
    assert res.code == 0, res
    doc = json.loads(res.out)
    assert [f["code"] for f in doc["findings"] if f["code"].startswith("BN40")] == ["BN406"]
    assert out.is_file()
