"""PyTorch folds beyond a neighbour, on ``.pt2`` files: through channel-preserving layout ops
(LeViT), through a channel cat (MixNet) and by merging summed branches (RepVGG, MobileOne,
FastViT's RepMixer); and the shapes that must stay (a second reader, a moved channel axis).

Each model is built here, its BN statistics and γ/β randomized, exported with a dynamic batch,
folded, compared with the unfolded program (fp32: |Δ| ≤ 1e-5 + 1e-4·max|ref|; the fold is exact
in float64, float32 rounding of the rewritten weights remains), written, reopened and inspected.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fold_fixtures import unlimited_verification_time  # noqa: F401  (a fixture)
from test_torch_fold import randomize
from torch import nn

import bncheck

pytestmark = pytest.mark.usefixtures("unlimited_verification_time")


def folded_pt2(tmp_path, model: nn.Module, shape: tuple[int, ...], bn_left: int):
    """Export ``model`` (dynamic batch), fold it, check values, the written file and that
    ``inspect`` decided what ``fold`` did; returns (handle, steps)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(randomize(model), (x,), dynamic_shapes=({0: batch},), strict=False)
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    handle = bncheck.open_model(tmp_path / "m.pt2")
    folded, steps = handle.folded()
    decided = {la.name: (la.fold.into, la.fold.target) for la in handle.info().bn_layers}
    assert decided == {s.layer: (s.into, s.target) for s in steps}, steps  # inspect agrees
    assert len(folded.info().bn_layers) == bn_left, steps
    feeds = {"x": np.random.default_rng(0).normal(size=(5, *shape[1:])).astype(np.float32)}
    with torch.no_grad():
        ref = model(torch.from_numpy(feeds["x"])).numpy().astype(np.float64)
    folded.save(tmp_path / "f.pt2")
    reopened = bncheck.open_model(tmp_path / "f.pt2")
    for got in (folded.run(feeds)[0], reopened.run(feeds)[0]):
        err = float(np.abs(np.asarray(got, np.float64) - ref).max())
        assert err <= 1e-5 + 1e-4 * float(np.abs(ref).max()), err
    assert len(reopened.info().bn_layers) == bn_left
    return handle, steps


def by_layer(steps):
    return {s.layer: s for s in steps}


# ------------------------------------------------------------------------ through layout ops


class LinearNorm(nn.Module):
    """LeViT's ``Linear → flatten(0, 1) → BatchNorm1d → reshape_as`` on (B, N, C) tokens."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(cin, cout), nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.qkv = LinearNorm(8, 12)
        self.proj = LinearNorm(12, 8)
        self.bn_t = nn.BatchNorm1d(8)  # conv → flatten(2) → transpose → transpose back → BN
        self.mlp = nn.Linear(8, 6, bias=False)
        self.bn_p = nn.BatchNorm1d(6)  # bias-free Linear on tokens → permute → BN on (B, C, N)

    def forward(self, x):
        t = self.conv(x).flatten(2)  # (B, 8, N)
        y = self.bn_t(t.transpose(1, 2).transpose(1, 2))
        t = torch.relu(self.qkv(y.transpose(1, 2)))  # (B, N, 12)
        t = self.proj(t) + y.transpose(1, 2)
        return self.bn_p(self.mlp(t).permute(0, 2, 1))


def test_bn_behind_layout_ops_folds_into_the_producer(tmp_path):
    _, steps = folded_pt2(tmp_path, LeViTish(), (2, 3, 8, 8), bn_left=0)
    s = by_layer(steps)
    assert s["qkv.bn"].target == "qkv.linear (through flatten 'flatten_1')"
    assert s["bn_p"].into == "producer" and s["bn_p"].target.startswith("mlp (through permute")
    assert s["bn_t"].target.startswith("conv (through flatten 'flatten', transpose")


class MovedAxis(nn.Module):
    """The permute makes the BN normalize the conv's H axis, not its channels: it stays."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.conv(x).permute(0, 2, 1, 3))


