"""Where a fold changed an ONNX graph: the part of both models that verification must run.

A fold rewrites the nodes around each BN; the nodes after the last rewrite are the original's,
reading the same tensors with bit-identical weights. Comparing the tensors where the rewritten
part hands over to that unchanged tail (the *frontier*) tests the fold itself: both models then
apply one and the same function to what they compared. Running the tail as well adds its cost
and no evidence about the fold; on VGG-11-BN it is 500 MB of fully connected weights that
onnxruntime packs again for each of the two sessions.

Verification cuts both models at the frontier only when the tail holds most of the weights
(:data:`TAIL_SHARE` and :data:`TAIL_MIN_BYTES`): elsewhere a whole-model comparison costs
little more, and it reports on the outputs a user reads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import NamedTuple

from onnx import AttributeProto, ModelProto, NodeProto, TensorProto

from bncheck.backends.onnx.encoding import declared_bytes, without_initializers
from bncheck.backends.onnx.graph import (
    _subgraph_outer_reads,
    inferred_values,
)

#: The unchanged tail must hold at least this share of the model's weight bytes...
TAIL_SHARE = 0.5
#: ...and at least this many bytes, for verification to run the changed part alone.
TAIL_MIN_BYTES = 64 * 2**20


class ChangedPart(NamedTuple):
    """Both models cut at the frontier, and what was left out."""

    original: ModelProto
    folded: ModelProto
    frontier: list[str]  # the tensors compared, in graph order
    tail_nodes: int  # nodes after the frontier, the same in both models
    tail_bytes: int  # the weight bytes only those nodes read


def changed_part(
    original: ModelProto,
    folded: ModelProto,
    *,
    share: float | None = None,
    min_bytes: int | None = None,
) -> ChangedPart | None:
    """``original`` and ``folded`` cut where ``folded``'s rewrites end, or None when the whole
    models should be compared: nothing changed, the unchanged tail is small (under ``share``
    of the weight bytes or ``min_bytes``; default :data:`TAIL_SHARE`, :data:`TAIL_MIN_BYTES`),
    or the two tails are not provably the same nodes on the same weights (a tail node with a
    subgraph, which may read any tensor above it, counts as not)."""
    share = TAIL_SHARE if share is None else share
    min_bytes = TAIL_MIN_BYTES if min_bytes is None else min_bytes
    g_o, g_f = original.graph, folded.graph
    total = sum(declared_bytes(t) for t in g_f.initializer)
    if total < min_bytes:
        return None  # no tail could be large enough: spare comparing every node and weight
    inits_o = {t.name: t for t in g_o.initializer}
    inits_f = {t.name: t for t in g_f.initializer}
    signatures_o = Counter(_signature(n) for n in g_o.node)

    def unchanged(node: NodeProto) -> bool:
        if _signature(node) not in signatures_o:
            return False
        for name in node.input:
            t = inits_f.get(name)
            if t is not None and not _same_tensor(t, inits_o.get(name)):
                return False
        return True

    changed = [i for i, n in enumerate(g_f.node) if not unchanged(n)]
    if not changed:
        return None
    head_f = _ancestors(g_f.node, changed)
    frontier = _frontier(g_f.node, head_f, {o.name for o in g_f.output})
    produced_o = {o: i for i, n in enumerate(g_o.node) for o in n.output}
    if any(name not in produced_o for name in frontier):
        return None
    head_o = _ancestors(g_o.node, sorted({produced_o[name] for name in frontier}))
    tail_f = [n for i, n in enumerate(g_f.node) if i not in head_f]
    tail_o = [n for i, n in enumerate(g_o.node) if i not in head_o]
    if any(_has_subgraph(n) for n in tail_f) or Counter(map(_signature, tail_f)) != Counter(
        map(_signature, tail_o)
    ):
        return None
    if [o.name for o in g_o.output] != [o.name for o in g_f.output]:
        return None
    # the original's tail reads what the folded one's does: the frontier, its own outputs,
    # the graph's inputs and equal weights (checked above, through the folded tail)
    known = {*frontier, *(o for n in tail_o for o in n.output), *(i.name for i in g_o.input)}
    known |= {*inits_o, ""}
    if any(name not in known for n in tail_o for name in n.input):
        return None

    head_reads = {name for i in head_f for name in _reads(g_f.node[i])}
    tail_reads = {name for n in tail_f for name in n.input} - head_reads
    tail_bytes = sum(declared_bytes(inits_f[name]) for name in tail_reads if name in inits_f)
    if tail_bytes < min_bytes or tail_bytes < share * total:
        return None
    types = _frontier_types(folded, frontier)
    if types is None:
        return None
    return ChangedPart(
        _cut(original, head_o, types),
        _cut(folded, head_f, types),
        frontier,
        len(tail_f),
        tail_bytes,
    )


def _signature(node: NodeProto) -> bytes:
    # name, op, domain, inputs, outputs and attributes: equal bytes, the same node
    return node.SerializeToString(deterministic=True)


def _same_tensor(a: TensorProto, b: TensorProto | None) -> bool:
    # protobuf compares the bytes without copying them out
    return b is not None and (a is b or a == b)


def _has_subgraph(node: NodeProto) -> bool:
    return any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute)


def _reads(node: NodeProto) -> Iterable[str]:
    """Every name ``node`` reads, its subgraphs' outer-scope reads too."""
    yield from node.input
    yield from _subgraph_outer_reads(node)


