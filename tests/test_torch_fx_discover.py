"""The fast discovery for reports (``torch.fx``, ``fxgraph.py``) against the exported graph's.

Every model here is discovered twice, by ``report_info()`` (fx where it can) and by ``info()``
(``torch.export``): the inspect reports (json payload: layers, neighbours, fold decisions and
reasons, inputs, outputs, node count, findings, notes) must be identical, and the fast path must
have answered where the test says it can.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_fixtures import (
    ConvBNReLU,
    DeconvBN,
    FanOut,
    LinearBN,
    PairNet,
    PinnedBatch,
    TwiceBN,
    Untraceable,
    randomize_bn,
)

from bncheck.api._inspect import InspectResult
from bncheck.backends.torch import TorchHandle
from bncheck.backends.torch.fxgraph import lower, torch_verified
from bncheck.report.inspect import payload
from bncheck.rules import run_rules
from bncheck.samples import BNPatterns, BrokenModel, SmallResNet

ROOT = Path(__file__).resolve().parent.parent
# the tests that name fx's own answers need the torch release its tables were checked against
verified = pytest.mark.skipif(not torch_verified(), reason="fx tables not checked on this torch")


def report(handle: TorchHandle, info) -> dict:
    return payload(InspectResult(info, run_rules(info), list(handle.notes)))


def both(model: nn.Module, shape: tuple[int, ...] | None, *, fast: bool) -> dict:
    """The two reports of ``model`` (equal), asserting whether fx answered; returns one. On a
    torch release the fx tables were not checked against, fx never answers."""
    fast = fast and torch_verified()
    shapes = {"": shape} if shape else None
    fx = TorchHandle(Path("m.pt"), "state_dict", model, input_shapes=shapes)
    prog, why = lower(fx)
    assert (prog is not None) == fast, why
    fast_report = report(fx, fx.report_info())
    assert fx._traced is not fast  # the fast path exported nothing
    ref = TorchHandle(Path("m.pt"), "state_dict", model, input_shapes=shapes)
    slow_report = report(ref, ref.info())
    assert json.dumps(fast_report, default=str) == json.dumps(slow_report, default=str)
    return fast_report


def folds(rep: dict) -> dict[str, tuple]:
    return {
        b["name"]: (b["fold"]["into"], b["fold"]["target"], b["fold"]["reason"])
        for b in rep["bn_layers"]
    }


# ------------------------------------------------------------------------------- architectures


class Basic(nn.Module):
    """torchvision's BasicBlock: a strided block with a 1×1 conv+BN downsample, `out += x`."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(Basic(8, 8, 1), Basic(8, 8, 1))
        self.layer2 = nn.Sequential(Basic(8, 16, 2), Basic(16, 16, 1))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.avgpool(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(x, 1))


def conv_bn_act(cin: int, cout: int, k: int, s: int = 1, g: int = 1, act: bool = True):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU6(inplace=True)] if act else []))


class Inverted(nn.Module):
    """MobileNetV2's block: expand 1×1, depthwise 3×3, linear 1×1 projection (no activation)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        mid = cin * 4
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            conv_bn_act(cin, mid, 1),
            conv_bn_act(mid, mid, 3, stride, g=mid),
            nn.Conv2d(mid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_act(3, 8, 3, 2), Inverted(8, 8, 1), Inverted(8, 16, 2), Inverted(16, 16, 1)
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class AfterFunctional(nn.Module):
    """BN after functional ops: a sum of two convs, a ReLU, an interpolation."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.bn_sum, self.bn_relu, self.bn_up = (nn.BatchNorm2d(4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn_sum(self.a(x) + self.b(x))
        y = self.bn_relu(F.relu(y))
        return self.bn_up(F.interpolate(y, scale_factor=2.0, mode="nearest"))


class Linear3d(nn.Module):
    """BatchNorm1d over the channels of a (N, C, L) tensor after a Linear on its last axis
    (C = L, so only the rank tells that the Linear's outputs are not the BN's channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.bn(self.fc(x)))


class BeforeConv(nn.Module):
    """BN before a conv: unpadded (folds into it), padded (does not, with a nonzero shift), and
    before a padding='same' conv and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0, self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        self.c0 = nn.Conv2d(3, 4, 3)
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, padding="same")
        self.bn_fc = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c0(self.bn0(x)).mean((2, 3)) + self.c1(self.bn1(x)).mean((2, 3))
        return self.fc(self.bn_fc(y + self.c2(self.bn2(x)).mean((2, 3))))


class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass whose forward also applies an activation,
    which fx traces through (F.batch_norm, then the activation module)."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected 4D input")
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps
        )
        return self.act(x)


class TimmLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = BNAct(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = BNAct(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.bn1(self.conv(x))))


class Heads(nn.Module):
    """Two outputs (a dict), an input named `input`, a BN whose output is a model output, and
    a channel count read from the input's shape (a constant, not an op)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(3, 4, 2, 2)
        self.bn = nn.BatchNorm2d(4)
        self.bn_out = nn.BatchNorm2d(4, affine=False)
        self.bn_batch = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, input: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.bn(self.conv(input)) * (input.shape[1] / 3)
        return {"a": self.bn_out(y), "b": self.bn_batch(y).sigmoid()}


class CrepeLike(nn.Module):
    """torchcrepe's CREPE: audio (N, L) indexed to (N, 1, L, 1), explicit F.pad before each
    unpadded conv, F.relu before the BN, F.max_pool2d, a permute/reshape head; `forward` takes
    a flag with a default that export and fx both leave at its default."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv1_BN = nn.Conv2d(1, 8, (16, 1), (4, 1)), nn.BatchNorm2d(8, 1e-3, 0.0)
        self.conv2, self.conv2_BN = nn.Conv2d(8, 4, (8, 1)), nn.BatchNorm2d(4, 1e-3, 0.0)
        self.classifier = nn.Linear(4 * 4, 6)

    def forward(self, x: torch.Tensor, embed: bool = False) -> torch.Tensor:
        x = x[:, None, :, None]
        x = self.layer(x, self.conv1, self.conv1_BN, (0, 0, 6, 6))
        x = self.layer(x, self.conv2, self.conv2_BN, (0, 0, 3, 4))
        if embed:
            return x
        return torch.sigmoid(self.classifier(x.permute(0, 2, 1, 3).reshape(-1, 16)))

    def layer(self, x, conv, bn, padding):
        x = bn(F.relu(conv(F.pad(x, padding))))
        return F.max_pool2d(x, (2, 1), (2, 1))


class Sliced(nn.Module):
    """Tensor indexing: a channel slice (export records a slice of the batch dim too), an
    int index, an Ellipsis; and a functional Linear on the module's own weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(4)
        self.bn1d = nn.BatchNorm1d(4)
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x)[:, :4])
        z = F.linear(y[..., 0, :].mean(-1), self.weight)
        return self.bn1d(z)[:, 1:]


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle, and a `view(x.size(0), -1)` head: the batch size read from
    shapes (export: one `sym_size` of the input, reused)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        b, c, h, w = y.size()
        y = y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        y = y.contiguous()  # already: export records nothing for it
        y = self.bn2(self.conv2(y))
        return self.fc(y.view(y.size(0), -1))


class BatchArithmetic(nn.Module):
    """A size computed from the batch (`2 * b`): export records sym ops for it; fx defers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y.reshape(2 * y.shape[0], -1)


