"""A BN after a channel Concat, folded slice by slice into the Concat's producers.

``BN(Concat(P₁(x₁), …, Pₖ(xₖ)))`` along the channel axis is ``Concat(BNᵢ(Pᵢ(xᵢ)))`` where
``BNᵢ`` is the BN restricted to the channels ``[oᵢ, oᵢ + mᵢ)`` that ``Pᵢ`` contributes: BN is
per channel, so each slice ``sᵢ·z + tᵢ`` folds into its own producer exactly as a BN after that
producer would (``W'ᵢ = sᵢ·Wᵢ`` along the output channels, ``b'ᵢ = sᵢ·bᵢ + tᵢ``). MixNet's
mixed depthwise convolutions are this shape.

It is exact only when each producer's output is read by the Concat alone (once): a producer
whose output also feeds something else would change that reader too (DenseNet's and DPN's
concats reuse their inputs, and stay). The Concat's output must feed the BN alone. Checks return
a reason instead of raising; the rewrite commits nothing unless every slice folds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from onnx import NodeProto

from bncheck.backends.onnx.fold_plan import BNFacts, _producer_reason
from bncheck.backends.onnx.graph import GraphIndex, attr, node_label
from bncheck.backends.onnx.rewrite import Rewrite

__all__ = ["ConcatFold", "concat_fold", "fold_concat", "slice_channels"]

_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")  # a MatMul would need its own bias Add


@dataclass(frozen=True)
class ConcatFold:
    """A BN folded through ``concat``: ``producers[i]`` makes channels ``slices[i]``."""

    concat: NodeProto
    producers: tuple[NodeProto, ...]
    slices: tuple[tuple[int, int], ...]  # (offset, count) per producer, in Concat order

    @property
    def target(self) -> str:
        names = ", ".join(node_label(p) for p in self.producers)
        return f"{names} (through Concat '{node_label(self.concat)}')"


def slice_channels(index: GraphIndex, node: NodeProto) -> int | None:
    """Output channels of a Conv/ConvTranspose/Gemm from its constant weight's shape."""
    w = index.const_shape(node.input[1]) if len(node.input) > 1 else None
    if not w:
        return None
    if node.op_type == "Conv":
        return int(w[0])
    if node.op_type == "ConvTranspose":
        return int(w[1]) * int(attr(node, "group", 1)) if len(w) > 1 else None
    if len(w) != 2:
        return None
    return int(w[0] if attr(node, "transB", 0) else w[1])


def concat_fold(index: GraphIndex, facts: BNFacts) -> ConcatFold | str:
    """The slices of ``facts``' BN when its input is a channel Concat of weighted producers
    that nothing else reads; otherwise why not."""
    concat = index.producer.get(facts.x)
    if concat is None or concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx"):
        return "input is not a Concat"
    rank = index.rank(facts.x)
    axis = int(attr(concat, "axis", 0))
    if rank is None or rank < 2 or axis not in (1, 1 - rank):
        return f"Concat '{node_label(concat)}' does not join along the channel axis"
    if index.is_graph_output(facts.x) or [n for n in index.uses(facts.x) if n is not facts.node]:
        return f"Concat '{node_label(concat)}' output also feeds other nodes"
    inputs = [i for i in concat.input if i]
    if len(inputs) != len(set(inputs)):
        return f"Concat '{node_label(concat)}' joins the same tensor twice"
    producers, slices, offset = [], [], 0
    for name in inputs:
        prod = index.producer.get(name)
        if prod is None or prod.op_type not in _PRODUCERS or prod.domain not in ("", "ai.onnx"):
            what = f"{prod.op_type} '{node_label(prod)}'" if prod is not None else f"'{name}'"
            return f"Concat input {what} is not a Conv, ConvTranspose or Gemm"
        if prod.output[0] != name:
            return f"Concat input '{name}' is not the main output of '{node_label(prod)}'"
        count = slice_channels(index, prod)
        if count is None:
            return f"output channels of '{node_label(prod)}' are unknown"
        # the usual producer checks, with the Concat as the one node allowed to read it
        reason = _producer_reason(index, replace(facts, node=concat, channels=count), prod, ())
        if reason:
            return reason
        producers.append(prod)
        slices.append((offset, count))
        offset += count
    if offset != facts.channels:
        return f"Concat '{node_label(concat)}' makes {offset} channels, the BN {facts.channels}"
    return ConcatFold(concat, tuple(producers), tuple(slices))


def fold_concat(
    rw: Rewrite, facts: BNFacts, plan: ConcatFold, st: tuple[np.ndarray, np.ndarray]
) -> str | None:
    """Fold BN ``facts`` (scale and shift ``st``) into ``plan``'s producers in the rewrite
    ``rw``; returns why not (nothing changed then) or None."""
    from bncheck.backends.onnx.fold import _load_params, _overflows  # fold.py imports us
    from bncheck.numerics import fold_into_producer

    s, t = st
    staged = []
    for prod, (offset, count) in zip(plan.producers, plan.slices, strict=True):
        params = _load_params(rw, prod)
        if isinstance(params, str):
            return params
        sl = slice(offset, offset + count)
        w, b = fold_into_producer(
            params.weight, params.bias, s[sl], t[sl], op=params.op, groups=params.groups
        )
        problem = _overflows((w, b), (params.dtype, params.bias_dtype))
        if problem:
            return problem
        staged.append((params, w, b))
    for params, w, b in staged:
        params.weight, params.bias, params.changed = w, b, True
    rw.remove.add(rw.position(facts.node))
    rw.rename_output[rw.position(plan.concat)] = facts.y
    return None
