"""Statistics glue of both backends: moment_runner (inference and batch statistics), with_stats.

The sample ResNet's stored statistics are the exact population statistics of resnet_calib.npy
(bncheck.samples ends with that pass, batches of 32), so the batch-statistics runner merged over
the same batches must give them back: float32 storage → 1e-5 relative on the mean, 1e-4 on the
unbiased variance (a variance sums squares of float32 activations, whose rounding differs
between the eager pass that made the file and the traced/ONNX graphs).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, SAMPLES, tiny_onnx_model
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import bncheck
from bncheck.backends.onnx.stats import batch_stats_model
from bncheck.backends.torch.stats import batch_moments, normalize_with_batch_moments
from bncheck.errors import InputError
from bncheck.numerics import Moments
from bncheck.sample_export import export_pt2
from bncheck.samples import exact_bn_statistics

CALIB = SAMPLES / "resnet_calib.npy"
ARCH = "bncheck.samples:small_resnet"


def merged_moments(handle, data: np.ndarray, *, batch_stats: bool, batch: int = 32):
    runner = handle.moment_runner(batch_stats=batch_stats)
    key = handle.info().inputs[0].name
    acc: dict[str, Moments] = {}
    for i in range(0, len(data), batch):
        _, moments = runner({key: data[i : i + batch]})
        for k, m in moments.items():
            acc[k] = acc[k] + m if k in acc else m
    return acc


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", ["resnet.pt2", "resnet.pt", "resnet.onnx"])
def test_batch_statistics_reproduce_the_stored_population_statistics(name):
    handle = bncheck.open_model(SAMPLES / name, arch=ARCH)
    acc = merged_moments(handle, np.load(CALIB), batch_stats=True)
    layers = handle.info().bn_layers
    assert len(layers) == 9 and set(acc) == {x.name for x in layers}
    for layer, per_sample in zip(layers, [24 * 24] * 3 + [12 * 12] * 3 + [6 * 6] * 3, strict=True):
        m = acc[layer.name]
        assert m.count == 256 * per_sample
        assert rel(m.mean, layer.running_mean) < 1e-5, layer.name
        assert rel(m.var(1), layer.running_var) < 1e-4, layer.name
    # And the committed statistics are not what inference mode sees: the test has teeth.
    infer = merged_moments(handle, np.load(CALIB), batch_stats=False)
    assert max(rel(infer[x.name].var(1), x.running_var) for x in layers) > 1e-2


def test_inference_moments_of_pt2_and_onnx_agree():
    data = np.load(CALIB)[:96]
    a_handle, b_handle = (bncheck.open_model(SAMPLES / n) for n in ("resnet.pt2", "resnet.onnx"))
    a = merged_moments(a_handle, data, batch_stats=False)
    b = merged_moments(b_handle, data, batch_stats=False)
    # Layer names differ between the forms; the graph order is the same.
    pairs = zip(a_handle.info().bn_layers, b_handle.info().bn_layers, strict=True)
    for la, lb in pairs:
        ma, mb = a[la.name], b[lb.name]
        assert ma.count == mb.count
        assert rel(ma.mean, mb.mean) < 1e-5 and rel(ma.var(0), mb.var(0)) < 1e-5, la.name


def test_runner_outputs_are_the_models_outputs():
    data = np.load(CALIB)[:8]
    for name in ("resnet.pt2", "resnet.onnx"):
        handle = bncheck.open_model(SAMPLES / name)
        key = handle.info().inputs[0].name
        outs, _ = handle.moment_runner(batch_stats=False)({key: data})
        expected = handle.run({key: data})
        assert len(outs) == len(expected) == 1
        assert np.allclose(outs[0], expected[0], rtol=1e-5, atol=1e-6), name


class DropNet(nn.Module):
    """BN → Dropout → BN: the pass must keep dropout off while BNs use batch statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(6, 5, 3)
        self.bn2 = nn.BatchNorm2d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.drop(torch.relu(self.bn1(self.conv(x))))))


def test_torch_batch_statistics_equal_exact_bn_statistics_with_dropout(tmp_path):
    from torch_fixtures import randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(DropNet()).eval()
    data = np.random.default_rng(1).normal(2.0, 3.0, size=(40, 3, 8, 8)).astype(np.float32)
    expected = exact_bn_statistics(copy.deepcopy(model), data, batch_size=16)
    export_pt2(model, torch.from_numpy(data[:2]), tmp_path / "m.pt2")
    handle = bncheck.open_model(tmp_path / "m.pt2")
    acc = merged_moments(handle, data, batch_stats=True, batch=16)  # batches 16, 16, 8
    assert set(acc) == set(expected) == {"bn1", "bn2"}
    for k, (mean, var) in expected.items():
        # Same float32 activations; the per-batch moments come from PyTorch's training-mode
        # BN kernel (double sums, results rounded to float32: 6e-8), merged in float64.
        assert rel(acc[k].mean, mean) < 1e-6 and rel(acc[k].var(1), var) < 1e-6, k


