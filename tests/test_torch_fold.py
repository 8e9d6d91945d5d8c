"""PyTorch folding on the traced graph: exact outputs, every guard, files that load and run.

BN statistics and affine parameters are always randomized. fp32 tolerance: |Δ| ≤ 1e-5 +
1e-4·max|ref| (exact in float64; float32 rounding of the rewritten weights remains).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import SAMPLES
from torch import nn

import bncheck
from bncheck.backends.torch import TorchHandle
from bncheck.samples import PATTERN_FOLDS


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) + 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(
                (torch.rand(c, generator=g) + 0.5) * torch.sign(torch.randn(c, generator=g))
            )
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.5)
    return model.eval()


def handle_of(model: nn.Module, shape) -> TorchHandle:
    h = TorchHandle("model.pt", "state_dict", randomize(model))
    h._example = {"x": torch.randn(*shape)}
    return h


def assert_same(handle, *, affine=False, bn_left=0, rtol=1e-4, atol=1e-5):
    folded, steps = handle.folded(affine=affine)
    assert len(folded.info().bn_layers) == bn_left, steps
    x = {
        "x": np.random.default_rng(0)
        .normal(size=tuple(handle.example_inputs[0].shape))
        .astype(np.float32)
    }
    for ref, got in zip(handle.run(x), folded.run(x), strict=True):
        scale = float(np.abs(ref).max())
        assert float(np.abs(ref - got).max()) <= atol + rtol * scale
    return folded, steps


class ConvBN(nn.Module):
    def __init__(self, conv: nn.Module, c: int, bn=nn.BatchNorm2d):
        super().__init__()
        self.conv, self.bn = conv, bn(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv2d(4, 6, 3, padding=1), (2, 4, 6, 6)),
        (nn.Conv2d(4, 6, 3, bias=False, groups=2, stride=2), (2, 4, 7, 7)),
        (nn.Conv2d(4, 4, 3, groups=4, dilation=2), (2, 4, 8, 8)),
        (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), (2, 4, 5, 5)),
    ],
)
def test_conv_family_folds_into_producer(conv, shape):
    c = conv.out_channels
    _, steps = assert_same(handle_of(ConvBN(conv, c), shape))
    assert [(s.layer, s.into, s.target) for s in steps] == [("bn", "producer", "conv")]


def test_linear_batchnorm1d():
    assert_same(handle_of(ConvBN(nn.Linear(5, 7), 7, nn.BatchNorm1d), (4, 5)))


class FanOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + torch.relu(y)


def test_fan_out_is_skipped():
    _, steps = assert_same(handle_of(FanOut(), (2, 3, 4, 4)), bn_left=1)
    assert steps[0].into is None and "also feeds" in steps[0].reason


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)), self.conv(x * 2)


def test_conv_used_twice_is_not_mutated():
    handle = handle_of(SharedConv(), (2, 3, 4, 4))
    folded, steps = handle.folded()
    x = {"x": np.random.default_rng(1).normal(size=(2, 3, 4, 4)).astype(np.float32)}
    ref, got = handle.run(x), folded.run(x)
    assert np.array_equal(ref[1], got[1])  # the other call site is bit-identical
    assert np.allclose(ref[0], got[0], rtol=1e-4, atol=1e-5)
    assert steps[0].into is None and "shared" in steps[0].reason


class BNTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn(x)


def test_bn_module_called_twice_is_skipped():
    _, steps = assert_same(handle_of(BNTwice(), (2, 3, 4, 4)), bn_left=1)
    assert "called at 2 places" in steps[0].reason


class BNThenConv(nn.Module):
    def __init__(self, padding):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=padding)

    def forward(self, x):
        return self.conv(self.bn(torch.relu(x)))


def test_bn_before_conv_only_when_exact():
    _, steps = assert_same(handle_of(BNThenConv(0), (2, 3, 6, 6)))
    assert (steps[0].into, steps[0].target) == ("consumer", "conv")
    _, steps = assert_same(handle_of(BNThenConv(1), (2, 3, 6, 6)), bn_left=1)
    assert "zero-pads" in steps[0].reason


def test_affine_removes_every_bn():
    assert_same(handle_of(FanOut(), (2, 3, 4, 4)), affine=True)


def test_fp16_model():
    model = randomize(ConvBN(nn.Conv2d(4, 6, 3), 6)).half()
    h = TorchHandle("m.pt", "state_dict", model)
    h._example = {"x": torch.randn(2, 4, 6, 6).half()}
    folded, _ = h.folded()
    x = {"x": np.random.default_rng(0).normal(size=(2, 4, 6, 6)).astype(np.float16)}
    ref, got = h.run(x)[0].astype(np.float64), folded.run(x)[0].astype(np.float64)
    assert np.abs(ref - got).max() <= 1e-3 + 1e-2 * np.abs(ref).max()
    assert len(folded.info().bn_layers) == 0


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x):
        if x.sum().item() > 1e9:  # data-dependent Python control flow: export fails
            return x
        return self.body(x)


def test_untraceable_model_folds_eager_pairs():
    handle = handle_of(Untraceable(), (2, 3, 6, 6))
    assert handle.info().graph_error
    folded, steps = assert_same(handle)
    assert steps[0].into == "producer"
    assert isinstance(folded.module.body[1], nn.Identity)


@pytest.mark.parametrize("source", ["patterns.pt2", "patterns.pt"])
def test_patterns_fold_as_the_table_says(source):
    handle = bncheck.open_model(SAMPLES / source, arch="bncheck.samples:bn_patterns")
    folded, steps = handle.folded()
    by_layer = {s.layer: s for s in steps}
    for name, (into, target) in PATTERN_FOLDS.items():
        assert by_layer[name].into == into, name
        if into:
            assert by_layer[name].target == target, name
    data = np.load(SAMPLES / "patterns_calib.npy")[:16]
    ref, got = handle.run({"x": data})[0], folded.run({"x": data})[0]
    assert np.abs(ref - got).max() <= 1e-5 + 1e-4 * np.abs(ref).max()


def test_saved_pt2_loads_with_dynamic_batch_and_onnx_runs(tmp_path):
    src = SAMPLES / "resnet.pt2"
    pt2, onx = tmp_path / "r.pt2", tmp_path / "r.onnx"
    assert bncheck.fold(src, pt2).passed and bncheck.fold(src, onx).passed
    data = np.load(SAMPLES / "resnet_calib.npy")[:5]  # batch 5: not the traced one
    ref = bncheck.open_model(src).run({"x": data})[0]
    reloaded = bncheck.open_model(pt2)  # through bncheck's own .pt2 validation
    assert len(reloaded.info().bn_layers) == 0
    assert np.abs(reloaded.run({"x": data})[0] - ref).max() <= 1e-4
    model = onnx.load(str(onx))
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    got = bncheck.open_model(onx).run({model.graph.input[0].name: data})[0]
    assert np.abs(got - ref).max() <= 1e-4


def test_source_handle_is_untouched():
    handle = bncheck.open_model(SAMPLES / "resnet.pt2")
    before = {k: v.clone() for k, v in handle.exported.state_dict.items()}
    handle.folded()
    for k, v in handle.exported.state_dict.items():
        assert torch.equal(v, before[k]), k


def test_cli_corrupted_fold_exits_1_and_writes_nothing(tmp_path, monkeypatch, run_cli):
    from bncheck.backends.torch import fold as fold_mod

    real = fold_mod.fold_into_producer

    def corrupt(*args, **kwargs):
        w, b = real(*args, **kwargs)
        return w * 1.01, b

    monkeypatch.setattr(fold_mod, "fold_into_producer", corrupt)
    out = tmp_path / "out.pt2"
    result = run_cli("fold", SAMPLES / "patterns.pt2", "-o", out)
    assert result.code == 1 and not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_fold_pt2_json(tmp_path, run_cli):
    out = tmp_path / "out.pt2"
    result = run_cli("fold", SAMPLES / "patterns.pt2", "-o", out, "--format", "json")
    assert result.code == 0, result
    doc = json.loads(result.out)
    assert doc["summary"] == {"bn_layers": 13, "folded": 10, "skipped": 3, "passed": True}
    assert doc["verification"]["max_rel_error"] < 1e-5
    assert len(bncheck.open_model(out).info().bn_layers) == 3