class Mixed(nn.Module):
    """MixNet's mixed conv and Res2Net's split: `torch.split` by a list of sizes, a conv+BN per
    part, concatenated, a BN after the concat; and `chunk` whose second part is unused."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(4, 4, 5, padding=2)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(2), nn.BatchNorm2d(4)])
        self.bn_cat = nn.BatchNorm2d(6)
        self.bn_half = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, [2, 4], dim=1)
        # indexed, not zipped: fx cannot iterate the parts (MixNet indexes them too)
        y = torch.cat([bn(conv(parts[i])) for i, (conv, bn) in enumerate(self.pairs())], 1)
        a, _ = self.bn_cat(y).chunk(2, 1)
        return self.bn_half(a)

    def pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return list(zip(self.convs, self.bns, strict=True))


# ------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (ConvBNReLU(), None),
        (LinearBN(), (3, 6)),
        (DeconvBN(), (1, 3, 4, 4)),
        (PairNet(), (1, 3, 8, 8)),
        (SmallResNet(), None),
        (BNPatterns(), None),
        (ResNetLike(), (1, 3, 32, 32)),
        (MobileNetLike(), (1, 3, 32, 32)),
        (AfterFunctional(), (2, 3, 8, 8)),
        (Linear3d(), (2, 6, 6)),
        (BeforeConv(), (1, 3, 8, 8)),
        (TimmLike(), (1, 3, 8, 8)),
        (Heads(), (1, 3, 4, 4)),
        (CrepeLike(), (1, 256)),
        (Sliced(), (1, 3, 4, 4)),
        (Mixed(), (1, 6, 8, 8)),
        (Shuffle(), (1, 3, 4, 4)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_fx_and_export_decide_alike(model, shape):
    both(randomize_bn(model.eval(), seed=5), shape, fast=True)


def test_decisions_of_the_fast_path():
    """The decisions themselves, so that two equally wrong paths cannot pass."""
    rep = both(randomize_bn(ResNetLike().eval()), (1, 3, 32, 32), fast=True)
    f = folds(rep)
    assert f["layer2.0.downsample.1"] == ("producer", "layer2.0.downsample.0", None)
    assert f["layer1.0.bn2"] == ("producer", "layer1.0.conv2", None)
    layer = next(b for b in rep["bn_layers"] if b["name"] == "layer1.0.bn2")
    assert layer["consumers"] == [{"name": "add_", "op": "add_", "has_weights": False}]
    assert rep["model"]["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    assert rep["model"]["outputs"][0]["shape"] == ["batch", 10]

    f = folds(both(randomize_bn(AfterFunctional().eval()), (2, 3, 8, 8), fast=True))
    assert f["bn_sum"][:2] == (None, None)
    assert f["bn_sum"][2].startswith("no producer with weights (input comes from add)")

    f = folds(both(randomize_bn(Linear3d().eval()), (2, 6, 6), fast=True))
    assert f["bn"] == (
        None,
        None,
        "producer 'fc' is a Linear on a 3-D tensor; BN normalizes another axis; "
        "consumer 'fc2' is a Linear on a 3-D tensor",
    )
    f = folds(both(randomize_bn(BeforeConv().eval()), (1, 3, 8, 8), fast=True))
    assert f["bn0"] == ("consumer", "c0", None)
    assert f["bn_fc"] == ("consumer", "fc", None)
    assert "zero-pads its input" in f["bn1"][2] and "zero-pads its input" in f["bn2"][2]

    f = folds(both(randomize_bn(TimmLike().eval()), (1, 3, 8, 8), fast=True))
    assert f["bn1"] == ("producer", "conv", None)

    f = folds(both(randomize_bn(Mixed().eval()), (1, 6, 8, 8), fast=True))
    assert f["bns.1"] == ("producer", "convs.1", None)
    assert f["bn_cat"][2].startswith("no producer with weights (input comes from cat)")
    assert f["bn_half"][2].startswith("no producer with weights (input comes from getitem_2)")


def test_fan_out_and_repeated_calls():
    f = folds(both(FanOut().eval(), (1, 3, 6, 6), fast=True))
    assert f["bn1"][2] == (
        "producer 'conv1' output also feeds 'add'; consumer 'relu' has no weights to absorb the BN"
    )
    f = folds(both(TwiceBN().eval(), (1, 3, 4, 4), fast=True))
    assert f["bn"] == (None, None, "BN module called at 2 places")


def test_train_mode_model_is_discovered_in_eval_and_reported_as_training():
    model = randomize_bn(BrokenModel().train())
    rep = both(model, None, fast=True)
    assert rep["model"]["training"] is True and model.training is True
    assert folds(rep)["bn_shared"] == (None, None, "BN module called at 2 places")


@verified
@pytest.mark.parametrize(
    ("model", "shape", "why"),
    [
        (Untraceable(), None, "fx: TraceError"),  # control flow on a tensor
        (PinnedBatch(), (1, 3, 8, 8), "fx: RuntimeError"),  # runs at batch 1 only
    ],
)
def test_export_answers_where_fx_cannot(model, shape, why):
    model = randomize_bn(model.eval())
    h = TorchHandle(Path("m.pt"), "state_dict", model, input_shapes={"": shape} if shape else None)
    assert lower(h)[1].startswith(why)
    rep = both(model, shape, fast=False)
    if isinstance(model, PinnedBatch):
        assert rep["notes"] and "fixes its batch size" in rep["notes"][0]


class Rolled(nn.Module):
    """``torch.roll``: an op the fx tables do not model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.roll(self.conv(x), 1, 2))


@verified
@pytest.mark.parametrize(
    ("model", "why"),
    [
        (Rolled(), "not in the tables: function roll"),
        (BatchArithmetic(), "not in the tables: mul: a size computed from the batch size"),
    ],
)
def test_ops_outside_the_tables_fall_back(model, why):
    model = randomize_bn(model.eval())
    h = TorchHandle(Path("m.pt"), "state_dict", model, input_shapes={"": (1, 3, 4, 4)})
    assert lower(h)[1] == why
    both(model, (1, 3, 4, 4), fast=False)


