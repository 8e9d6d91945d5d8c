"""PyTorch latency runner for ``bncheck bench``: eager (or ``torch.compile``) inference.

The module timed is a copy of the one ``TorchHandle.run`` uses (a ``.pt2``'s graph, else an
eval copy). CUDA work is queued
asynchronously, so a CUDA runner carries ``sync=torch.cuda.synchronize`` for the harness to
call inside the timed region.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np

from bncheck.backends.base import LatencyRunner
from bncheck.backends.torch.load import quiet_torch
from bncheck.errors import InputError, first_line
from bncheck.wording import plural

__all__ = ["latency_runner"]


def latency_runner(
    handle: object,
    feeds: Mapping[str, np.ndarray],
    *,
    device: str = "cpu",
    threads: int | None = None,
    compile: bool = False,
    optimize: bool = True,
) -> LatencyRunner:
    """A runner doing ``with torch.inference_mode(): module(*inputs)`` on pre-made tensors.

    ``threads`` calls ``torch.set_num_threads`` (process-wide; None leaves it). ``compile``
    wraps the module in ``torch.compile`` (default inductor backend) and compiles it here, on
    the first call, so a machine where compilation fails gives one clear InputError rather
    than a failure mid-measurement. ``optimize`` is onnxruntime's option and ignored here.
    """
    import torch

    path = handle.path  # type: ignore[attr-defined]
    if device == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                "CUDA is not available on this machine (torch.cuda.is_available() is False)"
            )
    elif device != "cpu":
        raise InputError(f"--device {device!r}: choose cpu or cuda")
    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads {threads}: must be at least 1")
        torch.set_num_threads(int(threads))
    # A copy per runner: each runner is an independent instance (the bench compares several
    # instance pairs, since where the weights land in memory moves latency by a few percent),
    # and moving it to CUDA leaves the handle's own module on CPU.
    with quiet_torch():
        module = copy.deepcopy(handle.runnable())  # type: ignore[attr-defined]
    tensors = handle.input_tensors(feeds)  # type: ignore[attr-defined]
    if device == "cuda":
        module = module.to("cuda")
        tensors = [t.to("cuda") for t in tensors]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    engine = "torch eager"
    if compile:
        try:
            module = torch.compile(module)
        except Exception as exc:
            raise InputError(f"{path}: torch.compile failed: {first_line(exc)}") from None
        engine = "torch.compile (inductor)"

    def run() -> None:
        with torch.inference_mode():
            module(*tensors)

    try:
        with quiet_torch():
            run()  # compiles under --compile; a model that cannot run fails here, not timed
            if device == "cuda":
                torch.cuda.synchronize()
    except Exception as exc:
        what = "torch.compile failed on this machine" if compile else "the model failed to run"
        raise InputError(f"{path}: {what}: {first_line(exc)}") from None

    used = torch.get_num_threads()
    runner = LatencyRunner(
        run=run,
        engine=f"{engine} {torch.__version__.split('+')[0]} ({device}, {plural(used, 'thread')})",
        sync=torch.cuda.synchronize if device == "cuda" else None,
        folds_bn_itself=False,  # eager never does; inductor only with config.freezing=True
        device=device,
        threads=used,
    )
    if device == "cuda":
        runner.peak_memory = torch.cuda.max_memory_allocated
    return runner
