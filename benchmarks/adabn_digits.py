"""AdaBN on scikit-learn's digits: accuracy under an input shift, before and after
``bncheck.recalibrate`` on unlabelled shifted data.

A small BN CNN is trained on clean digits (8×8, scaled to [0, 1]). The held-out digits are
split in two: an *adaptation* half, shifted and given to ``bncheck.recalibrate`` without labels,
and an *evaluation* half, shifted the same way, on which accuracy is measured with the model's
stored statistics (before) and with the recalibrated ones (after). Shifts are per-image
intensity changes a sensor or a preprocessing change would cause (``x' = gain·x + offset``,
contrast about the image mean, additive noise). The .pt2 and the .onnx forms of the model are
recalibrated separately; both must give the same accuracy.

    python benchmarks/adabn_digits.py [--epochs 30] [--seed 0]

Needs scikit-learn (its digits data set ships with the package: no download).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import bncheck
from bncheck.sample_export import export_onnx_keep_bn, export_pt2


class DigitsNet(nn.Module):
    """conv-BN-ReLU ×2, pool, conv-BN-ReLU, global average, linear: 8×8 → 10 classes."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


SHIFTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "none": lambda x, rng: x,
    "gain 2, offset −0.5": lambda x, rng: 2.0 * x - 0.5,
    "dim: gain 0.4, offset +0.3": lambda x, rng: 0.4 * x + 0.3,
    "contrast ×0.5 about the image mean": lambda x, rng: (
        0.5 * (x - x.mean(axis=(1, 2, 3), keepdims=True)) + x.mean(axis=(1, 2, 3), keepdims=True)
    ),
    "brightness +0.5": lambda x, rng: x + 0.5,
    "gaussian noise σ=0.3": lambda x, rng: x + rng.normal(0, 0.3, size=x.shape),
}


def load_digits(seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # N×1×8×8 in [0, 1]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    # 1000 train, then the rest split into adaptation (unlabelled) and evaluation halves
    n_adapt = (len(x) - 1000) // 2
    return x[:1000], y[:1000], x[1000 : 1000 + n_adapt], x[1000 + n_adapt :], y[1000 + n_adapt :]


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(50):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()


def accuracy(handle, x: np.ndarray, y: np.ndarray) -> float:
    key = handle.info().inputs[0].name
    logits = handle.run({key: x.astype(np.float32)})[0]
    return float((logits.argmax(axis=1) == y).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(2)
    import onnxruntime as ort
    import sklearn

    x_tr, y_tr, x_adapt, x_ev, y_ev = load_digits(args.seed)
    print(
        f"machine: {platform.machine()}; python {platform.python_version()}, torch "
        f"{torch.__version__}, onnxruntime {ort.__version__}, scikit-learn {sklearn.__version__}; "
        f"digits: {len(x_tr)} train, {len(x_adapt)} unlabelled adaptation, {len(x_ev)} "
        f"evaluation; recalibration batch {args.batch_size}"
    )
    torch.manual_seed(args.seed)  # the initial weights too: the table must be reproducible
    model = DigitsNet()
    t0 = time.perf_counter()
    train(model, x_tr, y_tr, args.epochs, args.seed)
    print(f"trained {args.epochs} epochs in {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(args.seed + 1)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        example = torch.from_numpy(x_tr[:2])
        export_pt2(model, example, folder / "digits.pt2")
        export_onnx_keep_bn(model, example, folder / "digits.onnx", ["logits"])
        handles = {f: bncheck.open_model(folder / f"digits.{f}") for f in ("pt2", "onnx")}
        for label, shift in SHIFTS.items():
            adapt = shift(x_adapt, rng).astype(np.float32)
            evaluate = shift(x_ev, rng).astype(np.float32)
            np.save(folder / "adapt.npy", adapt)
            row = [label]
            for handle in handles.values():
                before = accuracy(handle, evaluate, y_ev)
                t0 = time.perf_counter()
                result = bncheck.recalibrate(
                    handle, data=folder / "adapt.npy", batch_size=args.batch_size, compare=False
                )
                secs = time.perf_counter() - t0
                after = accuracy(result.handle, evaluate, y_ev)
                row += [before, after, secs]
            rows.append(row)
    print()
    print("| shift | .pt2 before | .pt2 after | s | .onnx before | .onnx after | s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, b1, a1, s1, b2, a2, s2 in rows:
        print(f"| {label} | {b1:.1%} | {a1:.1%} | {s1:.2f} | {b2:.1%} | {a2:.1%} | {s2:.2f} |")


if __name__ == "__main__":
    main()
