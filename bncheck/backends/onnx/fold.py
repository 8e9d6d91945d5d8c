"""Fold BatchNormalization nodes of an ONNX graph into their neighbours.

Each BN follows its :class:`~bncheck.backends.onnx.discover.FoldPlan` (the same decision
``inspect`` reports), so what inspect calls foldable is exactly what fold removes:

- into the producer (Conv, ConvTranspose, Gemm, MatMul), through any per-channel constant
  Mul/Add chain between them: the chain and the BN are one affine ``a·z + b`` per channel,
  ``W' = a·W`` along the output channels and ``b' = a·bias + b``;
- into the single consumer (Conv, ConvTranspose, Gemm, MatMul) when that is exact;
- with ``affine``, a BN that cannot fold becomes ``Mul(s) → Add(t)``.

A standalone per-channel ``Mul``/``Add`` right after a weighted node (the decomposed BN that
converters emit) folds into it too. All weight math is ``bncheck.numerics`` in float64, cast
back to the weight's dtype; a cast that would overflow leaves that layer unfolded. The source
model is never modified: the rewrite works on a copy, and a weight initializer that something
else also reads is copied under a new name rather than changed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, helper, numpy_helper

from bncheck.backends.onnx.discover import BNFacts, FoldPlan, _per_channel, bn_facts, fold_plan
from bncheck.backends.onnx.graph import GraphIndex, attr, node_label
from bncheck.layers import FoldStep
from bncheck.numerics import bn_scale_shift, cast_checked, fold_into_consumer, fold_into_producer

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class _Params:
    """Current float64 weight and bias of a weighted node, as folds accumulate."""

    weight: np.ndarray
    bias: np.ndarray | None
    dtype: np.dtype
    bias_dtype: np.dtype
    groups: int
    op: str  # numerics op name


@dataclass
class _Rewrite:
    index: GraphIndex
    params: dict[int, _Params] = field(default_factory=dict)  # node position → params
    remove: set[int] = field(default_factory=set)  # node positions to drop
    rename_output: dict[int, str] = field(default_factory=dict)  # producer position → new output
    rewire_input: dict[int, str] = field(default_factory=dict)  # consumer position → new input 0
    affine: dict[int, tuple[np.ndarray, np.ndarray, int, np.dtype]] = field(default_factory=dict)
    absorbed: dict[str, NodeProto] = field(
        default_factory=dict
    )  # tensor → weighted node now making it
    matmul_bias: set[int] = field(default_factory=set)  # MatMul positions that gain an Add
    pos: dict[int, int] = field(default_factory=dict)  # id(node) → position

    def position(self, node: NodeProto) -> int:
        return self.pos[id(node)]


def _numerics_op(node: NodeProto) -> str:
    if node.op_type == "Conv":
        return "conv"
    if node.op_type == "ConvTranspose":
        return "conv_transpose"
    if node.op_type == "Gemm":
        return "linear" if attr(node, "transB", 0) else "gemm_t"
    return "matmul"


def _load_params(rw: _Rewrite, node: NodeProto) -> _Params | str:
    """The node's weight and bias as float64, or the reason they cannot be folded."""
    p = rw.position(node)
    if p in rw.params:
        return rw.params[p]
    idx = rw.index
    w = idx.const(node.input[1])
    if w is None:
        return f"weight of {node_label(node)} is not constant"
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
        b64 = b64.reshape(-1)
    params = _Params(w64, b64, w.dtype, (b if b is not None else w).dtype, groups, op)
    rw.params[p] = params
    return params


def _checked(params: _Params, w: np.ndarray, b: np.ndarray) -> str | None:
    if cast_checked(w, params.dtype)[1] or cast_checked(b, params.bias_dtype)[1]:
        return f"folded weights overflow {params.dtype.name}"
    return None


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


def _fold_producer(rw: _Rewrite, plan: FoldPlan) -> str | None:
    facts, prod = plan.facts, plan.producer
    params = _load_params(rw, prod)
    if isinstance(params, str):
        return params
    a, b = _chain_affine(rw.index, plan.chain, facts.channels)
    s, t = bn_scale_shift(facts.mean, facts.var, facts.scale, facts.bias, facts.eps)
    w, bias = fold_into_producer(
        params.weight, params.bias, a * s, b * s + t, op=params.op, groups=params.groups
    )
    problem = _checked(params, w, bias)
    if problem:
        return problem
    params.weight, params.bias = w, bias
    p = rw.position(prod)
    for node in plan.chain:
        rw.remove.add(rw.position(node))
    rw.remove.add(rw.position(plan.bn))
    rw.rename_output[p] = facts.y
    if prod.op_type == "MatMul":
        rw.matmul_bias.add(p)
    return None


