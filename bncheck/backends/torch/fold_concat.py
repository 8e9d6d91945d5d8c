"""A BN after a channel ``cat``, folded slice by slice into the cat's producers.

``BN(cat([P₁(x₁), …, Pₖ(xₖ)], dim=1))`` is ``cat([BNᵢ(Pᵢ(xᵢ))])`` where ``BNᵢ`` is the BN
restricted to the channels ``[oᵢ, oᵢ + mᵢ)`` that ``Pᵢ`` contributes: BN is per channel, so each
slice ``sᵢ·z + tᵢ`` folds into its own producer exactly as a BN right after it would
(``W'ᵢ = sᵢ·Wᵢ`` along the output channels, ``b'ᵢ = sᵢ·bᵢ + tᵢ``). MixNet's mixed depthwise
convolutions (``split → conv per slice → cat → BN``) are this shape.

It is exact only when each producer's output is read by the cat alone (once): a producer whose
output also feeds something else would change that reader too (DenseNet's and DPN's concats
reuse their inputs, and stay). The cat's output must feed the BN alone. Each producer passes the
same checks as a plain producer fold (``graph.producer_check``), and the rewrite changes nothing
unless every slice fits its dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from bncheck.backends.torch.fold_layout import dims, value_readers
from bncheck.backends.torch.graph import BNCall, GraphView, op_args, out_channels, producer_check

__all__ = ["ConcatPlan", "concat_plan"]


@dataclass(frozen=True)
class ConcatPlan:
    """A BN folded through ``cat``: ``producers[i]`` makes channels ``slices[i]``."""

    cat: Any
    producers: tuple[Any, ...]
    names: tuple[str, ...]
    slices: tuple[tuple[int, int], ...]  # (offset, count) per producer, in cat order
    into: ClassVar[str] = "producer"  # FoldDecision.into

    @property
    def target(self) -> str:
        return f"{', '.join(self.names)} (through cat '{self.cat.name}')"

    def execute(self, gm: Any, nodes: dict[str, Any], call: BNCall, st: Any) -> None:
        """In the unlifted copy: each producer takes its slice of the BN, the cat feeds the
        BN's readers (``_Skip``, with nothing changed, when a slice does not fit its dtype)."""
        from bncheck.backends.torch.fold import _erase, fold_producer  # fold.py imports us

        s, t = st
        parts = [
            (nodes[p.name], s[o : o + m], t[o : o + m])
            for p, (o, m) in zip(self.producers, self.slices, strict=True)
        ]
        fold_producer(gm, parts)
        call.output.replace_all_uses_with(nodes[self.cat.name])
        _erase(gm, call)


def concat_plan(view: GraphView, call: BNCall, channels: int) -> ConcatPlan | str:
    """The slices of the BN of ``call`` when its input is a channel cat of weighted producers
    that nothing else reads; otherwise why not."""
    cat = call.input
    args = op_args(cat)
    shape = dims(cat)
    dim = args.get("dim", 0)
    if shape is None or len(shape) < 2 or not isinstance(dim, int) or dim % len(shape) != 1:
        return f"cat '{cat.name}' does not join along the channel axis"
    others = value_readers(view, cat, call.region)
    if others:
        return f"cat '{cat.name}' output also feeds {others[0]!r}"
    inputs = list(args.get("tensors") or ())
    if len(inputs) != len(set(inputs)):
        return f"cat '{cat.name}' joins the same tensor twice"
    producers, names, slices, offset = [], [], [], 0
    for inp in inputs:
        if not hasattr(inp, "op"):
            return f"cat '{cat.name}' joins a constant"
        kind = view.kind(inp)
        count = out_channels(view, inp) if kind in ("Conv", "ConvTranspose", "Linear") else None
        if count is None:
            return f"cat input '{view.neighbour(inp).name}' is not a Conv, ConvTranspose or Linear"
        # the plain producer checks, with the cat as the one node allowed to read it
        name, reason = producer_check(view, BNCall(None, {cat}, inp, None), count)
        if reason:
            return f"cat input: {reason}"
        producers.append(inp)
        names.append(name)
        slices.append((offset, count))
        offset += count
    if offset != channels:
        return f"cat '{cat.name}' makes {offset} channels, the BN {channels}"
    return ConcatPlan(cat, tuple(producers), tuple(names), tuple(slices))
