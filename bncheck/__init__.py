"""bncheck: inspect, check, recalibrate and fold the BatchNorm layers of PyTorch and ONNX models."""

__version__ = "0.1.0"

from bncheck.api import (
    BenchResult,
    CheckResult,
    FoldResult,
    InspectResult,
    OptimizeResult,
    RecalibrateResult,
    bench,
    check,
    fold,
    inspect,
    open_model,
    optimize,
    recalibrate,
)

__all__ = [
    "BenchResult",
    "CheckResult",
    "FoldResult",
    "InspectResult",
    "OptimizeResult",
    "RecalibrateResult",
    "__version__",
    "bench",
    "check",
    "fold",
    "inspect",
    "open_model",
    "optimize",
    "recalibrate",
]
