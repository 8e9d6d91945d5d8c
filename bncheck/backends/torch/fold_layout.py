"""A BN behind channel-preserving layout ops, folded into the Conv/Linear before them.

LeViT writes ``Linear → flatten(0, 1) → BatchNorm1d → reshape_as``: the BN's channel axis is
the Linear's feature axis, moved by ops that only re-index elements. When every element of BN
channel ``c`` is feature ``c`` of the producer's output (proved from the traced shapes and
permutations by :mod:`bncheck.numerics.layout`), ``BN(L(z)) = L(s·z + t)`` with ``s, t`` along
the producer's feature axis, so the BN folds into the producer exactly as if it came right
after it: ``W' = s·W`` along the output features, ``b' = s·b + t``.

Matched: a Conv, ConvTranspose (feature axis 1) or Linear (last axis) with stored weights, then
up to four of flatten, reshape, view, squeeze, unsqueeze, permute, transpose, ``t`` and clone,
then the BN; every value between them read by the next node alone. A reader of the shape only
(``reshape_as(y, z)`` reads ``z``'s shape: LeViT's ``.reshape_as(x)``) is not a reader of the
values, which are all the fold changes. The same (match, check → reason) unit decides for
``inspect`` and runs in ``fold``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from bncheck.backends.torch.graph import (
    BNCall,
    GraphView,
    _other_users,
    op_args,
    out_channels,
    packet,
)
from bncheck.numerics.layout import axis_through_reshape, axis_through_transpose

__all__ = ["LAYOUT_OPS", "LayoutPlan", "dims", "layout_plan", "shape_only", "value_readers"]

_RESHAPES = {"flatten", "reshape", "view", "_unsafe_view", "reshape_as", "view_as", "squeeze",
             "unsqueeze"}  # fmt: skip
_SAME = {"clone", "contiguous", "alias", "detach", "lift_fresh_copy"}
LAYOUT_OPS = frozenset({*_RESHAPES, *_SAME, "permute", "transpose", "t"})
_SHAPE_OF_SECOND = {"reshape_as", "view_as", "expand_as"}  # (values, shape source)
_SHAPE_ONLY = {"sym_size", "sym_numel", "sym_stride", "size", "dim"}
_MAX_LAYOUT = 4


def dims(node: Any) -> tuple[int | str, ...] | None:
    """The traced shape of ``node``: ints, and symbolic sizes by their expression (``s0``)."""
    val = node.meta.get("val") if hasattr(node, "meta") else None
    if not hasattr(val, "shape"):
        return None
    return tuple(d if isinstance(d, int) else str(d) for d in val.shape)


def shape_only(user: Any, node: Any) -> bool:
    name = packet(user)
    if name in _SHAPE_ONLY:
        return True
    return name in _SHAPE_OF_SECOND and user.args[0] is not node


def value_readers(view: GraphView, node: Any, besides: set[Any]) -> list[str]:
    """Names of what reads ``node``'s values other than ``besides`` (the model output too);
    readers of its shape alone do not count."""
    shape_readers = {u for u in node.users if shape_only(u, node)}
    return _other_users(view, node, {*besides, *shape_readers})


@dataclass(frozen=True)
class LayoutPlan:
    """``producer → layout ops → BN``, proven to keep the producer's feature axis as axis 1."""

    producer: Any
    layout: tuple[Any, ...]  # producer side first
    name: str  # the producer's report name
    into: ClassVar[str] = "producer"  # FoldDecision.into

    @property
    def target(self) -> str:
        ops = ", ".join(f"{packet(n)} '{n.name}'" for n in self.layout)
        return f"{self.name} (through {ops})"

    def execute(self, gm: Any, nodes: dict[str, Any], call: BNCall, st: Any) -> None:
        """In the unlifted copy: the producer takes the BN, its last layout op feeds the BN's
        readers (``_Skip`` when the folded weights do not fit the dtype)."""
        from bncheck.backends.torch.fold import _erase, fold_producer  # fold.py imports us

        prod = nodes[self.producer.name]
        fold_producer(gm, [(prod, *st)])
        call.output.replace_all_uses_with(nodes[self.layout[-1].name])
        _erase(gm, call)


def _axis_through(node: Any, axis: int) -> int | None:
    name = packet(node)
    if name in _SAME:
        return axis
    shape_in, shape_out = dims(node.args[0]), dims(node)
    if shape_in is None or shape_out is None:
        return None
    rank = len(shape_in)
    if name == "permute":
        return axis_through_transpose([int(p) for p in op_args(node)["dims"]], axis)
    if name in ("transpose", "t"):
        perm = list(range(rank))[::-1] if name == "t" else list(range(rank))
        if name == "transpose":
            a, b = (int(op_args(node)[k]) % rank for k in ("dim0", "dim1"))
            perm[a], perm[b] = perm[b], perm[a]
        return axis_through_transpose(perm, axis)
    return axis_through_reshape(shape_in, axis, shape_out)


def layout_plan(view: GraphView, call: BNCall, channels: int) -> LayoutPlan | str:
    """How the BN of ``call`` folds through layout ops into a weighted producer, or why not."""
    layout: list[Any] = []
    node, below = call.input, set(call.region)
    while (
        node is not None
        and packet(node) in LAYOUT_OPS
        and hasattr(node.args[0], "op")
        and len(layout) < _MAX_LAYOUT
    ):
        others = value_readers(view, node, below)
        if others:
            return f"output of {packet(node)} '{node.name}' also feeds {others[0]!r}"
        layout.insert(0, node)
        node, below = node.args[0], {node}
    if not layout:
        return "input does not come from a layout op"
    first = f"{packet(layout[0])} '{layout[0].name}'"
    nb = view.neighbour(node)
    if nb.op not in ("Conv", "ConvTranspose", "Linear"):
        return f"no producer with weights before {first} (input comes from {nb.name})"
    if not nb.has_weights:
        return f"weight of '{nb.name}' is computed in the graph, not stored"
    bias = op_args(node).get("bias")
    if bias is not None and not view.stored(bias):
        return f"bias of '{nb.name}' is computed in the graph, not stored"
    others = value_readers(view, node, below)
    if others:
        return f"producer '{nb.name}' output also feeds {others[0]!r}"
    shape = dims(node)
    if shape is None or len(shape) < 2:
        return f"output rank of '{nb.name}' is unknown"
    oc = out_channels(view, node)
    if oc != channels:
        return f"producer '{nb.name}' has {oc} output features, the BN {channels}"
    axis: int | None = len(shape) - 1 if nb.op == "Linear" else 1
    for n in layout:
        axis = _axis_through(n, axis)
        if axis is None:
            return (
                f"{packet(n)} '{n.name}' is not proven to keep the feature axis of "
                f"'{nb.name}' intact"
            )
    if axis != 1:
        return f"the feature axis of '{nb.name}' reaches the BN as axis {axis}, not 1"
    return LayoutPlan(node, tuple(layout), nb.name)
