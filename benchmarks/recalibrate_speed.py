"""Cost of a recalibration pass against the plain inference passes it needs, and against
``torch.optim.swa_utils.update_bn``.

Over the same batches (default 20 of 32 images, ResNet-18 at 112×112) it times:

- torch: plain inference of the traced graph (``inference_mode``); bncheck's batch-statistics
  pass (the work of ``recalibrate``: every BN normalizes with batch statistics and its input's
  float64 moments are merged); ``update_bn`` (train-mode BN, cumulative average, eager model);
  and ``bncheck.recalibrate(…, compare=False)`` end to end from a .npy file (loading, the pass,
  with_stats, no write);
- onnxruntime (ORT_DISABLE_ALL, as bncheck runs it): plain inference of the same model, and
  bncheck's pass (explicit batch-statistics ops, every BN input an extra output).

Target: bncheck's pass ≤ 1.15× plain inference. The rows are timed in interleaved rounds (one
run of each per round, so a busy neighbour slows all of them alike); the table gives the median
and the minimum over ``--repeat`` rounds (on a shared machine the minimum is the better
estimate of the uncontended time).

    python benchmarks/recalibrate_speed.py [--threads 2] [--batches 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models

import bncheck
from bncheck.numerics import Moments
from bncheck.samples import export_onnx_keep_bn


def run_pass(handle, key: str, batches: list[np.ndarray]) -> Callable[[], None]:
    runner = handle.moment_runner(batch_stats=True)

    def go() -> None:
        acc: dict[str, Moments] = {}
        for x in batches:
            _, moments = runner({key: x})
            for k, m in moments.items():
                acc[k] = acc[k] + m if k in acc else m

    return go


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or '?'}; "
        f"python {platform.python_version()}, torch {torch.__version__}, onnxruntime "
        f"{ort.__version__}, numpy {np.__version__}; threads {args.threads}; ResNet-18 at "
        f"{args.size}×{args.size}, {args.batches} batches of {args.batch_size}; median of "
        f"{args.repeat} interleaved rounds"
    )
    model = models.randomize_bn(models.resnet18()).eval()
    rng = np.random.default_rng(0)
    shape = (args.batch_size, 3, args.size, args.size)
    batches = [rng.normal(size=shape).astype(np.float32) for _ in range(args.batches)]

    with tempfile.TemporaryDirectory() as d:
        pt2, onx, npy = Path(d) / "r18.pt2", Path(d) / "r18.onnx", Path(d) / "data.npy"
        np.save(npy, np.concatenate(batches))
        example = torch.from_numpy(batches[0][:2])
        batch = torch.export.Dim("batch", min=1, max=1024)
        ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
        torch.export.save(ep, str(pt2))
        export_onnx_keep_bn(model, example, onx, ["logits"])
        th = bncheck.open_model(pt2)
        oh = bncheck.open_model(onx)
        graph = th.runnable()

        def torch_plain() -> None:
            with torch.inference_mode():
                for x in batches:
                    graph(torch.from_numpy(x))

        def swa_update_bn() -> None:
            from torch.optim.swa_utils import update_bn

            work = models.randomize_bn(models.resnet18())
            update_bn([torch.from_numpy(x) for x in batches], work)

        def api_recalibrate() -> None:
            bncheck.recalibrate(th, data=npy, batch_size=args.batch_size, compare=False)

        sess_opts = ort.SessionOptions()
        sess_opts.intra_op_num_threads = args.threads
        sess_opts.log_severity_level = 3
        sess_opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(str(onx), sess_opts, providers=["CPUExecutionProvider"])

        def ort_plain() -> None:
            for x in batches:
                sess.run(None, {"input": x})

        rows: list[tuple[str, Callable[[], None]]] = [
            ("torch: plain inference (traced graph)", torch_plain),
            ("torch: bncheck recalibration pass", run_pass(th, "x", batches)),
            ("torch: bncheck.recalibrate end to end (compare=False)", api_recalibrate),
            ("torch: swa_utils.update_bn (eager)", swa_update_bn),
            ("onnxruntime: plain inference (ORT_DISABLE_ALL)", ort_plain),
            ("onnxruntime: bncheck recalibration pass", run_pass(oh, "input", batches)),
        ]
        for _, fn in rows:  # warm-up: first-call allocations, lazy tracing, session start
            fn()
        times: dict[str, list[float]] = {label: [] for label, _ in rows}
        for _ in range(args.repeat):
            for label, fn in rows:
                t0 = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - t0)
    med = {label: statistics.median(t) for label, t in times.items()}
    low = {label: min(t) for label, t in times.items()}
    torch_base, ort_base = rows[0][0], rows[4][0]
    print("| pass | median s | × plain | min s | × plain (min) |")
    print("|---|---:|---:|---:|---:|")
    for label, _ in rows:
        base = torch_base if label.startswith("torch") else ort_base
        print(
            f"| {label} | {med[label]:.2f} | {med[label] / med[base]:.2f} | {low[label]:.2f} | "
            f"{low[label] / low[base]:.2f} |"
        )


if __name__ == "__main__":
    main()
