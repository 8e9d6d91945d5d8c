"""Does bncheck's latency harness agree with ``torch.utils.benchmark``?

For each model, the *same* runner (``bncheck.backends.torch.latency.latency_runner``: eager,
``torch.inference_mode``) is timed by ``bncheck.bench.measure`` and by
``torch.utils.benchmark.Timer(...).blocked_autorange()`` and ``.adaptive_autorange()``, on the
same number of threads. The three methods run alternately, ``--repeats`` times, so drift of
the machine hits them alike; the table gives the median of each method's medians and
bncheck's relative difference from each. Target: within 5 %.

Timer reports the median of *block means* (blocks of ``number_per_run`` calls), bncheck the
median of single calls. On a loaded machine a preempted call inflates its whole block's mean,
so Timer reads higher there; the "block-mean" column applies Timer's statistic to bncheck's
own samples, which separates "measures the same thing" from "summarizes it differently".

    python benchmarks/bench_accuracy.py [--threads 1] [--repeats 15] [--budget 0.2] [--quick]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models

from bncheck.api import open_model
from bncheck.backends.torch.latency import latency_runner
from bncheck.bench import measure
from bncheck.sample_export import export_pt2

ROOT = Path(__file__).resolve().parents[1]


def block_median(seconds: np.ndarray, block: int) -> float:
    """Median of the means of consecutive blocks of ``block`` calls: the statistic Timer
    reports (it times blocks of ``number_per_run`` calls), computed from bncheck's samples."""
    n = len(seconds) // block * block
    return float(np.median(seconds[:n].reshape(-1, block).mean(axis=1)))


def time_three(runner, threads: int, budget: float, repeats: int) -> dict[str, float]:
    timer = Timer(stmt="run()", globals={"run": runner.run}, num_threads=threads)
    got: dict[str, list[float]] = {"bncheck": [], "blocks": [], "blocked": [], "adaptive": []}
    for _ in range(repeats):
        samples = measure(runner.run, warmup=10, min_time_s=budget)
        blocked = timer.blocked_autorange(min_run_time=budget)
        got["bncheck"].append(samples.median)
        got["blocks"].append(block_median(samples.seconds, blocked.number_per_run))
        got["blocked"].append(blocked.median)
        got["adaptive"].append(timer.adaptive_autorange(min_run_time=budget / 4).median)
    return {k: statistics.median(v) for k, v in got.items()}


def sample_resnet(batch: int):
    handle = open_model(ROOT / "sample_models" / "resnet.pt2")
    x = np.random.default_rng(0).standard_normal((batch, 3, 24, 24)).astype(np.float32)
    return handle, {"x": x}


def resnet18(batch: int, tmp: Path):
    torch.manual_seed(0)
    model = models.randomize_bn(models.resnet18(norm=True)).eval()
    example = torch.randn(2, 3, 224, 224)
    path = tmp / "resnet18.pt2"
    export_pt2(model, example, path)
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    return open_model(path), {"x": x}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--budget", type=float, default=0.2, help="seconds per method and repeat")
    ap.add_argument("--quick", action="store_true", help="the small sample model only")
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; python "
        f"{platform.python_version()}, torch {torch.__version__}; threads {args.threads}"
    )
    print(
        "| model | batch | bncheck median ms | bncheck block-mean median ms "
        "| blocked_autorange ms | adaptive_autorange ms | bncheck vs blocked "
        "| bncheck vs adaptive | block-mean vs blocked |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    import tempfile

    worst = 0.0
    with tempfile.TemporaryDirectory() as d:
        cases = [("sample resnet (.pt2)", lambda b: sample_resnet(b), (1, 32))]
        if not args.quick:
            cases.append(("ResNet-18 224² (.pt2)", lambda b: resnet18(b, Path(d)), (1,)))
        for name, make, batches in cases:
            for batch in batches:
                handle, feeds = make(batch)
                runner = latency_runner(handle, feeds, threads=args.threads)
                t = time_three(runner, args.threads, args.budget, args.repeats)
                d_blocked = t["bncheck"] / t["blocked"] - 1
                d_adaptive = t["bncheck"] / t["adaptive"] - 1
                d_blocks = t["blocks"] / t["blocked"] - 1
                worst = max(worst, abs(d_blocked), abs(d_adaptive))
                print(
                    f"| {name} | {batch} | {t['bncheck'] * 1e3:.4g} | {t['blocks'] * 1e3:.4g} "
                    f"| {t['blocked'] * 1e3:.4g} | {t['adaptive'] * 1e3:.4g} | {d_blocked:+.1%} "
                    f"| {d_adaptive:+.1%} | {d_blocks:+.1%} |"
                )
    verdict = "within" if worst <= 0.05 else "OUTSIDE"
    print(f"\nlargest difference {worst:.1%}: {verdict} the 5% target")
    sys.exit(0 if worst <= 0.05 else 1)


if __name__ == "__main__":
    main()
