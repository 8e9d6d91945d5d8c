"""Structural reparameterisation on the torch graph: summed parallel branches become one conv.

RepVGG, MobileOne and FastViT blocks compute ``conv₁(x)→BN + conv₂(x)→BN + … + BN(x)``. Once
each branch BN has folded into its conv, the sum is one convolution (the math and its alignment
conditions are in :mod:`bncheck.numerics.reparam`): the kernels add up, each embedded in the
largest at the tap where its window lines up, and an identity branch ``BN(x) = s·x + t`` (or a
bare ``x``) is a kernel with ``s[o]`` at the centre tap of channel ``o``. The largest conv (the
host) takes the merged kernel and bias and stands for the sum; the other convs, the identity BN
and the adds go.

The sum may be signed and per-channel weighted, ``Σ kᵢ·branchᵢ``: ``sub`` negates its second
operand and a ``mul`` by a per-channel constant scales what it reads (FastViT's RepMixer is
``x + γ·(mixer(x) − norm(x))``); ``kᵢ·conv(x)`` is a conv with its output channels scaled,
``kᵢ·(s·x + t)`` an identity with scale ``kᵢ·s``, shift ``kᵢ·t``. A number or per-channel
constant added to the sum (timm's MobileOne adds a literal 0) goes into the bias.

Matched: a tree of add/sub (``alpha`` 1, in place or not) and muls by per-channel constants,
inner values read once by the next node, whose leaves are a conv on one input ``x`` (read once,
optionally through a BN that folds into it), an inference BN on ``x``, ``x`` itself (never
updated in place) or a constant. The convs share groups, strides and dilations, have integer
padding and stored weights; each kernel lines up with the largest; identity leaves need stride
1, an output the size of the input and as many channels out as in.

``identity_merge`` decides for an identity BN in discovery (``inspect`` reports it);
:func:`~bncheck.backends.torch.reparam_merge.merge_sums` merges every matching sum of the
unlifted copy after the BN folds, sums without an identity BN too (RepVGG's stride-2 blocks),
and names the identity BNs whose merge did not happen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from bncheck.backends.torch.fold_layout import value_readers
from bncheck.backends.torch.graph import (
    BN_OPS,
    BNCall,
    GraphView,
    call_from_op,
    op_args,
    packet,
    producer_check,
)
from bncheck.numerics.reparam import tap_offset

__all__ = ["BranchMerge", "Env", "Leaf", "identity_merge", "match_group"]

_COMBINE = {"add", "add_", "sub", "sub_"}
_SCALE = {"mul", "mul_"}
_CONVS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"}
_TRAINING = {"_batch_norm_with_update", "_batch_norm_with_update_functional"}


@dataclass
class Env:
    """The graph being matched and how to read its stored tensors: the ExportedProgram's
    graph in discovery, the unlifted copy in ``fold``; ``bn_ok(bn, conv)`` says why a BN
    has not folded (into ``conv``, or as an identity branch when ``conv`` is None)."""

    readers: Callable[[Any, set[Any]], list[str]]
    stored: Callable[[Any], bool]
    tensor: Callable[[Any], Any]
    bn_ok: Callable[[Any, Any], str | None]


@dataclass(frozen=True)
class Leaf:
    node: Any  # what the sum reads: a node, or a number
    conv: Any = None  # a conv branch
    bn: Any = None  # the BN op after the conv, or the identity BN op
    const: bool = False
    coef: np.ndarray | None = None  # per-channel factor from sub and mul on the way


@dataclass(frozen=True)
class BranchMerge:
    """Branches summed at ``root`` (through ``inner``), merged into ``host``."""

    root: Any
    inner: tuple[Any, ...]
    convs: tuple[Leaf, ...]
    idents: tuple[Leaf, ...]
    consts: tuple[Leaf, ...]
    host: Any
    host_name: str
    kernel: tuple[int, ...]
    offsets: tuple[tuple[int, ...], ...]
    centre: tuple[int, ...] | None
    groups: int
    into: ClassVar[str] = "producer"  # FoldDecision.into

    @property
    def target(self) -> str:
        return f"{self.host_name} (branches merged at {packet(self.root)} '{self.root.name}')"

    def execute(self, gm: Any, nodes: dict[str, Any], call: BNCall, st: Any) -> None:
        """Nothing yet: ``reparam_merge.merge_sums`` merges, after every branch BN has folded."""


def _is_bn(node: Any) -> Any:
    """The BN op whose normalized output ``node`` is, or None."""
    if packet(node) in BN_OPS and len(node.target._schema.returns) == 1:
        return node
    if packet(node) == "getitem" and node.args[1] == 0 and packet(node.args[0]) in BN_OPS:
        return node.args[0]
    return None


def _is_conv(node: Any) -> bool:
    return packet(node) in _CONVS and not op_args(node).get("transposed", False)


def _scale(env: Env, node: Any) -> tuple[Any, np.ndarray] | None:
    """(variable operand, factor) of a mul by a number or per-channel stored tensor."""
    if packet(node) not in _SCALE:
        return None
    a, b = node.args[:2]
    for var, k in ((a, b), (b, a)):
        if not hasattr(var, "op"):
            continue
        if isinstance(k, (int, float)) and not isinstance(k, bool):
            return var, np.array([float(k)])
        if hasattr(k, "op") and env.stored(k):
            value = _per_channel(env.tensor(k), node)
            if value is not None:
                return var, value
    return None


def _per_channel(t: Any, out: Any) -> np.ndarray | None:
    """``t`` as a float64 vector when it broadcasts against ``out`` along axis 1 only."""
    val = out.meta.get("val")
    rank = val.dim() if hasattr(val, "dim") else None
    shape = tuple(t.shape)
    if rank is None or rank < 2 or len(shape) > rank or not t.is_floating_point():
        return None
    padded = (1,) * (rank - len(shape)) + shape
    if any(d != 1 for i, d in enumerate(padded) if i != 1):
        return None
    return t.detach().double().cpu().numpy().reshape(-1)


def _combiner(node: Any) -> bool:
    return (
        packet(node) in _COMBINE
        and len(node.args) == 2
        and node.kwargs.get("alpha", 1) == 1
        and all(hasattr(a, "op") or isinstance(a, (int, float)) for a in node.args)
    )


def _leaf(env: Env, item: Any, coef: np.ndarray | None) -> Leaf:
    if not hasattr(item, "op"):
        return Leaf(item, const=True, coef=coef)
    if env.stored(item):
        return Leaf(item, const=True, coef=coef)
    bn = _is_bn(item)
    if bn is not None:
        below = op_args(bn).get("input")
        if _is_conv(below) and not env.readers(below, {bn}):
            return Leaf(item, below, bn, coef=coef)
        return Leaf(item, None, bn, coef=coef)
    return Leaf(item, item if _is_conv(item) else None, None, coef=coef)


def _tree(env: Env, root: Any) -> tuple[list[Any], list[Leaf]]:
    """The inner nodes of the sum at ``root`` (each read once, by the next) and its leaves
    with their factors: ``root = Σ coefᵢ·leafᵢ``."""
    inner, leaves = [root], []
    stack: list[tuple[Any, np.ndarray | None]] = [(root, None)]
    while stack:
        node, k = stack.pop()
        sc = _scale(env, node)
        if sc is not None:
            items = [(sc[0], sc[1] if k is None else k * sc[1])]
        else:
            neg = -np.ones(1) if k is None else -k
            items = [(node.args[0], k), (node.args[1], neg if "sub" in packet(node) else k)]
        for item, kk in items:
            inside = hasattr(item, "op") and (_combiner(item) or _scale(env, item) is not None)
            if inside and not env.readers(item, {node}):
                inner.append(item)
                stack.append((item, kk))
            else:
                leaves.append(_leaf(env, item, kk))
    return inner, leaves


def _leaf_input(leaf: Leaf) -> Any:
    if leaf.conv is not None:
        return op_args(leaf.conv)["input"]
    return op_args(leaf.bn)["input"] if leaf.bn is not None else leaf.node


def _ints(value: Any, n: int) -> tuple[int, ...] | None:
    vals = [value] if isinstance(value, int) else list(value)
    if not all(isinstance(v, int) for v in vals):
        return None
    return tuple(vals * n if len(vals) == 1 else vals) if len(vals) in (1, n) else None


def _geometry(env: Env, conv: Any, label: str) -> tuple[Any, ...] | str:
    """(weight shape, stride, padding, dilation, groups) of a conv, or why not mergeable."""
    args = op_args(conv)
    w, b = args.get("weight"), args.get("bias")
    if not (hasattr(w, "op") and env.stored(w)) or (b is not None and not env.stored(b)):
        return f"weights of '{label}' are computed in the graph, not stored"
    shape = tuple(env.tensor(w).shape)
    n = len(shape) - 2
    pad = args.get("padding", 0)
    pad = (0,) * n if pad == "valid" else pad
    geo = [_ints(args.get(k, 1), n) for k in ("stride", "dilation")]
    pads = None if isinstance(pad, str) else _ints(pad, n)
    if n < 1 or pads is None or None in geo:
        return f"'{label}' has no integer padding, stride or dilation"
    return shape, geo[0], pads, geo[1], int(args.get("groups", 1))


def match_group(env: Env, root: Any, name: Callable[[Any], str]) -> BranchMerge | str:
    """The branches summed at ``root`` as one mergeable group, or why they are not."""
    inner, leaves = _tree(env, root)
    consts = [leaf for leaf in leaves if leaf.const]
    leaves = [leaf for leaf in leaves if not leaf.const]
    xs = {_leaf_input(leaf) for leaf in leaves}
    convs = [leaf for leaf in leaves if leaf.conv is not None]
    idents = [leaf for leaf in leaves if leaf.conv is None]
    here = f"{packet(root)} '{root.name}'"
    if len(xs) != 1 or not convs:
        return f"the branches summed at {here} are not convolutions of one input"
    if len(leaves) < 2:
        return f"{here} sums a single branch"
    (x,) = xs
    for leaf in leaves:
        if leaf.node is not x and env.readers(leaf.node, set(inner)):
            return f"branch output '{name(leaf.node)}' is also read elsewhere"
    mutated = [n for n in inner if packet(n).endswith("_") and n.args[0] is x]
    if mutated:
        return f"{packet(mutated[0])} '{mutated[0].name}' updates the input in place"
    geos = []
    for leaf in convs:
        geo = _geometry(env, leaf.conv, name(leaf.conv))
        if isinstance(geo, str):
            return geo
        if leaf.bn is not None and (why := env.bn_ok(leaf.bn, leaf.conv)):
            return why
        geos.append(geo)
    shape0, stride, _, dil, groups = geos[0]
    if any(g[1:2] + g[3:] != (stride, dil, groups) for g in geos):
        return f"the convolutions summed at {here} differ in stride, dilation or groups"
    if any(g[0][:2] != shape0[:2] for g in geos):
        return f"the convolutions summed at {here} differ in channels"
    n = len(shape0) - 2
    hi = max(range(len(convs)), key=lambda i: int(np.prod(geos[i][0][2:])))
    kernel, hp = geos[hi][0][2:], geos[hi][2]
    offsets = []
    for leaf, g in zip(convs, geos, strict=True):
        off = [tap_offset(kernel[a], g[0][2 + a], (hp[a],) * 2, (g[2][a],) * 2, dil[a])
               for a in range(n)]  # fmt: skip
        if None in off:
            return f"'{name(leaf.conv)}' does not line up with '{name(convs[hi].conv)}'"
        offsets.append(tuple(off))
    cout = shape0[0]
    for leaf in (*leaves, *consts):
        if leaf.coef is not None and leaf.coef.size not in (1, cout):
            return f"a factor in the sum at {here} is not per channel"
    for leaf in consts:
        if hasattr(leaf.node, "op") and _per_channel(env.tensor(leaf.node), root) is None:
            return f"constant '{leaf.node.name}' summed at {here} is not per channel"
    centre = None
    if idents:
        if shape0[1] * groups != cout or any(s != 1 for s in stride):
            return f"an identity branch at {here} needs stride 1 and as many channels out as in"
        if any(hp[a] % dil[a] or 2 * hp[a] != dil[a] * (kernel[a] - 1) for a in range(n)):
            return f"'{name(convs[hi].conv)}' does not keep the size of its input"
        centre = tuple(hp[a] // dil[a] for a in range(n))
        for leaf in idents:
            if leaf.bn is not None and (why := env.bn_ok(leaf.bn, None)):
                return why
    host = convs[hi].conv
    return BranchMerge(root, tuple(inner), tuple(convs), tuple(idents), tuple(consts), host,
                       name(host), tuple(kernel), tuple(offsets), centre, groups)  # fmt: skip


def _up(env: Env, node: Any) -> Any:
    """The add/sub that takes ``node``'s value into its sum (through muls), if any."""
    while True:
        users = list(node.users)
        if len(users) != 1 or env.readers(node, set(users)):
            return None
        node = users[0]
        if _combiner(node):
            return node
        if _scale(env, node) is None:
            return None


