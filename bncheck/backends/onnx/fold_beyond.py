"""The folds beyond a neighbour, tried for a BN whose producer and consumer both refuse.

- through layout ops into the producer before them (:mod:`~bncheck.backends.onnx.fold_layout`);
- into a consumer behind ``Identity`` nodes (exported dropout and clone): a plain consumer fold
  with the Identity chain's output standing for the BN's; the Identity goes with the BN;
- as an identity branch of summed convolutions (:mod:`~bncheck.backends.onnx.reparam`).

``fold_plan`` asks :func:`further` last, so a neighbour fold always wins and ``inspect`` and
``fold`` see the same decision.
"""

from __future__ import annotations

import dataclasses

from onnx import NodeProto

from bncheck.backends.onnx.fold_layout import LAYOUT_OPS, layout_fold
from bncheck.backends.onnx.fold_plan import (
    BNFacts,
    FoldPlan,
    _consumer_reason,
    _is_default_domain,
)
from bncheck.backends.onnx.graph import GraphIndex, node_label
from bncheck.backends.onnx.reparam import identity_merge
from bncheck.layers import FoldDecision

__all__ = ["further"]


def further(
    index: GraphIndex, facts: BNFacts, immediate: NodeProto | None, cons: NodeProto | None
) -> object:
    """The first of the module's folds that applies to ``facts``' BN: a ``LayoutFold`` or
    ``BranchMerge`` (``FoldPlan.via``), or a consumer ``FoldPlan``; else why the nearest one does
    not apply, or "" when none is near."""
    why = ""
    if immediate is not None and immediate.op_type in LAYOUT_OPS:
        why = layout_fold(index, facts)
        if not isinstance(why, str):
            return why
    uses = index.uses(facts.y)
    through = facts
    while len(uses) == 1 and _is_default_domain(uses[0]) and uses[0].op_type == "Identity":
        if index.is_graph_output(through.y) or len(uses[0].output) != 1:
            break
        through = dataclasses.replace(through, y=uses[0].output[0])
        uses = index.uses(through.y)
    if through is not facts:  # exported dropout and clone: BN → Identity → Linear
        cons2, c_reason = _consumer_reason(index, through)
        if c_reason is None and cons2 is not None:
            decision = FoldDecision("consumer", node_label(cons2))
            return FoldPlan(decision, facts.node, through, None, (), cons2, immediate)
        return why or f"through Identity: {c_reason}"
    if why:
        return why
    uses = index.uses(facts.y)
    if cons is None and len(uses) == 1 and uses[0].op_type in ("Add", "Sub", "Mul"):
        return identity_merge(index, facts)
    return ""
