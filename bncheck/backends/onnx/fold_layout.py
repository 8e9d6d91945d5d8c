"""A BN behind channel-preserving layout ops, folded into the weighted node before them.

LeViT and friends write ``Linear → Reshape/Flatten → BatchNorm1d → Reshape``: the BN's channel
axis is the Linear's feature axis, moved by ops that only re-index elements. When every element
of BN channel ``c`` is feature ``c`` of the producer's output (proved from the shapes and
permutations by :mod:`bncheck.numerics.layout`), ``BN(L(z)) = L(s·z + t)`` with ``s, t`` along
the producer's feature axis, so the BN folds into the producer exactly as if it came right
after it: ``W' = s·W`` along the output features, ``b' = s·b + t``.

Matched: a weighted producer (Conv, ConvTranspose and Gemm: feature axis 1; MatMul with a
constant 2-D weight: the last axis), then any per-feature constant Add/Mul (the bias Add of a
Linear exported as MatMul), then up to four of Reshape, Flatten, Transpose, Squeeze and
Unsqueeze, then the BN; every tensor between them read once, by the next node. Checks return
a reason; nothing is changed unless the fold succeeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import NodeProto

from bncheck.backends.onnx.fold_plan import BNFacts, FoldPlan, _desc, _weight_reason
from bncheck.backends.onnx.graph import GraphIndex, attr, node_label
from bncheck.backends.onnx.rewrite import Rewrite
from bncheck.numerics.layout import axis_through_reshape, axis_through_transpose

__all__ = ["LAYOUT_OPS", "LayoutFold", "fold_layout", "layout_fold", "single_reader"]

LAYOUT_OPS = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")
_MAX_LAYOUT = 4
_MAX_CHAIN = 4


def _default(node: NodeProto | None) -> bool:
    return node is not None and node.domain in ("", "ai.onnx")


@dataclass(frozen=True)
class LayoutFold:
    """``producer → chain (Add/Mul) → layout ops → BN``, proven channel-preserving."""

    producer: NodeProto
    chain: tuple[NodeProto, ...]
    layout: tuple[NodeProto, ...]  # producer side first

    @property
    def target(self) -> str:
        ops = ", ".join(_desc(n) for n in self.layout)
        return f"{node_label(self.producer)} (through {ops})"

    def fold(self, rw: Rewrite, plan: FoldPlan) -> str | None:
        return fold_layout(rw, plan.facts, self)


def single_reader(index: GraphIndex, tensor: str, reader: NodeProto) -> bool:
    """``tensor`` is read by ``reader`` alone, once, and is no graph output."""
    uses = index.uses(tensor)
    return len(uses) == 1 and uses[0] is reader and not index.is_graph_output(tensor)


def _feature_axis(index: GraphIndex, prod: NodeProto) -> tuple[int, int] | str:
    """(feature axis of the producer's output, its size) or why unknown."""
    w = index.const_shape(prod.input[1]) if len(prod.input) > 1 else None
    if not w:
        return f"producer {_desc(prod)} weight shape is unknown"
    if prod.op_type == "Conv":
        return 1, int(w[0])
    if prod.op_type == "ConvTranspose":
        return (1, int(w[1]) * int(attr(prod, "group", 1))) if len(w) > 1 else "bad weight"
    if len(w) != 2:
        return f"producer {_desc(prod)} weight is not a 2-D matrix"
    if prod.op_type == "Gemm":
        if attr(prod, "transA", 0):
            return f"producer {_desc(prod)} transposes its input (transA=1)"
        return 1, int(w[0] if attr(prod, "transB", 0) else w[1])
    rank = index.rank(prod.output[0])
    if rank is None or rank < 2:
        return f"producer {_desc(prod)} output rank is unknown"
    return rank - 1, int(w[1])


def _per_feature(shape: tuple[int, ...], rank: int, axis: int, channels: int) -> bool:
    """A constant that broadcasts along ``axis`` only and keeps the rank."""
    if len(shape) > rank:
        return False
    padded = (1,) * (rank - len(shape)) + tuple(shape)
    return all(d == 1 for i, d in enumerate(padded) if i != axis) and padded[axis] in (1, channels)


def _axis_through(index: GraphIndex, node: NodeProto, axis: int) -> int | None:
    if node.op_type == "Transpose":
        rank = index.rank(node.input[0])
        perm = attr(node, "perm", None)
        perm = list(reversed(range(rank))) if perm is None and rank else perm
        return axis_through_transpose(list(perm), axis) if perm else None
    dims_in, dims_out = index.shape(node.input[0]), index.shape(node.output[0])
    if dims_in is None or dims_out is None:
        return None
    return axis_through_reshape(dims_in, axis, dims_out)


def layout_fold(index: GraphIndex, facts: BNFacts) -> LayoutFold | str:
    """How ``facts``' BN folds through layout ops into a weighted producer, or why not."""
    layout: list[NodeProto] = []
    name, below = facts.x, facts.node
    node = index.producer.get(name)
    while _default(node) and node.op_type in LAYOUT_OPS and len(layout) < _MAX_LAYOUT:
        if not single_reader(index, name, below):
            return f"output of {_desc(node)} is also read elsewhere"
        layout.insert(0, node)
        name, below = node.input[0], node
        node = index.producer.get(name)
    if not layout:
        return "input does not come from a layout op"
    chain: list[NodeProto] = []
    while _default(node) and node.op_type in ("Add", "Mul") and len(chain) < _MAX_CHAIN:
        consts = [i for i in node.input if index.is_constant(i)]
        if len(node.input) != 2 or len(consts) != 1 or not single_reader(index, name, below):
            break
        chain.insert(0, node)
        name, below = next(i for i in node.input if i not in consts), node
        node = index.producer.get(name)
    if not (_default(node) and node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")):
        what = _desc(node) if node is not None else f"'{name}'"
        return f"no producer with weights before {_desc(layout[0])} (input comes from {what})"
    prod = node
    reason = _weight_reason(index, prod, "producer")
    if reason:
        return reason
    if prod.output[0] != name or not single_reader(index, name, below):
        return f"producer {_desc(prod)} output is also read elsewhere"
    feat = _feature_axis(index, prod)
    if isinstance(feat, str):
        return feat
    axis, channels = feat
    if channels != facts.channels:
        return f"producer {_desc(prod)} has {channels} output features, the BN {facts.channels}"
    rank = index.rank(prod.output[0])
    for n in chain:
        const = next(i for i in n.input if index.is_constant(i))
        if rank is None or not _per_feature(index.const_shape(const) or (), rank, axis, channels):
            return f"{_desc(n)} after producer {_desc(prod)} is not per feature"
    for n in layout:
        axis = _axis_through(index, n, axis)
        if axis is None:
            return f"{_desc(n)} is not proven to keep the feature axis of {_desc(prod)} intact"
    if axis != 1:
        return f"the feature axis of {_desc(prod)} reaches the BN as axis {axis}, not 1"
    return LayoutFold(prod, tuple(chain), tuple(layout))


def fold_layout(rw: Rewrite, facts: BNFacts, plan: LayoutFold) -> str | None:
    """Fold BN ``facts`` into ``plan.producer`` in the rewrite ``rw``: the producer's weights
    take ``s`` and ``t`` (after the chain's own affine), the chain and the BN go, and the last
    layout op writes the BN's output. Returns why not (nothing changed then) or None."""
    from bncheck.backends.onnx.fold import (  # fold.py imports this module
        _bn_affine,
        _chain_affine,
        _load_params,
        _overflows,
    )
    from bncheck.numerics import fold_into_producer

    params = _load_params(rw, plan.producer)
    if isinstance(params, str):
        return params
    st = _bn_affine(facts)
    if isinstance(st, str):
        return st
    s, t = st
    a, b = _chain_affine(rw.index, plan.chain, facts.channels)
    w, bias = fold_into_producer(
        params.weight, params.bias, a * s, b * s + t, op=params.op, groups=params.groups
    )
    problem = _overflows((w, bias), (params.dtype, params.bias_dtype))
    if problem:
        return problem
    if not np.all(np.isfinite(w)):
        return "folded weights are not finite"
    params.weight, params.bias, params.changed = w, bias, True
    p = rw.position(plan.producer)
    rw.remove.update(rw.position(n) for n in (*plan.chain, facts.node))
    if plan.chain:  # the producer now writes what the chain wrote
        rw.rename_output[p] = plan.chain[-1].output[0]
    rw.rename_output[rw.position(plan.layout[-1])] = facts.y
    if plan.producer.op_type == "MatMul":
        rw.matmul_bias.add(p)
    return None
