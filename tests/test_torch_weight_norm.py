"""Models under the old ``torch.nn.utils.weight_norm`` (audio models still ship with it): torch
refuses to deep-copy them, which every command's private copy of the model used to turn into an
internal error."""

from __future__ import annotations

import json

import numpy as np
import torch
from torch_fixtures import randomize_bn, weight_normed_net

from bncheck.backends.torch.copying import copy_module

ARCH = ("--arch", "torch_fixtures:weight_normed_net", "--input-shape", "1,3,8,8")


def test_copy_module_copies_a_weight_normed_module_and_leaves_it_as_it_was():
    net = randomize_bn(weight_normed_net().eval(), seed=1)
    before = net[0].weight
    copied = copy_module(net)
    assert net[0].weight is before  # the source keeps its computed weight
    assert copied[0].weight_v is not net[0].weight_v
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(copied(x).numpy(), net(x).numpy(), rtol=0, atol=0)
        copied[0].weight_g.mul_(2)  # the copy's own parameters, not shared
        assert not torch.equal(copied(x), net(x))


def test_inspect_and_fold_of_a_weight_normed_state_dict(tmp_path, run_cli):
    sd = tmp_path / "wn.pt"
    torch.save(randomize_bn(weight_normed_net().eval(), seed=1).state_dict(), sd)
    r = run_cli("inspect", sd, *ARCH, "--format", "json")
    assert r.code == 0, r.err
    (bn,) = json.loads(r.out)["bn_layers"]
    assert bn["fold"]["into"] is None
    assert "computed in the graph" in bn["fold"]["reason"]
    out = tmp_path / "wn.onnx"
    r = run_cli("fold", sd, *ARCH, "-o", out)
    assert r.code == 0, r.err
    assert "internal error" not in r.err
    assert out.exists() and run_cli("inspect", out, "--format", "json").code == 0