def _ancestors(nodes: Iterable[NodeProto], start: list[int]) -> set[int]:
    """Positions of the ``start`` nodes and of every node they depend on."""
    nodes = list(nodes)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    seen: set[int] = set()
    todo = list(start)
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        todo += [producer[name] for name in _reads(nodes[i]) if name in producer]
    return seen


def _frontier(nodes: Iterable[NodeProto], head: set[int], outputs: set[str]) -> list[str]:
    """The head's outputs that a node outside it reads, or that are graph outputs."""
    nodes = list(nodes)
    read_outside = {name for i, n in enumerate(nodes) if i not in head for name in _reads(n)}
    return [
        o
        for i in sorted(head)
        for o in nodes[i].output
        if o and (o in read_outside or o in outputs)
    ]


_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


def _frontier_types(model: ModelProto, frontier: list[str]) -> dict | None:
    """A ValueInfo for each frontier tensor (declared, else inferred), or None unless each is a
    float tensor of known type: onnxruntime needs the type to return it, and the verification
    bound is one for floats (outputs of another type are compared whole, as outputs)."""
    g = model.graph
    declared = {vi.name: vi for vi in [*g.input, *g.value_info, *g.output]}
    if any(name not in declared for name in frontier):
        declared = {**inferred_values(model), **declared}
    out = {}
    for name in frontier:
        vi = declared.get(name)
        if vi is None or vi.type.tensor_type.elem_type not in _FLOATS:
            return None
        out[name] = vi
    return out


def _cut(model: ModelProto, keep: set[int], outputs: dict) -> ModelProto:
    """``model`` with only the nodes at ``keep``, the weights they read, and ``outputs`` (name
    → ValueInfo) as its outputs; every graph input stays, so the same feeds run it."""
    g = model.graph
    cut = without_initializers(model)
    cg = cut.graph
    cg.ClearField("node")
    cg.node.extend(g.node[i] for i in sorted(keep))
    reads = {name for n in cg.node for name in _reads(n)}
    cg.initializer.extend(t for t in g.initializer if t.name in reads)
    kept = {t.name for t in cg.initializer}
    initializers = {t.name for t in g.initializer}
    inputs = [vi for vi in g.input if vi.name not in initializers or vi.name in kept]
    cg.ClearField("input")
    cg.input.extend(inputs)
    cg.ClearField("output")
    cg.output.extend(outputs.values())
    produced = {o for n in cg.node for o in n.output}
    values = [vi for vi in g.value_info if vi.name in produced]
    cg.ClearField("value_info")
    cg.value_info.extend(values)
    return cut
