"""The interface every backend implements. The core sees models only through it."""

from __future__ import annotations

import abc
from pathlib import Path

from bncheck.layers import ModelInfo


class ModelHandle(abc.ABC):
    """A loaded model. Methods beyond ``info`` arrive with the commands that need them
    (check: collect_moments; recalibrate: with_stats; fold: folded; bench: runner; save)."""

    path: Path
    format: str  # onnx | pt2 | state_dict | safetensors | torchscript | pickle
    framework: str  # torch | onnx

    @abc.abstractmethod
    def info(self) -> ModelInfo:
        """Discover BN layers, other norms, inputs and outputs. Cached: cheap to call again."""
