"""Structural reparameterisation: summed parallel branches on one input become one Conv.

RepVGG, MobileOne and FastViT blocks compute ``Add(Conv₁(x)+BN, Conv₂(x)+BN, …, BN(x))``. Once
each branch BN has folded into its Conv, the sum is one convolution (the math and its alignment
conditions are in :mod:`bncheck.numerics.reparam`): the kernels add up, each embedded in the
largest at the tap where its window lines up, and an identity branch ``BN(x) = s·x + t`` (or a
bare ``x``) is a kernel with ``s[o]`` at the centre tap of channel ``o``. The merged Conv takes
the largest kernel's place and writes the sum; the other Convs, the identity BN and the Adds go.

More generally the sum may be a signed, per-channel weighted one, ``Σ kᵢ·branchᵢ``: a ``Sub``
negates its second operand and a ``Mul`` by a per-channel constant scales what it reads
(FastViT's RepMixer is ``x + γ·(mixer(x) − norm(x))``); ``kᵢ·Conv(x)`` is a Conv with its output
channels scaled, ``kᵢ·(s·x + t)`` an identity with scale ``kᵢ·s`` and shift ``kᵢ·t``.

Matched: a tree of Add/Sub nodes and Muls by per-channel constants (inner results read once,
by the next node) whose every leaf is a Conv on the same input ``x`` (its output read once,
optionally through a BN that folds into it), a BN on ``x``, ``x`` itself, or a per-channel
constant (added to the bias). All Convs share groups, strides and dilations and have explicit
padding (no ``auto_pad``); every kernel fits the largest with matching padding; identity leaves
need stride 1, an output the size of the input and as many output channels as input channels.

:func:`identity_merge` tells the planner whether an identity BN goes this way (so ``inspect``
and ``fold`` agree); the merges happen in :func:`merge_branches`, after every BN fold, and also
cover sums with no identity BN (RepVGG's stride-2 blocks), which hold no BN of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from onnx import NodeProto

from bncheck.backends.onnx.fold_layout import single_reader
from bncheck.backends.onnx.fold_plan import (
    BNFacts,
    FoldPlan,
    _desc,
    bn_facts,
    bn_reason,
    fold_plan,
    per_channel,
)
from bncheck.backends.onnx.graph import GraphIndex, attr, node_label
from bncheck.backends.onnx.rewrite import Rewrite
from bncheck.numerics import fold_into_producer
from bncheck.numerics.reparam import merge_branches as merge_kernels
from bncheck.numerics.reparam import tap_offset

__all__ = ["BranchMerge", "identity_merge", "merge_branches"]


def _default(node: NodeProto | None, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain in ("", "ai.onnx")


@dataclass(frozen=True)
class Leaf:
    tensor: str  # what the Add tree reads
    conv: NodeProto | None  # a Conv branch, else an identity branch
    bn: NodeProto | None  # the BN after the Conv, or the identity BN; None for a bare x
    const: bool = False  # a constant added to the sum (timm's MobileOne adds a literal 0)
    coef: np.ndarray | None = None  # per-channel factor from Sub and Mul on the way; None = 1


@dataclass(frozen=True)
class BranchMerge:
    """Branches summed by ``root`` (through ``adds``), merged into ``host`` (largest kernel)."""

    root: NodeProto
    adds: tuple[NodeProto, ...]
    convs: tuple[Leaf, ...]
    identities: tuple[Leaf, ...]
    host: NodeProto
    kernel: tuple[int, ...]
    offsets: tuple[tuple[int, ...], ...]  # per conv, tap offset inside ``kernel``
    centre: tuple[int, ...] | None  # the identity tap, when there are identity branches
    groups: int
    consts: tuple[Leaf, ...] = ()  # per-channel constants added to the sum: into the bias

    @property
    def target(self) -> str:
        return f"{node_label(self.host)} (branches merged at {_desc(self.root)})"

    def fold(self, rw: Rewrite, plan: FoldPlan) -> str | None:
        return None  # carried out by merge_branches, once every branch BN has folded


def _leaf(index: GraphIndex, tensor: str) -> Leaf:
    prod = index.producer.get(tensor)
    if _default(prod, "BatchNormalization") and prod.output[0] == tensor:
        below = index.producer.get(prod.input[0])
        if _default(below, "Conv") and single_reader(index, prod.input[0], prod):
            return Leaf(tensor, below, prod)
        return Leaf(tensor, None, prod)
    if _default(prod, "Conv") and prod.output[0] == tensor:
        return Leaf(tensor, prod, None)
    return Leaf(tensor, None, None, const=index.is_constant(tensor))


def _leaf_input(leaf: Leaf) -> str:
    if leaf.conv is not None:
        return leaf.conv.input[0]
    return leaf.bn.input[0] if leaf.bn is not None else leaf.tensor


def _combiner(node: NodeProto | None) -> bool:
    return (_default(node, "Add") or _default(node, "Sub")) and len(node.input) == 2


def _scale(index: GraphIndex, node: NodeProto | None) -> tuple[str, np.ndarray] | None:
    """``(variable input, factor)`` of a Mul by a constant that broadcasts along axis 1 only."""
    if not _default(node, "Mul") or len(node.input) != 2:
        return None
    consts = [i for i in node.input if index.is_constant(i)]
    if len(consts) != 1:
        return None
    shape = index.const_shape(consts[0]) or ()
    if not per_channel(shape, index.rank(node.output[0]), max(shape, default=1)):
        return None
    var = next(i for i in node.input if i != consts[0])
    return var, index.const(consts[0]).astype(np.float64).reshape(-1)


def _tree(index: GraphIndex, root: NodeProto) -> tuple[list[NodeProto], list[Leaf]]:
    """The Add/Sub nodes (and Muls by per-channel constants) of the sum at ``root``, each read
    once by the next, and its leaves with their factors: ``root = Σ coefᵢ·leafᵢ``."""
    inner, leaves = [root], []
    stack: list[tuple[NodeProto, np.ndarray | None]] = [(root, None)]
    while stack:
        node, k = stack.pop()
        if node.op_type == "Mul":
            var, c = _scale(index, node)
            items = [(var, c if k is None else k * c)]
        else:
            neg = -np.ones(1) if k is None else -k
            items = [(node.input[0], k), (node.input[1], neg if node.op_type == "Sub" else k)]
        for name, kk in items:
            prod = index.producer.get(name)
            inside = _combiner(prod) or _scale(index, prod) is not None
            if inside and prod.output[0] == name and single_reader(index, name, node):
                inner.append(prod)
                stack.append((prod, kk))
            else:
                leaf = _leaf(index, name)
                leaves.append(Leaf(leaf.tensor, leaf.conv, leaf.bn, leaf.const, kk))
    return inner, leaves


def _ints(node: NodeProto, name: str, n: int, fill: int) -> tuple[int, ...]:
    v = attr(node, name, None)
    return tuple(int(x) for x in v) if v else (fill,) * n


BnCheck = Callable[[NodeProto, NodeProto], str | None]  # (bn, conv) → why it has not folded


def _planned(index: GraphIndex) -> BnCheck:
    def check(bn: NodeProto, conv: NodeProto) -> str | None:
        plan = fold_plan(index, bn)
        if plan.decision.into == "producer" and plan.producer is conv and not plan.chain:
            return None
        return f"branch BN '{node_label(bn)}' does not fold into {_desc(conv)}"

    return check


def match_group(index: GraphIndex, root: NodeProto, bn_folded: BnCheck) -> BranchMerge | str:
    """The branches summed at ``root`` as one mergeable group, or why they are not."""
    if not _combiner(root):
        return f"{_desc(root)} is not a two-input Add or Sub"
    adds, leaves = _tree(index, root)
    consts = [leaf for leaf in leaves if leaf.const]
    leaves = [leaf for leaf in leaves if not leaf.const]
    xs = {_leaf_input(leaf) for leaf in leaves}
    convs = [leaf for leaf in leaves if leaf.conv is not None]
    idents = [leaf for leaf in leaves if leaf.conv is None]
    if len(xs) != 1 or not convs:
        return f"the branches summed at {_desc(root)} are not convolutions of one input"
    if len(leaves) < 2:  # one Conv and constants: a decomposed BN or bias, folded as such
        return f"{_desc(root)} sums a single branch"
    for leaf in leaves:
        reader = next(a for a in adds if leaf.tensor in a.input)
        if leaf.tensor not in xs and not single_reader(index, leaf.tensor, reader):
            return f"branch output '{leaf.tensor}' is also read elsewhere"
    first = convs[0].conv
    n = len(index.const_shape(first.input[1]) or ()) - 2
    if n < 1:
        return f"weight of {_desc(first)} is unknown"
    groups = int(attr(first, "group", 1))
    strides, dil = _ints(first, "strides", n, 1), _ints(first, "dilations", n, 1)
    shapes = []
    for leaf in convs:
        c = leaf.conv
        w = index.const_shape(c.input[1]) if len(c.input) > 1 else None
        if not w or len(w) != n + 2 or not index.is_constant(c.input[1]):
            return f"weight of {_desc(c)} is not a constant {n}-D kernel"
        if len(c.input) > 2 and c.input[2] and not index.is_constant(c.input[2]):
            return f"bias of {_desc(c)} is not constant"
        if int(attr(c, "group", 1)) != groups:
            return f"the convolutions summed at {_desc(root)} differ in groups"
        if _ints(c, "strides", n, 1) != strides or _ints(c, "dilations", n, 1) != dil:
            return f"the convolutions summed at {_desc(root)} differ in stride or dilation"
        pad = attr(c, "auto_pad", b"NOTSET")
        if (pad.decode() if isinstance(pad, bytes) else str(pad)) not in ("NOTSET", ""):
            return f"{_desc(c)} uses auto_pad"
        if tuple(w[:2]) != tuple(index.const_shape(first.input[1])[:2]):
            return f"the convolutions summed at {_desc(root)} differ in channels"
        shapes.append(tuple(w[2:]))
        if leaf.bn is not None:
            why = bn_folded(leaf.bn, c)
            if why:
                return why
    host_i = max(range(len(convs)), key=lambda i: int(np.prod(shapes[i])))
    host, kernel = convs[host_i].conv, shapes[host_i]
    hp = _ints(host, "pads", 2 * n, 0)
    offsets = []
    for leaf, k in zip(convs, shapes, strict=True):
        p = _ints(leaf.conv, "pads", 2 * n, 0)
        off = [
            tap_offset(kernel[a], k[a], (hp[a], hp[a + n]), (p[a], p[a + n]), dil[a])
            for a in range(n)
        ]
        if any(o is None for o in off):
            return f"{_desc(leaf.conv)} does not line up with {_desc(host)} (kernel or padding)"
        offsets.append(tuple(off))
    rank = n + 2
    cout = index.const_shape(first.input[1])[0]
    for leaf in consts:
        if not per_channel(index.const_shape(leaf.tensor) or (), rank, cout):
            return f"constant '{leaf.tensor}' summed at {_desc(root)} is not per channel"
    for leaf in (*leaves, *consts):
        if leaf.coef is not None and leaf.coef.size not in (1, cout):
            return f"a factor in the sum at {_desc(root)} is not per channel"
    centre = None
    if idents:
        cout, cin_g = index.const_shape(host.input[1])[:2]
        if cin_g * groups != cout or any(s != 1 for s in strides):
            return (
                f"an identity branch at {_desc(root)} needs stride 1 and as many channels out as in"
            )
        centre = tuple(hp[a] // dil[a] for a in range(n))
        if any(hp[a] % dil[a] or hp[a] + hp[a + n] != dil[a] * (kernel[a] - 1) for a in range(n)):
            return f"{_desc(host)} does not keep the size of its input (identity branch)"
        for leaf in idents:
            if leaf.bn is not None:
                facts = bn_facts(index, leaf.bn)
                why = bn_reason(index, facts)
                if why or facts.channels != cout:
                    return (
                        why or f"identity BN '{node_label(leaf.bn)}' has {facts.channels} channels"
                    )
    return BranchMerge(
        root,
        tuple(adds),
        tuple(convs),
        tuple(idents),
        host,
        kernel,
        tuple(offsets),
        centre,
        groups,
        tuple(consts),
    )


def _up(index: GraphIndex, node: NodeProto) -> NodeProto | None:
    """The Add/Sub that takes ``node``'s output into its sum (through Muls by per-channel
    constants, each read once), if any."""
    while True:
        out = node.output[0]
        uses = index.uses(out)
        if len(uses) != 1 or index.is_graph_output(out):
            return None
        node = uses[0]
        if _combiner(node):
            return node
        if _scale(index, node) is None:
            return None


def _root(index: GraphIndex, add: NodeProto, bn_folded: BnCheck) -> BranchMerge | str:
    """The largest matching Add tree at or above ``add``, or why ``add``'s does not match.
    (A tree that fails holds a leaf or a Conv that fails, so every tree above it fails too.)"""
    chain = [add]
    while (parent := _up(index, chain[-1])) is not None:
        chain.append(parent)
    results = [match_group(index, a, bn_folded) for a in chain]
    return next((r for r in reversed(results) if not isinstance(r, str)), results[0])


def identity_merge(index: GraphIndex, facts: BNFacts) -> BranchMerge | str:
    """The merge that takes ``facts``' BN as an identity branch, or why none does."""
    leaf = _leaf(index, facts.y)
    if leaf.conv is not None or leaf.bn is not facts.node:
        return "output feeds an Add"
    add = _up(index, facts.node)
    if add is None:
        return "output feeds no sum"
    found = _root(index, add, _planned(index))
    if isinstance(found, str):
        return f"no branch merge: {found}"
    return found


