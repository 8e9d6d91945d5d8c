"""Read-only index over an ONNX graph: who produces and who consumes each tensor, and which
tensors are constants (initializers or ``Constant`` nodes), with their values as numpy.

Only the top-level graph is indexed for producers; a node whose subgraph (``If``/``Loop``/
``Scan`` body) reads an outer tensor counts as a consumer of it, so a fold never misses a use.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, numpy_helper

from bncheck.errors import InputError
from bncheck.layers import TensorSpec

__all__ = [
    "GraphIndex",
    "attr",
    "constant_tensor",
    "dtype_name",
    "fixed_dim",
    "infer_shapes",
    "iter_graphs",
    "node_label",
    "opset_version",
    "tensor_element_count",
    "tensor_specs",
    "unfix_dynamic_dims",
    "value_dims",
]

Dims = tuple[int | str | None, ...]

# Pure, cheap ops whose outputs count as constants when their inputs are (GraphIndex._fold).
_FOLD_OPS = frozenset(
    {"Identity", "Cast", "CastLike", "Shape", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Concat"}
    | {"Transpose"}  # torch.onnx writes Linear as MatMul(x, Transpose(W))
)
_FOLD_MAX_ELEMENTS = 1 << 22

# Initializers up to this many elements keep their data for shape inference (Reshape targets,
# Slice bounds…); larger ones travel as dims only, so inference never copies the weights.
_SHAPE_DATA_LIMIT = 4096


def attr(node: NodeProto, name: str, default: object = None) -> object:
    """The Python value of attribute ``name`` of ``node``, or ``default`` when absent."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_label(node: NodeProto) -> str:
    """A node's name, or its first output where the name is empty (many exporters leave it)."""
    if node.name:
        return node.name
    return next((o for o in node.output if o), node.op_type)


def dtype_name(elem_type: int) -> str:
    """numpy dtype name of an ONNX element type (``float16``, ``bfloat16``…)."""
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return TensorProto.DataType.Name(elem_type).lower() if elem_type else "undefined"


def tensor_element_count(t: TensorProto) -> int:
    """Product of a tensor's declared dims (1 for a scalar)."""
    n = 1
    for d in t.dims:
        n *= int(d)
    return n


def opset_version(model: ModelProto, domain: str = "") -> int | None:
    """The model's opset for ``domain`` (``""`` and ``ai.onnx`` are the same domain)."""
    wanted = {"", "ai.onnx"} if domain in ("", "ai.onnx") else {domain}
    for op in model.opset_import:
        if op.domain in wanted:
            return int(op.version)
    return None