def test_torch_batch_statistics_of_a_channel_far_from_zero(tmp_path):
    """Mean 10⁴ against a spread of 1 (saturated channels sit there): no cancellation."""
    model = nn.Sequential(nn.BatchNorm2d(3)).eval()
    data = np.random.default_rng(2).normal(1e4, 1.0, size=(48, 3, 4, 4)).astype(np.float32)
    expected = exact_bn_statistics(copy.deepcopy(model), data, batch_size=16)["0"]
    export_pt2(model, torch.from_numpy(data[:2]), tmp_path / "m.pt2")
    acc = merged_moments(bncheck.open_model(tmp_path / "m.pt2"), data, batch_stats=True, batch=16)
    assert rel(acc["0"].mean, expected[0]) < 1e-7  # the mean rounded to float32
    assert rel(acc["0"].var(1), expected[1]) < 1e-4  # float32 data resolution at 1e4 is 1e-3


def test_torch_batch_moments_equal_numpy_moments():
    x = (np.random.default_rng(0).normal(size=(8, 5, 6, 7)) * 3 + 1e4).astype(np.float32)
    a, b = batch_moments(torch.from_numpy(x)), Moments.from_batch(x, channel_axis=1)
    assert a.count == b.count == 8 * 42
    assert rel(a.mean, b.mean) < 1e-15 and rel(a.m2, b.m2) < 1e-12
    flat = batch_moments(torch.from_numpy(x[:, :, 0, 0]))  # N×C (BatchNorm1d)
    assert flat.count == 8 and rel(flat.m2, Moments.from_batch(x[:, :, 0, 0]).m2) < 1e-12


