"""Fold BatchNormalization nodes of an ONNX graph into their neighbours.

Each BN follows its :class:`~bncheck.backends.onnx.fold_plan.FoldPlan` (the same decision
``inspect`` reports), so what inspect calls foldable is exactly what fold removes:

- into the producer (Conv, ConvTranspose, Gemm, MatMul), through any per-channel constant
  Mul/Add chain between them: the chain and the BN are one affine ``a·z + b`` per channel,
  ``W' = a·W`` along the output channels and ``b' = a·bias + b``;
- into the single consumer (Conv, ConvTranspose, Gemm, MatMul) when that is exact;
- after a channel Concat, slice by slice into the Concat's producers (``fold_concat.py``);
- with ``affine``, a BN that cannot fold becomes ``Mul(s) → Add(t)``.

A standalone per-channel ``Mul``/``Add`` right after a Conv/ConvTranspose/Gemm (the decomposed
BN that converters emit) folds into it too. Gemm's ``alpha``/``beta`` are folded into B and C.
All weight math is ``bncheck.numerics`` in float64, cast back to the weight's dtype; a cast that
would overflow, or statistics that give a non-finite scale, leave that layer unfolded. The
source model is never modified: the rewrite works on a copy, a weight initializer that anything
else also reads is written under a new name, and only what the fold orphaned is removed
(``rewrite.py`` holds the decisions' record and writes the new graph from it).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, helper

from bncheck.backends.onnx.fold_concat import fold_concat
from bncheck.backends.onnx.fold_plan import (
    BNFacts,
    FoldPlan,
    bias_problem,
    bn_facts,
    bn_reason,
    fold_plan,
)
from bncheck.backends.onnx.fold_plan import per_channel as _per_channel
from bncheck.backends.onnx.graph import GraphIndex, attr, node_label, opset_version
from bncheck.backends.onnx.reparam import merge_branches
from bncheck.backends.onnx.rewrite import Params, Rewrite, emit_model
from bncheck.errors import InputError
from bncheck.layers import FoldStep
from bncheck.numerics import bn_scale_shift, cast_checked, fold_into_consumer, fold_into_producer
from bncheck.wording import plural

__all__ = ["fold_model"]


def _numerics_op(node: NodeProto) -> str:
    if node.op_type == "Conv":
        return "conv"
    if node.op_type == "ConvTranspose":
        return "conv_transpose"
    if node.op_type == "Gemm":
        return "linear" if attr(node, "transB", 0) else "gemm_t"
    return "matmul"


def _load_params(rw: Rewrite, node: NodeProto) -> Params | str:
    """The node's weight and bias as float64, or the reason they cannot be folded."""
    p = rw.position(node)
    if p in rw.params:
        return rw.params[p]
    idx = rw.index
    w = idx.const(node.input[1])
    if w is None:
        return f"weight of {node_label(node)} is not constant"
    if w.dtype.kind != "f" and w.dtype.name != "bfloat16":
        return f"weight of {node_label(node)} is {w.dtype.name}, not floating point"
    has_bias = node.op_type != "MatMul" and len(node.input) > 2 and node.input[2]
    b = idx.const(node.input[2]) if has_bias else None
    if has_bias and b is None:
        return f"bias of {node_label(node)} is not constant"
    groups = int(attr(node, "group", 1)) if node.op_type in ("Conv", "ConvTranspose") else 1
    op = _numerics_op(node)
    w64 = w.astype(np.float64)
    b64 = None if b is None else b.astype(np.float64)
    if node.op_type == "Gemm":
        alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
        w64 = w64 * alpha  # Y = alpha·A·B + beta·C: fold alpha into B and beta into C
        if b64 is not None:
            out = w64.shape[0] if op == "linear" else w64.shape[1]
            if b64.size not in (1, out) or (b64.ndim == 2 and b64.shape[0] != 1):
                return f"bias of {node_label(node)} is not per output feature (shape {b.shape})"
            b64 = np.broadcast_to(b64.reshape(-1), (out,)) * beta
    elif b64 is not None:
        problem = bias_problem(idx, node)
        if problem:
            return problem
        b64 = b64.reshape(-1)
    params = Params(w64, b64, w.dtype, (b if b is not None else w).dtype, groups, op)
    rw.params[p] = params
    return params


def _overflows(
    values: tuple[np.ndarray, ...], dtypes: tuple[np.dtype, ...], what: str = "folded weights"
) -> str | None:
    """Why ``values`` cannot be stored in ``dtypes`` (overflow, or an unsupported dtype)."""
    for v, dt in zip(values, dtypes, strict=True):
        try:
            if cast_checked(v, dt)[1]:
                return f"{what} overflow {np.dtype(dt).name}"
        except ValueError as exc:
            return str(exc)
    return None


