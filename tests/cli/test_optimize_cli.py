"""``bncheck optimize`` end to end on the sample models: file written with no BN, the
verification and latency in the report, exit codes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import SAMPLES, assert_clean_error

import bncheck.cli._optimize  # noqa: F401  (registers the command until cli/__init__ imports it)
from bncheck import api

FAST = ["--threads", "1", "--time-budget", "0.2", "--format", "json"]


def optimize_json(run_cli, *args, code=0):
    result = run_cli("optimize", *args, *FAST)
    assert result.code == code, result
    doc = json.loads(result.out)
    assert doc["schema"] == "bncheck.optimize/2"
    return doc


def test_onnx_end_to_end(run_cli, tmp_path):
    out = tmp_path / "out.onnx"
    doc = optimize_json(run_cli, SAMPLES / "resnet.onnx", "-o", out)
    assert out.is_file() and doc["output"] == str(out)
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(out)).graph.node) == 0
    assert doc["summary"]["bn_layers_before"] == 9 and doc["summary"]["bn_layers_after"] == 0
    assert doc["fold"]["folded"] == 9 and doc["fold"]["verification"]["passed"] is True
    assert doc["fold"]["verification"]["max_abs_error"] < 1e-4
    assert doc["recalibration"] is None and "recalibration skipped: no --data" in doc["notes"]
    (row,) = doc["bench"]["rows"]
    low, high = row["ratio_ci"]
    assert low <= row["ratio"] <= high
    assert doc["bench"]["vs"]["path"] == str(out) and doc["bench"]["vs"]["bn_layers"] == 0
    # The unfolded input is fused by onnxruntime itself: the report says not to expect more.
    assert any("fuses Conv+BN itself" in n for n in doc["bench"]["notes"])


def test_pt2_end_to_end_text(run_cli, tmp_path):
    out = tmp_path / "out.pt2"
    result = run_cli(
        "optimize", SAMPLES / "resnet.pt2", "-o", out, "--threads", "1", "--time-budget", "0.2"
    )
    assert result.code == 0, result
    assert out.is_file()
    assert len(api.open_model(out).info().bn_layers) == 0
    for needle in ("folded 9 of 9 BN layers", "verification passed", "optimized/original"):
        assert needle in result.out


def test_recalibrates_with_data(run_cli, tmp_path):
    out = tmp_path / "out.onnx"
    doc = optimize_json(
        run_cli,
        SAMPLES / "resnet.onnx",
        "-o",
        out,
        "--data",
        SAMPLES / "resnet_calib.npy",
        "--no-bench",
    )
    recal = doc["recalibration"]
    assert recal is not None and recal["layers"] == 9 and recal["samples"] == 256
    # The sample's statistics already are the exact ones of this data: nothing diverges.
    assert recal["mismatched_after"] == 0
    assert doc["bench"] is None and "latency not measured (--no-bench)" in doc["notes"]
    assert "resnet_calib.npy" in doc["fold"]["verification"]["inputs"]


def test_failed_verification_exits_1_and_writes_nothing(run_cli, tmp_path, monkeypatch):
    from bncheck.backends.onnx import OnnxHandle

    real = OnnxHandle.folded

    def wrong_fold(self, *, affine=False):
        handle, steps = real(self, affine=affine)
        w = handle.model.graph.initializer[0]
        arr = onnx.numpy_helper.to_array(w) * np.float32(1.01)  # a 1 % error in one weight
        w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
        return handle, steps

    monkeypatch.setattr(OnnxHandle, "folded", wrong_fold)
    out = tmp_path / "out.onnx"
    doc = optimize_json(run_cli, SAMPLES / "resnet.onnx", "-o", out, code=1)
    assert not out.exists() and doc["output"] is None
    assert doc["summary"]["passed"] is False and doc["bench"] is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, needle",
    [
        (["-o", "out.pt2"], "must end in .onnx"),
        (["-o", "out.onnx", "--device", "cuda"], "CUDA is not available"),
    ],
)
def test_bad_input_exits_2(run_cli, tmp_path, monkeypatch, args, needle):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    assert_clean_error(run_cli("optimize", SAMPLES / "resnet.onnx", *args), needle)
    assert list(tmp_path.iterdir()) == []