def fixed_dim(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    """The size a dim fixes, or None when it is dynamic.

    Dynamic: a ``dim_param`` (``"N"``, ``"?"``), no value at all, or a ``dim_value`` ≤ 0.
    Exporters write ``-1`` (Paddle) or ``0`` (older converters) for "any size"; onnxruntime reads
    a negative value as dynamic, and a zero-size model input is never what a user means. This is
    the one place the ONNX backend decides whether a dim is fixed.
    """
    if dim.HasField("dim_value") and dim.dim_value > 0:
        return int(dim.dim_value)
    return None


def value_dims(vi: onnx.ValueInfoProto) -> Dims | None:
    """Dims of a tensor ValueInfo: a fixed size (int), else its symbolic name, else None (see
    :func:`fixed_dim`); None when the rank is unknown."""
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    return tuple(
        size if (size := fixed_dim(d)) is not None else (d.dim_param or None) for d in tt.shape.dim
    )


def unfix_dynamic_dims(model: ModelProto) -> int:
    """Rewrite, in place, every non-positive ``dim_value`` of a value's declared shape (graph
    inputs, outputs and value_info, subgraphs included) as an unknown dim; returns how many.

    Such a dim means "any size" (:func:`fixed_dim`), but onnxruntime enforces a ``0`` as a
    size and onnx shape inference trips over a ``-1``: an unknown dim (neither value nor name)
    is how ONNX itself says "dynamic", so every session, inference and written file agrees.
    """
    changed = 0
    for g in iter_graphs(model.graph):
        for vi in (*g.input, *g.output, *g.value_info):
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
                continue
            for d in tt.shape.dim:
                if d.HasField("dim_value") and d.dim_value <= 0:
                    d.ClearField("dim_value")
                    changed += 1
    return changed


def tensor_specs(values: list[onnx.ValueInfoProto]) -> tuple[TensorSpec, ...]:
    """Graph inputs/outputs as TensorSpecs; non-tensor values get their kind as dtype."""
    specs = []
    for vi in values:
        kind = vi.type.WhichOneof("value")
        if kind == "tensor_type":
            dtype = dtype_name(vi.type.tensor_type.elem_type)
            dims = value_dims(vi) or ()
        else:
            dtype, dims = (kind or "undefined").removesuffix("_type"), ()
        specs.append(TensorSpec(vi.name, dims, dtype))
    return tuple(specs)


def inferred_values(
    model: ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, onnx.ValueInfoProto]:
    """The top-level graph's values (inputs, value_info, outputs) after onnx shape inference,
    by name (as declared where inference fails).

    Runs on a light copy: large initializers keep their dims but not their data.
    ``input_shapes`` (graph input name → shape) fixes dynamic input dims first.
    """
    g = model.graph
    light = ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    lg = light.graph
    lg.name = g.name
    lg.node.extend(g.node)
    lg.input.extend(g.input)
    lg.output.extend(g.output)
    lg.value_info.extend(g.value_info)
    for t in g.initializer:
        if tensor_element_count(t) <= _SHAPE_DATA_LIMIT:
            lg.initializer.append(t)
        else:
            stub = lg.initializer.add()
            stub.name, stub.data_type = t.name, t.data_type
            stub.dims.extend(t.dims)
    for vi in lg.input:
        if input_shapes and vi.name in input_shapes and vi.type.HasField("tensor_type"):
            shape = vi.type.tensor_type.shape
            shape.ClearField("dim")
            for d in input_shapes[vi.name]:
                shape.dim.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False)
    except Exception:  # inference is a help, not a requirement: unknown ranks stay unknown
        inferred = light
    ig = inferred.graph
    return {vi.name: vi for vi in [*ig.input, *ig.value_info, *ig.output]}


def infer_shapes(
    model: ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, Dims]:
    """Shapes of the top-level graph's tensors by onnx shape inference (empty where it fails;
    see :func:`inferred_values`); an initializer's are its dims."""
    out: dict[str, Dims] = {}
    for name, vi in inferred_values(model, input_shapes).items():
        dims = value_dims(vi)
        if dims is not None:
            out[name] = dims
    for t in model.graph.initializer:
        out[t.name] = tuple(int(d) for d in t.dims)
    return out


def iter_graphs(graph: GraphProto) -> Iterator[GraphProto]:
    """``graph`` and every subgraph nested in its nodes' attributes, depth first."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == AttributeProto.GRAPH:
                yield from iter_graphs(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from iter_graphs(g)


def _subgraph_outer_reads(node: NodeProto) -> set[str]:
    """Names a node's subgraphs read without defining them: outer-scope tensors it consumes."""
    reads: set[str] = set()

    def walk(g: GraphProto, defined: set[str]) -> None:
        defined = defined | {i.name for i in g.input} | {t.name for t in g.initializer}
        for n in g.node:
            reads.update(i for i in n.input if i and i not in defined)
            for a in n.attribute:
                subs = [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs)
                for sub in subs:
                    walk(sub, defined)
            defined |= set(n.output)
        reads.update(o.name for o in g.output if o.name not in defined)

    for a in node.attribute:
        subs = [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs)
        for sub in subs:
            walk(sub, set())
    return reads


_CONSTANT_LISTS = {"value_int": np.int64, "value_ints": np.int64}
_CONSTANT_LISTS |= {"value_float": np.float32, "value_floats": np.float32}


def constant_tensor(node: NodeProto) -> TensorProto | None:
    """The value of a ``Constant`` node as a TensorProto (``value`` or ``value_int(s)``/
    ``value_float(s)``); None for sparse or string values."""
    for a in node.attribute:
        if a.name == "value" and a.type == AttributeProto.TENSOR:
            return a.t
        if a.name in _CONSTANT_LISTS:
            arr = np.asarray(onnx.helper.get_attribute_value(a), dtype=_CONSTANT_LISTS[a.name])
            return numpy_helper.from_array(arr, node.output[0])
    return None


