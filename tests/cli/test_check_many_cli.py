"""``bncheck check`` over several models on one dataset: files and folders, a section per model,
a total, the worst exit code; a model that cannot be read does not stop the others."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import SAMPLES, assert_clean_error
from onnx import numpy_helper

DATA = SAMPLES / "resnet_calib.npy"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """models/good.onnx (the sample), models/nested/shifted.onnx (its stem BN's running mean
    moved by 5: a diverging first layer, BN401), models/nested/cut.onnx (truncated)."""
    root = tmp_path_factory.mktemp("repo")
    (root / "models" / "nested").mkdir(parents=True)
    shutil.copy(SAMPLES / "resnet.onnx", root / "models" / "good.onnx")
    model = onnx.load(str(SAMPLES / "resnet.onnx"))
    stem = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    init = next(t for t in model.graph.initializer if t.name == stem.input[3])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(5), init.name))
    onnx.save(model, str(root / "models" / "nested" / "shifted.onnx"))
    data = (SAMPLES / "resnet.onnx").read_bytes()
    (root / "models" / "nested" / "cut.onnx").write_bytes(data[: len(data) // 3])
    return root


def test_folder_checks_every_model_and_reports_the_unreadable_one(run_cli, repo):
    r = run_cli("check", repo / "models", "--data", DATA, "--format", "json")
    assert r.code == 2, r  # one model could not be read: the run could not be done in full
    doc = json.loads(r.out)
    assert doc["schema"] == "bncheck.check/2"
    by_path = {m["path"].split("models/")[1]: m for m in doc["models"]}
    assert list(by_path) == ["good.onnx", "nested/cut.onnx", "nested/shifted.onnx"]
    assert by_path["nested/cut.onnx"]["status"] == "error"
    assert by_path["good.onnx"]["status"] == "checked"
    assert by_path["good.onnx"]["first_diverging"] is None
    shifted = by_path["nested/shifted.onnx"]
    assert [f["code"] for f in shifted["findings"] if f["severity"] == "error"] == ["BN401"]
    assert shifted["data"]["samples"] == by_path["good.onnx"]["data"]["samples"] == 256
    assert doc["summary"]["checked"] == 2 and doc["summary"]["unreadable"] == 1
    assert r.err.count("bncheck: error: ") == 1 and "cut.onnx" in r.err


def test_exit_code_is_the_worst_over_the_models(run_cli, repo):
    good, shifted = repo / "models" / "good.onnx", repo / "models" / "nested" / "shifted.onnx"
    assert run_cli("check", good, good, "--data", DATA, "-q").code == 0
    both = run_cli("check", good, shifted, "--data", DATA, "-q")
    assert both.code == 1, both
    assert "2 models: 2 checked · 1 error" in both.out
    assert run_cli("check", good, shifted, "--data", DATA, "--fail-on", "never").code == 0


def test_github_and_markdown_name_every_model(run_cli, repo):
    good, shifted = repo / "models" / "good.onnx", repo / "models" / "nested" / "shifted.onnx"
    gh = run_cli("check", good, shifted, "--data", DATA, "--format", "github")
    assert gh.code == 1 and f"::error file={shifted}" in gh.out
    md = run_cli("check", good, shifted, "--data", DATA, "--format", "markdown")
    assert md.out.startswith("## bncheck check: 2 models: 2 checked")
    assert str(good) in md.out and str(shifted) in md.out


def test_html_report_takes_one_model(run_cli, repo, tmp_path):
    good = repo / "models" / "good.onnx"
    r = run_cli("check", good, good, "--data", DATA, "--report", tmp_path / "r.html")
    assert_clean_error(r, "--report writes one model's page")
    assert not (tmp_path / "r.html").exists()


def test_arch_table_serves_every_command_on_one_model(run_cli, tmp_path, monkeypatch):
    # `arch = {glob = factory}` in the pyproject picks the factory of the one model a command
    # names, as it does per model for inspect and check over folders.
    (tmp_path / "models").mkdir()
    shutil.copy(SAMPLES / "resnet.pt", tmp_path / "models" / "r.pt")
    (tmp_path / "pyproject.toml").write_text(
        '[tool.bncheck]\narch = {"models/*.pt" = "bncheck.samples:small_resnet"}\n'
    )
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.onnx"
    folded = run_cli("fold", "models/r.pt", "-o", out, "--format", "json")
    assert folded.code == 0, folded
    assert json.loads(folded.out)["summary"]["folded"] == 9 and out.is_file()
    checked = run_cli("check", "models/r.pt", "--data", DATA, "--format", "json")
    assert checked.code == 0, checked
    assert json.loads(checked.out)["data"]["samples"] == 256
