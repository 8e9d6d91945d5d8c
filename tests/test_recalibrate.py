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
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import ROOT, SAMPLES
from onnx import numpy_helper

import bncheck
from bncheck.errors import InputError
from bncheck.rules_data import (
    RecalibrateThresholds,
    RecalibrationEvidence,
    run_recalibrate_rules,
)

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


@pytest.mark.parametrize("name", ["resnet.pt2", "resnet.pt", "resnet.safetensors", "resnet.onnx"])
def test_perturbed_statistics_are_restored(tmp_path, name):
    original = bncheck.open_model(SAMPLES / name, arch=ARCH)
    bad = perturbed(original)
    src = tmp_path / name
    bad.save(src)  # the perturbed model as a file in the source's own format
    out = tmp_path / f"fixed{src.suffix}"
    compare = name != "resnet.safetensors"  # the same torch path as .pt: spare two passes
    labels = LABELS if compare else None  # labels need the before/after pass
    result = bncheck.recalibrate(src, out, data=CALIB, labels=labels, arch=ARCH, compare=compare)
    assert result.output == out and result.samples == 256 and result.batches == 8
    assert max_rel(stats_of(result.handle), stats_of(original)) < 1e-4
    assert max_rel(stats_of(bncheck.open_model(out, arch=ARCH)), stats_of(original)) < 1e-4
    if compare:
        assert result.accuracy_before < 0.5 and result.accuracy_after == 1.0
        assert all(x.before.score > x.after.score for x in result.layers)


def test_pt2_and_onnx_end_equal():
    a_handle = perturbed(bncheck.open_model(SAMPLES / "resnet.pt2"))
    b_handle = perturbed(bncheck.open_model(SAMPLES / "resnet.onnx"))
    a = bncheck.recalibrate(a_handle, data=CALIB, compare=False)
    b = bncheck.recalibrate(b_handle, data=CALIB, compare=False)
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


def test_ema_mode_replays_pytorchs_own_moving_average():
    """Independent reference: PyTorch's BN updating its buffers in train mode, momentum 0.2."""
    from bncheck.samples import small_resnet

    start = perturbed(bncheck.open_model(SAMPLES / "resnet.pt", arch=ARCH))
    result = bncheck.recalibrate(
        start, data=CALIB, mode="ema", momentum=0.2, compare=False, batch_size=64
    )
    model = small_resnet()
    model.load_state_dict(start.module.state_dict())
    model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.2
            m.train()
    with torch.no_grad():
        for i in range(0, 256, 64):
            model(torch.from_numpy(np.load(CALIB)[i : i + 64]))
    expected = {
        name: (m.running_mean.double().numpy(), m.running_var.double().numpy())
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    }
    got = stats_of(result.handle)
    assert got.keys() == expected.keys()
    assert max_rel(got, expected) < 1e-5  # PyTorch updates in float32, bncheck in float64
    nbt = result.handle.module.state_dict()["stem.1.num_batches_tracked"]
    assert int(nbt) == int(start.module.state_dict()["stem.1.num_batches_tracked"]) + 4


def test_convergence_compares_the_estimate_at_half_the_data():
    handle = bncheck.open_model(SAMPLES / "resnet.onnx")
    result = bncheck.recalibrate(handle, data=CALIB, compare=False)
    runner = handle.moment_runner(batch_stats=True)
    data = np.load(CALIB)
    parts = [runner({"input": data[i : i + 32]})[1] for i in range(0, 256, 32)]
    layer = handle.info().bn_layers[-1]
    half = parts[0][layer.name] + parts[1][layer.name] + parts[2][layer.name] + parts[3][layer.name]
    full = half
    for p in parts[4:]:
        full = full + p[layer.name]
    var = full.var(1) + layer.eps
    mean_change = np.sqrt(np.mean((full.mean - half.mean) ** 2 / var))
    var_change = np.sqrt(np.mean(((full.var(1) - half.var(1)) / var) ** 2))
    got = result.layers[-1]
    assert got.name == layer.name
    assert abs(got.mean_change - mean_change) <= 1e-9 * mean_change
    assert abs(got.var_change - var_change) <= 1e-9 * var_change
    assert 0.005 < got.mean_change < 0.05 and 0.01 < got.var_change < 0.1  # sampling noise
    one_batch = bncheck.recalibrate(handle, data=CALIB, compare=False, max_batches=1)
    assert all(x.converged is None for x in one_batch.layers)
    assert any("one batch only" in n for n in one_batch.notes)


