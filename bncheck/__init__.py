"""bncheck: inspect, check, recalibrate and fold the BatchNorm layers of PyTorch and ONNX models."""

__version__ = "0.1.0"

from bncheck.api import FoldResult, InspectResult, fold, inspect, open_model

__all__ = ["FoldResult", "InspectResult", "__version__", "fold", "inspect", "open_model"]