def _fold_consumer(rw: _Rewrite, plan: FoldPlan) -> str | None:
    facts, cons = plan.facts, plan.consumer
    params = _load_params(rw, cons)
    if isinstance(params, str):
        return params
    s, t = bn_scale_shift(facts.mean, facts.var, facts.scale, facts.bias, facts.eps)
    try:
        w, bias = fold_into_consumer(
            params.weight, params.bias, s, t, op=params.op, groups=params.groups
        )
    except ValueError as exc:
        return str(exc)
    problem = _checked(params, w, bias)
    if problem:
        return problem
    params.weight, params.bias = w, bias
    rw.remove.add(rw.position(plan.bn))
    rw.rewire_input[rw.position(cons)] = facts.x
    if cons.op_type == "MatMul":
        rw.matmul_bias.add(rw.position(cons))
    return None


def _to_affine(rw: _Rewrite, facts: BNFacts) -> str | None:
    if facts.training:
        return "BN is in training mode"
    if facts.mean is None or facts.var is None:
        return "statistics are not constant"
    rank = rw.index.rank(facts.x)
    if rank is None or rank < 2:
        return "input rank unknown: cannot shape the scale and shift"
    s, t = bn_scale_shift(facts.mean, facts.var, facts.scale, facts.bias, facts.eps)
    dtype = (facts.scale if facts.scale is not None else facts.mean).dtype
    if cast_checked(s, dtype)[1] or cast_checked(t, dtype)[1]:
        return f"scale and shift overflow {dtype.name}"
    rw.affine[rw.position(facts.node)] = (s, t, rank, dtype)
    return None


def _decomposed(rw: _Rewrite, model: ModelProto) -> list[FoldStep]:
    """Fold ``weighted → Mul/Add (per-channel constant)`` pairs that are not part of a BN."""
    idx, steps = rw.index, []
    for node in model.graph.node:
        p = rw.position(node)
        if p in rw.remove or node.op_type not in ("Mul", "Add") or len(node.input) != 2:
            continue
        var_in = [i for i in node.input if not idx.is_constant(i)]
        if len(var_in) != 1:
            continue
        src = rw.absorbed.get(var_in[0]) or idx.producer.get(var_in[0])
        if src is None or src.op_type not in ("Conv", "ConvTranspose", "Gemm"):
            continue  # a MatMul would need an Add for the bias anyway
        sp = rw.position(src)
        if sp in rw.remove or rw.rename_output.get(sp, var_in[0]) != var_in[0]:
            continue
        if idx.uses(var_in[0]) != [node] or idx.is_graph_output(var_in[0]):
            continue
        params = _load_params(rw, src)
        if isinstance(params, str):
            continue
        out_ch = (
            params.weight.shape[1] * params.groups
            if params.op == "conv_transpose"
            else (
                params.weight.shape[0]
                if params.op in ("conv", "linear")
                else params.weight.shape[1]
            )
        )
        const = next(i for i in node.input if idx.is_constant(i))
        rank = idx.rank(var_in[0])
        if not _per_channel(idx.const_shape(const) or (), rank, out_ch):
            continue
        c = np.broadcast_to(idx.const(const).astype(np.float64).reshape(-1), (out_ch,))
        scale, shift = (c, np.zeros(out_ch)) if node.op_type == "Mul" else (np.ones(out_ch), c)
        w, b = fold_into_producer(
            params.weight, params.bias, scale, shift, op=params.op, groups=params.groups
        )
        if _checked(params, w, b):
            continue
        params.weight, params.bias = w, b
        rw.remove.add(p)
        rw.rename_output[sp] = node.output[0]
        rw.absorbed[node.output[0]] = src
        steps.append(FoldStep(node_label(node), "producer", node_label(src)))
    return steps


