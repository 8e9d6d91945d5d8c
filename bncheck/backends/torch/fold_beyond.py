"""The folds beyond a neighbour, tried for a BN whose producer and consumer both refuse.

- through channel-preserving layout ops into the producer before them
  (:mod:`~bncheck.backends.torch.fold_layout`, LeViT's ``Linear → flatten → BatchNorm1d``);
- slice by slice into the producers of a channel ``cat``
  (:mod:`~bncheck.backends.torch.fold_concat`, MixNet);
- as an identity branch of summed convolutions (:mod:`~bncheck.backends.torch.reparam`,
  RepVGG, MobileOne, FastViT).

``graph.match_fold`` asks :func:`further` last, so a neighbour fold always wins; ``fold`` finds
the same plan again with :func:`plan_of` on the same graph, so ``inspect`` and ``fold`` agree.
Each plan has a ``target`` (what ``inspect`` reports) and ``execute`` (the rewrite on the
unlifted copy; summed branches merge after every BN fold, in ``reparam.merge_sums``).
"""

from __future__ import annotations

from typing import Any

from bncheck.backends.torch.fold_concat import concat_plan
from bncheck.backends.torch.fold_layout import LAYOUT_OPS, layout_plan
from bncheck.backends.torch.graph import BNCall, GraphView, packet, producer_check

__all__ = ["further", "plan_of"]


def further(view: GraphView, call: BNCall, channels: int) -> Any:
    """The first fold of this module that applies to the BN of ``call`` (a plan with ``target``
    and ``execute``), else why the nearest one does not apply, or "" when none is near."""
    from bncheck.backends.torch.reparam import identity_merge  # it imports fold, which us

    inp = call.input
    if inp is not None and packet(inp) in LAYOUT_OPS:
        return layout_plan(view, call, channels)
    if inp is not None and packet(inp) == "cat":
        return concat_plan(view, call, channels)
    return identity_merge(view, call, channels)


def plan_of(view: GraphView, call: BNCall, into: str | None, channels: int) -> Any:
    """The plan behind a producer decision that is no plain producer fold, else None."""
    if into != "producer" or producer_check(view, call, channels)[0] is not None:
        return None
    plan = further(view, call, channels)
    return None if isinstance(plan, str) else plan
