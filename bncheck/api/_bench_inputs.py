"""``bench``'s inputs: option checks, device and engine checks, the feeds, the runners.

What must hold before anything is timed, and what each side is timed on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bncheck.backends import ModelHandle
from bncheck.errors import InputError

ENGINES = {"torch": "torch", "onnxruntime": "onnx"}  # engine name → framework it runs


def latency_runner_for(
    handle: ModelHandle,
    feeds: Mapping[str, np.ndarray],
    *,
    device: str,
    threads: int | None,
    compile: bool,
    optimize: bool,
) -> Any:
    """The backend's ``latency_runner`` for ``handle`` (see ``backends/<fw>/latency.py``)."""
    if handle.framework == "onnx":
        from bncheck.backends.onnx.latency import latency_runner
    else:
        from bncheck.backends.torch.latency import latency_runner
    return latency_runner(
        handle,
        feeds,
        device=device,
        threads=threads,
        compile=compile and handle.framework == "torch",
        optimize=optimize,
    )


def check_options(
    device: str,
    threads: int | None,
    batch_sizes: Sequence[int],
    time_budget_s: float,
    rounds: int | None,
    warmup: int,
    replicates: int,
    vs: object,
    fail_if_slower: float | None,
) -> None:
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device {device!r}: choose cpu or cuda")
    if threads is not None and threads < 1:
        raise InputError(f"--threads {threads}: must be at least 1")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise InputError("--batch-size: every batch size must be at least 1")
    if not (time_budget_s > 0 and math.isfinite(time_budget_s)):
        raise InputError(f"--time-budget {time_budget_s}: must be a positive number of seconds")
    if rounds is not None and rounds < (2 if vs is not None else 1):
        raise InputError(f"--rounds {rounds}: must be at least {2 if vs is not None else 1}")
    if warmup < 0:
        raise InputError(f"--warmup {warmup}: must be at least 0")
    if replicates < 1:
        raise InputError(f"--replicates {replicates}: must be at least 1")
    if fail_if_slower is not None:
        if vs is None:
            raise InputError("--fail-if-slower needs --vs: there is nothing to compare with")
        if not (fail_if_slower >= 1 and math.isfinite(fail_if_slower)):
            raise InputError(
                f"--fail-if-slower {fail_if_slower:g}: must be a ratio B/A of at least 1 "
                "(1.1 fails when B is more than 10% slower), or a percentage such as 10%"
            )


def check_device(handle: ModelHandle, device: str) -> None:
    """Refuse ``device`` before any work when this machine cannot run ``handle`` on it."""
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device {device!r}: choose cpu or cuda")
    if device != "cuda":
        return
    if handle.framework == "onnx":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InputError(
                "CUDA is not available on this machine (onnxruntime has no "
                "CUDAExecutionProvider; install onnxruntime-gpu)"
            )
    else:
        import torch

        if not torch.cuda.is_available():
            raise InputError(
                "CUDA is not available on this machine (torch.cuda.is_available() is False)"
            )


def check_engine(handle: ModelHandle, engine: str | None) -> None:
    if engine is None:
        return
    if engine not in ENGINES:
        raise InputError(f"--engine {engine!r}: choose {' or '.join(ENGINES)}")
    if ENGINES[engine] != handle.framework:
        runs = "ONNX models" if engine == "onnxruntime" else "PyTorch models"
        raise InputError(f"{handle.path}: engine {engine} runs {runs}; this is a {handle.format}")


def bench_feeds(
    handle: ModelHandle,
    batch: int,
    data: str | os.PathLike[str] | None,
    input_shapes: Mapping[str, Sequence[int]] | None,
    seed: int,
) -> tuple[dict[str, np.ndarray], str]:
    """Seeded N(0, 1) input of the model's shape with batch dim ``batch``, or the first
    ``batch`` samples of ``data``; and its description."""
    from bncheck.data import open_data

    src = open_data(
        data,
        inputs=handle.info().inputs,
        batch_size=batch,
        max_samples=batch,
        synthetic=data is None,
        seed=seed,
        input_shapes=input_shapes,
    )
    feeds = src.first_batch()
    shapes = ", ".join(f"{k} {tuple(v.shape[1:])} {v.dtype}" for k, v in feeds.items())
    if data is None:
        return feeds, f"seeded N(0, 1) input (seed {seed}): {shapes}, batch dim = the batch size"
    source = getattr(data, "source", data)  # a DataSpec names its file, folder or hook
    return feeds, f"first batch of {Path(str(source)).name}: {shapes}"


def feeds_for(other: ModelHandle, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A's feeds for B: by name, or by position when both take one input."""
    names = [s.name for s in other.info().inputs]
    if set(names) <= set(feeds):
        return {n: feeds[n] for n in names}
    if len(names) == 1 and len(feeds) == 1:
        return {names[0]: next(iter(feeds.values()))}
    raise InputError(
        f"{other.path}: its inputs ({', '.join(names)}) differ from the first model's "
        f"({', '.join(feeds)}); both models must take the same inputs"
    )


def check_same_inputs(a: ModelHandle, b: ModelHandle) -> None:
    """Refuse an A/B comparison, before anything is timed, when B does not take A's inputs.

    Inputs pair by name, or by position when each model takes one input. Each pair must have
    the same rank, the same dtype, and the same size in every dim that both models fix (a
    dynamic dim, named or None, fits any size). Raises InputError naming the first difference.
    """
    ins_a, ins_b = a.info().inputs, b.info().inputs
    names_a, names_b = [t.name for t in ins_a], [t.name for t in ins_b]
    if len(ins_a) == 1 and len(ins_b) == 1:
        pairs = [(ins_a[0], ins_b[0])]
    elif set(names_a) == set(names_b):
        by_name = {t.name: t for t in ins_b}
        pairs = [(t, by_name[t.name]) for t in ins_a]
    else:
        raise InputError(
            f"{b.path}: its inputs ({', '.join(names_b) or 'none'}) differ from "
            f"{a.path}'s ({', '.join(names_a) or 'none'}); both models must take the same inputs"
        )
    for ta, tb in pairs:
        where = f"input {ta.name!r}" + (f" ({tb.name!r} in B)" if tb.name != ta.name else "")
        if len(ta.shape) != len(tb.shape):
            raise InputError(
                f"{b.path}: {where} has rank {len(tb.shape)}, {a.path} rank {len(ta.shape)}; "
                "both models must take the same inputs"
            )
        fixed = [
            (k, da, db)
            for k, (da, db) in enumerate(zip(ta.shape, tb.shape, strict=True))
            if isinstance(da, int) and isinstance(db, int) and da != db
        ]
        if fixed:
            k, da, db = fixed[0]
            raise InputError(
                f"{b.path}: {where} has size {db} in dim {k}, {a.path} size {da}; "
                "both models must take the same inputs"
            )
        if ta.dtype != tb.dtype:
            raise InputError(
                f"{b.path}: {where} is {tb.dtype}, {a.path} takes {ta.dtype}; "
                "both models must take the same inputs"
            )
