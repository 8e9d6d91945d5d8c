"""Cost of a recalibration pass against the plain inference passes it needs, and against
``torch.optim.swa_utils.update_bn``.

Over the same 20 batches it times, for a ResNet-18 at 112×112, batch 32:

- torch: plain inference (``inference_mode``), bncheck's batch-statistics pass (the work of
  ``recalibrate``: every BN normalizes with batch statistics and its input's float64 moments are
  merged), and ``update_bn`` (which runs the model in train mode with a cumulative average);
- onnxruntime: plain inference of the same model, and bncheck's pass.

Target: bncheck's pass ≤ 1.15× plain inference.
Each figure is the median of ``--repeat`` round-robin runs.

    python benchmarks/recalibrate_speed.py [--threads 2] [--batches 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models

import bncheck
from bncheck.numerics import Moments
from bncheck.samples import export_onnx_keep_bn


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
        f"machine: {platform.machine()}; python {platform.python_version()}, torch "
        f"{torch.__version__}, onnxruntime {ort.__version__}; threads {args.threads}; "
        f"ResNet-18 at {args.size}×{args.size}, {args.batches} batches of {args.batch_size}"
    )
    model = models.randomize_bn(models.resnet18())
    rng = np.random.default_rng(0)
    shape = (args.batch_size, 3, args.size, args.size)
    batches = [rng.normal(size=shape).astype(np.float32) for _ in range(args.batches)]

    with tempfile.TemporaryDirectory() as d:
        pt2, onx = Path(d) / "r18.pt2", Path(d) / "r18.onnx"
        example = torch.from_numpy(batches[0][:2])
        batch = torch.export.Dim("batch", min=1, max=1024)
        ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
        torch.export.save(ep, str(pt2))
        export_onnx_keep_bn(model, example, onx, ["logits"])
        th = bncheck.open_model(pt2)
        oh = bncheck.open_model(onx)

        def torch_plain():
            with torch.inference_mode():
                for x in batches:
                    model(torch.from_numpy(x))

        def run_pass(handle, key):
            runner = handle.moment_runner(batch_stats=True)

            def go():
                acc: dict[str, Moments] = {}
                for x in batches:
                    _, moments = runner({key: x})
                    for k, m in moments.items():
                        acc[k] = acc[k] + m if k in acc else m

            return go

        def swa_update_bn():
            from torch.optim.swa_utils import update_bn

            work = models.randomize_bn(models.resnet18())
            update_bn([torch.from_numpy(x) for x in batches], work)

        sess_opts = ort.SessionOptions()
        sess_opts.intra_op_num_threads = args.threads
        sess_opts.log_severity_level = 3
        sess_opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(str(onx), sess_opts, providers=["CPUExecutionProvider"])

        def ort_plain():
            for x in batches:
                sess.run(None, {"input": x})

        passes = [
            ("torch: plain inference", torch_plain),
            ("torch: bncheck recalibration pass", run_pass(th, "x")),
            ("torch: swa_utils.update_bn", swa_update_bn),
            ("onnxruntime: plain inference (ORT_DISABLE_ALL)", ort_plain),
            ("onnxruntime: bncheck recalibration pass", run_pass(oh, "input")),
        ]
        # Round-robin repeats, so slow drift of the machine hits every pass alike.
        times: dict[str, list[float]] = {label: [] for label, _ in passes}
        for _ in range(args.repeat):
            for label, fn in passes:
                times[label].append(timed(fn, 1))
        rows = [(label, statistics.median(ts)) for label, ts in times.items()]
    print("| pass | seconds | × plain inference |")
    print("|---|---:|---:|")
    for label, secs in rows:
        base = rows[0][1] if label.startswith("torch") else rows[3][1]
        print(f"| {label} | {secs:.2f} | {secs / base:.2f} |")


if __name__ == "__main__":
    main()
