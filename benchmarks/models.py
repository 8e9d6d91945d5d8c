"""Reference CNNs for the benchmarks, written out here so nothing is downloaded.

ResNet-18/50 and MobileNetV2 follow the published architectures (He et al. 2016; Sandler et
al. 2018) at ImageNet size. ``norm=False`` builds the same network without BN (convs with
bias): the floor a folded model should reach.
"""

from __future__ import annotations

import torch
from torch import nn


def _bn(c: int, norm: bool) -> nn.Module:
    return nn.BatchNorm2d(c) if norm else nn.Identity()


def conv_bn(cin, cout, k, s=1, g=1, norm=True, act=True, act_layer=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=not norm), _bn(cout, norm)]
    if act:
        layers.append(act_layer(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        self.a = conv_bn(cin, cout, 3, stride, norm=norm)
        self.b = conv_bn(cout, cout, 3, 1, norm=norm, act=False)
        self.down = (
            conv_bn(cin, cout, 1, stride, norm=norm, act=False)
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        return torch.relu(self.b(self.a(x)) + self.down(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride, norm):
        super().__init__()
        cout = width * 4
        self.a = conv_bn(cin, width, 1, norm=norm)
        self.b = conv_bn(width, width, 3, stride, norm=norm)
        self.c = conv_bn(width, cout, 1, norm=norm, act=False)
        self.down = (
            conv_bn(cin, cout, 1, stride, norm=norm, act=False)
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        return torch.relu(self.c(self.b(self.a(x))) + self.down(x))


class ResNet(nn.Module):
    def __init__(self, block, depths, norm=True, classes=1000):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 64, 7, 2, norm=norm), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], 64
        for i, (n, width) in enumerate(zip(depths, (64, 128, 256, 512), strict=True)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blk = block(cin, width, stride, norm)
                stages.append(blk)
                cin = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand, norm):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [conv_bn(cin, hidden, 1, norm=norm, act_layer=nn.ReLU6)]
        layers += [
            conv_bn(hidden, hidden, 3, stride, g=hidden, norm=norm, act_layer=nn.ReLU6),
            conv_bn(hidden, cout, 1, norm=norm, act=False),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip

    def __init__(self, norm=True, classes=1000):
        super().__init__()
        layers, cin = [conv_bn(3, 32, 3, 2, norm=norm, act_layer=nn.ReLU6)], 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t, norm))
                cin = c
        layers.append(conv_bn(cin, 1280, 1, norm=norm, act_layer=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, classes))

    def forward(self, x):
        return self.head(self.features(x))


class VGG(nn.Module):
    """VGG-11 with BN (Simonyan & Zisserman 2015; torchvision's ``vgg11_bn``): 132.9 M
    parameters, 531 MB in float32, most of them in the 25088→4096 classifier."""

    CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, norm=True, classes=1000):
        super().__init__()
        layers, cin = [], 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(conv_bn(cin, v, 3, norm=norm))
                cin = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(512 * 49, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, classes),
        )

    def forward(self, x):
        return self.head(self.pool(self.features(x)))


def resnet18(norm: bool = True) -> nn.Module:
    return ResNet(BasicBlock, (2, 2, 2, 2), norm)


def resnet50(norm: bool = True) -> nn.Module:
    return ResNet(Bottleneck, (3, 4, 6, 3), norm)


def mobilenet_v2(norm: bool = True) -> nn.Module:
    return MobileNetV2(norm)


def vgg11_bn(norm: bool = True) -> nn.Module:
    return VGG(norm)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters (a broken fold then shows)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()
