"""Build the committed sample models and data: ``python -m bncheck.samples [OUTDIR]``.

Three models, each with a factory usable as ``--arch bncheck.samples:<factory>`` (called with no
arguments; the module carries ``example_input_shape``, batch 1):

* ``small_resnet`` — a trained ResNet-style CNN on synthetic gratings, with exact statistics;
* ``bn_patterns`` — one branch per BN placement folding must handle, statistics randomized;
* ``broken_model`` — BN layers carrying every flaw ``inspect`` looks for, saved in train mode.

The models, the data and the exact-statistics pass live here (tests and ``--arch`` import
them); training, export and writing the files are in ``bncheck.sample_export``.

Everything is seeded and runs single-threaded with deterministic algorithms, so a rerun on the
same machine writes byte-identical state dicts and ``.npy`` files.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "PATTERN_FOLDS",
    "BNPatterns",
    "BrokenModel",
    "SmallResNet",
    "bn_patterns",
    "broken_model",
    "exact_bn_statistics",
    "main",
    "make_gratings",
    "small_resnet",
]

RESNET_SIZE = (
    24  # 3×24×24 keeps 256 float32 calibration images at 1.8 MB (the folder must be < 4 MB)
)
NUM_CLASSES = 10
OPSET = 18


# ---------------------------------------------------------------------------------------------
# models


class BasicBlock(nn.Module):
    """Two 3×3 Conv-BN, ReLU between; a 1×1 Conv+BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem Conv-BN-ReLU, stages of 8/16/32 channels (the last two downsample), GAP, Linear."""

    example_input_shape = (1, 3, RESNET_SIZE, RESNET_SIZE)

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.layer3 = BasicBlock(16, 32, 2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(y.mean(dim=(2, 3)))


class BNPatterns(nn.Module):
    """Every BN placement folding must handle, one branch each; outputs flattened and joined.

    The expected fold of each BN is ``PATTERN_FOLDS`` (with reasons in ``sample_models/README.md``).
    """

    example_input_shape = (1, 4, 16, 16)

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(4, 6, 3)
        self.bn_conv1d = nn.BatchNorm1d(6)
        self.conv_bias = nn.Conv2d(4, 6, 3, padding=1)
        self.bn_conv_bias = nn.BatchNorm2d(6)
        self.conv_nobias = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn_conv_nobias = nn.BatchNorm2d(6)
        self.conv3d = nn.Conv3d(1, 3, 3, padding=1)
        self.bn_conv3d = nn.BatchNorm3d(3)
        self.conv_depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.bn_depthwise = nn.BatchNorm2d(4)
        self.conv_grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.bn_grouped = nn.BatchNorm2d(6)
        self.convt = nn.ConvTranspose2d(4, 6, 2, stride=2)
        self.bn_convtranspose = nn.BatchNorm2d(6)
        self.convt_grouped = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.bn_convtranspose_grouped = nn.BatchNorm2d(6)
        self.linear = nn.Linear(64, 16)
        self.bn_linear = nn.BatchNorm1d(16)
        self.bn_before_conv = nn.BatchNorm2d(4)
        self.conv_after_bn = nn.Conv2d(4, 6, 3, padding=0)
        self.bn_before_padded_conv = nn.BatchNorm2d(4)
        self.conv_padded_after_bn = nn.Conv2d(4, 6, 3, padding=1)
        self.bn_relu = nn.BatchNorm2d(4)
        self.conv_fanout = nn.Conv2d(4, 6, 3)
        self.bn_fanout = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fan = self.conv_fanout(x)
        outs = [
            self.bn_conv1d(self.conv1d(x.flatten(2))),
            self.bn_conv_bias(self.conv_bias(x)),
            self.bn_conv_nobias(self.conv_nobias(x)),
            self.bn_conv3d(self.conv3d(x.unsqueeze(1))),
            self.bn_depthwise(self.conv_depthwise(x)),
            self.bn_grouped(self.conv_grouped(x)),
            self.bn_convtranspose(self.convt(x)),
            self.bn_convtranspose_grouped(self.convt_grouped(x)),
            self.bn_linear(self.linear(nn.functional.avg_pool2d(x, 4).flatten(1))),
            self.conv_after_bn(self.bn_before_conv(x)),
            self.conv_padded_after_bn(self.bn_before_padded_conv(x)),
            torch.relu(self.bn_relu(x)),
            self.bn_fanout(fan),
            torch.relu(fan),  # the second reader of the conv output: bn_fanout cannot fold
        ]
        return torch.cat([o.flatten(1) for o in outs], dim=1)


# Expected fold of each BN in BNPatterns: (into, target module), None where it cannot fold.
# sample_models/README.md tabulates the same with the reasons.
PATTERN_FOLDS: dict[str, tuple[str | None, str | None]] = {
    "bn_conv1d": ("producer", "conv1d"),
    "bn_conv_bias": ("producer", "conv_bias"),
    "bn_conv_nobias": ("producer", "conv_nobias"),
    "bn_conv3d": ("producer", "conv3d"),
    "bn_depthwise": ("producer", "conv_depthwise"),
    "bn_grouped": ("producer", "conv_grouped"),
    "bn_convtranspose": ("producer", "convt"),
    "bn_convtranspose_grouped": ("producer", "convt_grouped"),
    "bn_linear": ("producer", "linear"),
    "bn_before_conv": ("consumer", "conv_after_bn"),
    "bn_before_padded_conv": (None, None),  # the consumer pads with zeros the BN never saw
    "bn_relu": (None, None),  # no weighted neighbour
    "bn_fanout": (None, None),  # the producer's output has a second reader
}


class BrokenModel(nn.Module):
    """A chain of Conv-BN pairs whose BN layers carry one flaw each (set by ``_break``).

    Returns ``(output, half_output)``: the float32 trunk, and the float16 sub-block cast back.
    """

    example_input_shape = (1, 3, 16, 16)

    def __init__(self) -> None:
        super().__init__()
        c = 8
        self.conv0 = nn.Conv2d(3, c, 3, padding=1)
        self.bn_uncalibrated = nn.BatchNorm2d(c)
        names = ["tiny_var", "bad_var", "dead", "extreme_scale", "fp16_overflow_var", "shared"]
        for i, name in enumerate(names, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(c, c, 3, padding=1))
            setattr(self, f"bn_{name}", nn.BatchNorm2d(c))
        self.conv_no_track = nn.Conv2d(c, c, 3, padding=1)
        self.bn_no_track = nn.BatchNorm2d(c, track_running_stats=False)
        self.conv_shared_again = nn.Conv2d(c, c, 1)
        # A half-precision sub-block: cast in, Conv+BN in float16, cast out.
        self.conv_half = nn.Conv2d(c, c, 3, padding=1).half()
        self.bn_half = nn.BatchNorm2d(c).half()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(self.bn_uncalibrated(self.conv0(x)))
        y = torch.relu(self.bn_tiny_var(self.conv1(y)))
        y = torch.relu(self.bn_bad_var(self.conv2(y)))
        y = torch.relu(self.bn_dead(self.conv3(y)))
        y = torch.relu(self.bn_fp16_overflow_var(self.conv5(y)))
        y = torch.relu(self.bn_no_track(self.conv_no_track(y)))
        y = torch.relu(self.bn_shared(self.conv6(y)))
        y = self.bn_shared(self.conv_shared_again(y))  # the same module, a second call site
        half = self.bn_half(self.conv_half(y.half())).float()
        out = self.bn_extreme_scale(self.conv4(y))
        return out, half


def small_resnet() -> SmallResNet:
    """Factory for ``--arch bncheck.samples:small_resnet`` (untrained, eval mode)."""
    return SmallResNet().eval()


def bn_patterns() -> BNPatterns:
    """Factory for ``--arch bncheck.samples:bn_patterns`` (eval mode)."""
    return BNPatterns().eval()


def broken_model() -> BrokenModel:
    """Factory for ``--arch bncheck.samples:broken_model``, in **train** mode on purpose."""
    return BrokenModel().train()


# ---------------------------------------------------------------------------------------------
# data and statistics


def make_gratings(n: int, seed: int, size: int = RESNET_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic 10-class images: class k is a grating at angle k·18° (period 6 px, random phase,
    i.e. a random shift) tinted with one of 5 colours (class mod 5), plus Gaussian noise σ=0.35
    and a per-image brightness offset. Returns (float32 N×3×size×size, int64 labels)."""
    rng = np.random.default_rng(seed)
    palette = np.array(
        [[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.2, 0.2, 1.0], [1.0, 1.0, 0.2], [0.2, 1.0, 1.0]]
    )
    labels = rng.integers(0, NUM_CLASSES, n)
    theta = labels * math.pi / NUM_CLASSES + rng.normal(0.0, 0.04, n)
    phase = rng.uniform(0.0, 2 * math.pi, n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    along = xx[None] * np.cos(theta)[:, None, None] + yy[None] * np.sin(theta)[:, None, None]
    grating = np.cos(2 * math.pi / 6.0 * along + phase[:, None, None])
    amp = rng.uniform(0.7, 1.3, n)[:, None, None, None]
    img = amp * palette[labels % 5][:, :, None, None] * grating[:, None]
    img += rng.uniform(-0.3, 0.6, (n, 1, 1, 1)) + rng.normal(0.0, 0.35, img.shape)
    return img.astype(np.float32), labels.astype(np.int64)


def _batches(data: np.ndarray | torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    t = torch.as_tensor(data)
    for start in range(0, t.shape[0], batch_size):
        yield t[start : start + batch_size]


def exact_bn_statistics(
    model: nn.Module, data: np.ndarray | torch.Tensor, batch_size: int = 32
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Set every BN's running statistics to the exact population moments of its input.

    Semantics (``bncheck recalibrate`` reproduces them): ``data`` (N×…, first axis = samples) is
    cut in file order into batches of ``batch_size`` (the last may be shorter) and run forward
    once, under ``torch.no_grad``, with every ``_BatchNorm`` that tracks running statistics in
    train mode — so it normalizes by its own batch statistics, exactly as during training — and
    every other module in eval mode. Each call of a BN contributes its *input* x (every call when
    a module is used twice); per channel c, over all other axes, in float64::

        batch:   n_b = numel(x)/C,  m_b = mean(x_c),  M2_b = Σ (x_c − m_b)²
        merge:   δ = m_b − m,  n' = n + n_b,  m += δ·n_b/n',  M2 += M2_b + δ²·n·n_b/n'  (Chan)

    then ``running_mean = m``, ``running_var = M2/(n − 1)`` (unbiased, PyTorch's convention),
    ``num_batches_tracked = number of batches``, each stored in the buffer's own dtype. Weights,
    affine parameters, and the modules' train/eval flags are left as they were; BN layers with
    ``track_running_stats=False`` are skipped. Returns ``{module name: (mean, var_unbiased)}`` as
    float64 arrays.
    """
    bns = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
    }
    acc: dict[str, list[Any]] = {name: [0, None, None] for name in bns}  # n, mean, M2

    def hook(name: str):
        def pre(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().to(torch.float64)
            xc = x.transpose(0, 1).reshape(x.shape[1], -1).numpy()
            n_b = xc.shape[1]
            m_b = xc.mean(axis=1)
            m2_b = ((xc - m_b[:, None]) ** 2).sum(axis=1)
            n, m, m2 = acc[name]
            if m is None:
                acc[name] = [n_b, m_b, m2_b]
                return
            delta = m_b - m
            total = n + n_b
            acc[name] = [total, m + delta * n_b / total, m2 + m2_b + delta**2 * n * n_b / total]

        return pre

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(hook(name)) for name, m in bns.items()]
    batches = 0
    try:
        model.eval()
        for m in bns.values():
            m.train()
        with torch.no_grad():
            for batch in _batches(data, batch_size):
                model(batch.to(next(model.parameters()).dtype))
                batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, flag in modes.items():
            m.train(flag)
    result: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with torch.no_grad():
        for name, m in bns.items():
            n, mean, m2 = acc[name]
            if mean is None:  # never called in forward: leave it alone
                continue
            var = m2 / (n - 1)
            m.running_mean.copy_(torch.from_numpy(mean))
            m.running_var.copy_(torch.from_numpy(var))
            m.num_batches_tracked.fill_(batches)
            result[name] = (mean, var)
    return result


def main(argv: list[str] | None = None) -> int:
    """Regenerate every sample into OUTDIR (default ``sample_models``) and print a summary."""
    from bncheck.sample_export import build_all

    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "sample_models")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    resnet, patterns, broken = build_all(out)
    print(f"samples written to {out} in {time.perf_counter() - start:.1f} s")
    total = 0
    for f in sorted(p for p in out.iterdir() if p.is_file() and p.name != "README.md"):
        total += f.stat().st_size
        print(f"  {f.name:<24} {f.stat().st_size / 1024:8.1f} KiB")
    print(f"  total {total / 1024:.1f} KiB")
    print(f"resnet: {resnet['bn']} BN layers, accuracy on resnet_calib {resnet['accuracy']:.3f}")
    print(f"patterns: {patterns['bn']} BN layers; broken: {broken['bn']} BN layers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