def _bn_affine(facts: BNFacts) -> tuple[np.ndarray, np.ndarray] | str:
    """The BN's float64 ``(s, t)``, or why they are unusable (non-finite channels)."""
    s, t = bn_scale_shift(facts.mean, facts.var, facts.scale, facts.bias, facts.eps)
    bad = int(np.count_nonzero(~(np.isfinite(s) & np.isfinite(t))))
    if bad:
        return f"BN statistics give a non-finite scale or shift in {plural(bad, 'channel')}"
    return s, t


def _chain_affine(
    idx: GraphIndex, chain: tuple[NodeProto, ...], channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel affine ``a·z + b`` of a Mul/Add chain, applied producer-side first."""
    a, b = np.ones(channels), np.zeros(channels)
    for node in chain:
        const = next(i for i in node.input if idx.is_constant(i))
        c = np.broadcast_to(idx.const(const).astype(np.float64).reshape(-1), (channels,))
        if node.op_type == "Mul":
            a, b = a * c, b * c
        else:
            b = b + c
    return a, b


def _fold_producer(rw: Rewrite, plan: FoldPlan) -> str | None:
    if plan.via is not None:  # through layout ops, or a branch merge (fold_layout, reparam)
        return plan.via.fold(rw, plan)
    facts, prod = plan.facts, plan.producer
    params = _load_params(rw, prod)
    if isinstance(params, str):
        return params
    st = _bn_affine(facts)
    if isinstance(st, str):
        return st
    a, b = _chain_affine(rw.index, plan.chain, facts.channels)
    s, t = st
    w, bias = fold_into_producer(
        params.weight, params.bias, a * s, b * s + t, op=params.op, groups=params.groups
    )
    problem = _overflows((w, bias), (params.dtype, params.bias_dtype))
    if problem:
        return problem
    params.weight, params.bias, params.changed = w, bias, True
    p = rw.position(prod)
    rw.remove.update(rw.position(n) for n in (*plan.chain, plan.bn))
    rw.rename_output[p] = facts.y
    rw.absorbed[facts.y] = prod  # a decomposed Mul/Add after the BN may fold in as well
    if prod.op_type == "MatMul":
        rw.matmul_bias.add(p)
    return None


def _fold_through_concat(rw: Rewrite, plan: FoldPlan) -> str | None:
    st = _bn_affine(plan.facts)
    return st if isinstance(st, str) else fold_concat(rw, plan.facts, plan.concat, st)


def _fold_consumer(rw: Rewrite, plan: FoldPlan) -> str | None:
    facts, cons = plan.facts, plan.consumer
    params = _load_params(rw, cons)
    if isinstance(params, str):
        return params
    st = _bn_affine(facts)
    if isinstance(st, str):
        return st
    try:
        w, bias = fold_into_consumer(
            params.weight, params.bias, *st, op=params.op, groups=params.groups
        )
    except ValueError as exc:
        return str(exc)
    problem = _overflows((w, bias), (params.dtype, params.bias_dtype))
    if problem:
        return problem
    params.weight, params.bias, params.changed = w, bias, True
    rw.remove.add(rw.position(plan.bn))
    rw.rewire_input[rw.position(cons)] = facts.x
    if cons.op_type == "MatMul":
        rw.matmul_bias.add(rw.position(cons))
    return None


def _input_dtype(rw: Rewrite, facts: BNFacts) -> np.dtype | None:
    """Element type of the BN input X: before opset 15 it is the scale's type; after, X may
    differ (T vs T1), so it comes from the graph's value_info or from type inference."""
    idx = rw.index
    if (opset_version(idx.model) or 0) < 15 and facts.scale is not None:
        return facts.scale.dtype
    g = idx.model.graph
    declared = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}
    elem = declared.get(facts.x, 0)
    if not elem:
        if rw.types is None:
            try:  # one inference for the whole model; a failure only means "unknown"
                inferred = onnx.shape_inference.infer_shapes(idx.model).graph
                rw.types = {v.name: v.type.tensor_type.elem_type for v in inferred.value_info}
            except Exception:
                rw.types = {}
        elem = rw.types.get(facts.x, 0)
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem)) if elem else None


def _to_affine(rw: Rewrite, facts: BNFacts) -> str | None:
    reason = bn_reason(rw.index, facts)
    if reason:
        return reason
    st = _bn_affine(facts)
    if isinstance(st, str):
        return st
    rank = rw.index.rank(facts.x)
    if rank is None or rank < 2:
        return "input rank unknown: cannot shape the scale and shift"
    dtype = _input_dtype(rw, facts)
    if dtype is None:
        return "input element type unknown: cannot type the scale and shift"
    problem = _overflows(st, (dtype, dtype), "scale and shift")
    if problem:
        return problem
    rw.affine[rw.position(facts.node)] = (*st, rank, dtype)
    return None


def _out_channels(params: Params) -> int:
    w = params.weight
    if params.op == "conv_transpose":
        return w.shape[1] * params.groups
    return w.shape[0] if params.op in ("conv", "linear") else w.shape[1]


