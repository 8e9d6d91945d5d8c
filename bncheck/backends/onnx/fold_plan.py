"""Decide, per BatchNormalization node, whether and where it folds away exactly.

A BN computes ``y = gamma * (x - mean) / sqrt(var + eps) + beta = s * x + t`` per channel with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``. It folds *into its producer*
(Conv/ConvTranspose/Gemm/MatMul, possibly through a chain of per-channel constant Add/Mul
nodes) by scaling the producer's output channels, or *into its consumer* by scaling the
consumer's input channels and moving ``t`` into its bias — exact only where the consumer sees
no zero padding, or ``t`` is zero. Each check returns a reason instead of raising, and the
plan (:class:`FoldPlan`) carries the nodes a rewrite needs. ``inspect`` reports these plans
and :mod:`bncheck.backends.onnx.fold` carries them out, so both always agree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import NodeProto

from bncheck.backends.onnx.graph import GraphIndex, attr, node_label
from bncheck.layers import FoldDecision

__all__ = [
    "WEIGHTED_OPS",
    "BNFacts",
    "FoldPlan",
    "bias_problem",
    "bn_facts",
    "bn_reason",
    "fold_plan",
    "per_channel",
    "plan_fold",
]


WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_MAX_CHAIN = 8  # Add/Mul nodes looked through between a producer and its BN


def _is_default_domain(node: NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def _weighted(node: NodeProto | None) -> bool:
    return node is not None and _is_default_domain(node) and node.op_type in WEIGHTED_OPS


def _desc(node: NodeProto) -> str:
    return f"{node.op_type} '{node_label(node)}'"


@dataclass(frozen=True)
class BNFacts:
    """A BatchNormalization node's attributes and constant tensors (None where computed)."""

    node: NodeProto
    x: str
    y: str
    scale: np.ndarray | None
    bias: np.ndarray | None
    mean: np.ndarray | None
    var: np.ndarray | None
    eps: float
    momentum: float
    training: bool
    spatial: bool
    channels: int

    def shift(self) -> np.ndarray | None:
        """``t = beta - mean * gamma / sqrt(var + eps)`` in float64; None if not constant."""
        if self.scale is None or self.bias is None or self.mean is None or self.var is None:
            return None
        s = self.scale.astype(np.float64) / np.sqrt(self.var.astype(np.float64) + self.eps)
        return self.bias.astype(np.float64) - self.mean.astype(np.float64) * s


def _f32_text(x: float) -> float:
    # Attributes are float32: report the shortest decimal that round-trips (1e-05, not 9.99e-06).
    return float(str(np.float32(x)))


def bn_facts(index: GraphIndex, node: NodeProto) -> BNFacts:
    """Read a BN node: tensors via :meth:`GraphIndex.const`, momentum in PyTorch convention
    (``m_torch = 1 - m_onnx``), training from ``training_mode=1`` (opset ≥ 14) or an explicit
    ``is_test=0`` (opset < 7)."""
    ins = [*node.input, "", "", "", "", ""][:5]
    # Overridable initializers still show their stored values; the fold check refuses them.
    scale, bias, mean, var = (index.const(n, overridable=True) for n in ins[1:5])
    eps = _f32_text(attr(node, "epsilon", 1e-5))
    m_onnx = _f32_text(attr(node, "momentum", 0.9))
    momentum = float(f"{1.0 - m_onnx:.12g}")
    training = bool(attr(node, "training_mode", 0)) or attr(node, "is_test", 1) == 0
    spatial = attr(node, "spatial", 1) != 0
    channels = 0
    for arr, name in zip((scale, bias, mean, var), ins[1:5], strict=True):
        if arr is not None and arr.ndim >= 1:
            channels = int(arr.shape[0])
            break
        dims = index.shape(name) if name else None
        if dims and isinstance(dims[0], int):
            channels = dims[0]
            break
    return BNFacts(
        node,
        ins[0],
        node.output[0],
        scale,
        bias,
        mean,
        var,
        eps,
        momentum,
        training,
        spatial,
        channels,
    )