def _root(env: Env, add: Any, name: Callable[[Any], str]) -> BranchMerge | str:
    """The largest matching sum at or above ``add``, or why ``add``'s does not match."""
    chain = [add]
    while (parent := _up(env, chain[-1])) is not None:
        chain.append(parent)
    results = [match_group(env, a, name) for a in chain]
    return next((r for r in reversed(results) if not isinstance(r, str)), results[0])


# --------------------------------------------------------------------------------- discovery


def _view_env(view: GraphView) -> Env:
    def bn_ok(bn: Any, conv: Any) -> str | None:
        args = op_args(bn)
        mean = args.get("running_mean")
        if packet(bn) in _TRAINING or args.get("training") or not view.stored(mean):
            return f"BN '{view.name(bn)}' normalizes with batch statistics"
        if sum(packet(u) in BN_OPS for u in mean.users) > 1:
            return f"BN '{view.name(bn)}' is called at several places"
        if conv is None:
            return None
        channels = int(view.tensor(view.fqn[mean.name]).numel())
        target, reason = producer_check(view, call_from_op(bn), channels)
        return None if target else f"branch BN '{view.name(bn)}' does not fold: {reason}"

    return Env(
        lambda n, besides: value_readers(view, n, besides),
        view.stored,
        lambda n: view.tensor(view.fqn[n.name]),
        bn_ok,
    )


def identity_merge(view: GraphView, call: BNCall, channels: int) -> BranchMerge | str:
    """The merge that takes the BN of ``call`` as an identity branch, or why none does
    ("" when its output feeds no sum)."""
    env = _view_env(view)
    bn = call.node
    if bn is None or _is_bn(call.output) is not bn:
        return ""
    add = _up(env, call.output)
    if add is None:
        return ""
    found = _root(env, add, lambda n: view.neighbour(n).name)
    if isinstance(found, str):
        return f"no branch merge: {found}"
    if not any(leaf.bn is bn for leaf in found.idents):
        return "no branch merge: the BN is not an identity branch of the sum"
    return found
