"""recalibrate: restores exact population statistics, for .pt2, state dict and .onnx.

The sample ResNet's stored statistics ARE the exact population statistics of resnet_calib.npy
(bncheck.samples ends with that pass), so perturbing them and recalibrating on that data must
give them back: to 1e-4 relative (float32 storage; float64 accumulation).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import ROOT, SAMPLES
from onnx import numpy_helper

import bncheck
from bncheck.errors import InputError

CALIB, LABELS = SAMPLES / "resnet_calib.npy", SAMPLES / "resnet_labels.npy"
ARCH = "bncheck.samples:small_resnet"


def stats_of(handle) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {x.name: (x.running_mean, x.running_var) for x in handle.info().bn_layers}


def perturbed(handle):
    return handle.with_stats({k: (m + 0.7, v * 3.0) for k, (m, v) in stats_of(handle).items()})


def max_rel(a, b) -> float:
    return max(
        float(np.abs(a[k][i] - b[k][i]).max() / np.abs(b[k][i]).max()) for k in b for i in (0, 1)
    )


@pytest.mark.parametrize("name", ["resnet.pt2", "resnet.pt", "resnet.onnx"])
def test_perturbed_statistics_are_restored(tmp_path, name):
    original = bncheck.open_model(SAMPLES / name, arch=ARCH)
    bad = perturbed(original)
    src = tmp_path / name
    bad.save(src)  # the perturbed model as a file in the source's own format
    out = tmp_path / f"fixed{src.suffix}"
    result = bncheck.recalibrate(src, out, data=CALIB, labels=LABELS, arch=ARCH)
    assert result.output == out and result.samples == 256 and result.batches == 8
    assert max_rel(stats_of(result.handle), stats_of(original)) < 1e-4
    assert max_rel(stats_of(bncheck.open_model(out, arch=ARCH)), stats_of(original)) < 1e-4
    assert result.accuracy_before < 0.5 and result.accuracy_after == 1.0
    assert all(x.before.score > x.after.score for x in result.layers)


def test_pt2_and_onnx_end_equal():
    a = bncheck.recalibrate(perturbed(bncheck.open_model(SAMPLES / "resnet.pt2")), data=CALIB)
    b = bncheck.recalibrate(perturbed(bncheck.open_model(SAMPLES / "resnet.onnx")), data=CALIB)
    sa, sb = stats_of(a.handle), stats_of(b.handle)
    # Layer names differ between the forms; the graph order is the same.
    for (ma, va), (mb, vb) in zip(sa.values(), sb.values(), strict=True):
        assert np.abs(ma - mb).max() <= 1e-5 * np.abs(ma).max()
        assert np.abs(va - vb).max() <= 1e-5 * np.abs(va).max()


def test_state_dict_output_loads_in_the_users_own_code(tmp_path):
    out = tmp_path / "fixed.pt"
    bncheck.recalibrate(SAMPLES / "resnet.pt", out, data=CALIB, arch=ARCH, compare=False)
    from bncheck.samples import small_resnet

    model = small_resnet()
    state = torch.load(out, weights_only=True)
    model.load_state_dict(state)  # strict: same keys, same shapes
    original = torch.load(SAMPLES / "resnet.pt", weights_only=True)
    changed = {k for k in state if not torch.equal(state[k], original[k])}
    assert changed <= {k for k in state if k.endswith(("running_mean", "running_var"))}


def test_only_running_statistics_change_in_onnx(tmp_path):
    out = tmp_path / "r.onnx"
    bncheck.recalibrate(perturbed(bncheck.open_model(SAMPLES / "resnet.onnx")), out, data=CALIB)
    before = {
        t.name: numpy_helper.to_array(t)
        for t in onnx.load(str(SAMPLES / "resnet.onnx")).graph.initializer
    }
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert before.keys() == after.keys()
    model = onnx.load(str(out))
    stat_names = {
        n.input[i] for n in model.graph.node if n.op_type == "BatchNormalization" for i in (3, 4)
    }
    for k in before:
        if k not in stat_names:
            assert np.array_equal(before[k], after[k]), k


def test_ema_mode_matches_a_hand_computation():
    handle = bncheck.open_model(SAMPLES / "resnet.onnx")
    layer = handle.info().bn_layers[0]
    result = bncheck.recalibrate(
        handle, data=CALIB, mode="ema", momentum=0.2, compare=False, batch_size=64
    )
    runner = handle.moment_runner(batch_stats=True)
    mean, var = layer.running_mean.astype(np.float64), layer.running_var.astype(np.float64)
    data = np.load(CALIB)
    for i in range(0, 256, 64):
        m = runner({"input": data[i : i + 64]})[1][layer.name]
        mean, var = 0.8 * mean + 0.2 * m.mean, 0.8 * var + 0.2 * m.var(1)
    got_mean, got_var = stats_of(result.handle)[layer.name]
    assert np.allclose(got_mean, mean, rtol=1e-5, atol=1e-7)
    assert np.allclose(got_var, var, rtol=1e-5, atol=1e-7)


def test_small_batches_warn_and_single_samples_are_refused(tmp_path):
    result = bncheck.recalibrate(
        SAMPLES / "resnet.onnx", data=CALIB, batch_size=8, compare=False, max_samples=64
    )
    assert any("batch size 8 < 16" in w for w in result.warnings)
    with pytest.raises(InputError, match="at least 2"):
        bncheck.recalibrate(SAMPLES / "resnet.onnx", data=CALIB, batch_size=1)
    one = tmp_path / "one.npy"
    np.save(one, np.load(CALIB)[:1])
    with pytest.raises(InputError, match="at least 2"):
        bncheck.recalibrate(SAMPLES / "resnet.onnx", data=one)
    odd = tmp_path / "odd.npy"
    np.save(odd, np.load(CALIB)[:33])  # 32 + a trailing batch of one
    result = bncheck.recalibrate(SAMPLES / "resnet.onnx", data=odd, compare=False)
    assert result.samples == 32 and any("last sample" in n for n in result.notes)


def test_cli_exit_codes_and_outputs(tmp_path, run_cli):
    out = tmp_path / "r.onnx"
    res = run_cli(
        "recalibrate", SAMPLES / "resnet.onnx", "--data", CALIB, "-o", out, "--format", "json"
    )
    assert res.code == 0, res
    doc = json.loads(res.out)
    assert doc["schema"] == "bncheck.recalibrate/1" and len(doc["layers"]) == 9 and out.exists()
    res = run_cli("recalibrate", SAMPLES / "resnet.onnx", "--data", CALIB)
    assert res.code == 2 and "-o" in res.err
    res = run_cli(
        "recalibrate", SAMPLES / "resnet.onnx", "--data", CALIB, "-o", SAMPLES / "resnet.onnx"
    )
    assert res.code == 2 and "--in-place" in res.err
    res = run_cli("recalibrate", SAMPLES / "resnet.onnx", "--data", CALIB, "-o", tmp_path / "x.pt2")
    assert res.code == 2 and ".onnx" in res.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.onnx"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_equals_one_process(tmp_path):
    args = ["recalibrate", str(SAMPLES / "resnet.pt"), "--arch", ARCH, "--data", str(CALIB),
            "--batch-size", "16", "--no-compare", "-q"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "bncheck", *args, "-o", str(two)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one = tmp_path / "one.pt"
    bncheck.recalibrate(
        SAMPLES / "resnet.pt", one, data=CALIB, arch=ARCH, batch_size=16, compare=False
    )
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            scale = float(a[k].double().abs().max()) or 1.0
            assert float((a[k].double() - b[k].double()).abs().max()) <= 1e-9 * scale, k
        else:
            assert torch.equal(a[k], b[k]), k
