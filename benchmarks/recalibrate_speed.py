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

Target: bncheck's pass ≤ 1.15× plain inference. Two tables:

- totals: each row over all batches, rows interleaved, median and minimum over ``--repeat``;
- paired: the pass against plain inference of the same batch, alternating batch by batch
  (``bncheck.bench.compare`` with one call per round, ``--rounds`` × ``--batches`` rounds, each
  batch as often on both sides), giving the ratio with a 95% bootstrap CI. Whole 20-batch
  passes on a shared 2-core machine drift by 10-40% from one to the next, so alternating at the
  finest grain is what makes the figure quotable.

    python benchmarks/recalibrate_speed.py [--threads 2] [--batches 20] [--repeat 3] [--rounds 10]
"""

from __future__ import annotations

import argparse
import logging
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
from bncheck.bench import compare
from bncheck.numerics import Moments
from bncheck.sample_export import export_onnx_keep_bn, export_pt2


def whole(step: Callable[[np.ndarray], None], batches: list[np.ndarray]) -> Callable[[], None]:
    """One call = ``step`` on every batch in turn."""

    def go() -> None:
        for x in batches:
            step(x)

    return go


def cycling(step: Callable[[np.ndarray], None], batches: list[np.ndarray]) -> Callable[[], None]:
    """One call = ``step`` on the next batch, round-robin."""
    state = {"i": 0}

    def go() -> None:
        step(batches[state["i"] % len(batches)])
        state["i"] += 1

    return go


def paired_rows(rows, batches: list[np.ndarray], rounds: int) -> list[str]:
    out = ["| pass | reference | ms per batch | reference ms | ratio | 95% CI |",
           "|---|---|---:|---:|---:|---|"]  # fmt: skip
    for label, ref_label, step, ref_step in rows:
        cmp = compare(
            cycling(ref_step, batches), cycling(step, batches),
            rounds=rounds * len(batches), iters_per_round=1, warmup=len(batches),
        )  # fmt: skip
        out.append(
            f"| {label} | {ref_label} | {cmp.b.median * 1e3:.1f} | {cmp.a.median * 1e3:.1f} | "
            f"{cmp.ratio:.3f} | [{cmp.ci_low:.3f}, {cmp.ci_high:.3f}] |"
            + ("  NOISY" if cmp.noisy else "")
        )
    return out


def pass_step(handle, key: str) -> Callable[[np.ndarray], None]:
    """One batch of the recalibration pass, moments merged into a running total."""
    runner = handle.moment_runner(batch_stats=True)
    acc: dict[str, Moments] = {}

    def step(x: np.ndarray) -> None:
        _, moments = runner({key: x})
        for k, m in moments.items():
            acc[k] = acc[k] + m if k in acc else m

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10, help="paired A/B rounds")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed"
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
        export_pt2(model, example, pt2)
        export_onnx_keep_bn(model, example, onx, ["logits"])
        th = bncheck.open_model(pt2)
        oh = bncheck.open_model(onx)
        graph = th.runnable()

        def torch_plain(x: np.ndarray) -> None:
            with torch.inference_mode():
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

        def ort_plain(x: np.ndarray) -> None:
            sess.run(None, {"input": x})

        torch_pass, ort_pass = pass_step(th, "x"), pass_step(oh, "input")
        rows: list[tuple[str, Callable[[], None]]] = [
            ("torch: plain inference (traced graph)", whole(torch_plain, batches)),
            ("torch: bncheck recalibration pass", whole(torch_pass, batches)),
            ("torch: bncheck.recalibrate end to end (compare=False)", api_recalibrate),
            ("torch: swa_utils.update_bn (eager)", swa_update_bn),
            ("onnxruntime: plain inference (ORT_DISABLE_ALL)", whole(ort_plain, batches)),
            ("onnxruntime: bncheck recalibration pass", whole(ort_pass, batches)),
        ]
        for _, fn in rows:  # warm-up: first-call allocations, lazy tracing, session start
            fn()
        times: dict[str, list[float]] = {label: [] for label, _ in rows}
        for _ in range(args.repeat):
            for label, fn in rows:
                t0 = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - t0)
        paired = paired_rows(
            [
                ("torch: bncheck recalibration pass", "torch plain", torch_pass, torch_plain),
                ("onnxruntime: bncheck recalibration pass", "ORT plain", ort_pass, ort_plain),
            ],
            batches,
            args.rounds,
        )  # fmt: skip
    med = {label: statistics.median(t) for label, t in times.items()}
    low = {label: min(t) for label, t in times.items()}
    torch_base, ort_base = rows[0][0], rows[4][0]
    print(f"\ntotals over {args.batches} batches, {args.repeat} interleaved repeats")
    print("| pass | median s | × plain | min s | × plain (min) |")
    print("|---|---:|---:|---:|---:|")
    for label, _ in rows:
        base = torch_base if label.startswith("torch") else ort_base
        print(
            f"| {label} | {med[label]:.2f} | {med[label] / med[base]:.2f} | {low[label]:.2f} | "
            f"{low[label] / low[base]:.2f} |"
        )
    print(f"\npaired: {args.rounds * args.batches} alternating A/B rounds of one batch")
    print("\n".join(paired))


if __name__ == "__main__":
    main()
