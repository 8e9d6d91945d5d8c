"""bncheck: inspect, check, recalibrate and fold the BatchNorm layers of PyTorch and ONNX models."""

__version__ = "0.1.0"

from bncheck.api import InspectResult, inspect, open_model

__all__ = ["InspectResult", "__version__", "inspect", "open_model"]