@dataclass(frozen=True)
class FoldPlan:
    """What a fold rewrite needs: the decision plus the nodes it touches.

    ``chain`` lists the per-channel constant Add/Mul nodes between ``producer`` and the BN,
    producer side first; a producer fold must push ``s`` and ``t`` through them
    (``(z * m + a) * s + t``), or fold them into the producer as well.
    """

    decision: FoldDecision
    bn: NodeProto
    facts: BNFacts
    producer: NodeProto | None  # the weighted producer, reached through ``chain``
    chain: tuple[NodeProto, ...]
    consumer: NodeProto | None  # the weighted consumer, when one was considered
    # a fold_layout.LayoutFold or reparam.BranchMerge: a producer fold it carries out itself
    via: object = dataclasses.field(default=None, kw_only=True)
    source: NodeProto | None = None  # the node directly producing the BN input
    concat: Any = None  # a fold_concat.ConcatFold when the BN folds through a channel Concat


def per_channel(shape: tuple[int, ...], rank: int | None, channels: int) -> bool:
    """A constant of ``shape`` broadcasts along axis 1 only (a scalar, or (C,1,…,1)) and
    leaves the shape of a rank-``rank`` tensor as it is (no extra leading dims)."""
    if len(shape) <= 1 and all(d == 1 for d in shape):
        return True
    if rank is None or len(shape) > rank or rank < 2:
        return False
    padded = (1,) * (rank - len(shape)) + tuple(shape)
    return all(d == 1 for i, d in enumerate(padded) if i != 1) and padded[1] in (1, channels)


def _other_uses(index: GraphIndex, tensor: str, wanted: NodeProto) -> list[NodeProto]:
    uses = index.uses(tensor)
    found = False
    rest = []
    for n in uses:
        if n is wanted and not found:
            found = True
        else:
            rest.append(n)
    return rest


def _walk_producer(
    index: GraphIndex, facts: BNFacts
) -> tuple[NodeProto | None, tuple[NodeProto, ...], NodeProto | None, str | None]:
    """Follow the BN input upward through per-channel constant Add/Mul nodes.

    Returns (weighted producer or None, chain producer-first, immediate producer, problem):
    ``problem`` says why a weighted node upstream cannot be reached cleanly (a fan-out).
    """
    immediate = index.producer.get(facts.x)
    chain: list[NodeProto] = []
    problem: str | None = None
    name, below = facts.x, facts.node
    node = immediate
    while node is not None and len(chain) < _MAX_CHAIN:
        if _weighted(node):
            if problem is not None:
                return None, (), immediate, problem.format(producer=_desc(node))
            return node, tuple(chain), immediate, None
        if not (_is_default_domain(node) and node.op_type in ("Add", "Mul")):
            break
        var_ins = [i for i in node.input if not index.is_constant(i)]
        const_ins = [i for i in node.input if index.is_constant(i)]
        if len(node.input) != 2 or len(var_ins) != 1 or len(const_ins) != 1:
            break
        # the rank asks for shape inference: only a chain needs it, a producer right above not
        if not per_channel(
            index.const_shape(const_ins[0]) or (), index.rank(facts.x), facts.channels
        ):
            break
        if problem is None:
            others = _other_uses(index, name, below)
            if others or index.is_graph_output(name):
                what = "is a graph output"
                if others:
                    what = f"also feeds {', '.join(_desc(n) for n in others)}"
                # Completed once the walk tells whether a weighted node lies upstream.
                problem = f"output of {_desc(node)} between producer {{producer}} and the BN {what}"
        chain.insert(0, node)
        name, below = var_ins[0], node
        node = index.producer.get(name)
    return None, (), immediate, None


def bn_reason(index: GraphIndex, facts: BNFacts) -> str | None:
    """Why the BN itself cannot become a constant ``s·x + t`` (training mode, per-activation
    statistics, statistics computed or overridable at run time), or None when it can."""
    if facts.training:
        return "BN is in training mode"
    if not facts.spatial:
        return "BN uses per-activation statistics (spatial=0)"
    missing = [
        n
        for n, a in zip(
            ("scale", "bias", "mean", "var"),
            (facts.scale, facts.bias, facts.mean, facts.var),
            strict=True,
        )
        if a is None
    ]
    if missing:
        return f"statistics are not constant ({', '.join(missing)} computed at run time)"
    names = ("scale", "bias", "mean", "var")
    inputs = [
        n for n, t in zip(names, facts.node.input[1:5], strict=True) if index.is_overridable(t)
    ]
    if inputs:
        return (
            f"statistics are not constant ({', '.join(inputs)} can be overridden as graph inputs)"
        )
    sizes = {a.size for a in (facts.scale, facts.bias, facts.mean, facts.var) if a is not None}
    if len(sizes) != 1:
        return "BN scale, bias, mean and var differ in length"
    return None


