"""The merge of summed branches on the unlifted copy, after every BN fold.

:mod:`bncheck.backends.torch.reparam` matches a sum of branches (and decides, for ``inspect``,
which identity BNs go into one); here the same matcher runs on the folded copy, where each branch
BN that folded is gone, and the host conv gets ``W = Σ embed(kᵢ·Wᵢ) + Σ identity(kⱼ·sⱼ)``,
``b = Σ kᵢ·bᵢ + Σ kⱼ·tⱼ + Σ constants`` (float64, :mod:`bncheck.numerics.reparam`), cast back to
its dtype (an overflow leaves the sum as it was) and stands for the sum.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bncheck.backends.torch.fold_layout import shape_only
from bncheck.backends.torch.graph import op_args
from bncheck.backends.torch.reparam import (
    BranchMerge,
    Env,
    Leaf,
    _combiner,
    _per_channel,
    _up,
    match_group,
)
from bncheck.numerics import bn_scale_shift, fold_into_producer
from bncheck.numerics.reparam import merge_branches

__all__ = ["merge_sums"]


def _gm_env(gm: Any, planned: set[str]) -> Env:
    from bncheck.backends.torch.attrs import get

    def readers(node: Any, besides: set[Any]) -> list[str]:
        return [u.name for u in node.users if u not in besides and not shape_only(u, node)]

    def bn_ok(bn: Any, conv: Any) -> str | None:
        if conv is not None:
            return f"branch BN '{bn.name}' did not fold into '{conv.name}'"
        return None if bn.name in planned else f"identity BN '{bn.name}' is not to be merged"

    return Env(readers, lambda n: n.op == "get_attr", lambda n: get(gm, n.target), bn_ok)


def _tensors(gm: Any, node: Any, *keys: str) -> list[np.ndarray | None]:
    from bncheck.backends.torch.attrs import get

    args = op_args(node)
    return [
        None if args.get(k) is None else get(gm, args[k].target).detach().double().cpu().numpy()
        for k in keys
    ]


def _apply(gm: Any, env: Env, m: BranchMerge) -> set[Any]:
    """Give the host the merged kernel and bias and let it stand for the sum (``_Skip``,
    with nothing changed, when they do not fit its dtype)."""
    from bncheck.backends.torch.fold import _erase_dead, _rewrite_weights  # fold imports us

    w0 = env.tensor(op_args(m.host)["weight"])
    c = int(w0.shape[0])

    def coef(leaf: Leaf) -> np.ndarray:
        return np.ones(c) if leaf.coef is None else np.broadcast_to(leaf.coef, (c,))

    convs, idents = [], []
    for leaf, off in zip(m.convs, m.offsets, strict=True):
        w, b = _tensors(gm, leaf.conv, "weight", "bias")
        w, b = fold_into_producer(w, b, coef(leaf), np.zeros(c), op="conv", groups=m.groups)
        convs.append((w, b, off))
    for leaf in m.idents:
        s, t = np.ones(c), np.zeros(c)
        if leaf.bn is not None:
            mean, var, gamma, beta = _tensors(
                gm, leaf.bn, "running_mean", "running_var", "weight", "bias"
            )
            eps = op_args(leaf.bn).get("eps", 1e-5)
            s, t = bn_scale_shift(mean, var, gamma, beta, float(eps))
        idents.append((coef(leaf) * s, coef(leaf) * t))
    w, b = merge_branches(convs, idents, kernel=m.kernel, groups=m.groups, centre=m.centre)
    for leaf in m.consts:
        v = (
            leaf.node
            if not hasattr(leaf.node, "op")
            else _per_channel(env.tensor(leaf.node), m.root)
        )
        b = b + coef(leaf) * np.broadcast_to(np.asarray(v, np.float64).reshape(-1), (c,))
    _rewrite_weights(gm, m.host, w, b)
    m.root.replace_all_uses_with(m.host)
    gone = [*m.inner, *(leaf.conv for leaf in m.convs if leaf.conv is not m.host)]
    gone += [n for leaf in m.idents if leaf.bn is not None for n in (leaf.bn, *leaf.bn.users)]
    return _erase_dead(gm, gone)


def merge_sums(gm: Any, planned: set[str]) -> dict[str, str]:
    """Merge every matching sum of branches in the unlifted copy ``gm`` (after the BN folds);
    ``planned`` names the identity BN nodes decided into a merge. Returns those still in the
    graph afterwards, with the reason."""
    from bncheck.backends.torch.fold import _Skip  # fold imports us

    env = _gm_env(gm, planned)
    failed: dict[str, str] = {}
    erased: set[Any] = set()
    for add in list(gm.graph.nodes):
        if add in erased or not _combiner(add):
            continue  # erased by an earlier merge, or no sum
        parent = _up(env, add)
        if parent is not None and not isinstance(match_group(env, parent, _name), str):
            continue  # an inner sum: its root merges it
        m = match_group(env, add, _name)
        if isinstance(m, str):
            continue
        try:
            erased |= _apply(gm, env, m)
        except (_Skip, ValueError) as exc:
            failed.update({i.bn.name: f"branch merge: {exc}" for i in m.idents if i.bn})
    left = {n.name for n in gm.graph.nodes}
    why = "branch merge: the sum no longer matches after the other folds"
    return {n: failed.get(n, why) for n in planned if n in left}


def _name(node: Any) -> str:
    w = op_args(node).get("weight")
    return w.target.rsplit(".", 1)[0] if getattr(w, "op", None) == "get_attr" else node.name
