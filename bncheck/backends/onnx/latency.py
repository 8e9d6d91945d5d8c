"""onnxruntime latency runner for ``bncheck bench``: one session, inputs bound once.

The session runs at onnxruntime's default optimization level (``ORT_ENABLE_ALL``) unless
``optimize=False``: that is how models are deployed, so that is the latency a user gets. At
that level onnxruntime fuses Conv+BatchNormalization (and MatMul+BN) itself, so folding BN
with bncheck cannot make such a model faster there; ``folds_bn_itself`` says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bncheck.backends.base import LatencyRunner
from bncheck.backends.onnx.run import make_session, ort_message
from bncheck.errors import InputError
from bncheck.wording import plural

__all__ = ["latency_runner"]

CUDA_PROVIDER = "CUDAExecutionProvider"


def ort_fuses_bn(handle: Any) -> bool:
    """True when onnxruntime's Conv/MatMul+BN fusion (a basic-level graph transformer) applies
    to at least one BN: bncheck's own plan folds it into a Conv/Gemm/MatMul producer, which
    needs the same conditions (constant parameters, the producer's output read only by BN)."""
    return any(
        layer.fold.foldable
        and layer.fold.into == "producer"
        and layer.producer is not None
        and layer.producer.op in ("Conv", "MatMul", "Gemm")
        for layer in handle.info().bn_layers
    )


def latency_runner(
    handle: Any,
    feeds: Mapping[str, np.ndarray],
    *,
    device: str = "cpu",
    threads: int | None = None,
    compile: bool = False,
    optimize: bool = True,
) -> LatencyRunner:
    """An onnxruntime session for ``handle`` (an OnnxHandle) with ``feeds`` bound once.

    ``device="cuda"`` uses CUDAExecutionProvider (then CPU for unsupported nodes) with inputs
    copied to the GPU once and outputs left there; onnxruntime synchronizes its CUDA stream at
    the end of every run, so ``sync`` is None. ``threads`` sets ``intra_op_num_threads``
    (None: onnxruntime's default, one per physical core). ``compile`` is a torch option and
    is refused here.
    """
    import onnxruntime as ort

    path = str(handle.path)
    if compile:
        raise InputError(f"{path}: --compile is for PyTorch models; onnxruntime has no compile")
    if device == "cuda":
        if CUDA_PROVIDER not in ort.get_available_providers():
            raise InputError(
                "CUDA is not available on this machine (onnxruntime has no "
                "CUDAExecutionProvider; install onnxruntime-gpu)"
            )
        providers = [CUDA_PROVIDER, "CPUExecutionProvider"]
    elif device == "cpu":
        providers = ["CPUExecutionProvider"]
    else:
        raise InputError(f"--device {device!r}: choose cpu or cuda")
    if threads is not None and threads < 1:
        raise InputError(f"--threads {threads}: must be at least 1")
    session = make_session(
        handle.model, optimize=optimize, providers=providers, threads=threads, source=path
    )
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise InputError(f"{path}: no input data for model input {missing[0]!r}")
    binding = session.io_binding()
    # Inputs and outputs bound once: the timed call is the run alone, no numpy conversions.
    keep: list[object] = []  # the bound buffers must live as long as the binding
    for name in names:
        arr = np.ascontiguousarray(feeds[name])
        keep.append(arr)
        if device == "cuda":
            value = ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0)
            keep.append(value)
            binding.bind_ortvalue_input(name, value)
        else:
            binding.bind_cpu_input(name, arr)
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda" if device == "cuda" else "cpu")

    def run() -> None:
        session.run_with_iobinding(binding)

    run.keep = keep  # type: ignore[attr-defined]
    try:
        run()  # fail here, with our message, rather than inside the timing loop
    except Exception as exc:
        raise InputError(f"{path}: onnxruntime run failed: {ort_message(exc)}") from None

    level = "ORT_ENABLE_ALL" if optimize else "ORT_DISABLE_ALL"
    used = session.get_providers()[0]
    threads_text = plural(threads, "thread") if threads else "default threads"
    return LatencyRunner(
        run=run,
        engine=f"onnxruntime {ort.__version__} ({used}, {level}, {threads_text})",
        sync=None,
        folds_bn_itself=optimize and ort_fuses_bn(handle),
        device=device,
        threads=threads,
    )