def bias_problem(index: GraphIndex, node: NodeProto) -> str | None:
    """Why a Conv/ConvTranspose's constant bias is not the 1-D tensor of one value per output
    channel the ONNX spec requires (onnxruntime refuses to run such a file), else None."""
    if node.op_type not in ("Conv", "ConvTranspose") or len(node.input) < 3 or not node.input[2]:
        return None
    w = index.const_shape(node.input[1]) if index.is_constant(node.input[1]) else None
    b = index.const_shape(node.input[2]) if index.is_constant(node.input[2]) else None
    if not w or b is None or (node.op_type == "ConvTranspose" and len(w) < 2):
        return None
    m = w[0] if node.op_type == "Conv" else w[1] * int(attr(node, "group", 1))
    if tuple(b) == (m,):
        return None
    return (
        f"{_desc(node)} bias has shape {tuple(b)}, expected ({m},): "
        "the model is invalid (onnxruntime cannot run it)"
    )


def _weight_reason(index: GraphIndex, node: NodeProto, role: str) -> str | None:
    w = node.input[1] if len(node.input) > 1 else ""
    if index.is_overridable(w):
        return f"{role} {_desc(node)} weight '{w}' can be overridden as a graph input"
    if not index.is_constant(w):
        return f"{role} {_desc(node)} weight is not constant"
    b = node.input[2] if node.op_type != "MatMul" and len(node.input) > 2 else ""
    if b and not index.is_constant(b):
        return f"{role} {_desc(node)} bias is not constant"
    problem = bias_problem(index, node)
    return f"{role} {problem}" if problem else None


def _producer_reason(
    index: GraphIndex, facts: BNFacts, prod: NodeProto, chain: tuple[NodeProto, ...]
) -> str | None:
    r = _weight_reason(index, prod, "producer")
    if r:
        return r
    out = prod.output[0]
    if index.is_graph_output(out):
        return f"producer output '{out}' is a graph output"
    nxt = chain[0] if chain else facts.node
    others = _other_uses(index, out, nxt)
    if others:
        feeds = ", ".join(_desc(n) for n in others)
        return f"producer {_desc(prod)} output also feeds {feeds}"
    w = index.const_shape(prod.input[1]) or ()
    c = facts.channels
    if prod.op_type == "Conv":
        m = w[0] if w else None
    elif prod.op_type == "ConvTranspose":
        m = w[1] * int(attr(prod, "group", 1)) if len(w) > 1 else None
    elif prod.op_type == "Gemm":
        m = (w[0] if attr(prod, "transB", 0) else w[1]) if len(w) == 2 else None
    else:  # MatMul: x @ W with W (K, N) constant, BN over the N features of a rank-2 output
        if len(w) != 2:
            return f"producer {_desc(prod)} weight is not a 2-D matrix"
        if index.rank(facts.x) != 2:
            return f"producer {_desc(prod)} output is not known to be rank 2 (BN channel axis 1)"
        m = w[1]
    if m != c:
        return f"producer {_desc(prod)} has {m} output channels, the BN {c}"
    return None


