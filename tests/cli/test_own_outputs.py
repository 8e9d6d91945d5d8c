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


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_written_files_and_sidecars_get_the_umask_mode(run_cli, tmp_path, umask_027):
    """A folded or recalibrated model with external data: the .onnx and its .data sidecar both
    get 0666 & ~umask (onnx's writer creates the sidecar 0600)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.normal(size=(16, 8, 3, 3)),  # 4.6 kB: large enough to go to the sidecar
        "scale": rng.uniform(0.5, 1.5, 16),
        "beta": rng.normal(size=16),
        "mean": rng.normal(size=16),
        "var": rng.uniform(0.5, 2, 16),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "scale", "beta", "mean", "var"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16, 5, 5])],
        [numpy_helper.from_array(a.astype(np.float32), k) for k, a in arrays.items()],
    )
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = src_dir / "m.onnx"
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
        str(src),
        save_as_external_data=True,
        location="m.data",
        size_threshold=0,
    )
    data = tmp_path / "calib.npy"
    np.save(data, np.random.default_rng(0).normal(size=(8, 8, 5, 5)).astype(np.float32))
    out = tmp_path / "out"
    out.mkdir()
    for cmd, extra in (("fold", []), ("recalibrate", ["--data", data])):
        res = run_cli(cmd, src, "-o", out / f"{cmd}.onnx", *extra)
        assert res.code == 0, res
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 4 and sum(n.endswith(".data") for n in written) == 2, written
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {umask_027}, modes
