"""Every file bncheck writes passes bncheck's own ``inspect`` with no error, and gets the mode
a new file gets under the umask (external-data sidecars included)."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from torch import nn
from torch_fixtures import randomize_bn


class DeadChannelNet(nn.Module):
    """Conv → BN → ReLU → Conv whose first conv outputs 0 in channel 1 whatever the input: the
    BN sees a constant there, so exact recalibration gives that channel variance 0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.conv1.weight[1].zero_()
            self.conv1.bias[1] = 0.25

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn1(self.conv1(x))))


def _inspect(run_cli, path) -> dict:
    res = run_cli("inspect", path, "--format", "json")
    assert res.code == 0, res
    return json.loads(res.out)


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_recalibrated_dead_channel_passes_inspect_and_folds(run_cli, tmp_path, suffix):
    torch.manual_seed(0)
    model = randomize_bn(DeadChannelNet()).eval()
    x = torch.randn(2, 3, 8, 8)
    src = tmp_path / f"dead{suffix}"
    if suffix == ".pt2":
        torch.export.save(torch.export.export(model, (x,)), src)
    else:
        from bncheck.sample_export import export_onnx_keep_bn

        export_onnx_keep_bn(model, x, src, ["y"])
    data = tmp_path / "calib.npy"
    np.save(data, np.random.default_rng(0).normal(size=(64, 3, 8, 8)).astype(np.float32))

    recal = tmp_path / f"recal{suffix}"
    res = run_cli("recalibrate", src, "--data", data, "-o", recal)
    assert res.code == 0, res
    doc = _inspect(run_cli, recal)
    assert doc["summary"]["error"] == 0
    [layer] = doc["bn_layers"]
    assert layer["running_var"]["min"] == 0.0  # the dead channel, written exactly
    assert [f["code"] for f in doc["findings"]] == ["BN103"]
    assert "in 1 of 4 channels (min 0)" in doc["findings"][0]["message"]

    folded = tmp_path / f"folded{suffix}"
    res = run_cli("fold", recal, "-o", folded, "--data", data)
    assert res.code == 0, res
    assert _inspect(run_cli, folded)["summary"]["error"] == 0
