"""Statistics glue for ONNX models: BN input moments per batch, and new running statistics.

Inference mode (``batch_stats=False``): the runner runs a *copy* of the graph in which every
BatchNormalization input is also a graph output; its per-channel moments are computed in numpy
(``Moments.from_batch``, float64).

Batch statistics (``batch_stats=True``): every BatchNormalization of the copy is replaced by
explicit ops that normalize with the statistics of the current batch, as in training —
PyTorch's training-mode ``F.batch_norm`` — while every other node runs as written (Dropout in
inference mode). With the input ``x`` (N×C×…) viewed as N×C×L, per sample n and channel c::

    m_nc = ReduceMean_L(x)              v_nc = ReduceSumSquare_L(x − m_nc) / L
    μ_c  = mean_n(m_nc)                 σ²_c = mean_n(v_nc) + mean_n((m_nc − μ_c)²)   (biased)
    y    = (x − m_nc)·k_c + ((m_nc − μ_c)·k_c + β_c),   k_c = γ_c/√(σ²_c + ε)

(equal counts per sample make σ² exact). The tiny N×C tensors ``m`` and ``v`` are graph outputs,
so the activation never leaves onnxruntime; numpy merges them in float64 with Chan's formula
for equal counts: ``mean_c = Σ_n m_nc/N``, ``M2_c = L·Σ_n v_nc + L·Σ_n (m_nc − mean_c)²``,
``count = N·L``. The per-sample sums are float32 in onnxruntime, so their rounding grows with L:
against a float64 reduction of the same activations, the variance of the first BN of published
Paddle models was off by 6e-7 relative at L = 2,304, 2e-5 at L = 25,600 and 4e-5 at L = 121,600
(means: 1e-7 to 2e-6). This does not rely on ``training_mode=1``, which onnxruntime's inference
builds and older opsets do not all support; the running statistics are never touched. float16 /
bfloat16 inputs are normalized in float32 and cast back (onnxruntime's CPU reductions have no
half kernels).
Never imports torch.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bncheck.backends.base import MomentRunner
from bncheck.backends.onnx.graph import attr, node_label, opset_version
from bncheck.errors import InputError
from bncheck.numerics import Moments

_TAP = "__bncheck_tap"


def _is_bn(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def _bn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if _is_bn(n)]


def _names(model: onnx.ModelProto) -> Iterator[str]:
    g = model.graph
    yield from (t.name for t in g.initializer)
    yield from (v.name for v in [*g.input, *g.output, *g.value_info])
    for n in g.node:
        yield n.name
        yield from n.output


class _Fresh:
    """Names that collide with nothing in the graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.taken = set(_names(model))

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


def _elem_type(model: onnx.ModelProto, name: str) -> int | None:
    """The ONNX element type of tensor ``name`` where the graph states it (else None)."""
    g = model.graph
    for t in g.initializer:
        if t.name == name:
            return int(t.data_type)
    for vi in [*g.input, *g.value_info, *g.output]:
        if vi.name == name and vi.type.HasField("tensor_type"):
            return int(vi.type.tensor_type.elem_type) or None
    for n in g.node:
        if n.op_type == "Constant" and n.output and n.output[0] == name:
            value = attr(n, "value")
            if isinstance(value, TensorProto):
                return int(value.data_type)
    return None


def _const(fresh: _Fresh, base: str, value: np.ndarray) -> tuple[onnx.NodeProto, str]:
    out = fresh(base)
    return helper.make_node(
        "Constant", [], [out], name=fresh(base + "_node"), value=numpy_helper.from_array(value)
    ), out


