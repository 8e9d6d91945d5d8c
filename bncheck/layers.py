"""Framework-neutral records a backend hands to the core: BN layers, other norms, findings.

Arrays are numpy in the dtype the model stores them in (so fp16 statistics stay visible); the
core converts to float64 where it does math. No framework object ever lives in these records.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

import numpy as np


class Severity(str, enum.Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return {"info": 0, "warning": 1, "error": 2}[self.value]


@dataclass(frozen=True)
class Neighbour:
    """A node next to a BN in the graph.

    ``op`` is normalized across frameworks: ``Conv``, ``ConvTranspose``, ``Linear`` (torch
    Linear), ``Gemm``, ``MatMul``; otherwise the raw op type or module class (``Relu``, ``Add``,
    ``BatchNormalization``…), ``input`` for a graph input and ``output`` for a graph output.
    """

    name: str
    op: str
    has_weights: bool = False  # a constant weight that could absorb the BN


@dataclass(frozen=True)
class FoldDecision:
    """Whether a BN can be folded away exactly, into what, and if not, why."""

    into: Literal["producer", "consumer"] | None
    target: str | None = None  # name of the neighbour that absorbs the BN
    reason: str | None = None  # why it cannot be folded (None when it can)

    @property
    def foldable(self) -> bool:
        return self.into is not None


@dataclass(frozen=True, eq=False)
class BNLayer:
    """One batch-normalization layer as found in a model.

    ``momentum`` uses PyTorch's convention, ``running = (1 - m) * running + m * batch``
    (ONNX's attribute is ``1 - m``); ``None`` means a cumulative average (PyTorch momentum=None).
    ``call_sites`` counts how often the layer is applied in the traced graph (0 when unknown).
    """

    name: str
    kind: str  # BatchNorm1d/2d/3d, SyncBatchNorm, FrozenBatchNorm2d, BatchNormalization, …
    channels: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    training: bool
    num_batches_tracked: int | None
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    weight: np.ndarray | None
    bias: np.ndarray | None
    stats_dtype: str | None  # numpy dtype name of running_mean/var
    param_dtype: str | None  # numpy dtype name of weight/bias
    producer: Neighbour | None
    consumers: tuple[Neighbour, ...]
    call_sites: int
    fold: FoldDecision
    frozen: bool = False  # a frozen-BN class: fixed statistics, never updated
    # Where the layer came from when the file records it (the PyTorch module path of an ONNX
    # node exported by torch's dynamo exporter): lets a user find "layer1.bn1" in an ONNX file.
    origin: str | None = None


@dataclass(frozen=True)
class NormLayer:
    """Another normalization layer (LayerNorm, GroupNorm, InstanceNorm, RMSNorm): inventory only."""

    name: str
    kind: str
    shape: str  # normalized shape, channels or groups, as text
    eps: float | None
    affine: bool


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: dims are ints, or a name / None where dynamic."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str


@dataclass(frozen=True)
class ModelInfo:
    """Everything static a backend discovers about a model."""

    path: str
    format: str  # onnx | pt2 | state_dict | safetensors | torchscript | pickle
    framework: Literal["torch", "onnx"]
    bn_layers: tuple[BNLayer, ...]
    norm_layers: tuple[NormLayer, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    training: bool  # the model (not just one layer) was saved in train mode
    graph_error: str | None = None  # why no graph could be traced; None when one was
    opset: int | None = None
    parameters: int = 0  # number of parameter / initializer elements
    nodes: int | None = None  # graph nodes, where a graph exists
    input_guessed: bool = False  # traced on a guessed input shape (no --input-shape, no data)


@dataclass(frozen=True)
class Finding:
    """One problem found by a rule. ``layer`` is None for model-level findings."""

    code: str
    severity: Severity
    layer: str | None
    message: str
    hint: str


@dataclass(frozen=True)
class FoldStep:
    """What ``fold`` did with one BN layer.

    ``into`` is ``producer`` / ``consumer`` (weights rewritten, BN removed), ``affine`` (BN
    replaced by a per-channel scale and shift, no statistics), or None (left as it was, with
    ``reason``). ``kind`` is ``bn`` for a BN layer, ``channel_op`` for a run of standalone
    per-channel Mul/Add nodes (a bias Add, a decomposed BN) merged into its producer: not a BN.
    """

    layer: str
    into: Literal["producer", "consumer", "affine"] | None
    target: str | None = None
    reason: str | None = None
    kind: Literal["bn", "channel_op"] = "bn"
