"""Fold BatchNormalization nodes of an ONNX graph into their neighbours.

Each BN follows its :class:`~bncheck.backends.onnx.fold_plan.FoldPlan` (the same decision
``inspect`` reports), so what inspect calls foldable is exactly what fold removes:

- into the producer (Conv, ConvTranspose, Gemm, MatMul), through any per-channel constant
  Mul/Add chain between them: the chain and the BN are one affine ``a·z + b`` per channel,
  ``W' = a·W`` along the output channels and ``b' = a·bias + b``;
- into the single consumer (Conv, ConvTranspose, Gemm, MatMul) when that is exact;
- with ``affine``, a BN that cannot fold becomes ``Mul(s) → Add(t)``.

A standalone per-channel ``Mul``/``Add`` right after a Conv/ConvTranspose/Gemm (the decomposed
BN that converters emit) folds into it too. Gemm's ``alpha``/``beta`` are folded into B and C.
All weight math is ``bncheck.numerics`` in float64, cast back to the weight's dtype; a cast that
would overflow, or statistics that give a non-finite scale, leave that layer unfolded. The
source model is never modified: the rewrite works on a copy, a weight initializer that anything
else also reads is written under a new name, and only what the fold orphaned is removed.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, helper, numpy_helper

from bncheck.backends.onnx.fold_plan import BNFacts, FoldPlan, bn_facts, bn_reason, fold_plan
from bncheck.backends.onnx.fold_plan import per_channel as _per_channel
from bncheck.backends.onnx.graph import (
    GraphIndex,
    _subgraph_outer_reads,
    attr,
    node_label,
    opset_version,
)
from bncheck.layers import FoldStep
from bncheck.numerics import bn_scale_shift, cast_checked, fold_into_consumer, fold_into_producer

__all__ = ["fold_model"]


@dataclass
class _Params:
    """Current float64 weight and bias of a weighted node, as folds accumulate."""

    weight: np.ndarray
    bias: np.ndarray | None
    dtype: np.dtype
    bias_dtype: np.dtype
    groups: int
    op: str  # numerics op name
    changed: bool = False  # a fold was applied: the node must be rewritten


@dataclass
class _Rewrite:
    index: GraphIndex
    params: dict[int, _Params] = field(default_factory=dict)  # node position → params
    remove: set[int] = field(default_factory=set)  # node positions to drop
    rename_output: dict[int, str] = field(default_factory=dict)  # producer position → new output
    rewire_input: dict[int, str] = field(default_factory=dict)  # consumer position → new input 0
    affine: dict[int, tuple[np.ndarray, np.ndarray, int, np.dtype]] = field(default_factory=dict)
    absorbed: dict[str, NodeProto] = field(default_factory=dict)  # tensor → weighted node making it
    matmul_bias: set[int] = field(default_factory=set)  # MatMul positions that gain an Add
    pos: dict[int, int] = field(default_factory=dict)  # id(node) → position
    types: dict[str, int] | None = None  # inferred element types, computed on demand

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
        b64 = b64.reshape(-1)
    params = _Params(w64, b64, w.dtype, (b if b is not None else w).dtype, groups, op)
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
        return f"BN statistics give a non-finite scale or shift in {bad} channel(s)"
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


def _fold_producer(rw: _Rewrite, plan: FoldPlan) -> str | None:
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


def _fold_consumer(rw: _Rewrite, plan: FoldPlan) -> str | None:
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


def _input_dtype(rw: _Rewrite, facts: BNFacts) -> np.dtype | None:
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


def _to_affine(rw: _Rewrite, facts: BNFacts) -> str | None:
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


def _out_channels(params: _Params) -> int:
    w = params.weight
    if params.op == "conv_transpose":
        return w.shape[1] * params.groups
    return w.shape[0] if params.op in ("conv", "linear") else w.shape[1]


def _decomposed(rw: _Rewrite, model: ModelProto) -> list[FoldStep]:
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
    return [FoldStep(name, "producer", target) for name, target, _ in units]


def _unique(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _reads(g: GraphProto) -> Counter[str]:
    """How often each tensor is read: node inputs, subgraph reads of outer names, outputs."""
    reads: Counter[str] = Counter(o.name for o in g.output)
    for n in g.node:
        reads.update(i for i in n.input if i)
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute
        ):
            reads.update(_subgraph_outer_reads(n))
    return reads


def _emit(rw: _Rewrite, src: ModelProto) -> ModelProto:
    """Build the rewritten model from the source and the decisions in ``rw``."""
    model = copy.deepcopy(src)
    g = model.graph
    nodes = list(g.node)
    reads_before = _reads(g)
    names_before = {o for n in nodes for o in n.output} | {t.name for t in g.initializer}
    graph_inputs = {i.name for i in g.input}
    taken = names_before | graph_inputs | {o.name for o in g.output}
    inits = {t.name: t for t in g.initializer}
    new_inits: list[onnx.TensorProto] = []

    def store(node: NodeProto, slot: int, value: np.ndarray, dtype: np.dtype, name: str) -> None:
        arr = cast_checked(value, dtype)[0]
        old = node.input[slot] if len(node.input) > slot else ""
        if old in inits and reads_before[old] == 1 and old not in graph_inputs:
            inits[old].CopyFrom(numpy_helper.from_array(arr, old))  # sole reader: keep the name
            return
        name = _unique(name, taken)
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
        params, label = rw.params.get(p), node_label(node)  # the label before any rename
        if p in rw.rename_output:
            node.output[0] = rw.rename_output[p]
        if params is not None and params.changed:
            store(node, 1, params.weight, params.dtype, f"{label}.weight_folded")
            if node.op_type == "MatMul" and p in rw.matmul_bias:
                mm_out, b_name = _unique(f"{label}.matmul", taken), _unique(f"{label}.bias", taken)
                final_out, node.output[0] = node.output[0], mm_out
                bias = cast_checked(params.bias, params.dtype)[0]
                new_inits.append(numpy_helper.from_array(bias, b_name))
                add = helper.make_node("Add", [mm_out, b_name], [final_out], name=f"{label}_bias")
                out_nodes += [node, add]
                continue
            if node.op_type != "MatMul" and params.bias is not None:
                if node.op_type == "Gemm":  # alpha and beta were folded into B and C
                    kept = [a for a in node.attribute if a.name not in ("alpha", "beta")]
                    del node.attribute[:]
                    node.attribute.extend(kept)
                store(node, 2, params.bias, params.bias_dtype, f"{label}.bias_folded")
        out_nodes.append(node)
    del g.node[:]
    g.node.extend(out_nodes)
    g.initializer.extend(new_inits)
    if model.ir_version < 4:  # before IR 4 every initializer must also be a graph input
        g.input.extend(
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in new_inits
        )
    _drop_orphans(g, reads_before, names_before)
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


def _drop_orphans(g: GraphProto, reads_before: Counter[str], names_before: set[str]) -> None:
    """Remove the nodes and initializers the fold left unread (Constant nodes, weights, BN
    statistics, ``Identity`` links to them) and value_info of tensors that no longer exist.

    Only what was read before and is not now goes: anything already dead in the source, the
    graph inputs and outputs are left as they were.
    """
    while True:
        reads = _reads(g)
        keep = [
            n
            for n in g.node
            if any(reads[o] for o in n.output if o)
            or not any(reads_before[o] for o in n.output if o)
        ]
        if len(keep) == len(g.node):
            break
        del g.node[:]
        g.node.extend(keep)
    graph_inputs = {i.name for i in g.input}
    kept = [
        t
        for t in g.initializer
        if reads[t.name] or not reads_before[t.name] or t.name in graph_inputs
    ]
    del g.initializer[:]
    g.initializer.extend(kept)
    now = {o for n in g.node for o in n.output} | {t.name for t in g.initializer} | graph_inputs
    vi = [v for v in g.value_info if v.name in now or v.name not in names_before]
    del g.value_info[:]
    g.value_info.extend(vi)


def fold_model(index: GraphIndex, *, affine: bool = False) -> tuple[ModelProto, list[FoldStep]]:
    """Fold every foldable BN of ``index.model``; returns a new model and the steps: one per
    BN in graph order (named as :class:`~bncheck.layers.BNLayer` names it), then one per
    decomposed Mul/Add run folded into its producer.

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
        if d.into == "producer":
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
    steps += _decomposed(rw, model)
    return _emit(rw, model), steps
