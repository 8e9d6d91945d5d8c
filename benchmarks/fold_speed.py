"""Latency of BN folding against its alternatives and the floor, and fold time.

For a ResNet-18-sized and a MobileNetV2-sized model at 224×224, batch 1 and 16, on a fixed number
of threads, it times:

- torch: the model with BN, ``torch.fx``'s ``fuse`` and the same network built without BN (the
  floor), eager; bncheck's folded ``.pt2`` against the floor exported to ``.pt2`` (both run as
  ``ep.module()``, so the comparison is like for like);
- onnxruntime at its default optimization level: the unfolded ONNX (ORT fuses Conv+BN itself),
  bncheck's folded ONNX, and the floor's ONNX.

Each candidate is compared with the floor in interleaved A/B rounds (``bncheck.bench.compare``),
so the ratio and its 95% CI are what the README quotes. Then it times ``handle.folded()`` on a
ResNet-50-sized model (target < 2 s beyond loading).

    python benchmarks/fold_speed.py [--threads 2] [--rounds 12] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models

import bncheck
from bncheck.bench import compare
from bncheck.sample_export import export_onnx_keep_bn, export_pt2


def torch_runner(module, x):
    def run():
        with torch.inference_mode():
            module(x)

    return run


def ort_runner(path: Path, x: np.ndarray, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda: sess.run(None, {name: x})


def row(label: str, ref_label: str, cmp) -> str:
    a, b = cmp.a, cmp.b
    flag = "  NOISY" if cmp.noisy else ""
    return (
        f"| {label} | {b.median * 1e3:8.2f} | {ref_label} | {a.median * 1e3:8.2f} "
        f"| {cmp.ratio:5.3f} "
        f"| [{cmp.ci_low:5.3f}, {cmp.ci_high:5.3f}] |{flag}"
    )


def bench_model(name: str, factory, batch: int, threads: int, rounds: int, tmp: Path) -> list[str]:
    torch.manual_seed(0)
    with_bn = models.randomize_bn(factory(norm=True))
    floor = factory(norm=False).eval()
    example = torch.randn(2, 3, 224, 224)  # batch 2: a dynamic batch must not specialize to 1
    x = torch.randn(batch, 3, 224, 224)
    xn = x.numpy()

    src_pt2, src_onnx, floor_onnx = (
        tmp / f"{name}.pt2",
        tmp / f"{name}.onnx",
        tmp / f"{name}_floor.onnx",
    )
    export_pt2(with_bn, example, src_pt2)
    export_onnx_keep_bn(with_bn, example, src_onnx, ["logits"])
    export_onnx_keep_bn(floor, example, floor_onnx, ["logits"])
    fold_pt2 = bncheck.fold(src_pt2, tmp / f"{name}_folded.pt2", verify=False).output
    fold_onnx = bncheck.fold(src_onnx, tmp / f"{name}_folded.onnx", verify=False).output
    folded_module = bncheck.open_model(fold_pt2).module
    # A .pt2 runs as ep.module(), a GraphModule whose call costs more than an eager module's;
    # the fair floor for the folded .pt2 is the floor exported and loaded the same way.
    floor_pt2 = tmp / f"{name}_floor.pt2"
    export_pt2(floor, example, floor_pt2)
    floor_pt2_module = torch.export.load(str(floor_pt2)).module()

    from torch.fx.experimental.optimization import fuse

    fx_fused = fuse(with_bn)
    eager_floor = torch_runner(floor, x)
    pt2_floor = torch_runner(floor_pt2_module, x)
    ort_floor = ort_runner(floor_onnx, xn, threads)
    cases = (
        ("torch eager, with BN", torch_runner(with_bn, x), "eager floor", eager_floor),
        ("torch eager, torch.fx fuse", torch_runner(fx_fused, x), "eager floor", eager_floor),
        ("torch eager, floor (built without BN)", eager_floor, "eager floor", eager_floor),
        ("torch .pt2, floor (exported)", pt2_floor, "eager floor", eager_floor),
        ("torch .pt2, bncheck fold", torch_runner(folded_module, x), ".pt2 floor", pt2_floor),
        ("onnxruntime, with BN (ORT fuses it)", ort_runner(src_onnx, xn, threads), "ORT floor",
         ort_floor),
        ("onnxruntime, bncheck fold (.onnx)", ort_runner(fold_onnx, xn, threads), "ORT floor",
         ort_floor),
        ("onnxruntime, floor (built without BN)", ort_floor, "ORT floor", ort_floor),
    )  # fmt: skip
    rows = []
    for label, runner, ref_label, ref in cases:
        cmp = compare(ref, runner, rounds=rounds, iters_per_round=3)
        rows.append(row(label, ref_label, cmp))
    return rows


def fold_time(tmp: Path) -> tuple[float, float, int]:
    model = models.randomize_bn(models.resnet50(norm=True))
    path = tmp / "resnet50.pt2"
    export_pt2(model, torch.randn(2, 3, 224, 224), path)
    t0 = time.perf_counter()
    handle = bncheck.open_model(path)
    handle.info()
    t1 = time.perf_counter()
    _, steps = handle.folded()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, sum(s.into is not None for s in steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="batch 1 only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed"
    import onnxruntime

    print(
        f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; "
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}; threads {args.threads}"
    )
    batches = (1,) if args.quick else (1, 16)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, factory in (("resnet18", models.resnet18), ("mobilenet_v2", models.mobilenet_v2)):
            for batch in batches:
                print(f"\n{name}, batch {batch}, 224×224 — candidate / reference")
                print("| variant | median ms | reference | ref ms | ratio | 95% CI |")
                print("|---|---:|---|---:|---:|---|")
                for line in bench_model(name, factory, batch, args.threads, args.rounds, tmp):
                    print(line)
        load_s, fold_s, n = fold_time(tmp)
        print(
            f"\nResNet-50 .pt2: load+discover {load_s:.2f} s, fold {fold_s:.2f} s ({n} BN folded)"
        )


if __name__ == "__main__":
    main()
