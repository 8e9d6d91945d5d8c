"""bncheck: inspect, check, recalibrate and fold the BatchNorm layers of PyTorch and ONNX models."""

__version__ = "0.1.0"

from bncheck.api import CheckResult, FoldResult, InspectResult, check, fold, inspect, open_model

__all__ = [
    "CheckResult",
    "FoldResult",
    "InspectResult",
    "__version__",
    "check",
    "fold",
    "inspect",
    "open_model",
]
