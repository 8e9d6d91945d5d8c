"""Lowering an fx graph to the graph ``torch.export`` would record (see ``fxgraph``).

``Lowering`` walks the fx graph in execution order and emits, for each node, the ops the tables
of ``fxops`` say export records for it, named as export names them (``conv2d``, ``hardtanh__1``),
with export's placeholders (every parameter, then every buffer, then the inputs), module stack
(one key per call of a module) and ``meta["val"]`` (``Val``: shape, dtype, which dims follow the
batch). It raises ``Ambiguous`` for whatever the tables do not model.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from bncheck.backends.torch.fxops import (
    ACTIVATIONS,
    BATCHNORM,
    CASTS,
    CONV,
    DECONV,
    METHODS,
    PYTHON_OPS,
    SIMPLE_MODULES,
    TENSOR_FACTS,
    Ambiguous,
    function_table,
    hashable,
    is_batchnorm,
    is_stochastic_depth,
    upsample,
    weighted_functions,
)
from bncheck.backends.torch.graph import _flatten

# methods whose sizes may come as varargs; export records them as one list
_SIZE_VARARGS = {"permute", "view", "reshape"}

__all__ = ["Const", "FxProgram", "Lowering", "Parts", "Val", "Varying", "aten_op"]


class Val:
    """A traced value's shape and dtype, as export keeps them in ``node.meta["val"]``; a
    batch-sized dim is the string ``"s0"`` (export's symbol, read by ``_spec`` as ``batch``)."""

    def __init__(
        self,
        shape: tuple[Any, ...],
        dtype: Any,
        free: tuple[bool, ...] = (),
        sizes: tuple[int, ...] = (),
        contiguous: bool = True,
    ) -> None:
        self.shape = shape
        self.dtype = dtype
        self.free = free  # per dim: its size follows the batch (export's size is symbolic)
        self.sizes = sizes  # the sizes at the example's batch
        self.contiguous = contiguous  # its layout (`contiguous()` of it is an op, or nothing)

    def dim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class Const:
    """A Python value the model computes the same at every batch size (``x.shape[1]``, an
    ``_assert``'s None): export evaluates it while tracing and records no node for it."""

    value: Any


@dataclass(frozen=True)
class Varying:
    """A Python value that changes with the batch size (its values at the two batch sizes):
    export records ops for it where a tensor op reads it."""

    at_b: Any
    at_b1: Any


@dataclass(frozen=True)
class Parts:
    """The tensors a multi-output op returns (``torch.split``, ``chunk``), one ``Val`` each:
    export records the op, then one ``getitem`` per part, used or not."""

    vals: tuple[Val, ...]


@dataclass
class FxProgram:
    """What ``GraphView`` reads of an ExportedProgram: its graph, signature and tensors."""

    graph: Any
    graph_signature: Any
    state_dict: dict[str, Any]
    constants: dict[str, Any] = field(default_factory=dict)


def aten_op(name: str) -> Any:
    """An OpOverload of ``aten.<name>`` (its overload packet names the node, as in export)."""
    import torch

    pkt = getattr(torch.ops.aten, name, None)
    if pkt is None:
        raise Ambiguous(name)
    return getattr(pkt, "default", None) or getattr(pkt, pkt.overloads()[0])


class Lowering:
    """Builds the export-shaped graph from the fx graph, node by node, in execution order."""

    def __init__(self, gm: Any, root: Any, vals: dict[Any, Any], batch: tuple[int, int]) -> None:
        import torch

        self.gm, self.root, self.vals, self.batch = gm, root, vals, batch
        self.batch_size: Any = None  # export's one `sym_size` node of the input, once read
        self.graph = torch.fx.Graph()
        self.env: dict[Any, Any] = {}
        self.params: dict[str, Any] = {}  # fqn → placeholder
        self.calls: dict[str, int] = {}  # module path → calls so far
        self.bn_paths = {n for n, m in root.named_modules() if is_batchnorm(m)}
        self.bn_calls: set[str] = set()
        self.functions = function_table()
        self.weighted = weighted_functions()
        sig = SimpleNamespace(
            inputs_to_parameters={},
            inputs_to_buffers={},
            inputs_to_lifted_tensor_constants={},
            user_inputs=[],
        )
        self.signature = sig
        # export lifts every parameter, then every buffer, then the user inputs
        for fqn, _ in root.named_parameters():
            self._placeholder("p_", fqn, sig.inputs_to_parameters)
        for fqn, _ in root.named_buffers():
            self._placeholder("b_", fqn, sig.inputs_to_buffers)

    def _placeholder(self, prefix: str, fqn: str, table: dict[str, str]) -> None:
        tensor = self.root.get_parameter(fqn) if prefix == "p_" else self.root.get_buffer(fqn)
        node = self.graph.placeholder(prefix + fqn.replace(".", "_").lower())
        node.meta["val"] = tensor
        table[node.name] = fqn
        self.params[fqn] = node

    # -------------------------------------------------------------------------------------

    def run(self) -> FxProgram:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" and isinstance(self.vals.get(node), Const):
                self.env[node] = self.vals[node].value  # an argument left at its default
            elif node.op == "placeholder":
                ph = self.graph.placeholder(node.target)
                ph.name = node.target  # fx would rename a builtin's name (`input`); export not
                ph.meta["val"] = self.vals[node]
                self.signature.user_inputs.append(ph.name)
                self.env[node] = ph
            elif node.op == "get_attr":
                if node.target not in self.params:
                    raise Ambiguous(f"attribute {node.target}")
                self.env[node] = self.params[node.target]
            elif isinstance(self.vals.get(node), (Const, Varying)):
                self.env[node] = self._python(node)
            elif isinstance(self.vals.get(node), Parts):
                self.env[node] = self._split(node)
            elif node.op == "call_module":
                self.env[node] = self._module(node)
            elif node.op == "call_function":
                self.env[node] = self._function(node)
            elif node.op == "call_method":
                self.env[node] = self._method(node)
            elif node.op == "output":
                leaves = list(_flatten(node.args[0]))
                if not leaves or not all(isinstance(self.vals.get(a), Val) for a in leaves):
                    raise Ambiguous("output")
                self.graph.output(tuple(self.env[a] for a in leaves))
        state = dict(self.root.state_dict(keep_vars=True))
        return FxProgram(self.graph, self.signature, state)

    def _python(self, node: Any) -> Any:
        """A node computing a Python value from sizes and flags: its value, and no op."""
        import torch

        if (node.op == "call_method" and node.target in ("size", "dim")) or (
            node.op == "call_function"
            and (
                node.target in PYTHON_OPS
                or node.target is torch._assert
                or (node.target is getattr and node.args[1] in TENSOR_FACTS)
            )
        ):
            value = self.vals[node]
            return value if isinstance(value, Varying) else value.value
        raise Ambiguous(f"{node.op} {getattr(node.target, '__name__', node.target)}")

    def _arg(self, a: Any) -> Any:
        if hasattr(a, "op"):
            value = self.env[a]
            if isinstance(value, Varying):
                if (value.at_b, value.at_b1) != self.batch:
                    raise Ambiguous(f"{a.name}: a size computed from the batch size")
                return self._batch_size()
            return value
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(x) for x in a)
        if isinstance(a, dict):
            return {k: self._arg(v) for k, v in a.items()}
        return a

    def _batch_size(self) -> Any:
        """The batch size as an op reads it (``x.size(0)``, ``b, c, h, w = y.shape``): export
        records one ``sym_size`` of the input, before every other op, and reuses it (named
        ``sym_size_int_1``: export's first such node is one it removes)."""
        import torch

        if self.batch_size is None:
            (name,) = self.signature.user_inputs
            x = next(n for n in self.graph.nodes if n.op == "placeholder" and n.name == name)
            first = next((n for n in self.graph.nodes if n.op != "placeholder"), None)
            with self.graph.inserting_before(first):
                self.batch_size = self.graph.create_node(
                    "call_function", torch.ops.aten.sym_size.int, (x, 0), name="sym_size_int_1"
                )
        return self.batch_size

    def _stack(self, node: Any, leaf: str | None = None) -> dict[str, tuple[str, Any]]:
        # export's nn_module_stack: one key per module call (a repeated call gets its own key)
        stack = {}
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            key = path
            if path == leaf:
                k = self.calls.get(path, 0)
                self.calls[path] = k + 1
                key = f"{path}@{k}" if k else path
            stack[key] = (path, cls)
        return stack

    def _emit(
        self,
        node: Any,
        op: str,
        args: tuple[Any, ...],
        stack: dict[str, Any],
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        new = self.graph.create_node("call_function", aten_op(op), args, kwargs or {}, name=op)
        new.meta["nn_module_stack"] = stack
        if node in self.vals:
            new.meta["val"] = self.vals[node]
        return new

    def _tensor_input(self, node: Any) -> Any:
        if not node.args or not hasattr(node.args[0], "op"):
            raise Ambiguous(f"{node.name}: no tensor input")
        return self.env[node.args[0]]

    def _module(self, node: Any) -> Any:
        mod = self.root.get_submodule(node.target)
        cls = type(mod)
        kind = cls.__name__
        if not cls.__module__.startswith("torch.nn.modules.") or len(node.args) != 1:
            raise Ambiguous(f"module {node.target} ({kind})")
        if node.kwargs:
            raise Ambiguous(f"module {node.target}: keyword arguments")
        if kind == "Identity":
            return self._tensor_input(node)
        stack = self._stack(node, leaf=node.target)
        x = self._tensor_input(node)
        p = self.params
        if kind in CONV:
            if mod.padding_mode != "zeros":
                raise Ambiguous(f"{node.target}: padding_mode {mod.padding_mode}")
            padding = mod.padding if isinstance(mod.padding, str) else list(mod.padding)
            w, b = p[f"{node.target}.weight"], p.get(f"{node.target}.bias")
            args = (x, w, b, list(mod.stride), padding, list(mod.dilation), mod.groups)
            return self._emit(node, CONV[kind], args, stack)
        if kind in DECONV:
            if mod.padding_mode != "zeros":
                raise Ambiguous(f"{node.target}: padding_mode {mod.padding_mode}")
            w, b = p[f"{node.target}.weight"], p.get(f"{node.target}.bias")
            out_pad = list(mod.output_padding)
            args = (x, w, b, list(mod.stride), list(mod.padding), out_pad, mod.groups)
            return self._emit(node, DECONV[kind], (*args, list(mod.dilation)), stack)
        if kind == "Linear":
            w, b = p[f"{node.target}.weight"], p.get(f"{node.target}.bias")
            return self._emit(node, "linear", (x, w, b), stack)
        if kind in BATCHNORM:
            get = p.get
            t = node.target
            stats = (get(f"{t}.running_mean"), get(f"{t}.running_var"))
            # eval: batch statistics only when there are no running ones (F.batch_norm's rule)
            training = stats == (None, None)
            args = (x, get(f"{t}.weight"), get(f"{t}.bias"), *stats, training)
            return self._emit(
                node, "batch_norm", (*args, mod.momentum or 0.0, mod.eps, True), stack
            )
        if kind in ACTIVATIONS:
            op, has_inplace = ACTIVATIONS[kind]
            inplace = has_inplace and bool(getattr(mod, "inplace", False))
            extra = tuple(self.params[f"{node.target}.{k}"] for k, _ in mod.named_parameters())
            return self._emit(node, op + ("_" if inplace else ""), (x, *extra), stack)
        if kind in SIMPLE_MODULES:
            op = SIMPLE_MODULES[kind]
            if getattr(mod, "return_indices", False):
                raise Ambiguous(f"{node.target}: return_indices")
            if op.endswith("dropout"):  # dropout(input, p, train) in full, as export
                op += "_" if mod.inplace else ""
                return self._emit(node, op, (x, mod.p, mod.training), stack)
            if getattr(mod, "inplace", False):
                raise Ambiguous(f"{node.target}: inplace")
            extra = tuple(self.params[f"{node.target}.{k}"] for k, _ in mod.named_parameters())
            return self._emit(node, op, (x, *extra), stack)
        if kind == "Upsample":
            return self._emit(node, upsample(mod.mode, mod.size, mod.scale_factor), (x,), stack)
        raise Ambiguous(f"module {node.target} ({kind})")

    def _function(self, node: Any) -> Any:
        import torch.nn.functional as F

        target = node.target
        stack = self._stack(node)
        if target is F.interpolate:
            kw = node.kwargs
            mode = kw.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
            size = kw.get("size", node.args[1] if len(node.args) > 1 else None)
            scale = kw.get("scale_factor", node.args[2] if len(node.args) > 2 else None)
            return self._emit(node, upsample(mode, size, scale), self._flat_args(node), stack)
        if target is F.batch_norm:
            return self._batch_norm(node, stack)
        if target is operator.getitem:
            return self._index(node, stack)
        if hashable(target) and target in self.weighted:
            # F.linear / F.conv2d on the module's own tensors (get_attr → its placeholder);
            # their arguments share the names of the aten op's schema, which discovery reads
            args = tuple(self._arg(a) for a in node.args)
            kwargs = {k: self._arg(v) for k, v in node.kwargs.items()}
            return self._emit(node, target.__name__, args, stack, kwargs)
        if is_stochastic_depth(target):
            training = node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True)
            if training is not False:
                raise Ambiguous("stochastic_depth in training")
            return self._tensor_input(node)  # the identity in eval: export records nothing
        if target is F.dropout:
            bound = inspect.signature(F.dropout).bind(*node.args, **node.kwargs)
            bound.apply_defaults()
            a = bound.arguments
            if a["inplace"] is not False:
                raise Ambiguous("dropout inplace")
            # dropout(input, p, train) in full, as export records it: folds read `train`
            return self._emit(
                node, "dropout", (self._arg(a["input"]), a["p"], a["training"]), stack
            )
        entry = self.functions.get(target) if hashable(target) else None
        if entry is None:
            raise Ambiguous(f"function {getattr(target, '__name__', target)}")
        op, inplace_at = entry
        if inplace_at is not None:
            inplace = node.kwargs.get(
                "inplace", node.args[inplace_at] if len(node.args) > inplace_at else False
            )
            if not isinstance(inplace, bool):
                raise Ambiguous("inplace flag")
            op += "_" if inplace else ""
        return self._emit(node, op, self._flat_args(node), stack)

    def _split(self, node: Any) -> tuple[Any, ...]:
        """``torch.split`` / ``chunk``: the op (``split``, ``split_with_sizes`` for a list of
        sizes, ``chunk``), then a ``getitem`` for every part, as export records them."""
        import torch

        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if (node.op, name) not in (("call_method", "split"), ("call_method", "chunk")) and not (
            node.op == "call_function" and node.target in (torch.split, torch.chunk)
        ):
            raise Ambiguous(f"{node.op} {name}: several outputs")
        if name == "split":
            size = node.kwargs.get("split_size_or_sections", node.kwargs.get("split_size"))
            size = node.args[1] if len(node.args) > 1 else size
            name = "split" if isinstance(size, int) else "split_with_sizes"
        stack = self._stack(node)
        op = self._emit(node, name, self._flat_args(node), stack)
        op.meta.pop("val", None)
        parts = []
        for i, val in enumerate(self.vals[node].vals):
            part = self.graph.create_node("call_function", operator.getitem, (op, i), {})
            part.meta["nn_module_stack"], part.meta["val"] = stack, val
            parts.append(part)
        return tuple(parts)

    def _index(self, node: Any, stack: dict[str, Any]) -> Any:
        """``x[...]`` on a tensor as export records it, left to right: ``slice`` for a
        slice (none where it keeps a fixed-size dim whole), ``select`` for an int,
        ``unsqueeze`` for None, nothing for the dims an Ellipsis spans."""
        src, index = node.args
        val = self.vals.get(src)
        if isinstance(val, Parts) and isinstance(index, int):
            return self.env[src][index]  # export's getitem of that part, made with the op
        if not isinstance(val, Val):
            raise Ambiguous("getitem of a non-tensor")
        items = index if isinstance(index, tuple) else (index,)
        if sum(1 for i in items if i is Ellipsis) > 1:
            raise Ambiguous("getitem: two ellipses")
        x = self._arg(src)
        real = sum(1 for i in items if i is not None and i is not Ellipsis)
        d = s = 0  # the dim in the result so far, the dim of the source
        for item in items:
            if item is Ellipsis:
                d, s = d + val.dim() - real, s + val.dim() - real
            elif item is None:
                x = self._emit(node, "unsqueeze", (x, d), stack)
                d += 1
            elif isinstance(item, int) and not isinstance(item, bool):
                x = self._emit(node, "select", (x, d, item), stack)
                s += 1
            elif isinstance(item, slice) and all(
                v is None or (isinstance(v, int) and not isinstance(v, bool))
                for v in (item.start, item.stop, item.step)
            ):
                whole = item.indices(val.sizes[s]) == (0, val.sizes[s], 1)
                if val.free[s] or not whole:
                    x = self._emit(node, "slice", (x, d, item.start, item.stop), stack)
                d, s = d + 1, s + 1
            else:
                raise Ambiguous(f"getitem with {type(item).__name__}")
        return x

    def _batch_norm(self, node: Any, stack: dict[str, Any]) -> Any:
        # F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        # inside a BN module fx traced through (timm's BatchNormAct2d): one call per module,
        # since fx keys every call of a module alike and export tells calls apart
        names = ("input", "running_mean", "running_var", "weight", "bias", "training",
                 "momentum", "eps")  # fmt: skip
        given = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
        defaults = {"running_mean": None, "running_var": None, "weight": None, "bias": None,
                    "training": False, "momentum": 0.1, "eps": 1e-5}  # fmt: skip
        a = {**defaults, **given}
        if not isinstance(a["training"], bool) or not all(
            isinstance(a[k], (int, float)) for k in ("momentum", "eps")
        ):
            raise Ambiguous("batch_norm arguments")
        owners = [k for k, (path, cls) in stack.items() if path in self.bn_paths]
        for key in owners[-1:]:
            if key in self.bn_calls:
                raise Ambiguous(f"BN module {key} called twice")
            self.bn_calls.add(key)
        t = tuple(
            self._arg(a[k]) for k in ("input", "weight", "bias", "running_mean", "running_var")
        )
        return self._emit(
            node, "batch_norm", (*t, a["training"], a["momentum"], a["eps"], True), stack
        )

    def _method(self, node: Any) -> Any:
        import torch

        if node.target in CASTS:
            dtypes = [a for a in (*node.args[1:], *node.kwargs.values())]
            if len(dtypes) != (node.target == "to") or not all(
                isinstance(d, torch.dtype) for d in dtypes
            ):
                raise Ambiguous(f"method {node.target} with {dtypes}")
            x, stack = self._tensor_input(node), self._stack(node)
            cast = self._emit(node, "to", (x, *dtypes), stack)
            # export adds the check before the cast once the cast is recorded: it comes first
            # in the graph and second among the input's readers
            with self.graph.inserting_before(cast):
                check = self.graph.create_node(
                    "call_function",
                    torch.ops.aten._assert_tensor_metadata.default,
                    (x,),
                    name="_assert_tensor_metadata_default",
                )
            check.meta["nn_module_stack"] = stack
            return cast
        op = METHODS.get(node.target)
        if op is None:
            raise Ambiguous(f"method {node.target}")
        if node.target == "contiguous":
            # export records the copy only where there is one to make
            src = self.vals.get(node.args[0])
            if not isinstance(src, Val) or len(node.args) > 1 or node.kwargs:
                raise Ambiguous("contiguous")
            if src.contiguous:
                return self._tensor_input(node)
            return self._emit(node, "contiguous", (self._tensor_input(node),), self._stack(node))
        args = self._flat_args(node)
        if node.target in _SIZE_VARARGS and len(args) > 2:
            args = (args[0], list(args[1:]))  # x.permute(0, 2, 1) is permute(x, [0, 2, 1])
        return self._emit(node, op, args, self._stack(node))

    def _flat_args(self, node: Any) -> tuple[Any, ...]:
        # the data edges are what discovery reads of these ops (users, fan-out)
        return tuple(self._arg(a) for a in (*node.args, *node.kwargs.values()))