@pytest.mark.parametrize(
    ("shape", "mean"),
    [((8, 5, 6, 7), 0.0), ((8, 5, 6, 7), 1e4), ((16, 6), 3.0), ((4, 3, 2, 3, 5), -2.0)],
)
def test_batch_norm_with_moments_equals_float64_training_mode(shape, mean):
    """The CPU recalibration kernel against float64: moments to float32 rounding of the data
    sums, and the output of training-mode BN to float32 rounding."""
    rng = np.random.default_rng(4)
    x = (rng.normal(size=shape) * 2 + mean).astype(np.float32)
    x[:, 1] = x[0, 1].flat[0]  # a constant channel: variance 0, not negative
    c = shape[1]
    w, b = rng.uniform(0.5, 2, c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    y, m = normalize_with_batch_moments(torch.from_numpy(x), torch.from_numpy(w),
                                        torch.from_numpy(b), 1e-5)  # fmt: skip
    ref = Moments.from_batch(x.astype(np.float64), channel_axis=1)
    assert m.count == ref.count
    # the mean to float32 rounding of the spread, or of the mean itself for a constant channel
    assert np.all(np.abs(m.mean - ref.mean) <= 1e-6 * np.sqrt(ref.var(0)) + 1e-7 * np.abs(ref.mean))
    assert 0.0 <= m.m2[1] < 1e-12
    live = np.arange(c) != 1
    assert rel(m.m2[live], ref.m2[live]) < 1e-6
    y64 = F.batch_norm(torch.from_numpy(x).double(), None, None, torch.from_numpy(w).double(),
                       torch.from_numpy(b).double(), training=True, eps=1e-5)  # fmt: skip
    tol = 1e-3 if mean == 1e4 else 1e-5  # float32 resolves x only to 1e-3σ at 1e4
    assert torch.allclose(y.double(), y64, atol=tol, rtol=tol)


def random_stats(handle, seed: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        x.name: (rng.normal(size=x.channels), rng.uniform(0.5, 2.0, size=x.channels))
        for x in handle.info().bn_layers
    }


def torch_tensors(handle) -> dict[str, torch.Tensor]:
    if handle.format == "pt2":
        return dict(handle.exported.state_dict)
    return dict(handle.module.state_dict())


@pytest.mark.parametrize("name", ["resnet.pt2", "resnet.pt"])
def test_torch_with_stats_changes_only_the_running_statistics(tmp_path, name):
    handle = bncheck.open_model(SAMPLES / name, arch=ARCH)
    before = {k: v.clone() for k, v in torch_tensors(handle).items()}
    stats = random_stats(handle)
    new = handle.with_stats(stats, num_batches=5)
    assert {k: v for k, v in torch_tensors(handle).items()}.keys() == before.keys()
    for k, v in torch_tensors(handle).items():
        assert torch.equal(v, before[k]), f"the source handle changed: {k}"
    after = torch_tensors(new)
    assert after.keys() == before.keys()
    for k in before:
        owner, _, leaf = k.rpartition(".")
        if leaf in ("running_mean", "running_var"):
            value = stats[owner][0 if leaf == "running_mean" else 1]
            assert after[k].dtype == before[k].dtype == torch.float32
            assert torch.equal(after[k], torch.from_numpy(value.astype(np.float32))), k
        elif leaf == "num_batches_tracked":
            assert int(after[k]) == 5, k
        else:
            assert torch.equal(after[k], before[k]), k
    assert {x.name: x.running_mean.tolist() for x in new.info().bn_layers} == {
        k: v[0].astype(np.float32).tolist() for k, v in stats.items()
    }
    out = tmp_path / name
    new.save(out)
    reread = torch_tensors(bncheck.open_model(out, arch=ARCH))
    assert all(torch.equal(reread[k], after[k]) for k in after)


def onnx_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_onnx_with_stats_changes_only_the_running_statistics(tmp_path):
    handle = bncheck.open_model(SAMPLES / "resnet.onnx")
    source = handle.model.SerializeToString()
    stats = random_stats(handle)
    new = handle.with_stats(stats)
    assert handle.model.SerializeToString() == source
    before, after = onnx_arrays(handle.model), onnx_arrays(new.model)
    assert before.keys() == after.keys()  # same names: nothing shared, nothing copied
    bns = [n for n in new.model.graph.node if n.op_type == "BatchNormalization"]
    slots = {n.input[i]: (n.name, i - 3) for n in bns for i in (3, 4)}
    assert len(slots) == 18
    for k in before:
        if k in slots:
            layer, which = slots[k]
            assert np.array_equal(after[k], stats[layer][which].astype(np.float32)), k
        else:
            assert after[k].tobytes() == before[k].tobytes(), k
    assert [n.SerializeToString() for n in new.model.graph.node] == [
        n.SerializeToString() for n in handle.model.graph.node
    ]
    new.save(tmp_path / "r.onnx")
    assert onnx_arrays(onnx.load(str(tmp_path / "r.onnx"))).keys() == before.keys()


def test_onnx_with_stats_copies_a_shared_initializer(tmp_path):
    model = tiny_onnx_model()
    g = model.graph
    bn = next(n for n in g.node if n.op_type == "BatchNormalization")
    second = helper.make_node(
        "BatchNormalization", ["y", "scale", "beta", "mean", "var"], ["z"], name="bn2"
    )
    g.node.append(second)
    g.output[0].name = "z"
    handle = bncheck.open_model(_save(model, tmp_path))
    new = handle.with_stats({"bn": (np.full(3, 2.0), np.full(3, 4.0))})
    arrays = onnx_arrays(new.model)
    nodes = {n.name: n for n in new.model.graph.node}
    assert list(nodes["bn2"].input) == list(second.input)  # untouched, still the shared ones
    assert np.array_equal(arrays["mean"], onnx_arrays(model)["mean"])
    mean_name, var_name = nodes["bn"].input[3], nodes["bn"].input[4]
    assert mean_name not in ("mean", "var") and var_name not in ("mean", "var")
    assert arrays[mean_name].tolist() == [2.0] * 3 and arrays[var_name].tolist() == [4.0] * 3
    assert bn.input[3] == "mean"


def _save(model: onnx.ModelProto, folder: Path) -> Path:
    path = folder / "m.onnx"
    onnx.save(model, str(path))
    return path


def bn_only_model(shape, opset: int, dtype=np.float32, eps: float = 1e-3) -> onnx.ModelProto:
    """x → BatchNormalization → Relu, randomized statistics and affine parameters."""
    rng = np.random.default_rng(opset)
    c = shape[1]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(dtype), "scale"),
        numpy_helper.from_array(rng.normal(size=c).astype(dtype), "beta"),
        numpy_helper.from_array(rng.normal(size=c).astype(dtype), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(dtype), "var"),
    ]
    nodes = [
        helper.make_node(
            "BatchNormalization", ["x", "scale", "beta", "mean", "var"], ["b"], name="bn",
            epsilon=eps,
        ),
        helper.make_node("Relu", ["b"], ["y"], name="relu"),
    ]  # fmt: skip
    dims = ["n", *shape[1:]]
    graph = helper.make_graph(
        nodes,
        "bn_only",
        [helper.make_tensor_value_info("x", elem, dims)],
        [helper.make_tensor_value_info("y", elem, dims)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def train_bn_reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """relu(γ·(x − μ_B)/√(σ²_B + ε) + β) in float64, σ²_B biased over all axes but 1."""
    a = onnx_arrays(model)
    eps = next(at.f for at in model.graph.node[0].attribute if at.name == "epsilon")
    xd = x.astype(np.float64)
    axes = (0, *range(2, x.ndim))
    shape = (1, -1, *([1] * (x.ndim - 2)))
    mu, var = xd.mean(axis=axes, keepdims=True), xd.var(axis=axes, keepdims=True)
    gamma, beta = (a[k].astype(np.float64).reshape(shape) for k in ("scale", "beta"))
    return np.maximum((xd - mu) / np.sqrt(var + eps) * gamma + beta, 0)


@pytest.mark.parametrize(
    ("shape", "opset"),
    [((6, 3, 5, 5), 13), ((6, 3, 5, 5), 17), ((6, 3, 5, 5), 18), ((7, 4), 18), ((5, 2, 9), 15)],
)
def test_onnx_batch_statistics_are_explicit_ops(tmp_path, shape, opset):
    """No BatchNormalization left (no reliance on training_mode); ReduceMean's axes move from
    attribute to input at opset 18; any rank ≥ 2."""
    model = bn_only_model(shape, opset)
    rewritten = batch_stats_model(model)
    assert not [n for n in rewritten.graph.node if n.op_type == "BatchNormalization"]
    assert [n for n in rewritten.graph.node if n.op_type == "ReduceMean"]
    onnx.checker.check_model(rewritten, full_check=True)
    x = np.random.default_rng(0).normal(1.0, 2.0, size=shape).astype(np.float32)
    sess = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x})
    assert np.allclose(y, train_bn_reference(model, x), rtol=1e-5, atol=1e-5)
    # Through the runner: per-sample float32 moments out of the graph, merged in float64.
    handle = bncheck.open_model(_save(model, tmp_path))
    outs, moments = handle.moment_runner(batch_stats=True)({"x": x})
    assert np.array_equal(outs[0], y)
    expected = Moments.from_batch(x, channel_axis=1)
    assert moments["bn"].count == expected.count
    assert (
        rel(moments["bn"].mean, expected.mean) < 1e-6 and rel(moments["bn"].m2, expected.m2) < 1e-6
    )
    # Inference mode taps the graph input itself (through an Identity): float64 exact.
    _, moments = handle.moment_runner(batch_stats=False)({"x": x})
    assert rel(moments["bn"].m2, expected.m2) < 1e-12
    assert handle.model.SerializeToString() == model.SerializeToString()


