"""The interface every backend implements. The core sees models only through it.

Backends hold framework glue only: the math they apply (fold formulas, moment accumulation)
comes from ``bncheck.numerics``, so it is written and tested once.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bncheck.layers import FoldStep, ModelInfo

if TYPE_CHECKING:  # numerics is not loaded by what needs no math (inspect)
    from bncheck.numerics import Moments

Feeds = Mapping[str, np.ndarray]
# one batch → (model outputs, {BN layer name: Moments of its input})
MomentRunner = Callable[[Feeds], "tuple[list[np.ndarray], dict[str, Moments]]"]


def _no_device_memory() -> int | None:
    return None


@dataclass
class LatencyRunner:
    """What the bench harness needs from a backend (both backends return this).

    ``run()`` does one inference on inputs bound beforehand and returns when it is complete;
    ``sync`` (or None) is called after each run inside the timed region (CUDA);
    ``peak_memory()`` is device memory in bytes, or None where the process's peak RSS is the
    figure to report.
    """

    run: Callable[[], None]
    engine: str
    sync: Callable[[], None] | None = None
    folds_bn_itself: bool = False
    device: str = "cpu"
    threads: int | None = None
    peak_memory: Callable[[], int | None] = field(default=_no_device_memory)


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

    def prepare(self) -> None:
        """Build what :meth:`run` needs (a session, an inference copy) ahead of the first call,
        so that timing a run measures the run. Optional: :meth:`run` builds it when needed."""
        return None

    def run_reference(self, feeds: Feeds) -> tuple[list[np.ndarray], str]:
        """:meth:`run`'s outputs computed a second, equally valid way (another evaluation order
        or a wider dtype), and how. Verification measures the model's own rounding noise with
        it (:mod:`bncheck.numerics.verify`)."""
        raise NotImplementedError(f"{type(self).__name__} has no second evaluation")

    def folded(self, *, affine: bool = False) -> tuple[ModelHandle, list[FoldStep]]:
        """Fold every foldable BN into its neighbour; with ``affine``, turn the rest into a
        per-channel scale and shift. Returns the new model and one step per BN layer."""
        raise NotImplementedError(f"{type(self).__name__} cannot fold")

    def changed_part(self, other: ModelHandle) -> tuple[ModelHandle, ModelHandle, str] | None:
        """This model and ``other`` (a transformed copy of it) cut where ``other``'s changes
        end, when what follows is large and provably the same in both; with words for what
        was left out. None: compare them whole (the default)."""
        return None

    def moment_runner(self, *, batch_stats: bool) -> MomentRunner:
        """A callable: one batch → (model outputs, {BN layer name: Moments of its input}).

        ``batch_stats=False``: inference (BN uses its running statistics). ``True``: every BN
        normalizes with the current batch's statistics, as in training, and nothing is updated.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot collect statistics")

    def with_stats(
        self, stats: Mapping[str, tuple[np.ndarray, np.ndarray]], *, num_batches: int | None = None
    ) -> ModelHandle:
        """A new handle whose BN running mean/var are ``stats`` (layer name → (mean, var))."""
        raise NotImplementedError(f"{type(self).__name__} cannot write statistics")

    def save(self, path: Path) -> None:
        """Write the model atomically (temp file in the target folder, then rename)."""
        raise NotImplementedError(f"{type(self).__name__} cannot save")