def _batch_stats_nodes(
    model: onnx.ModelProto, node: onnx.NodeProto, fresh: _Fresh, source: str
) -> tuple[list[onnx.NodeProto], tuple[str, str, str]]:
    """Nodes computing ``node``'s output with batch statistics (formulas in the module doc),
    and the names of its per-sample moments ``m``, ``v`` (N×C×1) and of the N×C×L shape."""
    opset = opset_version(model) or 1
    label = node_label(node)
    if attr(node, "spatial", 1) == 0:
        raise InputError(
            f"{source}: BN '{label}' has spatial=0 (per-element statistics); not supported"
        )
    x, scale, bias = node.input[0], node.input[1], node.input[2]
    y = node.output[0]
    eps = float(attr(node, "epsilon", 1e-5))
    # opset < 15: X, scale and B share one type; from 15 on they may differ (T, T1).
    x_type = _elem_type(model, x) or _elem_type(model, scale) or TensorProto.FLOAT
    work = x_type if x_type in (TensorProto.FLOAT, TensorProto.DOUBLE) else TensorProto.FLOAT
    np_work = helper.tensor_dtype_to_np_dtype(work)
    p = f"{label}{_TAP}"
    nodes: list[onnx.NodeProto] = []

    def add(op: str, inputs: list[str], **attrs: Any) -> str:
        out = fresh(f"{p}_{op.lower()}")
        nodes.append(helper.make_node(op, inputs, [out], name=fresh(out + "_node"), **attrs))
        return out

    def const(base: str, value: np.ndarray) -> str:
        n, out = _const(fresh, f"{p}_{base}", value)
        nodes.append(n)
        return out

    def as_work(name: str) -> str:
        t = _elem_type(model, name) or x_type
        return name if t == work else add("Cast", [name], to=work)

    def reduce(op: str, t: str, axis: int) -> str:
        if opset >= 18:  # axes moved from attribute to input
            return add(op, [t, const(f"axis{axis}", np.array([axis], np.int64))], keepdims=1)
        return add(op, [t], axes=[axis], keepdims=1)

    shape = add("Shape", [x])
    x3 = add("Reshape", [as_work(x), const("ncl", np.array([0, 0, -1], np.int64))])
    shape3 = add("Shape", [x3])
    length = add("Cast", [add("Gather", [shape3, const("two", np.array(2, np.int64))])], to=work)
    m = reduce("ReduceMean", x3, 2)  # N×C×1
    d = add("Sub", [x3, m])
    v = add("Div", [reduce("ReduceSumSquare", d, 2), length])  # N×C×1
    mu = reduce("ReduceMean", m, 0)  # 1×C×1
    dm = add("Sub", [m, mu])
    var = add("Add", [reduce("ReduceMean", v, 0), reduce("ReduceMean", add("Mul", [dm, dm]), 0)])
    std = add("Sqrt", [add("Add", [var, const("eps", np.array(eps, np_work))])])
    col = const("col", np.array([-1, 1], np.int64))
    k = add("Div", [add("Reshape", [as_work(scale), col]), std])  # γ/√(σ²+ε), 1×C×1
    offset = add("Add", [add("Mul", [dm, k]), add("Reshape", [as_work(bias), col])])  # N×C×1
    y3 = add("Add", [add("Mul", [d, k]), offset])
    if work == x_type:
        nodes.append(helper.make_node("Reshape", [y3, shape], [y], name=fresh(f"{p}_out")))
    else:
        cast = helper.make_node(
            "Cast", [add("Reshape", [y3, shape])], [y], name=fresh(f"{p}_out"), to=x_type
        )
        nodes.append(cast)
    return nodes, (m, v, shape3)


