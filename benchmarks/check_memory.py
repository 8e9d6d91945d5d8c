"""Peak memory of ``bncheck check`` streaming 10,000 samples, against one batch's activations.

    python benchmarks/check_memory.py [--samples 10000] [--batch-size 32] [--model M.onnx]

Writes ``samples`` inputs for the sample ResNet (its calibration images, repeated) to a
temporary .npy, then runs ``check`` in a fresh child process and reports:

- ``activations``: bytes of every intermediate tensor of ONE batch (the ONNX graph run with
  every node output exposed), the figure the streaming claim is measured against;
- ``peak anon RSS delta``: the highest anonymous resident memory (``RssAnon``, sampled every
  millisecond) during the full run, minus the level after a warm-up run of 2 batches on the
  same handle. Anonymous only: the data file is memory-mapped, and its page-cache pages count
  in RSS without being allocated by bncheck;
- ``tracemalloc peak``: the Python/numpy allocations of the full run (onnxruntime's own
  allocations are not traced; the RSS figure includes them).

Target: peak anon RSS delta < 2 × activations. The data file itself is printed for scale: a
run that loaded it would show a delta of at least its size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PeakSampler:
    """Highest RssAnon seen by a background thread polling every ``interval`` seconds."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def activation_bytes(model_path: Path, batch: np.ndarray) -> int:
    """Bytes of every node output of one forward pass on ``batch`` (input excluded)."""
    import onnx

    from bncheck.backends.onnx.run import make_session

    model = onnx.load(str(model_path))
    existing = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for out in node.output:
            if out and out not in existing:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(out))
                existing.add(out)
    session = make_session(model, source=str(model_path))
    name = session.get_inputs()[0].name
    return sum(int(np.asarray(v).nbytes) for v in session.run(None, {name: batch}))


def child(model: Path, data: Path, batch_size: int) -> dict:
    import gc

    from bncheck.api._check import check
    from bncheck.api._common import open_model

    handle = open_model(model)
    handle.info()
    check(handle, data=data, batch_size=batch_size, max_batches=2)  # warm-up: imports, kernels
    gc.collect()
    base = rss_anon()
    tracemalloc.start()
    t0 = time.perf_counter()
    with PeakSampler() as sampler:
        result = check(handle, data=data, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "samples": result.samples,
        "batches": result.batches,
        "seconds": seconds,
        "rss_anon_base": base,
        "rss_anon_peak_delta": sampler.peak - base,
        "tracemalloc_peak": traced_peak,
        "findings": [f.code for f in result.findings],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", type=Path, default=SAMPLES / "resnet.onnx")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "DATA"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]), args.batch_size)))
        return

    calib = np.load(SAMPLES / "resnet_calib.npy")
    acts = activation_bytes(args.model, calib[: args.batch_size])
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.npy"
        out = np.lib.format.open_memmap(
            data, mode="w+", dtype=np.float32, shape=(args.samples, *calib.shape[1:])
        )
        for start in range(0, args.samples, len(calib)):
            stop = min(start + len(calib), args.samples)
            out[start:stop] = calib[: stop - start]
        out.flush()
        del out
        size = data.stat().st_size
        batch_opt = ["--batch-size", str(args.batch_size)]
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(args.model), str(data), *batch_opt],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
        )
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 1 / 2**20
    ratio = r["rss_anon_peak_delta"] / acts
    found = ", ".join(r["findings"]) or "none"
    print(
        f"model {args.model.name}, {r['samples']} samples in {r['batches']} batches of "
        f"{args.batch_size}, {r['seconds']:.1f} s; findings: {found}"
    )
    print(f"data file                      {size * mib:8.1f} MiB (memory-mapped)")
    print(f"activations of one batch       {acts * mib:8.1f} MiB")
    print(
        f"peak anon RSS delta            {r['rss_anon_peak_delta'] * mib:8.1f} MiB "
        f"= {ratio:.2f} x activations (target < 2)"
    )
    print(f"tracemalloc peak (numpy side)  {r['tracemalloc_peak'] * mib:8.1f} MiB")
    sys.exit(0 if ratio < 2 else 1)


if __name__ == "__main__":
    main()