def _unique(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _emit(rw: _Rewrite, src: ModelProto) -> ModelProto:
    """Build the rewritten model from the source and the decisions in ``rw``."""
    model = copy.deepcopy(src)
    g = model.graph
    nodes = list(g.node)
    readers: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    taken = {t.name for t in g.initializer} | {o for n in nodes for o in n.output}
    taken |= {i.name for i in g.input}
    inits = {t.name: t for t in g.initializer}
    new_inits: list[onnx.TensorProto] = []

    def store(node: NodeProto, slot: int, value: np.ndarray, dtype: np.dtype, label: str) -> None:
        arr = cast_checked(value, dtype)[0]
        old = node.input[slot] if len(node.input) > slot else ""
        if old in inits and readers.get(old, 0) == 1 and old not in {i.name for i in g.input}:
            inits[old].CopyFrom(numpy_helper.from_array(arr, old))  # sole reader: keep the name
            return
        name = _unique(f"{node_label(node)}.{label}_folded", taken)
        new_inits.append(numpy_helper.from_array(arr, name))
        while len(node.input) <= slot:
            node.input.append("")
        node.input[slot] = name

    out_nodes: list[NodeProto] = []
    for p, node in enumerate(nodes):
        if p in rw.remove:
            continue
        if p in rw.rewire_input:
            node.input[0] = rw.rewire_input[p]
        if p in rw.affine:
            out_nodes += _affine_nodes(node, *rw.affine[p], new_inits, taken)
            continue
        params = rw.params.get(p)
        if params is not None:
            store(node, 1, params.weight, params.dtype, "weight")
            final_out = rw.rename_output.get(p, node.output[0])
            if node.op_type == "MatMul" and params.bias is not None and p in rw.matmul_bias:
                label = node_label(node)
                mm_out, b_name = _unique(f"{label}.matmul", taken), _unique(f"{label}.bias", taken)
                node.output[0] = mm_out
                out_nodes.append(node)
                bias = cast_checked(params.bias, params.dtype)[0]
                new_inits.append(numpy_helper.from_array(bias, b_name))
                add = helper.make_node("Add", [mm_out, b_name], [final_out], name=f"{label}_bias")
                out_nodes.append(add)
                continue
            if node.op_type != "MatMul" and params.bias is not None:
                if node.op_type == "Gemm":  # alpha and beta were folded into B and C
                    kept = [a for a in node.attribute if a.name not in ("alpha", "beta")]
                    del node.attribute[:]
                    node.attribute.extend(kept)
                store(node, 2, params.bias, params.bias_dtype, "bias")
            node.output[0] = final_out
        elif p in rw.rename_output:
            node.output[0] = rw.rename_output[p]
        out_nodes.append(node)
    del g.node[:]
    g.node.extend(out_nodes)
    g.initializer.extend(new_inits)
    _drop_dead(model)
    return model


def _affine_nodes(
    bn: NodeProto,
    s: np.ndarray,
    t: np.ndarray,
    rank: int,
    dtype: np.dtype,
    new_inits: list[onnx.TensorProto],
    taken: set[str],
) -> list[NodeProto]:
    """``Mul(x, s) → Add(·, t)`` in place of ``bn``, constants shaped (C, 1, …) for axis 1."""
    label = node_label(bn)
    shape = (len(s),) + (1,) * (rank - 2)
    s_name, t_name = _unique(f"{label}.scale", taken), _unique(f"{label}.shift", taken)
    mid = _unique(f"{label}.scaled", taken)
    new_inits.append(numpy_helper.from_array(cast_checked(s, dtype)[0].reshape(shape), s_name))
    new_inits.append(numpy_helper.from_array(cast_checked(t, dtype)[0].reshape(shape), t_name))
    return [
        helper.make_node("Mul", [bn.input[0], s_name], [mid], name=f"{label}_scale"),
        helper.make_node("Add", [mid, t_name], [bn.output[0]], name=f"{label}_shift"),
    ]


def _drop_dead(model: ModelProto) -> None:
    """Remove nodes, initializers and value_info that nothing reads any more."""
    g = model.graph
    outputs = {o.name for o in g.output}
    changed = True
    while changed:
        read = {i for n in g.node for i in n.input} | outputs
        keep = [n for n in g.node if any(o in read for o in n.output if o)]
        changed = len(keep) != len(g.node)
        if changed:
            del g.node[:]
            g.node.extend(keep)
    read = {i for n in g.node for i in n.input} | outputs
    graph_inputs = {i.name for i in g.input}
    kept = [t for t in g.initializer if t.name in read or t.name in graph_inputs]
    del g.initializer[:]
    g.initializer.extend(kept)
    produced = {o for n in g.node for o in n.output} | graph_inputs
    vi = [v for v in g.value_info if v.name in produced]
    del g.value_info[:]
    g.value_info.extend(vi)


def fold_model(index: GraphIndex, *, affine: bool = False) -> tuple[ModelProto, list[FoldStep]]:
    """Fold every foldable BN of ``index.model``; returns a new model and one step per BN.

    With ``affine``, BNs that cannot fold become a Mul and an Add.
    """
    model = index.model
    rw = _Rewrite(index=index, pos={id(n): p for p, n in enumerate(model.graph.node)})
    steps: list[FoldStep] = []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        plan = fold_plan(index, node, bn_facts(index, node))
        name, d = node_label(node), plan.decision
        problem = None
        if d.into == "producer":
            problem = _fold_producer(rw, plan)
        elif d.into == "consumer":
            problem = _fold_consumer(rw, plan)
        else:
            problem = d.reason or "no foldable neighbour"
        if problem is None:
            steps.append(FoldStep(name, d.into, d.target))
            continue
        if affine and _to_affine(rw, plan.facts) is None:
            steps.append(FoldStep(name, "affine", None, problem))
        else:
            steps.append(FoldStep(name, None, None, problem))
    steps += _decomposed(rw, model)
    return _emit(rw, model), steps
