"""``bncheck check`` end to end: exit codes, the first diverging layer, every output format.

Faults are controlled by the test: a gain and offset on the input (the stem BN must come
first), one BN's running_mean moved by 3 running std in an ONNX copy and in a state dict (that
layer must come first). The figures themselves are tested in tests/test_check.py.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import SAMPLES, assert_clean_error

import bncheck.cli._check  # noqa: F401  (registers the command until cli/__init__ imports it)

ONNX = SAMPLES / "resnet.onnx"
CALIB = SAMPLES / "resnet_calib.npy"
ARCH = ("--arch", "bncheck.samples:small_resnet")


def check_json(run_cli, *args, code: int):
    result = run_cli("check", *args, "--format", "json")
    assert result.code == code, result
    doc = json.loads(result.out)
    assert doc["schema"] == "bncheck.check/1"
    return doc


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "shifted.npy"
    np.save(path, (np.load(CALIB) * 1.5 + 0.5).astype(np.float32))
    return path


@pytest.fixture
def perturbed_onnx(tmp_path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(ONNX))
    bn = [n for n in model.graph.node if n.op_type == "BatchNormalization"][4]
    inits = {t.name: t for t in model.graph.initializer}
    mean_t, var = inits[bn.input[3]], numpy_helper.to_array(inits[bn.input[4]])
    mean = numpy_helper.to_array(mean_t) + 3.0 * np.sqrt(var)
    mean_t.CopyFrom(numpy_helper.from_array(mean.astype(np.float32), mean_t.name))
    path = tmp_path / "perturbed.onnx"
    onnx.save(model, str(path))
    return path, bn.name


def test_onnx_on_its_own_data_passes(run_cli):
    doc = check_json(run_cli, ONNX, "--data", CALIB, "--task", "classify", code=0)
    assert len(doc["layers"]) == 9 and doc["summary"]["measured"] == 9
    assert doc["first_diverging"] is None and doc["findings"] == []
    assert doc["data"]["samples"] == 256 and doc["data"]["batches"] == 8
    layer = doc["layers"][0]
    assert len(layer["per_channel"]["data_mean"]) == 8 == len(layer["per_channel"]["kl"])
    assert layer["over"] is False and layer["count"] == 256 * 24 * 24
    assert doc["output_divergence"]["top1_agreement"] == 1.0


def test_pt2_on_its_own_data_passes(run_cli):
    result = run_cli("check", SAMPLES / "resnet.pt2", "--data", CALIB, "--max-samples", "128")
    assert result.code == 0, result
    assert "9 of 9 BN layers checked on 128 samples · 0 over threshold" in result.out
    assert "0 errors, 0 warnings, 0 info" in result.out


def test_shifted_data_exits_1_naming_the_stem(run_cli, shifted):
    doc = check_json(run_cli, ONNX, "--data", shifted, code=1)
    stem = doc["layers"][0]["name"]
    assert doc["first_diverging"] == stem
    assert doc["layers"][0]["first_diverging"] is True
    errors = [f for f in doc["findings"] if f["severity"] == "error"]
    assert [(f["code"], f["layer"]) for f in errors] == [("BN401", stem)]
    # Later layers over the threshold are warnings (inherited), not more errors.
    over_later = [x["name"] for x in doc["layers"][1:] if x["over"]]
    assert over_later and {f["layer"] for f in doc["findings"] if f["code"] == "BN404"} == set(
        over_later
    )


def test_shifted_data_text_report(run_cli, shifted):
    result = run_cli("check", ONNX, "--data", shifted)
    assert result.code == 1, result
    assert "◀ first" in result.out and "█" in result.out
    assert "later layers inherit its shift" in result.out
    assert "BN401" in result.out and "-v lists them" in result.out


def test_perturbed_onnx_layer_is_named_first(run_cli, perturbed_onnx):
    path, name = perturbed_onnx
    doc = check_json(run_cli, path, "--data", CALIB, code=1)
    assert doc["first_diverging"] == name == doc["layers"][4]["name"]
    assert not any(x["over"] for x in doc["layers"][:4])
    assert doc["layers"][4]["score"] > 4.0  # ½·3² = 4.5 nats per channel


def test_perturbed_state_dict_layer_is_named_first(run_cli, tmp_path):
    import torch

    state = torch.load(SAMPLES / "resnet.pt", weights_only=True)
    var = state["layer2.bn2.running_var"]
    state["layer2.bn2.running_mean"] = state["layer2.bn2.running_mean"] + 3.0 * var.sqrt()
    path = tmp_path / "perturbed.pt"
    torch.save(state, path)
    doc = check_json(run_cli, path, *ARCH, "--data", CALIB, "--max-samples", "64", code=1)
    assert doc["first_diverging"] == "layer2.bn2"
    assert [f["layer"] for f in doc["findings"] if f["code"] == "BN401"] == ["layer2.bn2"]


def test_fail_on_select_and_ignore(run_cli, shifted):
    assert run_cli("check", ONNX, "--data", shifted, "--fail-on", "never").code == 0
    # Without BN401 only warnings remain: below the default --fail-on error.
    assert run_cli("check", ONNX, "--data", shifted, "--ignore", "BN401").code == 0
    strict = run_cli("check", ONNX, "--data", shifted, "--ignore", "BN401", "--fail-on", "warning")
    assert strict.code == 1
    doc = check_json(run_cli, ONNX, "--data", shifted, "--select", "BN404", code=0)
    assert {f["code"] for f in doc["findings"]} == {"BN404"}


def test_thresholds_come_from_pyproject(run_cli, shifted, tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text(
        "[tool.bncheck.thresholds]\nkl = 1.0\noutput_rel_l2 = 2.0\n"
    )
    monkeypatch.chdir(tmp_path)
    doc = check_json(run_cli, ONNX, "--data", shifted, code=0)
    assert doc["thresholds"] == {
        "kl": 1.0,
        "max_share": 0.1,
        "output_rel_l2": 2.0,
        "top1_agreement": 0.9,
    }
    assert doc["first_diverging"] is None
    (tmp_path / "pyproject.toml").write_text("[tool.bncheck.thresholds]\nkl = -1\n")
    assert_clean_error(run_cli("check", ONNX, "--data", CALIB), "thresholds", "kl")


def test_synthetic_limits_and_quiet(run_cli):
    # Noise is nothing like the gratings the model was calibrated on: it diverges (exit 1),
    # and BN403 says the figures mean little.
    doc = check_json(
        run_cli, ONNX, "--synthetic", "--max-batches", "2", "--batch-size", "8", code=1
    )
    assert (doc["data"]["synthetic"], doc["data"]["samples"], doc["data"]["batches"]) == (
        True,
        16,
        2,
    )
    assert "BN403" in {f["code"] for f in doc["findings"]}
    result = run_cli("check", ONNX, "--synthetic", "-q", "--fail-on", "never")
    assert result.code == 0
    assert result.out.count("\n") == 1 and "BN layers checked on 32 samples" in result.out


def test_github_and_markdown(run_cli, shifted):
    result = run_cli("check", ONNX, "--data", shifted, "--format", "github")
    assert result.code == 1
    lines = result.out.strip().splitlines()
    assert lines[0].startswith("::error file=") and "title=bncheck BN401" in lines[0]
    assert sum(line.startswith("::warning") for line in lines) >= 1
    assert "over threshold" in lines[-1]
    md = run_cli("check", ONNX, "--data", shifted, "--format", "markdown").out
    assert md.startswith("### bncheck check:")
    assert "| # | BN layer |" in md and "◀ first" in md and "| error | BN401 |" in md


def test_html_report_is_self_contained_and_atomic(run_cli, shifted, tmp_path):
    out = tmp_path / "report.html"
    result = run_cli("check", ONNX, "--data", shifted, "--report", out, "-q")
    assert result.code == 1, result
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("<svg") == 1 + 4  # the layer chart + the 4 worst layers' histograms
    for outside in ("<script", "http://", "https://", "src=", "<link"):
        assert outside not in page.replace('xmlns="http://www.w3.org/2000/svg"', "").replace(
            'xmlns:xlink="http://www.w3.org/1999/xlink"', ""
        ), outside
    assert "first diverging" in page and "BN401" in page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temp file left


def test_report_problems_are_found_before_the_run(run_cli, tmp_path, monkeypatch):
    assert_clean_error(
        run_cli("check", ONNX, "--data", CALIB, "--report", tmp_path / "r.txt"), ".html"
    )
    assert_clean_error(
        run_cli("check", ONNX, "--data", CALIB, "--report", tmp_path / "no" / "r.html"),
        "does not exist",
    )
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    assert_clean_error(
        run_cli("check", ONNX, "--data", CALIB, "--report", tmp_path / "r.html"),
        "pip install 'bncheck[report]'",
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, needle",
    [
        ((), "check needs data"),
        (("--data", CALIB, "--synthetic"), "not both"),
        (("--data", SAMPLES / "missing.npy"), "missing.npy"),
        (("--data", SAMPLES / "patterns_calib.npy"), "dim 1 is 4, not 3"),
        (("--synthetic", "--select", "BN9"), "unknown rule code"),
        (("--synthetic", "--batch-size", "0"), "batch size must be at least 1"),
    ],
)
def test_bad_input_exits_2(run_cli, args, needle):
    assert_clean_error(run_cli("check", ONNX, *args), needle)