class SecondReader(nn.Module):
    """The flattened Linear output is also added to the result: the fold would change it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(5, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        z = self.linear(x).flatten(0, 1)
        return self.bn(z) + z


def test_layout_fold_refuses_a_moved_axis_and_a_second_reader(tmp_path):
    _, steps = folded_pt2(tmp_path, MovedAxis(), (2, 4, 6, 5), bn_left=1)
    assert steps[0].into is None
    assert "feature axis of 'conv' reaches the BN as axis 2, not 1" in steps[0].reason
    _, steps = folded_pt2(tmp_path, SecondReader(), (2, 3, 5), bn_left=1)
    assert steps[0].into is None and "also feeds" in steps[0].reason, steps


class SharedLinear(nn.Module):
    """One Linear read twice: its BN folds into a copy, the other call keeps the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = LinearNorm(5, 5)

    def forward(self, x):
        return self.norm(x) + self.norm.linear(x)


def test_layout_fold_into_a_shared_linear_uses_a_copy(tmp_path):
    handle, steps = folded_pt2(tmp_path, SharedLinear(), (2, 3, 5), bn_left=0)
    assert steps[0].into == "producer"
    folded, _ = handle.folded()
    keys = set(folded.exported.state_dict)
    assert {"norm.linear.weight", "norm.linear.weight_folded"} <= keys, keys


class NormLinear(nn.Module):
    """LeViT's head: token mean → BatchNorm1d → Dropout → Linear; the BN has no producer."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.drop, self.linear = nn.BatchNorm1d(6), nn.Dropout(0.2), nn.Linear(6, 4)

    def forward(self, x):
        return self.linear(self.drop(self.bn(x.mean(1))))


def test_bn_folds_into_a_consumer_behind_eval_dropout(tmp_path):
    _, steps = folded_pt2(tmp_path, NormLinear(), (2, 5, 6), bn_left=0)
    assert (steps[0].into, steps[0].target) == ("consumer", "linear")


# --------------------------------------------------------------------------- through a cat


class MixedConv(nn.Module):
    """MixNet: split the channels, a depthwise conv of its own size per slice, cat, BN."""

    def __init__(self, c: int = 9, share: bool = False) -> None:
        super().__init__()
        self.splits = [3, 3, 3]
        self.convs = nn.ModuleList(
            nn.Conv2d(3, 3, k, padding=k // 2, groups=3, bias=k == 5) for k in (3, 5, 7)
        )
        self.bn, self.share = nn.BatchNorm2d(c), share

    def forward(self, x):
        parts = [conv(p) for conv, p in zip(self.convs, x.split(self.splits, 1), strict=True)]
        y = torch.relu(self.bn(torch.cat(parts, 1)))
        return y + parts[0].mean() if self.share else y


def test_bn_after_cat_splits_into_each_producer(tmp_path):
    handle, steps = folded_pt2(tmp_path, MixedConv(), (2, 9, 7, 7), bn_left=0)
    assert steps[0].target == "convs.0, convs.1, convs.2 (through cat 'cat')"
    assert handle.info().bn_layers[0].fold.into == "producer"


def test_cat_input_with_a_second_reader_stays(tmp_path):
    _, steps = folded_pt2(tmp_path, MixedConv(share=True), (2, 9, 7, 7), bn_left=1)
    assert steps[0].into is None
    assert "cat input: producer 'convs.0' output also feeds" in steps[0].reason


# ----------------------------------------------------------------- summed branches, merged


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


class RepVGGBlock(nn.Module):
    """timm's RepVGG block: 3×3 + 1×1 conv-BN branches, an identity BN when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.conv_kxk, self.conv_1x1 = conv_bn(cin, cout, 3, stride), conv_bn(cin, cout, 1, stride)

    def forward(self, x):
        y = self.conv_1x1(x) + self.conv_kxk(x)
        if self.identity is not None:
            y += self.identity(x)  # in place, as timm writes it
        return torch.relu(y)


class MobileOneBlock(nn.Module):
    """timm's MobileOne block: identity BN, a 1×1 scale branch, k depthwise k×k branches;
    a missing branch is the literal 0 timm adds."""

    def __init__(self, c: int, k: int = 3, branches: int = 2, scale: bool = True) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(c)
        self.conv_scale = conv_bn(c, c, 1, groups=c) if scale else None
        self.conv_kxk = nn.ModuleList(conv_bn(c, c, k, groups=c) for _ in range(branches))

    def forward(self, x):
        out = (self.conv_scale(x) if self.conv_scale is not None else 0) + self.identity(x)
        for conv in self.conv_kxk:
            out += conv(x)
        return out


