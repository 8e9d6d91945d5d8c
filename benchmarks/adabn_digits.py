"""AdaBN-style experiment: does recalibrating BN on shifted, unlabelled data restore accuracy?

Data: scikit-learn's bundled handwritten digits (1,797 8×8 images; shipped with the package, no
download). A small BN CNN is trained on the first 1,000 images. The other 797 are shifted the
way a new camera or preprocessing shifts them (gain, offset, blur, noise), bncheck recalibrates
the BN statistics on the shifted images without their labels (``bncheck.recalibrate``), and
accuracy on them is compared before and after — for the .pt2 and the ONNX form.

    pip install scikit-learn   # only this benchmark needs it
    python benchmarks/adabn_digits.py
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import bncheck
from bncheck.samples import export_onnx_keep_bn


def net() -> nn.Module:
    def block(cin, cout):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        )

    return nn.Sequential(
        block(1, 16), block(16, 32), nn.MaxPool2d(2), block(32, 64), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


def shifts(x: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    blur = (x + np.roll(x, 1, 2) + np.roll(x, 1, 3) + np.roll(x, (1, 1), (2, 3))) / 4
    return {
        "gain 0.4, offset +0.5": x * 0.4 + 0.5,
        "gain 2.0, offset -0.8": x * 2.0 - 0.8,
        "blur + offset +0.3": blur + 0.3,
        "noise σ=0.3 + offset +0.4": x + rng.normal(0, 0.3, x.shape) + 0.4,
    }


def accuracy(handle, x: np.ndarray, y: np.ndarray, key: str) -> float:
    return float((handle.run({key: x.astype(np.float32)})[0].argmax(1) == y).mean())


def main() -> None:
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # N×1×8×8 in [0, 1]
    x = (x - x.mean()) / x.std()
    y = digits.target
    xtr, ytr, xte, yte = x[:1000], y[:1000], x[1000:], y[1000:]

    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):  # epochs of 1000 images, batch 50
        perm = rng.permutation(1000)
        for i in range(0, 1000, 50):
            idx = perm[i : i + 50]
            loss = nn.functional.cross_entropy(
                model(torch.from_numpy(xtr[idx])), torch.from_numpy(ytr[idx])
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    print(f"machine: {platform.machine()}; torch {torch.__version__}; digits: train 1000, test 797")
    print("| test data | form | accuracy before | after recalibration |")
    print("|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        example = torch.from_numpy(xtr[:2])
        batch = torch.export.Dim("batch", min=1, max=4096)
        ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
        torch.export.save(ep, str(tmp / "m.pt2"))
        export_onnx_keep_bn(model, example, tmp / "m.onnx", ["logits"])
        forms = {"pt2": (bncheck.open_model(tmp / "m.pt2"), "x"),
                 "onnx": (bncheck.open_model(tmp / "m.onnx"), "input")}  # fmt: skip
        cases = {"clean": xte, **shifts(xte, rng)}
        for label, data in cases.items():
            path = tmp / "shifted.npy"
            np.save(path, data.astype(np.float32))
            for form, (handle, key) in forms.items():
                before = accuracy(handle, data, yte, key)
                result = bncheck.recalibrate(handle, data=path, batch_size=64, compare=False)
                after = accuracy(result.handle, data, yte, key)
                print(f"| {label} | {form} | {before:.1%} | {after:.1%} |")


if __name__ == "__main__":
    main()