@dataclass
class GraphIndex:
    """Producer/consumer maps and constant lookup for the top-level graph of ``model``.

    A tensor is *constant* when it is an initializer that cannot be overridden at run time
    (not also a graph input, or the model's IR version is below 4, as onnxruntime decides),
    the output of a ``Constant`` node with a ``value`` tensor, or computed from constants by
    one of a few pure ops (``Identity``, ``Cast``, ``Expand``…; see ``_fold``).
    """

    model: ModelProto
    producer: dict[str, NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[NodeProto]] = field(default_factory=dict)
    initializers: dict[str, TensorProto] = field(default_factory=dict)
    constant_nodes: dict[str, TensorProto] = field(default_factory=dict)
    graph_inputs: set[str] = field(default_factory=set)
    graph_outputs: set[str] = field(default_factory=set)
    input_shapes: dict[str, tuple[int, ...]] | None = None
    source: str = "model"  # names the model in error messages
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _shapes: dict[str, Dims] | None = field(default=None, repr=False)
    _folded: dict[str, np.ndarray | None] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        model: ModelProto,
        input_shapes: dict[str, tuple[int, ...]] | None = None,
        *,
        source: str = "model",
    ) -> GraphIndex:
        g = model.graph
        idx = cls(model=model, input_shapes=input_shapes, source=source)
        idx.initializers = {t.name: t for t in g.initializer}
        idx.graph_inputs = {i.name for i in g.input}
        idx.graph_outputs = {o.name for o in g.output}
        for node in g.node:
            for o in node.output:
                if o:
                    idx.producer[o] = node
            uses = [i for i in node.input if i]
            if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
                uses += sorted(_subgraph_outer_reads(node) - set(uses))
            for i in uses:
                idx.consumers.setdefault(i, []).append(node)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                t = constant_tensor(node)
                if t is not None:
                    idx.constant_nodes[node.output[0]] = t
        return idx

    @property
    def overridable_initializers(self) -> bool:
        return self.model.ir_version >= 4

    def is_constant(self, name: str) -> bool:
        """Stored constant, or computed from constants by a small pure op (see :meth:`_fold`)."""
        if not name:
            return False
        if name in self.constant_nodes:
            return True
        if name in self.initializers:
            return not (self.overridable_initializers and name in self.graph_inputs)
        return self._fold(name) is not None

    def is_overridable(self, name: str) -> bool:
        """An initializer that is also a graph input: a default the caller may replace."""
        return (
            name in self.initializers
            and name in self.graph_inputs
            and self.overridable_initializers
            and name not in self.constant_nodes
        )

    def tensor(self, name: str, *, overridable: bool = False) -> TensorProto | None:
        """The TensorProto behind a constant name (initializer or Constant node), else None.

        ``overridable=True`` also returns initializers that are graph inputs (their default).
        """
        if name in self.constant_nodes:
            return self.constant_nodes[name]
        if name not in self.initializers:
            return None
        if self.is_constant(name) or (overridable and self.is_overridable(name)):
            return self.initializers[name]
        return None

    def const(self, name: str, *, overridable: bool = False) -> np.ndarray | None:
        """The value of a constant tensor as numpy in its stored dtype; None if not constant
        (``overridable`` as in :meth:`tensor`)."""
        t = self.tensor(name, overridable=overridable) if name else None
        if t is None:
            return self._fold(name) if name and name not in self.initializers else None
        if name not in self._arrays:
            try:
                arr = numpy_helper.to_array(t)
            except (ValueError, TypeError, KeyError) as exc:  # bad dims, data or data_type
                raise InputError(
                    f"{self.source}: tensor '{name}' holds malformed data ({exc})"
                ) from None
            arr.setflags(write=False)  # shared with every caller: nobody may change it in place
            self._arrays[name] = arr
        return self._arrays[name]

    def const_shape(self, name: str) -> tuple[int, ...] | None:
        """Declared dims of a constant, without converting stored data."""
        t = self.tensor(name)
        if t is not None:
            return tuple(int(d) for d in t.dims)
        folded = self._fold(name) if name and name not in self.initializers else None
        return None if folded is None else tuple(folded.shape)

    def _fold(self, name: str, depth: int = 0) -> np.ndarray | None:
        """Value of ``name`` when a chain of pure ops computes it from constants, else None.

        Exporters emit such chains (a deduplicated parameter behind ``Identity``, a zero
        bias built by ``Expand(CastLike(0, x), Shape(W))``); treating them as constants lets
        those BNs fold. Only :data:`_FOLD_OPS` are evaluated, outputs are capped at
        :data:`_FOLD_MAX_ELEMENTS`, and anything unexpected just means "not constant".
        """
        if name in self._folded:
            return self._folded[name]
        self._folded[name] = None  # also guards against cycles in a malformed graph
        node = self.producer.get(name)
        if node is None or depth > 16 or node.op_type not in _FOLD_OPS:
            return None
        if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            return None
        try:
            value = self._eval(node, depth)
        except (ValueError, TypeError, IndexError, KeyError):
            value = None
        if value is not None:
            value = np.asarray(value)
            if value.size > _FOLD_MAX_ELEMENTS:
                value = None
            else:
                value.setflags(write=False)
        self._folded[name] = value
        return value

    def _input(self, node: NodeProto, i: int, depth: int) -> np.ndarray | None:
        name = node.input[i] if len(node.input) > i else ""
        if not name:
            return None
        if name in self.initializers or name in self.constant_nodes:
            return self.const(name)
        return self._fold(name, depth + 1)

    def _elem_dtype(self, name: str) -> np.dtype | None:
        value = self.const(name) if self.is_constant(name) else None
        if value is not None:
            return value.dtype
        g = self.model.graph
        for vi in [*g.input, *g.value_info, *g.output]:
            if vi.name == name and vi.type.HasField("tensor_type"):
                return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        return None

    def _eval(self, node: NodeProto, depth: int) -> np.ndarray | None:
        op = node.op_type
        if op == "Shape":  # of a constant only: an activation's dims may change per call
            dims = self.const_shape(node.input[0]) if self.is_constant(node.input[0]) else None
            if dims is None:
                return None
            start, end = attr(node, "start", 0), attr(node, "end", None)
            return np.array(dims[start:end], dtype=np.int64)
        if op == "Concat":  # of shapes, as exporters build an Expand's target
            parts = [self._input(node, i, depth) for i in range(len(node.input))]
            if any(p is None for p in parts):
                return None
            return np.concatenate(parts, axis=int(attr(node, "axis", 0)))
        x = self._input(node, 0, depth)
        if x is None:
            return None
        if op == "Identity":
            return x
        if op == "Transpose":
            perm = attr(node, "perm", None)
            return np.transpose(x, None if perm is None else [int(p) for p in perm])
        if op == "Cast":
            return x.astype(onnx.helper.tensor_dtype_to_np_dtype(attr(node, "to")))
        if op == "CastLike":
            dtype = self._elem_dtype(node.input[1])
            return None if dtype is None else x.astype(dtype)
        if op in ("Unsqueeze", "Squeeze"):
            axes = attr(node, "axes") if len(node.input) < 2 else self._input(node, 1, depth)
            if op == "Squeeze":
                return np.squeeze(x) if axes is None else np.squeeze(x, tuple(int(a) for a in axes))
            if axes is None:
                return None
            rank = x.ndim + len(axes)
            for a in sorted(int(a) % rank for a in axes):
                x = np.expand_dims(x, a)
            return x
        shape = self._input(node, 1, depth)
        if shape is None:
            return None
        dims = [int(d) for d in shape.ravel()]
        if op == "Expand":
            out = np.broadcast_shapes(x.shape, tuple(dims))
            if int(np.prod(out)) > _FOLD_MAX_ELEMENTS:
                return None
            return np.broadcast_to(x, out).copy()
        # Reshape: 0 copies the input dim unless allowzero=1; -1 is left to numpy
        if not attr(node, "allowzero", 0):
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(dims)

    def uses(self, name: str) -> list[NodeProto]:
        """Nodes consuming ``name``, once per use (a node reading it twice appears twice)."""
        return list(self.consumers.get(name, []))

    def is_graph_output(self, name: str) -> bool:
        return name in self.graph_outputs

    def shape(self, name: str) -> Dims | None:
        """Inferred dims of a tensor (shape inference runs once, on first use)."""
        if self._shapes is None:
            self._shapes = infer_shapes(self.model, self.input_shapes)
        return self._shapes.get(name)

    def rank(self, name: str) -> int | None:
        dims = self.shape(name)
        return None if dims is None else len(dims)
