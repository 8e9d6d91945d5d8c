"""Small PyTorch models for the torch backend tests; importable as ``--arch torch_fixtures:…``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running stats and affine parameters in every BN-like module (defaults hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "running_mean") and m.running_mean is not None:
                n = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g))
            if isinstance(getattr(m, "num_batches_tracked", None), torch.Tensor):
                m.num_batches_tracked.fill_(7)
    return model


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int = 3, cout: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.example_input_shape = (2, cin, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))


def conv_bn(cout: int = 4) -> ConvBNReLU:
    """The --arch factory the load tests use."""
    return ConvBNReLU(3, cout)


def make_marker(path: str) -> None:
    """What a malicious pickle would run: its only effect is creating ``path``."""
    Path(path).write_text("pickle code ran")


class Evil:
    """Unpickling this creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (make_marker, (self.marker,))


class LinearBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.fc(x)))


class DeconvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 2, 2, stride=2, groups=1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.up(x)) * 2


class FanOut(nn.Module):
    """conv1 feeds both the BN and an add: the BN cannot fold into it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        return torch.relu(self.bn1(y)) + y


class TwiceBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv2(self.bn(self.conv1(x))))


class FrozenBN2d(nn.Module):
    """Like torchvision.ops.FrozenBatchNorm2d: fixed statistics, plain arithmetic."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, init in (
            ("weight", torch.ones),
            ("bias", torch.zeros),
            ("running_mean", torch.zeros),
            ("running_var", torch.ones),
        ):
            self.register_buffer(name, init(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class FrozenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fbn = FrozenBN2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fbn(self.conv(x)))


class SyncNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.bn = nn.SyncBatchNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class Norms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.gn = nn.GroupNorm(2, 8, eps=1e-3)
        self.ln = nn.LayerNorm(8, elementwise_affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.gn(self.conv(x)).mean((2, 3)))


class Untraceable(nn.Module):
    """Python control flow on a tensor value: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.example_input_shape = (2, 3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        if y.sum() > 0:
            return y
        return -y


class PairNet(nn.Module):
    """Sequential blocks: Conv→BN→ReLU, then Conv→BN feeding a padded consumer conv."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 3)
        self.bn_head = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn_head(self.block(x).mean((2, 3)).relu()))


class WideNet(nn.Module):
    """A 224×224 classifier in miniature: strided convs with BN, adaptive pooling, so it runs at
    any spatial size, and no ``example_input_shape``: a state dict of it gets its input shape
    from --input-shape or the data (bncheck's guess would be 32×32)."""

    def __init__(self, fixed_head: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=4, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.pool = nn.Identity() if fixed_head else nn.AdaptiveAvgPool2d(1)
        # A fixed-size head (flatten → Linear) runs at 224×224 only, like VGG or LeNet.
        self.fc = nn.Linear(6 * 28 * 28 if fixed_head else 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def wide_net() -> WideNet:
    """``--arch torch_fixtures:wide_net``."""
    return WideNet()


def fixed_head_net() -> WideNet:
    """``--arch torch_fixtures:fixed_head_net``: runs at 224×224 only."""
    return WideNet(fixed_head=True)


def wide_files(folder: Path, samples: int, seed: int = 1) -> tuple[WideNet, Path, Path]:
    """A WideNet with random BN statistics, its state dict saved in ``folder``, and
    ``samples`` 224×224 samples beside it: (model, state dict path, data path)."""
    import numpy as np

    model = randomize_bn(WideNet().eval(), seed=seed)
    f = folder / "wide.pt"
    torch.save(model.state_dict(), f)
    data = folder / "d224.npy"
    rng = np.random.default_rng(0)
    np.save(data, rng.standard_normal((samples, 3, 224, 224)).astype(np.float32))
    return model, f, data


class PinnedBatch(nn.Module):
    """Flattens with ``view(1, -1)``: runs batch size 1 only, whatever export is asked."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).view(1, -1))


def pinned_batch() -> PinnedBatch:
    """``--arch torch_fixtures:pinned_batch``."""
    return PinnedBatch()


class DeepConvNet(nn.Module):
    """``depth`` × (3×3 Conv → BN → ReLU), the last without ReLU so the output crosses zero;
    BN statistics and signed γ/β random (as in ``fold_fixtures.deep_convnet``): activations grow
    to ~1e4, and a correct fold differs by float32 rounding of ~1e-5 of the output scale."""

    def __init__(self, depth: int = 24, channels: int = 16, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        cin = 3
        for i in range(depth):
            conv = nn.Conv2d(cin, channels, 3, padding=1, bias=False)
            bn = nn.BatchNorm2d(channels)
            with torch.no_grad():
                conv.weight.normal_(0, (2.0 / (cin * 9)) ** 0.5, generator=g)
                sign = torch.randint(0, 2, (channels,), generator=g) * 2 - 1
                bn.weight.copy_((torch.rand(channels, generator=g) * 1.5 + 0.5) * sign)
                bn.bias.normal_(0, 1, generator=g)
                bn.running_mean.normal_(0, 1, generator=g)
                bn.running_var.copy_(torch.rand(channels, generator=g) * 1.8 + 0.2)
            layers += [conv, bn] + ([nn.ReLU()] if i < depth - 1 else [])
            cin = channels
        self.body = nn.Sequential(*layers)
        self.example_input_shape = (2, 3, 16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def no_bn_net() -> nn.Module:
    """Conv → ReLU → Conv: nothing to fold."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()


def weight_normed_net() -> nn.Module:
    """``--arch torch_fixtures:weight_normed_net``: a conv under the old
    ``torch.nn.utils.weight_norm`` (a forward pre-hook; deepcopy refuses the module), then BN."""
    import warnings

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, and still in use
        net[0] = torch.nn.utils.weight_norm(net[0])
    return net