@verified
def test_fold_still_reads_the_exported_graph():
    model = randomize_bn(MobileNetLike().eval())
    h = TorchHandle(Path("m.pt"), "state_dict", model, input_shapes={"": (1, 3, 32, 32)})
    fast = h.report_info()
    assert h._exported is None
    _, steps = h.folded()
    assert h._exported is not None  # fold traced the model with export, and decided alike:
    assert report(h, h.info()) == report(h, fast)
    assert len(steps) == sum(1 for b in fast.bn_layers if b.fold.foldable) > 0


@verified
def test_cli_inspect_of_a_state_dict_uses_fx_and_no_export_machinery(tmp_path):
    """End to end: `bncheck inspect sd.pt --arch …` reports what export-based discovery does,
    and never imports dynamo or sympy (what made it slow)."""
    model = randomize_bn(ConvBNReLU().eval(), seed=2)
    sd = tmp_path / "sd.pt"
    torch.save(model.state_dict(), sd)
    code = (
        "import sys, runpy\n"
        "sys.argv = ['bncheck', 'inspect', sys.argv[1], '--arch', 'torch_fixtures:conv_bn',"
        " '--format', 'json']\n"
        "try:\n    runpy.run_module('bncheck', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "bad = [m for m in ('torch._dynamo', 'sympy') if m in sys.modules]\n"
        "print('IMPORTED', bad, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(sd)], capture_output=True, text=True, env=env
    )
    assert "IMPORTED []" in proc.stderr, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    ref = TorchHandle(sd, "state_dict", ConvBNReLU().eval())
    ref.module.load_state_dict(model.state_dict())
    want = report(ref, ref.info())
    assert got["model"] == json.loads(json.dumps(want["model"]))
    assert got["bn_layers"] == json.loads(json.dumps(want["bn_layers"]))
    assert [f["code"] for f in got["findings"]] == [f["code"] for f in want["findings"]]


class IdentityHead(nn.Module):
    """The output is an earlier value passed through an Identity (timm's RepVGG head): its
    batch dim is still the symbolic batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.fc, self.drop = nn.Linear(4, 2), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc(self.bn(self.conv(x)).mean((2, 3))))


def test_an_output_through_an_identity_keeps_its_batch_dim():
    rep = both(randomize_bn(IdentityHead().eval()), (1, 3, 4, 4), fast=True)
    assert rep["model"]["outputs"][0]["shape"] == ["batch", 2]


def _double(module, args):
    return (args[0] * 2,)


@verified
def test_a_forward_hook_falls_back():
    """A pre-forward hook on the BN scales its input: export records that op between the conv
    and the BN; fx records the BN as one call and would not see it."""
    model = randomize_bn(ConvBNReLU().eval())
    model.bn1.register_forward_pre_hook(_double)
    h = TorchHandle(Path("m.pt"), "state_dict", model)
    assert lower(h)[1] == "bn1: a forward hook"
    rep = both(model, None, fast=False)
    # the hook's mul is the BN's input (named after the module it runs in): no fold
    assert folds(rep)["bn1"][2].startswith("no producer with weights (input comes from bn1)")


def test_another_torch_release_always_exports(monkeypatch):
    from bncheck.backends.torch import fxgraph

    monkeypatch.setattr(fxgraph, "VERIFIED_TORCH", ("0.0",))
    model = randomize_bn(ConvBNReLU().eval())
    h = TorchHandle(Path("m.pt"), "state_dict", model)
    assert lower(h) == (None, "torch is not a release the fx tables were checked against")
    fast = report(h, h.report_info())
    assert h._traced and fast == report(h, h.info())


# The folds beyond a neighbour (layout ops, a channel cat, eval dropout, merged branches) are
# decided by the same match_fold on either graph; the fast report must name them the same way.
@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("LeViTish", (2, 3, 8, 8)),
        ("NormLinear", (2, 5, 6)),
        ("MixedConv", (2, 9, 7, 7)),
        ("MovedAxis", (2, 4, 6, 5)),
        ("SecondReader", (2, 3, 5)),
        ("Reps", (2, 3, 9, 9)),
        ("SharedBranch", (2, 6, 7, 7)),
        ("StridedIdentity", (2, 6, 8, 8)),
    ],
)
def test_fx_and_export_decide_the_folds_beyond_a_neighbour_alike(name, shape):
    import test_torch_fold_beyond as beyond

    model = randomize_bn(getattr(beyond, name)().eval(), seed=5)
    fast = TorchHandle(Path("m.pt"), "state_dict", model, input_shapes={"": shape})
    ref = TorchHandle(Path("m.pt"), "state_dict", model, input_shapes={"": shape})
    fast_report = report(fast, fast.report_info())
    assert json.dumps(fast_report, default=str) == json.dumps(report(ref, ref.info()), default=str)