def test_onnx_batch_statistics_of_float16_run_in_float32(tmp_path):
    model = bn_only_model((6, 3, 4, 4), 15, dtype=np.float16)
    x = np.random.default_rng(0).normal(1.0, 2.0, size=(6, 3, 4, 4)).astype(np.float16)
    handle = bncheck.open_model(_save(model, tmp_path))
    outs, moments = handle.moment_runner(batch_stats=True)({"x": x})
    assert outs[0].dtype == np.float16
    ref = train_bn_reference(model, x)
    assert np.abs(outs[0].astype(np.float64) - ref).max() < 4e-3 * np.abs(ref).max()
    assert rel(moments["bn"].mean, x.astype(np.float64).mean(axis=(0, 2, 3))) < 1e-6


def test_onnx_stats_never_import_torch():
    code = (
        "import sys, numpy as np, bncheck\n"
        f"h = bncheck.open_model({str(SAMPLES / 'resnet.onnx')!r})\n"
        f"x = np.load({str(CALIB)!r})[:16]\n"
        "for bs in (False, True): h.moment_runner(batch_stats=bs)({'input': x})\n"
        "h.with_stats({l.name: (l.running_mean, l.running_var) for l in h.info().bn_layers})\n"
        "bncheck.recalibrate(h, data=" + repr(str(CALIB)) + ", max_samples=64, compare=False)\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


def test_onnx_training_mode_export_with_used_running_outputs_is_refused():
    model = bn_only_model((6, 3, 4, 4), 15)
    bn = model.graph.node[0]
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    bn.output.extend(["rm", "rv"])
    model.graph.output.append(helper.make_tensor_value_info("rm", TensorProto.FLOAT, [3]))
    with pytest.raises(InputError, match="training mode"):
        batch_stats_model(model, "m.onnx")


def test_onnx_batch_statistics_of_a_channel_far_from_zero(tmp_path):
    """Mean 10⁴ against a spread of 1: per-sample float32 moments, float64 merge."""
    handle = bncheck.open_model(_save(bn_only_model((16, 3, 24, 24), 18), tmp_path))
    runner = handle.moment_runner(batch_stats=True)
    rng = np.random.default_rng(0)
    batches = [rng.normal(1e4, 1.0, size=(16, 3, 24, 24)).astype(np.float32) for _ in range(4)]
    got = Moments.merge_all(runner({"x": x})[1]["bn"] for x in batches)
    ref = Moments.merge_all(Moments.from_batch(x, channel_axis=1) for x in batches)
    assert rel(got.mean, ref.mean) < 1e-7 and rel(got.var(1), ref.var(1)) < 1e-4  # 3.7e-6 seen