def test_trusted_pickle_is_written_back_as_a_pickle(tmp_path):
    from bncheck.samples import small_resnet

    src = tmp_path / "whole.pt"
    model = small_resnet()
    model.load_state_dict(torch.load(SAMPLES / "resnet.pt", weights_only=True))
    torch.save(model, src)
    out = tmp_path / "fixed.pt"
    bncheck.recalibrate(src, out, data=CALIB, trust_pickle=True, compare=False, max_samples=64)
    loaded = torch.load(out, weights_only=False)  # the user's own code path for a pickle
    assert type(loaded).__name__ == "SmallResNet"
    assert not torch.equal(loaded.stem[1].running_var, model.stem[1].running_var)
    assert torch.equal(loaded.stem[0].weight, model.stem[0].weight)


def test_ema_is_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="one process"):
        bncheck.recalibrate(SAMPLES / "resnet.onnx", data=CALIB, mode="ema")


def test_small_batches_warn_and_single_samples_are_refused(tmp_path):
    result = bncheck.recalibrate(
        SAMPLES / "resnet.onnx", data=CALIB, batch_size=8, compare=False, max_samples=64
    )
    assert result.batch_sizes == [(8, 8)]
    assert any("from 8 batches of 8 samples (fewer than 16" in w for w in result.warnings)
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_equals_one_process(tmp_path):
    """torchrun, 2 CPU processes, gloo: the same file as one process, to 1e-9 relative, and
    the same report (accuracy and before/after figures merged over both shards)."""
    src = tmp_path / "bad.pt"  # perturbed statistics, so accuracy before is low
    perturbed(bncheck.open_model(SAMPLES / "resnet.pt", arch=ARCH)).save(src)
    args = ["recalibrate", str(src), "--arch", ARCH, "--data", str(CALIB),
            "--batch-size", "16", "--max-samples", "200", "--labels", str(LABELS),
            "--format", "json"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "bncheck", *args, "-o", str(two)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)  # rank 0 alone reports
    one = tmp_path / "one.pt"
    ref = bncheck.recalibrate(src, one, data=CALIB, arch=ARCH, batch_size=16,
                              max_samples=200, labels=LABELS)  # fmt: skip
    assert (doc["world_size"], doc["samples"], doc["batches"]) == (2, 200, 13)
    assert doc["accuracy_before"] == ref.accuracy_before < 0.5  # shards merged, not rank 0's
    assert doc["accuracy_after"] == ref.accuracy_after == 1.0
    for got, want in zip(doc["layers"], ref.layers, strict=True):
        for when in ("before", "after"):
            g, w = got[when]["score"], getattr(want, when).score
            assert abs(g - w) <= 1e-6 * w + 1e-12, (got["name"], when)
        assert abs(got["var_change_last_half"] - want.var_change) <= 1e-9 * want.var_change
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            scale = float(a[k].double().abs().max()) or 1.0
            assert float((a[k].double() - b[k].double()).abs().max()) <= 1e-9 * scale, k
        else:
            assert torch.equal(a[k], b[k]), k


# --- the guard: a recalibration is judged before it is written (issue 13, items 9 and 10) ---


@pytest.fixture(scope="module")
def one_class(tmp_path_factory):
    """The 29 calibration images of class 0 and their labels: data that does not represent
    use. Recalibrated on it, the sample ResNet falls from 100% to 27.6% on those very images."""
    folder = tmp_path_factory.mktemp("one_class")
    x, y = np.load(CALIB), np.load(LABELS)
    np.save(folder / "x.npy", x[y == 0])
    np.save(folder / "y.npy", y[y == 0])
    return folder / "x.npy", folder / "y.npy"


@pytest.mark.parametrize("name", ["resnet.onnx", "resnet.pt2"])
def test_lower_accuracy_writes_nothing_unless_forced(tmp_path, one_class, name):
    x, y = one_class
    out = tmp_path / f"r{Path(name).suffix}"
    result = bncheck.recalibrate(SAMPLES / name, out, data=x, labels=y)
    assert result.refused and result.output is None and not out.exists()
    assert result.accuracy_before == 1.0 and result.accuracy_after < 0.5
    (finding,) = result.findings
    assert (finding.code, finding.severity.value) == ("BN405", "error")
    drop = (result.accuracy_before - result.accuracy_after) * 100
    assert f"({drop:.1f} points > 1) over 29 samples" in finding.message
    forced = bncheck.recalibrate(SAMPLES / name, out, data=x, labels=y, force=True)
    assert forced.output == out and not forced.refused and forced.forced
    assert [f.code for f in forced.findings] == ["BN405"]  # written, still reported
    assert max_rel(stats_of(bncheck.open_model(out)), stats_of(forced.handle)) < 1e-6


