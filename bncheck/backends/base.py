"""The interface every backend implements. The core sees models only through it.

Backends hold framework glue only: the math they apply (fold formulas, moment accumulation)
comes from ``bncheck.numerics``, so it is written and tested once.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from bncheck.layers import FoldStep, ModelInfo

Feeds = Mapping[str, np.ndarray]


class ModelHandle(abc.ABC):
    """A loaded model.

    Every method that changes the model returns a new handle; the handle it was called on,
    and the file it came from, are never modified.
    """

    path: Path
    format: str  # onnx | pt2 | state_dict | safetensors | torchscript | pickle
    framework: str  # torch | onnx

    @abc.abstractmethod
    def info(self) -> ModelInfo:
        """Discover BN layers, other norms, inputs and outputs. Cached: cheap to call again."""

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        """One inference-mode forward pass on CPU: numpy in, numpy outputs out (graph order)."""
        raise NotImplementedError(f"{type(self).__name__} cannot run models")

    def folded(self, *, affine: bool = False) -> tuple[ModelHandle, list[FoldStep]]:
        """Fold every foldable BN into its neighbour; with ``affine``, turn the rest into a
        per-channel scale and shift. Returns the new model and one step per BN layer."""
        raise NotImplementedError(f"{type(self).__name__} cannot fold")

    def save(self, path: Path) -> None:
        """Write the model atomically (temp file in the target folder, then rename)."""
        raise NotImplementedError(f"{type(self).__name__} cannot save")