def _executed(rw: Rewrite) -> BnCheck:
    def check(bn: NodeProto, conv: NodeProto) -> str | None:
        p = rw.position(conv)
        if rw.position(bn) in rw.remove and rw.rename_output.get(p) == bn.output[0]:
            return None
        return f"branch BN '{node_label(bn)}' did not fold into {_desc(conv)}"

    return check


def _apply(rw: Rewrite, m: BranchMerge) -> str | None:
    from bncheck.backends.onnx.fold import _bn_affine, _load_params, _overflows  # it imports us

    for leaf in m.convs:
        if leaf.bn is None and rw.position(leaf.conv) in rw.remove:
            return f"{_desc(leaf.conv)} was rewritten"
    convs, idents = [], []
    c = int(rw.index.const_shape(m.host.input[1])[0])

    def coef(leaf: Leaf) -> np.ndarray:
        return np.ones(c) if leaf.coef is None else np.broadcast_to(leaf.coef, (c,))

    for leaf, off in zip(m.convs, m.offsets, strict=True):
        params = _load_params(rw, leaf.conv)
        if isinstance(params, str):
            return params
        k = coef(leaf)  # k·Conv(x) is a Conv with its output channels scaled
        w, b = fold_into_producer(
            params.weight, params.bias, k, np.zeros(c), op="conv", groups=params.groups
        )
        convs.append((w, b, off))
    for leaf in m.identities:
        st = (np.ones(c), np.zeros(c))
        if leaf.bn is not None:
            p = rw.position(leaf.bn)
            if p in rw.remove or p in rw.affine:
                return f"identity BN '{node_label(leaf.bn)}' was rewritten"
            st = _bn_affine(bn_facts(rw.index, leaf.bn))
            if isinstance(st, str):
                return st
        idents.append((coef(leaf) * st[0], coef(leaf) * st[1]))
    w, b = merge_kernels(convs, idents, kernel=m.kernel, groups=m.groups, centre=m.centre)
    for leaf in m.consts:
        value = rw.index.const(leaf.tensor).astype(np.float64).reshape(-1)
        b = b + coef(leaf) * np.broadcast_to(value, (c,))
    host = _load_params(rw, m.host)
    problem = _overflows((w, b), (host.dtype, host.bias_dtype), "merged kernel")
    if problem:
        return problem
    host.weight, host.bias, host.changed = w, b, True
    for leaf in m.convs:
        if leaf.conv is not m.host:
            rw.remove.add(rw.position(leaf.conv))
    rw.remove.update(rw.position(n) for n in (*m.adds, *(i.bn for i in m.identities if i.bn)))
    rw.rename_output[rw.position(m.host)] = m.root.output[0]
    return None


def merge_branches(rw: Rewrite) -> list[tuple[NodeProto, str]]:
    """Merge every matching sum of branches in the rewrite ``rw`` (after the BN folds);
    returns the identity BNs planned into a merge that did not happen, with the reason."""
    index = rw.index
    executed, planned = _executed(rw), _planned(index)
    failed: list[tuple[NodeProto, str]] = []
    for add in index.model.graph.node:
        if not _combiner(add) or rw.position(add) in rw.remove:
            continue
        parent = _up(index, add)
        if parent is not None and not isinstance(match_group(index, parent, planned), str):
            continue  # an inner sum: its root merges it
        m = match_group(index, add, planned)
        if isinstance(m, str):
            continue
        why = match_group(index, add, executed)
        why = why if isinstance(why, str) else _apply(rw, why)
        if why:
            failed += [(i.bn, f"branch merge: {why}") for i in m.identities if i.bn]
    return failed