def test_output_change_is_the_relative_l2_between_old_and_new_outputs(one_class):
    x, _ = one_class
    old = bncheck.open_model(SAMPLES / "resnet.onnx")
    result = bncheck.recalibrate(old, data=x)  # no labels: the outputs' change is the judge
    data = {"input": np.load(x)}
    a = np.asarray(old.run(data)[0], np.float64)
    b = np.asarray(result.handle.run(data)[0], np.float64)
    expected = np.linalg.norm(b - a) / np.linalg.norm(a)
    assert abs(result.output_change - expected) <= 1e-6 * expected
    assert expected > 0.9  # class-0 statistics wipe out most of the class signal
    assert [f.code for f in result.findings] == ["BN406"] and result.output is None
    assert not result.refused  # a warning: the model would be written
    same = bncheck.recalibrate(old, data=CALIB)  # the data the statistics came from
    assert same.output_change < 1e-5 and same.findings == []


def _evidence(before=None, after=None, change=None, **limits):
    return RecalibrationEvidence(before, after, change, 100, RecalibrateThresholds(**limits))


def test_guard_rules_at_their_thresholds():
    def codes(*args, **limits):
        return [f.code for f in run_recalibrate_rules(_evidence(*args, **limits))]

    assert codes(0.9, 0.89) == []  # exactly 1 point: not more than the threshold
    assert codes(0.9, 0.8899) == ["BN405"]
    assert codes(0.9, 0.8899, accuracy_drop=5) == []
    assert codes(0.5, 0.9, 3.0) == []  # accuracy rose: the output change is not judged
    assert codes(None, None, 0.25) == [] and codes(None, None, 0.2501) == ["BN406"]
    assert codes(None, None, 0.3, output_change=0.5) == []
    assert codes(None, None, float("nan")) == ["BN406"]
    assert codes(None, None, None) == []  # --no-compare: nothing measured


def test_guard_thresholds_come_from_the_shared_table():
    th = RecalibrateThresholds.from_mapping({"accuracy_drop": 5, "kl": 0.1, "output-change": 1})
    assert (th.accuracy_drop, th.output_change) == (5.0, 1.0)
    with pytest.raises(InputError, match="accuracy-drop must be in"):
        RecalibrateThresholds.from_mapping({"accuracy-drop": 101})
    with pytest.raises(InputError, match="unknown threshold 'accuracy'"):
        RecalibrateThresholds.from_mapping({"accuracy": 1})
    with pytest.raises(InputError, match="drop --no-compare"):
        bncheck.recalibrate(SAMPLES / "resnet.onnx", data=CALIB, labels=LABELS, compare=False)


def test_small_batch_warning_reads_the_batches_the_data_formed(tmp_path):
    eight = tmp_path / "eight.npy"
    np.save(eight, np.load(CALIB)[:8])
    result = bncheck.recalibrate(SAMPLES / "resnet.onnx", data=eight, compare=False)
    assert result.batch_size == 32 and result.batch_sizes == [(8, 1)]
    (warning,) = [w for w in result.warnings if "batch statistics" in w]
    assert "from 1 batch of 8 samples (fewer than 16" in warning
    onnx_path = SAMPLES / "resnet.onnx"
    # 32 + 8: the small batch holds 20% of the samples, worth a warning.
    mixed = bncheck.recalibrate(onnx_path, data=CALIB, max_samples=40, compare=False)
    assert mixed.batch_sizes == [(32, 1), (8, 1)]
    assert any("from 1 batch of 8 samples" in w for w in mixed.warnings)
    # 7 × 32 + 10: a trailing batch with 4% of the samples barely moves the estimate.
    tail = bncheck.recalibrate(onnx_path, data=CALIB, max_samples=234, compare=False)
    assert tail.batch_sizes == [(32, 7), (10, 1)]
    assert not any("batch statistics" in w for w in tail.warnings)
