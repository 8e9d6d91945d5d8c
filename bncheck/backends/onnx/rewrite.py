"""The record of an ONNX fold's decisions, and the new graph written from it.

``fold.py`` decides, node by node, what changes (new weights, removed nodes, renamed and
rewired tensors, BNs turned affine) into a :class:`Rewrite`; :func:`emit_model` then builds the
folded model from a copy of the source: a weight initializer that anything else also reads is
written under a new name, and only what the fold orphaned is removed.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, helper, numpy_helper

from bncheck.backends.onnx.graph import GraphIndex, _subgraph_outer_reads, node_label
from bncheck.numerics import cast_checked

__all__ = ["Params", "Rewrite", "emit_model"]


@dataclass
class Params:
    """Current float64 weight and bias of a weighted node, as folds accumulate."""

    weight: np.ndarray
    bias: np.ndarray | None
    dtype: np.dtype
    bias_dtype: np.dtype
    groups: int
    op: str  # numerics op name
    changed: bool = False  # a fold was applied: the node must be rewritten


@dataclass
class Rewrite:
    index: GraphIndex
    params: dict[int, Params] = field(default_factory=dict)  # node position → params
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


def emit_model(rw: Rewrite, src: ModelProto) -> ModelProto:
    """Build the rewritten model from the source and the decisions in ``rw``."""
    model = copy.deepcopy(src)
    g = model.graph
    nodes = list(g.node)
    reads_before = _reads(g)
    names_before = {o for n in nodes for o in n.output} | {t.name for t in g.initializer}
    graph_inputs = {i.name for i in g.input}
    taken = names_before | graph_inputs | {o.name for o in g.output}
    taken |= {n.name for n in nodes if n.name}  # new node names must not repeat one either
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
                add = helper.make_node(
                    "Add", [mm_out, b_name], [final_out], name=_unique(f"{label}_bias", taken)
                )
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
        helper.make_node(
            "Mul", [bn.input[0], s_name], [mid], name=_unique(f"{label}_scale", taken)
        ),
        helper.make_node(
            "Add", [mid, t_name], [bn.output[0]], name=_unique(f"{label}_shift", taken)
        ),
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
    dropped = [
        i
        for i, t in enumerate(g.initializer)
        if not (reads[t.name] or not reads_before[t.name] or t.name in graph_inputs)
    ]
    # Deleted in place, from the back: rebuilding the list would copy every weight.
    for i in reversed(dropped):
        del g.initializer[i]
    now = {o for n in g.node for o in n.output} | {t.name for t in g.initializer} | graph_inputs
    vi = [v for v in g.value_info if v.name in now or v.name not in names_before]
    del g.value_info[:]
    g.value_info.extend(vi)