def _decomposed(rw: Rewrite, model: ModelProto) -> list[FoldStep]:
    """Fold ``weighted → Mul/Add (per-channel constant)`` runs that are not part of a BN.

    Consecutive Mul/Add nodes folded into one producer are one step, named after the first
    Mul of the run (the scale of a decomposed BN), else after its first node.
    """
    idx = rw.index
    units: list[list] = []  # [layer name, target, named after a Mul]
    open_units: dict[str, int] = {}  # tensor the last absorbed node writes → unit
    for node in model.graph.node:
        p = rw.position(node)
        if p in rw.remove or node.op_type not in ("Mul", "Add") or len(node.input) != 2:
            continue
        if node.domain not in ("", "ai.onnx"):
            continue
        var_in = [i for i in node.input if not idx.is_constant(i)]
        if len(var_in) != 1:
            continue
        x = var_in[0]
        src = rw.absorbed.get(x) or idx.producer.get(x)
        if src is None or src.op_type not in ("Conv", "ConvTranspose", "Gemm"):
            continue  # a MatMul would need an Add for the bias anyway
        sp = rw.position(src)
        if src.domain not in ("", "ai.onnx") or sp in rw.remove:
            continue
        if rw.rename_output.get(sp, x) != x or idx.is_graph_output(x):
            continue
        uses = idx.uses(x)
        if len(uses) != 1 or uses[0] is not node:
            continue
        params = _load_params(rw, src)
        if isinstance(params, str):
            continue
        out_ch = _out_channels(params)
        const = next(i for i in node.input if idx.is_constant(i))
        if not _per_channel(idx.const_shape(const) or (), idx.rank(x), out_ch):
            continue
        c = np.broadcast_to(idx.const(const).astype(np.float64).reshape(-1), (out_ch,))
        scale, shift = (c, np.zeros(out_ch)) if node.op_type == "Mul" else (np.ones(out_ch), c)
        w, b = fold_into_producer(
            params.weight, params.bias, scale, shift, op=params.op, groups=params.groups
        )
        if _overflows((w, b), (params.dtype, params.bias_dtype)):
            continue
        params.weight, params.bias, params.changed = w, b, True
        rw.remove.add(p)
        rw.rename_output[sp] = node.output[0]
        rw.absorbed[node.output[0]] = src
        u = open_units.pop(x, None)
        if u is None:
            u = len(units)
            units.append([node_label(node), node_label(src), node.op_type == "Mul"])
        elif node.op_type == "Mul" and not units[u][2]:
            units[u][0], units[u][2] = node_label(node), True
        open_units[node.output[0]] = u
    return [FoldStep(name, "producer", target, kind="channel_op") for name, target, _ in units]


def fold_model(index: GraphIndex, *, affine: bool = False) -> tuple[ModelProto, list[FoldStep]]:
    """Fold every foldable BN of ``index.model``; returns a new model and the steps: one per
    BN in graph order (named as :class:`~bncheck.layers.BNLayer` names it), then one per
    decomposed Mul/Add run folded into its producer.

    With ``affine``, BNs that cannot fold become a Mul and an Add.
    """
    model = index.model
    rw = Rewrite(index=index, pos={id(n): p for p, n in enumerate(model.graph.node)})
    steps: list[FoldStep] = []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        plan = fold_plan(index, node, bn_facts(index, node))
        for neighbour in (plan.producer, plan.consumer):
            problem = bias_problem(index, neighbour) if neighbour is not None else None
            if problem:  # a broken file, not a BN that cannot fold: say so, write nothing
                raise InputError(f"{index.source}: {problem}")
        name, d = node_label(node), plan.decision
        if d.into == "producer" and plan.concat is not None:
            problem = _fold_through_concat(rw, plan)
        elif d.into == "producer":
            problem = _fold_producer(rw, plan)
        elif d.into == "consumer":
            problem = _fold_consumer(rw, plan)
        else:
            problem = d.reason or "no foldable neighbour"
        if problem is None:
            steps.append(FoldStep(name, d.into, d.target))
            continue
        why_not = _to_affine(rw, plan.facts) if affine else problem
        if why_not is None:
            steps.append(FoldStep(name, "affine", None, problem))
        else:
            if why_not not in problem:
                problem = f"{problem}; not made affine: {why_not}"
            steps.append(FoldStep(name, None, None, problem))
    for bn, why in merge_branches(rw):  # summed branches → one Conv; identity BNs left out:
        i = next(k for k, st in enumerate(steps) if st.layer == node_label(bn))
        made_affine = affine and _to_affine(rw, bn_facts(index, bn)) is None
        steps[i] = FoldStep(steps[i].layer, "affine" if made_affine else None, None, why)
    steps += _decomposed(rw, model)
    return emit_model(rw, model), steps