def _rewrite(
    model: onnx.ModelProto, source: str
) -> tuple[onnx.ModelProto, list[tuple[str, tuple[str, str, str]]]]:
    out = copy.deepcopy(model)
    g = out.graph
    fresh = _Fresh(out)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    nodes: list[onnx.NodeProto] = []
    taps: list[tuple[str, tuple[str, str, str]]] = []
    for node in g.node:
        if not (node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")):
            nodes.append(node)
            continue
        if any(o and o in used for o in node.output[1:]):
            raise InputError(
                f"{source}: BN '{node_label(node)}' is exported in training mode and its "
                "running-statistics outputs are used; export the model in eval mode"
            )
        new, names = _batch_stats_nodes(out, node, fresh, source)
        nodes.extend(new)
        taps.append((node_label(node), names))
    del g.node[:]
    g.node.extend(nodes)
    return out, taps


def batch_stats_model(model: onnx.ModelProto, source: str = "model") -> onnx.ModelProto:
    """A copy of ``model`` whose BatchNormalization nodes normalize with batch statistics."""
    return _rewrite(model, source)[0]


def _merge_samples(m: np.ndarray, v: np.ndarray, shape3: np.ndarray) -> Moments:
    """Moments of a batch from per-sample means ``m`` and biased variances ``v`` (N×C×1) of
    ``L = shape3[2]`` values each (formula in the module doc), in float64."""
    n, length = int(shape3[0]), int(shape3[2])
    m64 = np.asarray(m, np.float64).reshape(n, -1)
    v64 = np.asarray(v, np.float64).reshape(n, -1)
    if n == 0 or length == 0:
        return Moments.empty(m64.shape[1])
    mean = m64.mean(axis=0)
    m2 = length * (v64.sum(axis=0) + ((m64 - mean) ** 2).sum(axis=0))
    return Moments(n * length, mean, m2)


def moment_runner(handle: Any, *, batch_stats: bool) -> MomentRunner:
    """One batch in → (model outputs, {BN layer name: Moments of its input}), merged over
    every BN node of that name; how the moments are computed is in the module doc."""
    from bncheck.backends.onnx.run import make_session

    source = str(handle.path)
    if batch_stats:
        model, taps = _rewrite(handle.model, source)
    else:
        model, taps = copy.deepcopy(handle.model), []
    g = model.graph
    n_outputs = len(g.output)
    produced = {o for n in g.node for o in n.output if o}
    fresh = _Fresh(model)
    watched: dict[str, list[str]] = {}  # inference mode: tensor → BN layer names reading it
    if not batch_stats:
        for node in _bn_nodes(handle.model):
            watched.setdefault(node.input[0], []).append(node_label(node))
    existing = {o.name for o in g.output}
    fetch: dict[str, str] = {}  # tensor → graph output carrying it
    wanted = list(watched) + [t for _, names in taps for t in names]
    for t in wanted:
        if t in existing or t in fetch:
            fetch.setdefault(t, t)
        elif t in produced:
            g.output.append(helper.make_empty_tensor_value_info(t))
            fetch[t] = t
        else:  # a graph input or initializer: outputs must be produced by a node
            tap = fresh(f"{t}{_TAP}")
            g.node.append(helper.make_node("Identity", [t], [tap], name=fresh(tap + "_node")))
            g.output.append(helper.make_empty_tensor_value_info(tap))
            fetch[t] = tap
    session = make_session(model, source=source)
    out_names = [o.name for o in g.output]
    index = {name: i for i, name in enumerate(out_names)}

    def run(feeds: Mapping[str, np.ndarray]) -> tuple[list[np.ndarray], dict[str, Moments]]:
        from bncheck.interrupt import run_session

        try:
            values = run_session(session, out_names, feeds)  # Ctrl-C stops it mid-run
        except Exception as exc:
            from bncheck.backends.onnx.run import ort_message

            raise InputError(f"{source}: onnxruntime run failed: {ort_message(exc)}") from None
        moments: dict[str, Moments] = {}

        def add(layer: str, m: Moments) -> None:
            moments[layer] = moments[layer] + m if layer in moments else m

        for tensor, layers in watched.items():
            m = Moments.from_batch(values[index[fetch[tensor]]], channel_axis=1)
            for layer in layers:
                add(layer, m)
        for layer, names in taps:
            add(layer, _merge_samples(*(values[index[fetch[t]]] for t in names)))
        return list(values[:n_outputs]), moments

    return run


def with_stats(
    handle: Any,
    stats: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    num_batches: int | None = None,
) -> Any:
    """A new handle whose BN ``mean``/``var`` hold ``stats`` (name → (mean, var)), cast to the
    stored dtype; every other tensor is left as it was.

    Each statistic is written where the old one lives: an initializer is overwritten, and so is
    the value of a ``Constant`` node (Paddle and older exporters store weights that way), so the
    file keeps its layout and a diff shows only the statistics. A tensor that anything else
    also reads (another node, a subgraph, a graph output) is never changed: the BN gets a copy
    under a new name (a ``Constant`` node placed just before it, or an initializer). A
    statistic computed from constants by a pure chain (``Identity``, ``Cast``…) becomes a new
    initializer; stored tensors and nodes that nothing reads any more are then removed.
    ``num_batches`` is accepted for symmetry: ONNX stores no count.
    """
    from bncheck.backends.onnx import OnnxHandle

    index = handle.index  # consumers include reads from subgraphs
    model = copy.deepcopy(handle.model)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    const_nodes = {
        n.output[0]: n for n in g.node if n.output and n.output[0] in index.constant_nodes
    }
    fresh = _Fresh(model)
    before: dict[int, list[onnx.NodeProto]] = {}  # BN node position → Constant nodes to put first
    replaced: set[str] = set()  # old statistics some BN no longer reads
    found = set()
    for pos, node in enumerate(g.node):
        name = node_label(node)
        if not _is_bn(node) or name not in stats:
            continue
        found.add(name)
        for slot, value in zip((3, 4), stats[name], strict=True):
            old = node.input[slot]
            current = index.const(old, overridable=True) if old else None
            if current is None:
                raise InputError(
                    f"{handle.path}: BN '{name}' statistics are computed at run time, "
                    "not stored in the model: nothing to recalibrate"
                )
            arr = np.asarray(value, dtype=np.float64).astype(current.dtype)
            if arr.shape != current.shape:
                raise InputError(
                    f"{handle.path}: BN '{name}': {arr.shape} statistics for a "
                    f"{current.shape} tensor"
                )
            alone = len(index.uses(old)) == 1 and not index.is_graph_output(old)
            if alone and old in const_nodes:
                n = const_nodes[old]
                del n.attribute[:]  # value_float(s) too: one `value` tensor replaces it
                n.attribute.append(helper.make_attribute("value", numpy_helper.from_array(arr)))
            elif alone and old in inits:
                inits[old].CopyFrom(numpy_helper.from_array(arr, old))
            else:
                new = fresh(f"{old}_{name}_recalibrated")
                if old in const_nodes:
                    value_t = numpy_helper.from_array(arr)
                    n = helper.make_node("Constant", [], [new], name=fresh(new), value=value_t)
                    before.setdefault(pos, []).append(n)
                else:
                    g.initializer.append(numpy_helper.from_array(arr, new))
                node.input[slot] = new
                replaced.add(old)
    missing = set(stats) - found
    if missing:
        raise InputError(f"{handle.path}: no BN layer named {sorted(missing)[0]!r}")
    if before:
        nodes = [m for pos, n in enumerate(g.node) for m in (*before.get(pos, ()), n)]
        del g.node[:]
        g.node.extend(nodes)
    _drop_unread(model, replaced)
    return OnnxHandle(
        handle.path, model, input_shapes=handle.input_shapes, external_data=handle.external_data
    )


def _drop_unread(model: onnx.ModelProto, names: set[str]) -> None:
    """Remove, from ``names`` back through their constant producers (``Constant`` and the
    pure ops of a constant chain), every initializer and node whose output nothing reads any
    more. Graph inputs and outputs are the model's interface: kept."""
    from bncheck.backends.onnx.graph import _FOLD_OPS, GraphIndex

    index = GraphIndex.build(model)
    dead: set[str] = set()  # tensor names whose initializer or single-output producer goes
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in dead or index.consumers.get(name) or name in index.graph_inputs:
            continue
        if index.is_graph_output(name):
            continue
        node = index.producer.get(name)
        if node is not None:
            if not (node.op_type == "Constant" or node.op_type in _FOLD_OPS):
                continue
            if len(node.output) != 1:
                continue
            for i in node.input:  # the chain's inputs lose a reader
                if i:
                    index.consumers[i] = [c for c in index.consumers.get(i, []) if c is not node]
                    todo.append(i)
        dead.add(name)
    if not dead:
        return
    g = model.graph
    nodes = [n for n in g.node if not (len(n.output) == 1 and n.output[0] in dead)]
    inits = [t for t in g.initializer if t.name not in dead]
    del g.node[:], g.initializer[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
