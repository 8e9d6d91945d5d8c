"""bncheck: inspect, check, recalibrate and fold the BatchNorm layers of PyTorch and ONNX models."""

__version__ = "0.1.0"
