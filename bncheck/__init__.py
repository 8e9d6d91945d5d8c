"""bncheck: inspect, check, recalibrate and fold the BatchNorm layers of PyTorch and ONNX models."""

__version__ = "0.1.0"

from bncheck.api import (
    CheckResult,
    FoldResult,
    InspectResult,
    RecalibrateResult,
    check,
    fold,
    inspect,
    open_model,
    recalibrate,
)

__all__ = [
    "CheckResult",
    "FoldResult",
    "InspectResult",
    "RecalibrateResult",
    "__version__",
    "check",
    "fold",
    "inspect",
    "open_model",
    "recalibrate",
]
