"""BN discovery for PyTorch models: layers, neighbours, call sites and fold decisions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch_fixtures import (
    ConvBNReLU,
    DeconvBN,
    FanOut,
    FrozenNet,
    LinearBN,
    Norms,
    PairNet,
    SyncNet,
    TwiceBN,
    Untraceable,
    randomize_bn,
)

from bncheck.backends import open_model
from bncheck.layers import FoldDecision, ModelInfo, Neighbour


def info_of(tmp_path: Path, model: nn.Module, **kw) -> ModelInfo:
    f = tmp_path / "model.pt"
    torch.save(model, f)
    return open_model(f, trust_pickle=True, **kw).info()


def only(info: ModelInfo):
    (layer,) = info.bn_layers
    return layer


def test_conv_bn_relu(tmp_path):
    model = randomize_bn(ConvBNReLU().eval(), seed=3)
    info = info_of(tmp_path, model)
    bn = only(info)
    assert (bn.name, bn.kind, bn.channels, bn.eps, bn.momentum) == (
        "bn1",
        "BatchNorm2d",
        4,
        1e-5,
        0.1,
    )
    assert (bn.affine, bn.track_running_stats, bn.training, bn.num_batches_tracked) == (
        True,
        True,
        False,
        7,
    )
    assert bn.producer == Neighbour("conv1", "Conv", True)
    assert bn.consumers == (Neighbour("relu", "relu"),)
    assert bn.call_sites == 1 and bn.fold == FoldDecision("producer", "conv1")
    assert (bn.stats_dtype, bn.param_dtype, bn.frozen) == ("float32", "float32", False)
    np.testing.assert_array_equal(bn.running_mean, model.bn1.running_mean.numpy())
    np.testing.assert_array_equal(bn.weight, model.bn1.weight.detach().numpy())
    assert info.graph_error is None and info.training is False
    # example_input_shape is honoured, traced with a dynamic batch; output follows the graph.
    assert info.inputs[0].shape == ("batch", 3, 8, 8)
    assert info.outputs[0].shape == ("batch", 4, 8, 8)
    assert info.parameters == 3 * 4 * 9 + 4 + 4 * 4  # conv w+b, BN w/b/mean/var
    assert info.nodes == 12  # 8 placeholders, conv, bn, relu, output


def test_linear_bn1d_and_input_shape(tmp_path):
    info = info_of(tmp_path, randomize_bn(LinearBN().eval()), input_shapes={"": (3, 6)})
    bn = only(info)
    assert (bn.kind, bn.channels) == ("BatchNorm1d", 5)
    assert bn.producer == Neighbour("fc", "Linear", True)
    assert bn.fold == FoldDecision("producer", "fc")
    assert info.inputs[0].shape == ("batch", 6)


def test_guessed_input_is_noted(tmp_path):
    f = tmp_path / "m.pt"
    torch.save(LinearBN().eval(), f)
    h = open_model(f, trust_pickle=True)
    assert [t.shape for t in h.example_inputs] == [(2, 6)]
    assert h.notes == [
        "example input x[2, 6] guessed from 'fc' (Linear); pass --input-shape to set it"
    ]


def test_conv_transpose(tmp_path):
    bn = only(info_of(tmp_path, randomize_bn(DeconvBN().eval()), input_shapes={"x": (1, 3, 4, 4)}))
    assert bn.producer == Neighbour("up", "ConvTranspose", True)
    assert bn.consumers == (Neighbour("mul", "mul"),)
    assert bn.fold == FoldDecision("producer", "up")


def test_fan_out_reason(tmp_path):
    bn = only(info_of(tmp_path, FanOut().eval(), input_shapes={"": (1, 3, 6, 6)}))
    assert bn.producer == Neighbour("conv1", "Conv", True)
    assert bn.fold == FoldDecision(
        None,
        reason="producer 'conv1' output also feeds 'add'; consumer 'relu' has no weights "
        "to absorb the BN",
    )


def test_bn_called_twice(tmp_path):
    bn = only(info_of(tmp_path, TwiceBN().eval(), input_shapes={"": (1, 3, 4, 4)}))
    assert bn.call_sites == 2
    assert bn.producer == Neighbour("conv1", "Conv", True)
    assert bn.fold == FoldDecision(None, reason="BN module called at 2 places")


def test_train_mode_recorded(tmp_path):
    model = ConvBNReLU().train()
    info = info_of(tmp_path, model)
    assert info.training is True and only(info).training is True
    assert model.training is True  # discovery never flips the caller's module
    assert only(info).fold.into == "producer"  # fold decisions assume eval


def test_frozen_bn(tmp_path):
    model = randomize_bn(FrozenNet().eval(), seed=5)
    bn = only(info_of(tmp_path, model, input_shapes={"": (1, 3, 6, 6)}))
    assert (bn.name, bn.kind, bn.frozen, bn.channels, bn.momentum) == (
        "fbn",
        "FrozenBN2d",
        True,
        4,
        None,
    )
    assert bn.producer == Neighbour("conv", "Conv", True)
    assert bn.consumers == (Neighbour("relu", "relu"),)
    assert bn.call_sites == 1 and bn.fold == FoldDecision("producer", "conv")
    np.testing.assert_array_equal(bn.running_var, model.fbn.running_var.numpy())


def test_sync_batchnorm(tmp_path):
    bn = only(info_of(tmp_path, SyncNet().eval(), input_shapes={"": (2, 3, 4, 4)}))
    assert (bn.kind, bn.channels) == ("SyncBatchNorm", 4)
    assert bn.fold == FoldDecision("producer", "conv")
    assert bn.consumers == (Neighbour("output", "output"),)


def test_other_norms(tmp_path):
    info = info_of(tmp_path, Norms().eval(), input_shapes={"": (2, 3, 4, 4)})
    assert info.bn_layers == ()
    assert [(n.name, n.kind, n.shape, n.eps, n.affine) for n in info.norm_layers] == [
        ("gn", "GroupNorm", "2 groups, 8 channels", 1e-3, True),
        ("ln", "LayerNorm", "(8,)", 1e-5, False),
    ]


def test_consumer_fold(tmp_path):
    info = info_of(tmp_path, randomize_bn(PairNet().eval()), input_shapes={"": (2, 3, 5, 5)})
    block, head = info.bn_layers
    assert block.fold == FoldDecision("producer", "block.0")
    assert head.producer == Neighbour("relu_1", "relu")  # functional relu: node name
    assert head.fold == FoldDecision("consumer", "head")


def test_untraceable_falls_back_to_module_tree(tmp_path):
    model = randomize_bn(Untraceable().eval())
    info = info_of(tmp_path, model)
    assert info.graph_error.startswith("could not trace the model: ")
    bn = only(info)
    assert (bn.name, bn.call_sites) == ("features.1", 0)
    assert bn.producer == Neighbour("features.0", "Conv", True)
    assert bn.consumers == (Neighbour("features.2", "ReLU"),)
    assert bn.fold == FoldDecision("producer", "features.0")
    assert info.outputs[0].shape == (2, 4, 6, 6)  # from an eager run


def _layer_facts(info: ModelInfo) -> list[tuple]:
    return [
        (
            b.name,
            b.kind,
            b.channels,
            b.eps,
            b.momentum,
            b.producer,
            b.consumers,
            b.fold,
            b.num_batches_tracked,
            b.stats_dtype,
        )
        for b in info.bn_layers
    ]


@pytest.mark.parametrize("factory", [ConvBNReLU, PairNet, FrozenNet])
def test_pt2_matches_eager(tmp_path, factory):
    model = randomize_bn(factory().eval(), seed=2)
    x = torch.randn(2, 3, 8, 8)
    eager = info_of(tmp_path, model, input_shapes={"": tuple(x.shape)})
    f = tmp_path / "model.pt2"
    batch = {0: torch.export.Dim("batch", min=1)}
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=(batch,)), f)
    exported = open_model(f).info()
    assert exported.format == "pt2" and exported.graph_error is None
    assert _layer_facts(exported) == _layer_facts(eager)
    for a, b in zip(exported.bn_layers, eager.bn_layers, strict=True):
        for field in ("running_mean", "running_var", "weight", "bias"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert exported.parameters == eager.parameters
    assert exported.inputs == eager.inputs and exported.outputs == eager.outputs


def test_pt2_train_mode(tmp_path):
    model = ConvBNReLU().train()
    f = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),)), f)
    info = open_model(f).info()
    assert info.training is True and only(info).training is True


def test_bfloat16_stats(tmp_path):
    model = randomize_bn(ConvBNReLU().eval()).to(torch.bfloat16)
    bn = only(info_of(tmp_path, model))
    assert (bn.stats_dtype, bn.param_dtype) == ("bfloat16", "bfloat16")
    assert bn.running_var.dtype == np.float32
    np.testing.assert_array_equal(bn.running_var, model.bn1.running_var.float().numpy())