class RepMixer(nn.Module):
    """FastViT: ``x + γ·(mixer(x) − norm(x))`` with MobileOne blocks and a layer scale."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = MobileOneBlock(c, branches=0, scale=False)
        self.mixer = MobileOneBlock(c, branches=1)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        return x + self.gamma * (self.mixer(x) - self.norm(x))


class Reps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = RepVGGBlock(3, 8, stride=2)  # no identity: two convs merge, BNs fold
        self.b1 = RepVGGBlock(8, 8)
        self.mob = MobileOneBlock(8)
        self.mix = RepMixer(8)

    def forward(self, x):
        return torch.relu(self.mix(torch.relu(self.mob(self.b1(self.stem(x))))))


def conv_count(handle) -> int:
    return sum("conv2d" in str(n.target) for n in handle.exported.graph.nodes)


def test_summed_branches_merge_into_one_conv(tmp_path):
    handle, steps = folded_pt2(tmp_path, Reps(), (2, 3, 9, 9), bn_left=0)
    folded, _ = handle.folded()
    assert (conv_count(handle), conv_count(folded)) == (9, 4)  # one conv per block
    s = by_layer(steps)
    assert s["b1.identity"].into == "producer"
    assert s["b1.identity"].target.startswith("b1.conv_kxk.0 (branches merged at add_ '")
    assert s["mix.norm.identity"].target.startswith("mix.mixer.conv_kxk.0.0 (branches merged")
    assert s["b1.conv_1x1.1"].target == "b1.conv_1x1.0"  # branch BNs: plain producer folds


class SharedBranch(nn.Module):
    """The 1×1 branch is also read outside the sum: nothing merges, the identity BN stays."""

    def __init__(self) -> None:
        super().__init__()
        self.block = RepVGGBlock(6, 6)

    def forward(self, x):
        b = self.block
        one = b.conv_1x1(x)
        return torch.relu(one + b.conv_kxk(x) + b.identity(x)) * one.mean()


class StridedIdentity(nn.Module):
    """A stride-2 sum with a BN of the input: no identity kernel exists, the BN stays."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = conv_bn(6, 6, 3, stride=2), nn.BatchNorm2d(6)

    def forward(self, x):
        return self.conv(x) + self.bn(x)[:, :, ::2, ::2]


def test_branches_that_do_not_merge_keep_their_bn(tmp_path):
    handle, steps = folded_pt2(tmp_path, SharedBranch(), (2, 6, 7, 7), bn_left=1)
    s = by_layer(steps)["block.identity"]
    assert (
        s.into is None
        and "no branch merge: branch output 'block.conv_1x1.1' is also read" in s.reason
    )
    folded, _ = handle.folded()
    assert conv_count(folded) == 2
    _, steps = folded_pt2(tmp_path, StridedIdentity(), (2, 6, 8, 8), bn_left=1)
    assert by_layer(steps)["bn"].into is None


def test_merge_that_overflows_float16_leaves_the_sum_and_its_identity_bn():
    from bncheck.backends.torch import TorchHandle

    model = randomize(RepVGGBlock(4, 4))
    with torch.no_grad():
        for branch in (model.conv_kxk, model.conv_1x1):
            branch[0].weight.fill_(40000.0)  # each fits float16, their sum at the centre not
            branch[1].running_mean.zero_(), branch[1].running_var.fill_(1.0)
            branch[1].weight.fill_(1.0), branch[1].bias.zero_()
    handle = TorchHandle("m.pt", "state_dict", model.half())
    handle._example = {"x": torch.randn(2, 4, 6, 6).half()}
    decided = {la.name: la.fold for la in handle.info().bn_layers}
    assert decided["identity"].into == "producer"  # inspect cannot know the sum overflows
    folded, steps = handle.folded()
    s = by_layer(steps)["identity"]
    assert s.into is None and "branch merge" in s.reason and "overflow float16" in s.reason
    assert len(folded.info().bn_layers) == 1 and conv_count(folded) == 2


@pytest.mark.parametrize(
    "model, shape, needle",
    [
        (LeViTish, (2, 3, 8, 8), "qkv.linear (through flatten"),
        (MixedConv, (2, 9, 7, 7), "through cat"),
        (Reps, (2, 3, 9, 9), "branches merged at"),
    ],
)
def test_cli_inspect_reports_the_decision_and_reads_the_folded_file(
    tmp_path, run_cli, model, shape, needle
):
    folded_pt2(tmp_path, model(), shape, bn_left=0)
    result = run_cli("inspect", tmp_path / "m.pt2", "--format", "json")
    assert result.code == 0, result
    assert needle in result.out
    assert run_cli("inspect", tmp_path / "f.pt2").code == 0