def _consumer_reason(index: GraphIndex, facts: BNFacts) -> tuple[NodeProto | None, str | None]:
    y = facts.y
    if index.is_graph_output(y):
        return None, f"BN output '{y}' is a graph output"
    uses = index.uses(y)
    if not uses:
        return None, "BN output is not used"
    if len(uses) > 1:
        return None, f"BN output feeds {len(uses)} nodes ({', '.join(_desc(n) for n in uses)})"
    cons = uses[0]
    if not _weighted(cons) or cons.input[0] != y:
        return None, f"no weighted consumer (output feeds {_desc(cons)})"
    r = _weight_reason(index, cons, "consumer")
    if r:
        return cons, r
    w = index.const_shape(cons.input[1]) or ()
    c = facts.channels
    shift = facts.shift()
    zero_shift = shift is not None and bool(np.all(shift == 0))
    op = cons.op_type
    if op == "Conv":
        k = w[1] * int(attr(cons, "group", 1)) if len(w) > 1 else None
        pads = list(attr(cons, "pads", []) or [])
        auto_pad = attr(cons, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        padded = any(p != 0 for p in pads) or auto_pad not in ("NOTSET", "VALID")
        if k == c and padded and not zero_shift:
            return cons, f"consumer {_desc(cons)} zero-pads its input and the BN shift is non-zero"
    elif op == "ConvTranspose":
        k = w[0] if w else None
        if k == c and not zero_shift:
            return cons, (
                f"consumer {_desc(cons)} is a ConvTranspose and the BN shift is non-zero "
                "(its borders would see the shift unevenly)"
            )
    elif op == "Gemm":
        if attr(cons, "transA", 0):
            return cons, f"consumer {_desc(cons)} transposes its input (transA=1)"
        k = (w[1] if attr(cons, "transB", 0) else w[0]) if len(w) == 2 else None
    else:
        if len(w) != 2:
            return cons, f"consumer {_desc(cons)} weight is not a 2-D matrix"
        if index.rank(y) != 2:
            return cons, f"consumer {_desc(cons)} input is not known to be rank 2"
        k = w[0]
    if k != c:
        return cons, f"consumer {_desc(cons)} has {k} input channels, the BN {c}"
    return cons, None


def fold_plan(index: GraphIndex, bn: NodeProto, facts: BNFacts | None = None) -> FoldPlan:
    """Decide how ``bn`` folds: into its producer if it can, else into its single consumer."""
    facts = facts or bn_facts(index, bn)
    prod, chain, immediate, problem = _walk_producer(index, facts)
    reason = bn_reason(index, facts)
    if reason:
        return FoldPlan(FoldDecision(None, None, reason), bn, facts, prod, chain, None, immediate)
    if prod is not None:
        p_reason = _producer_reason(index, facts, prod, chain)
        if p_reason is None:
            decision = FoldDecision("producer", node_label(prod))
            return FoldPlan(decision, bn, facts, prod, chain, None, immediate)
    elif problem:
        p_reason = problem
    elif immediate is not None and immediate.op_type == "Concat":
        from bncheck.backends.onnx.fold_concat import concat_fold  # it imports this module

        via = concat_fold(index, facts)
        if not isinstance(via, str):
            decision = FoldDecision("producer", via.target)
            return FoldPlan(decision, bn, facts, None, (), None, immediate, concat=via)
        p_reason = f"no producer with weights (input comes from {_desc(immediate)}: {via})"
    elif immediate is not None:
        p_reason = f"no producer with weights (input comes from {_desc(immediate)})"
    elif facts.x in index.graph_inputs:
        p_reason = f"no producer with weights (input comes from graph input '{facts.x}')"
    else:
        p_reason = f"no producer with weights (input '{facts.x}' is a constant)"
    cons, c_reason = _consumer_reason(index, facts)
    if c_reason is None and cons is not None:
        decision = FoldDecision("consumer", node_label(cons))
        return FoldPlan(decision, bn, facts, None, (), cons, immediate)
    from bncheck.backends.onnx.fold_beyond import further  # it imports this module

    via = further(index, facts, immediate, cons)
    if isinstance(via, FoldPlan):
        return via
    if not isinstance(via, str):
        decision = FoldDecision("producer", via.target)
        return FoldPlan(decision, bn, facts, None, (), None, immediate, via=via)
    if via:
        p_reason = f"{p_reason} ({via})"
    decision = FoldDecision(None, None, f"{p_reason}; {c_reason}")
    return FoldPlan(decision, bn, facts, prod, chain, cons, immediate)


def plan_fold(index: GraphIndex, bn: NodeProto) -> FoldDecision:
    """The :class:`FoldDecision` of :func:`fold_plan`."""
    return fold_plan(index, bn).decision
