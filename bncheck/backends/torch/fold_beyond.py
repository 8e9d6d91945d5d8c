"""The folds beyond a neighbour, tried for a BN whose producer and consumer both refuse.

- through channel-preserving layout ops into the producer before them
  (:mod:`~bncheck.backends.torch.fold_layout`, LeViT's ``Linear → flatten → BatchNorm1d``);
- slice by slice into the producers of a channel ``cat``
  (:mod:`~bncheck.backends.torch.fold_concat`, MixNet);
- into a consumer behind ops that pass values through unchanged at inference (dropout with
  ``train=False``, clone, alias, detach: LeViT's ``BN → Dropout → Linear`` head), a plain consumer
  fold with the last of them standing for the BN's output;
- as an identity branch of summed convolutions (:mod:`~bncheck.backends.torch.reparam`,
  RepVGG, MobileOne, FastViT).

``graph.match_fold`` asks :func:`further` last, so a neighbour fold always wins; ``fold`` finds
the same plan again with :func:`plan_of` on the same graph, so ``inspect`` and ``fold`` agree.
Each plan has ``into`` and ``target`` (what ``inspect`` reports) and ``execute`` (the rewrite on
the unlifted copy; summed branches merge after every BN fold, in ``reparam_merge.merge_sums``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from bncheck.backends.torch.fold_concat import concat_plan
from bncheck.backends.torch.fold_layout import LAYOUT_OPS, layout_plan
from bncheck.backends.torch.graph import (
    BNCall,
    GraphView,
    bn_shift_is_zero,
    consumer_check,
    op_args,
    packet,
    producer_check,
)
from bncheck.layers import BNLayer

__all__ = ["PassThrough", "further", "pass_through", "plan_of"]

_PASS = {"dropout", "clone", "alias", "detach", "contiguous"}


@dataclass(frozen=True)
class PassThrough:
    """``BN → pass-through ops → consumer``: the consumer absorbs the BN."""

    consumer: Any
    name: str
    into: ClassVar[str] = "consumer"

    @property
    def target(self) -> str:
        return self.name

    def execute(self, gm: Any, nodes: dict[str, Any], call: BNCall, st: Any) -> None:
        """In the unlifted copy: the consumer takes the BN, the first pass-through op reads
        the BN's input (``_Skip`` when the folded weights do not fit the dtype)."""
        from bncheck.backends.torch.fold import _erase, fold_consumer  # fold.py imports us

        fold_consumer(gm, nodes[self.consumer.name], *st)
        call.output.replace_all_uses_with(call.input)
        _erase(gm, call)


def _passes(node: Any, value: Any) -> bool:
    name = packet(node)
    if name not in _PASS or node.args[0] is not value:
        return False
    return name != "dropout" or not op_args(node).get("train", True)


def pass_through(view: GraphView, call: BNCall, channels: int, shift_is_zero: bool) -> Any:
    """The consumer fold behind pass-through ops, or why not ("" when none follow the BN)."""
    out = call.output
    while out not in view.outputs:
        users = [u for u in out.users if u not in call.region]
        if len(users) != 1 or not _passes(users[0], out):
            break
        out = users[0]
    if out is call.output:
        return ""
    target, reason = consumer_check(
        view, BNCall(call.node, call.region, call.input, out), channels, shift_is_zero
    )
    if target is None:
        return f"through {packet(out)} '{out.name}': {reason}"
    return PassThrough(next(u for u in out.users), target)


def further(view: GraphView, call: BNCall, channels: int, shift_is_zero: bool) -> Any:
    """The first fold of this module that applies to the BN of ``call`` (a plan with ``into``,
    ``target`` and ``execute``), else why the nearest one does not apply, or "" when none is
    near."""
    from bncheck.backends.torch.reparam import identity_merge  # it imports fold, which us

    inp = call.input
    why = ""
    if inp is not None and packet(inp) in LAYOUT_OPS:
        why = layout_plan(view, call, channels)
    elif inp is not None and packet(inp) == "cat":
        why = concat_plan(view, call, channels)
    if not isinstance(why, str) or call.output is None:
        return why
    plan = pass_through(view, call, channels, shift_is_zero)
    if not isinstance(plan, str):
        return plan
    return why or plan or identity_merge(view, call, channels)


def plan_of(view: GraphView, call: BNCall, layer: BNLayer) -> Any:
    """The plan behind ``layer``'s decision when it is no plain neighbour fold, else None."""
    into, channels = layer.fold.into, layer.channels
    if into == "producer" and producer_check(view, call, channels)[0] is not None:
        return None
    stats = (layer.running_mean, layer.running_var, layer.weight, layer.bias)
    shift0 = bn_shift_is_zero(*stats, layer.eps)
    if into == "consumer" and consumer_check(view, call, channels, shift0)[0] is not None:
        return None
    plan = further(view, call, channels, shift0)
    return None if isinstance(plan, str) else plan
