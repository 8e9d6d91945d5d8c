"""What a person reads from ``check`` and ``inspect``: layers by the module path the exporter
recorded (json keeps the node name too), info findings chosen with --select, top-1 agreement
only for class scores, and a model without BN said as much."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import SAMPLES
from torch import nn

ONNX = SAMPLES / "resnet.onnx"
CALIB = SAMPLES / "resnet_calib.npy"


def _bn_nodes(path) -> list[str]:
    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "BatchNormalization"]


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "shifted.npy"
    np.save(path, (np.load(CALIB) * 1.5 + 0.5).astype(np.float32))
    return path


def test_check_names_layers_by_module_path_everywhere(run_cli, shifted, tmp_path):
    nodes = _bn_nodes(ONNX)
    assert nodes[0].startswith("node_")  # torch's exporter names the node, not the module
    html = tmp_path / "r.html"
    text = run_cli("check", ONNX, "--data", shifted, "-v", "--report", html)
    assert text.code == 1, text
    assert "first diverging layer: stem.1 — later layers" in text.out
    assert "BN401 stem.1: first diverging layer" in text.out
    assert "diverges downstream of stem.1 (likely inherited)" in text.out
    assert "(first diverging: stem.1)" in text.out
    page = html.read_text()
    for out in (text.out, page):
        assert not any(n in out for n in nodes), "a node name reached a reader"
    assert "layer2.shortcut.1" in page and ">stem.1<" in page  # chart labels and table
    for fmt in ("markdown", "github"):
        res = run_cli("check", ONNX, "--data", shifted, "--format", fmt)
        assert "stem.1" in res.out and not any(n in res.out for n in nodes), fmt
    doc = json.loads(run_cli("check", ONNX, "--data", shifted, "--format", "json").out)
    first = next(f for f in doc["findings"] if f["code"] == "BN401")
    assert (first["layer"], first["origin"]) == (nodes[0], "stem.1")
    assert (doc["layers"][0]["name"], doc["layers"][0]["origin"]) == (nodes[0], "stem.1")
    assert doc["first_diverging"] == nodes[0]


def test_selected_findings_are_listed_not_counted(run_cli, shifted):
    plain = run_cli("check", ONNX, "--data", shifted)
    assert "later layers diverge downstream of the first" in plain.out
    assert "BN404 layer1.bn1:" not in plain.out
    chosen = run_cli("check", ONNX, "--data", shifted, "--select", "BN404")
    assert "BN404 layer1.bn1: diverges downstream of stem.1" in chosen.out
    assert "-v lists them" not in chosen.out


def _converted_pt2(path) -> None:
    """Conv → BN with real statistics and num_batches_tracked 0, as a model converted from
    another framework carries."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.copy_(torch.tensor([74.0, -3.0, 0.5, 12.0]))
        bn.running_var.copy_(torch.tensor([1e4, 0.2, 3.0, 50.0]))
        bn.num_batches_tracked.zero_()
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),)), path)


def test_converted_model_is_not_uncalibrated_and_info_shows_when_selected(run_cli, tmp_path):
    src = tmp_path / "converted.pt2"
    _converted_pt2(src)
    plain = run_cli("inspect", src)
    assert plain.code == 0, plain  # BN101 said "never calibrated" here: an error, exit 1
    assert "BN108" not in plain.out and "0 errors, 0 warnings, 1 info" in plain.out
    chosen = run_cli("inspect", src, "--select", "BN108")
    assert chosen.code == 0
    assert "BN108 model: num_batches_tracked is 0 in 1 BN layer with calibrated" in chosen.out
    doc = json.loads(run_cli("inspect", src, "--format", "json").out)
    assert [(f["code"], f["severity"]) for f in doc["findings"]] == [("BN108", "info")]


class Embedder(nn.Module):
    """Conv → BN → ReLU → global pool → 64-d embedding: outputs with no classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3)
        self.bn = nn.BatchNorm2d(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


def test_top1_is_judged_only_for_class_scores(run_cli, tmp_path, monkeypatch):
    """An embedding's argmax is no class: by default BN402 judges the relative L2 alone; with
    --task classify (or task in [tool.bncheck]) the top-1 agreement too."""
    torch.manual_seed(0)
    model = Embedder().eval()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():  # calibrate on the data itself: outputs barely move
        model.train()
        model(torch.from_numpy(x))
        model.bn.momentum = None
        model.bn.reset_running_stats()
        for i in range(0, 64, 8):
            model(torch.from_numpy(x[i : i + 8]))
        model.eval()
    src = tmp_path / "embed.pt2"
    torch.export.save(torch.export.export(model, (torch.from_numpy(x[:2]),)), src)
    data = tmp_path / "x.npy"
    np.save(data, x)
    monkeypatch.chdir(tmp_path)

    def run(*extra):
        res = run_cli("check", src, "--data", data, "--batch-size", "8", "--format", "json", *extra)
        return res.code, json.loads(res.out)

    _, doc = run()
    assert doc["task"] == "other" and doc["output_divergence"]["top1_agreement"] is None
    rel = doc["output_divergence"]["rel_l2"]
    assert 0 < rel < 0.5  # small: the output rule stays quiet on it
    assert [f["code"] for f in doc["findings"] if f["code"] == "BN402"] == []
    _, doc = run("--task", "classify")
    top1 = doc["output_divergence"]["top1_agreement"]
    assert doc["task"] == "classify" and top1 is not None and top1 < 0.9
    [bn402] = [f for f in doc["findings"] if f["code"] == "BN402"]
    assert f"top-1 agreement {top1:.1%} < 90%" in bn402["message"]
    (tmp_path / "pyproject.toml").write_text('[tool.bncheck]\ntask = "classify"\n')
    assert run()[1]["task"] == "classify"
    bad = run_cli("check", src, "--data", data, "--task", "segment")
    assert bad.code == 2 and "choose classify or other" in bad.err


def test_check_without_bn_says_so(run_cli, tmp_path):
    src = tmp_path / "nobn.pt2"
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),)), src)
    data = tmp_path / "x.npy"
    np.save(data, np.zeros((4, 3, 8, 8), np.float32))
    res = run_cli("check", src, "--data", data)
    assert res.code == 0, res
    assert "the model has no BatchNorm layers: nothing to check" in res.out
    assert "outputs: not compared" not in res.out
