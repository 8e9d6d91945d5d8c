"""The graph ``torch.export`` would trace, rebuilt from a ``torch.fx.symbolic_trace`` in a tenth of
the time, for reporting (``inspect``).

``torch.export`` costs seconds: its machinery (dynamo, sympy) takes ~2.4 s to import and the first
trace ~3 s, more than building, loading and running the model. Its graph, in the IR it returns
(pre-dispatch ATen), keeps every ``torch.nn`` layer and functional call as one op of the same name
(``Conv2d`` → ``conv2d``, ``ReLU6(inplace=True)`` → ``hardtanh_``, ``x + y`` → ``add``, ``Identity``
→ nothing). ``torch.fx.symbolic_trace`` gives the same program one level up: ``call_module`` nodes
for the ``torch.nn`` layers, ``call_function`` / ``call_method`` for the rest. ``fx_program``
lowers each fx node to the ops export records for it (``_MODULES``, ``_FUNCTIONS``, ``_METHODS``),
named as export names them, with the same placeholders (parameters, buffers, inputs), module
stack and value ranks, into an object that ``GraphView`` reads like an ExportedProgram. Discovery
(``discover.build_info``) then runs unchanged on it: the same producers, consumers, fold
decisions and reasons as on the exported graph.

It answers only where that is certain, and returns None (the caller exports) otherwise: a node
not in the tables (``x.size()``, indexing, a multi-output op, …), a BN layer fx does not keep as
one call (a ``_BatchNorm`` subclass with its own ``forward``), a frozen BN, a module or parameter
reachable under two names, an input signature export would see differently, ``--dynamic-dims``,
or a model whose batch size is not free. Export keeps dim 0 dynamic where the model allows it;
whether it does is seen by running the traced graph at batch sizes 2 and 3 (the example's batch
dim doubled as ``dynamic_spec`` does, and one more): a model that pins its batch fails at one of
them or changes a non-batch output dim, and export (which also writes the note) takes over.

``fold`` never reads this graph: it rewrites the exported program.
"""

from __future__ import annotations

import copy
import inspect
import operator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

__all__ = ["FxProgram", "fx_program", "lower"]

# the formats whose module is the user's eager nn.Module
_EAGER = ("state_dict", "safetensors", "pickle")


class _Ambiguous(Exception):
    """The fx graph does not say for certain what export would record."""


class _Val:
    """A traced value's shape and dtype, as export keeps them in ``node.meta["val"]``; a
    batch-sized dim is the string ``"s0"`` (export's symbol, read by ``_spec`` as ``batch``)."""

    def __init__(self, shape: tuple[Any, ...], dtype: Any, free: tuple[bool, ...] = ()) -> None:
        self.shape = shape
        self.dtype = dtype
        self.free = free  # per dim: its size follows the batch (export's size is symbolic)
        self.sizes: tuple[int, ...] = ()  # the sizes at the example's batch

    def dim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class _Const:
    """A Python value the model computes the same at every batch size (``x.shape[1]``, an
    ``_assert``'s None): export evaluates it while tracing and records no node for it."""

    value: Any


_VARYING = _Const(object())  # a Python value that changes with the batch size


@dataclass
class FxProgram:
    """What ``GraphView`` reads of an ExportedProgram: its graph, signature and tensors."""

    graph: Any
    graph_signature: Any
    state_dict: dict[str, Any]
    constants: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ the tables

# activation layers: class name → (op, whether `inplace=True` makes it the `op_` variant)
_ACTIVATIONS = {
    "ReLU": ("relu", True), "ReLU6": ("hardtanh", True), "Hardtanh": ("hardtanh", True),
    "Hardswish": ("hardswish", True), "Hardsigmoid": ("hardsigmoid", True),
    "SiLU": ("silu", True), "Mish": ("mish", True), "LeakyReLU": ("leaky_relu", True),
    "ELU": ("elu", True), "GELU": ("gelu", False), "Sigmoid": ("sigmoid", False),
    "Tanh": ("tanh", False), "Softplus": ("softplus", False), "PReLU": ("prelu", False),
    "Softmax": ("softmax", False),
}  # fmt: skip
# other one-op layers: class name → op
_SIMPLE_MODULES = {
    "MaxPool1d": "max_pool1d", "MaxPool2d": "max_pool2d", "MaxPool3d": "max_pool3d",
    "AvgPool1d": "avg_pool1d", "AvgPool2d": "avg_pool2d", "AvgPool3d": "avg_pool3d",
    "AdaptiveAvgPool1d": "adaptive_avg_pool1d", "AdaptiveAvgPool2d": "adaptive_avg_pool2d",
    "AdaptiveAvgPool3d": "adaptive_avg_pool3d", "Flatten": "flatten", "Dropout": "dropout",
    "Dropout2d": "feature_dropout", "Dropout3d": "feature_dropout",
    "AlphaDropout": "alpha_dropout", "ChannelShuffle": "channel_shuffle",
    "PixelShuffle": "pixel_shuffle", "ZeroPad2d": "pad", "LayerNorm": "layer_norm",
    "GroupNorm": "group_norm",
}  # fmt: skip
_CONV = {"Conv1d": "conv1d", "Conv2d": "conv2d", "Conv3d": "conv3d"}
_DECONV = {"ConvTranspose1d": "conv_transpose1d", "ConvTranspose2d": "conv_transpose2d",
           "ConvTranspose3d": "conv_transpose3d"}  # fmt: skip
_BATCHNORM = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"}

# Python operators on sizes and flags (a tensor result goes to the op tables instead)
_PYTHON_OPS = {
    operator.getitem, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
    operator.ge, operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
    operator.mod, operator.neg, operator.not_,
}  # fmt: skip
_TENSOR_FACTS = {"shape", "ndim", "dtype", "device", "is_cuda"}

# call_method name → op; the `_` variants are in-place, as in export
_METHODS = {
    name: name
    for name in (
        "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "flatten", "mean", "sum", "view",
        "reshape", "permute", "transpose", "add", "add_", "mul", "mul_", "sub", "div", "clamp",
        "softmax", "expand_as", "neg", "matmul", "exp", "sqrt", "pow", "amax", "unsqueeze",
        "squeeze", "sigmoid_", "hardswish", "hardswish_",
    )
}  # fmt: skip
_METHODS["contiguous"] = ""  # no op: export records none for it
# dtype casts: export checks the input's metadata (a node reading the input), then casts
_CASTS = {"float", "half", "double", "bfloat16", "to"}


def _function_table() -> dict[Any, tuple[str, int | None]]:
    """call_function target → (op, position of its ``inplace`` argument or None)."""
    import torch
    import torch.nn.functional as F

    table: dict[Any, tuple[str, int | None]] = {
        operator.add: ("add", None), operator.iadd: ("add_", None),
        operator.mul: ("mul", None), operator.imul: ("mul_", None),
        operator.sub: ("sub", None), operator.isub: ("sub_", None),
        operator.truediv: ("div", None), operator.itruediv: ("div_", None),
        operator.neg: ("neg", None), operator.matmul: ("matmul", None),
        torch.add: ("add", None), torch.mul: ("mul", None), torch.cat: ("cat", None),
        torch.relu: ("relu", None), torch.sigmoid: ("sigmoid", None), torch.tanh: ("tanh", None),
        torch.flatten: ("flatten", None), torch.mean: ("mean", None),
        torch.unsqueeze: ("unsqueeze", None),
        torch.matmul: ("matmul", None),
        F.relu: ("relu", 1), F.relu6: ("relu6", 1), F.silu: ("silu", 1),
        F.hardswish: ("hardswish", 1), F.hardsigmoid: ("hardsigmoid", 1), F.mish: ("mish", 1),
        F.gelu: ("gelu", None), F.sigmoid: ("sigmoid", None), F.tanh: ("tanh", None),
        F.leaky_relu: ("leaky_relu", 2), F.elu: ("elu", 2), F.hardtanh: ("hardtanh", 3),
        F.softmax: ("softmax", None), F.adaptive_avg_pool2d: ("adaptive_avg_pool2d", None),
        F.avg_pool2d: ("avg_pool2d", None), F.pad: ("pad", None),
        F.max_pool1d: ("max_pool1d", None), F.max_pool2d: ("max_pool2d", None),
        F.avg_pool1d: ("avg_pool1d", None), F.adaptive_avg_pool1d: ("adaptive_avg_pool1d", None),
    }  # fmt: skip
    return table


# --------------------------------------------------------------------------------- the lowering


def _aten(name: str) -> Any:
    """An OpOverload of ``aten.<name>`` (its overload packet names the node, as in export)."""
    import torch

    pkt = getattr(torch.ops.aten, name, None)
    if pkt is None:
        raise _Ambiguous(name)
    return getattr(pkt, "default", None) or getattr(pkt, pkt.overloads()[0])


class _Lowering:
    """Builds the export-shaped graph from the fx graph, node by node, in execution order."""

    def __init__(self, gm: Any, root: Any, vals: dict[Any, Any]) -> None:
        import torch

        self.gm, self.root, self.vals = gm, root, vals
        self.graph = torch.fx.Graph()
        self.env: dict[Any, Any] = {}
        self.params: dict[str, Any] = {}  # fqn → placeholder
        self.calls: dict[str, int] = {}  # module path → calls so far
        self.bn_paths = {n for n, m in root.named_modules() if _is_batchnorm(m)}
        self.bn_calls: set[str] = set()
        self.functions = _function_table()
        self.weighted = _weighted_functions()
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
            if node.op == "placeholder" and isinstance(self.vals.get(node), _Const):
                self.env[node] = self.vals[node].value  # an argument left at its default
            elif node.op == "placeholder":
                ph = self.graph.placeholder(node.target)
                ph.name = node.target  # fx would rename a builtin's name (`input`); export not
                ph.meta["val"] = self.vals[node]
                self.signature.user_inputs.append(ph.name)
                self.env[node] = ph
            elif node.op == "get_attr":
                if node.target not in self.params:
                    raise _Ambiguous(f"attribute {node.target}")
                self.env[node] = self.params[node.target]
            elif isinstance(self.vals.get(node), _Const):
                self.env[node] = self._python(node)
            elif node.op == "call_module":
                self.env[node] = self._module(node)
            elif node.op == "call_function":
                self.env[node] = self._function(node)
            elif node.op == "call_method":
                self.env[node] = self._method(node)
            elif node.op == "output":
                leaves = list(_leaves(node.args[0]))
                if not leaves or not all(isinstance(self.vals.get(a), _Val) for a in leaves):
                    raise _Ambiguous("output")
                self.graph.output(tuple(self.env[a] for a in leaves))
        state = dict(self.root.state_dict(keep_vars=True))
        return FxProgram(self.graph, self.signature, state)

    def _python(self, node: Any) -> Any:
        """A node computing a Python value from sizes and flags: its value, and no op."""
        import torch

        if (node.op == "call_method" and node.target in ("size", "dim")) or (
            node.op == "call_function"
            and (
                node.target in _PYTHON_OPS
                or node.target is torch._assert
                or (node.target is getattr and node.args[1] in _TENSOR_FACTS)
            )
        ):
            value = self.vals[node]
            return value if value is _VARYING else value.value
        raise _Ambiguous(f"{node.op} {getattr(node.target, '__name__', node.target)}")

    def _arg(self, a: Any) -> Any:
        if hasattr(a, "op"):
            if self.env[a] is _VARYING:
                raise _Ambiguous(f"{a.name}: a size that follows the batch")
            return self.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(x) for x in a)
        if isinstance(a, dict):
            return {k: self._arg(v) for k, v in a.items()}
        return a

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
        new = self.graph.create_node("call_function", _aten(op), args, kwargs or {}, name=op)
        new.meta["nn_module_stack"] = stack
        if node in self.vals:
            new.meta["val"] = self.vals[node]
        return new

    def _tensor_input(self, node: Any) -> Any:
        if not node.args or not hasattr(node.args[0], "op"):
            raise _Ambiguous(f"{node.name}: no tensor input")
        return self.env[node.args[0]]

    def _module(self, node: Any) -> Any:
        mod = self.root.get_submodule(node.target)
        cls = type(mod)
        kind = cls.__name__
        if not cls.__module__.startswith("torch.nn.modules.") or len(node.args) != 1:
            raise _Ambiguous(f"module {node.target} ({kind})")
        if node.kwargs:
            raise _Ambiguous(f"module {node.target}: keyword arguments")
        if kind == "Identity":
            return self._tensor_input(node)
        stack = self._stack(node, leaf=node.target)
        x = self._tensor_input(node)
        p = self.params
        if kind in _CONV:
            if mod.padding_mode != "zeros":
                raise _Ambiguous(f"{node.target}: padding_mode {mod.padding_mode}")
            padding = mod.padding if isinstance(mod.padding, str) else list(mod.padding)
            w, b = p[f"{node.target}.weight"], p.get(f"{node.target}.bias")
            args = (x, w, b, list(mod.stride), padding, list(mod.dilation), mod.groups)
            return self._emit(node, _CONV[kind], args, stack)
        if kind in _DECONV:
            if mod.padding_mode != "zeros":
                raise _Ambiguous(f"{node.target}: padding_mode {mod.padding_mode}")
            w, b = p[f"{node.target}.weight"], p.get(f"{node.target}.bias")
            out_pad = list(mod.output_padding)
            args = (x, w, b, list(mod.stride), list(mod.padding), out_pad, mod.groups)
            return self._emit(node, _DECONV[kind], (*args, list(mod.dilation)), stack)
        if kind == "Linear":
            w, b = p[f"{node.target}.weight"], p.get(f"{node.target}.bias")
            return self._emit(node, "linear", (x, w, b), stack)
        if kind in _BATCHNORM:
            get = p.get
            t = node.target
            stats = (get(f"{t}.running_mean"), get(f"{t}.running_var"))
            # eval: batch statistics only when there are no running ones (F.batch_norm's rule)
            training = stats == (None, None)
            args = (x, get(f"{t}.weight"), get(f"{t}.bias"), *stats, training)
            return self._emit(
                node, "batch_norm", (*args, mod.momentum or 0.0, mod.eps, True), stack
            )
        if kind in _ACTIVATIONS:
            op, has_inplace = _ACTIVATIONS[kind]
            inplace = has_inplace and bool(getattr(mod, "inplace", False))
            extra = tuple(self.params[f"{node.target}.{k}"] for k, _ in mod.named_parameters())
            return self._emit(node, op + ("_" if inplace else ""), (x, *extra), stack)
        if kind in _SIMPLE_MODULES:
            op = _SIMPLE_MODULES[kind]
            if getattr(mod, "return_indices", False):
                raise _Ambiguous(f"{node.target}: return_indices")
            if getattr(mod, "inplace", False):
                if not op.endswith("dropout"):
                    raise _Ambiguous(f"{node.target}: inplace")
                op += "_"
            extra = tuple(self.params[f"{node.target}.{k}"] for k, _ in mod.named_parameters())
            return self._emit(node, op, (x, *extra), stack)
        if kind == "Upsample":
            return self._emit(node, _upsample(mod.mode, mod.size, mod.scale_factor), (x,), stack)
        raise _Ambiguous(f"module {node.target} ({kind})")

    def _function(self, node: Any) -> Any:
        import torch.nn.functional as F

        target = node.target
        stack = self._stack(node)
        if target is F.interpolate:
            kw = node.kwargs
            mode = kw.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
            size = kw.get("size", node.args[1] if len(node.args) > 1 else None)
            scale = kw.get("scale_factor", node.args[2] if len(node.args) > 2 else None)
            return self._emit(node, _upsample(mode, size, scale), self._flat_args(node), stack)
        if target is F.batch_norm:
            return self._batch_norm(node, stack)
        if target is operator.getitem:
            return self._index(node, stack)
        if _hashable(target) and target in self.weighted:
            # F.linear / F.conv2d on the module's own tensors (get_attr → its placeholder);
            # their arguments share the names of the aten op's schema, which discovery reads
            args = tuple(self._arg(a) for a in node.args)
            kwargs = {k: self._arg(v) for k, v in node.kwargs.items()}
            return self._emit(node, target.__name__, args, stack, kwargs)
        if _is_stochastic_depth(target):
            training = node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True)
            if training is not False:
                raise _Ambiguous("stochastic_depth in training")
            return self._tensor_input(node)  # the identity in eval: export records nothing
        if target is F.dropout:
            if node.kwargs.get("inplace", False) or len(node.args) > 3:
                raise _Ambiguous("dropout inplace")
            return self._emit(node, "dropout", self._flat_args(node), stack)
        entry = self.functions.get(target) if _hashable(target) else None
        if entry is None:
            raise _Ambiguous(f"function {getattr(target, '__name__', target)}")
        op, inplace_at = entry
        if inplace_at is not None:
            inplace = node.kwargs.get(
                "inplace", node.args[inplace_at] if len(node.args) > inplace_at else False
            )
            if not isinstance(inplace, bool):
                raise _Ambiguous("inplace flag")
            op += "_" if inplace else ""
        return self._emit(node, op, self._flat_args(node), stack)

    def _index(self, node: Any, stack: dict[str, Any]) -> Any:
        """``x[...]`` on a tensor as export records it, left to right: ``slice`` for a
        slice (none where it keeps a fixed-size dim whole), ``select`` for an int,
        ``unsqueeze`` for None, nothing for the dims an Ellipsis spans."""
        src, index = node.args
        val = self.vals.get(src)
        if not isinstance(val, _Val):
            raise _Ambiguous("getitem of a non-tensor")
        items = index if isinstance(index, tuple) else (index,)
        if sum(1 for i in items if i is Ellipsis) > 1:
            raise _Ambiguous("getitem: two ellipses")
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
                raise _Ambiguous(f"getitem with {type(item).__name__}")
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
            raise _Ambiguous("batch_norm arguments")
        owners = [k for k, (path, cls) in stack.items() if path in self.bn_paths]
        for key in owners[-1:]:
            if key in self.bn_calls:
                raise _Ambiguous(f"BN module {key} called twice")
            self.bn_calls.add(key)
        t = tuple(
            self._arg(a[k]) for k in ("input", "weight", "bias", "running_mean", "running_var")
        )
        return self._emit(
            node, "batch_norm", (*t, a["training"], a["momentum"], a["eps"], True), stack
        )

    def _method(self, node: Any) -> Any:
        import torch

        if node.target in _CASTS:
            dtypes = [a for a in (*node.args[1:], *node.kwargs.values())]
            if len(dtypes) != (node.target == "to") or not all(
                isinstance(d, torch.dtype) for d in dtypes
            ):
                raise _Ambiguous(f"method {node.target} with {dtypes}")
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
        op = _METHODS.get(node.target)
        if op is None:
            raise _Ambiguous(f"method {node.target}")
        if op == "":
            return self._tensor_input(node)
        return self._emit(node, op, self._flat_args(node), self._stack(node))

    def _flat_args(self, node: Any) -> tuple[Any, ...]:
        # the data edges are what discovery reads of these ops (users, fan-out)
        return tuple(self._arg(a) for a in (*node.args, *node.kwargs.values()))


def _weighted_functions() -> set[Any]:
    import torch.nn.functional as F

    return {F.linear, F.conv1d, F.conv2d, F.conv3d}


def _is_batchnorm(m: Any) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return isinstance(m, _BatchNorm)


def _is_stochastic_depth(target: Any) -> bool:
    # torchvision.ops.stochastic_depth: an fx-wrapped function that is the identity in eval
    return getattr(target, "__name__", "") == "stochastic_depth" and getattr(
        target, "__module__", ""
    ).startswith("torchvision.ops")


def _upsample(mode: str, size: Any, scale: Any) -> str:
    ops = {"nearest": "upsample_nearest", "bilinear": "upsample_bilinear", "linear": None}
    base = ops.get(mode)
    if base is None or (size is None) == (scale is None):
        raise _Ambiguous(f"upsample mode {mode}")
    return f"{base}2d"


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _leaves(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _leaves(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _leaves(y)
    else:
        yield x


# ------------------------------------------------------------------------------------- the entry


def _eligible(handle: Any) -> dict[str, Any] | None:
    """The one example input export would trace, when the fast path may answer at all."""
    if handle.format not in _EAGER or handle._dynamic_dims:
        return None
    example = handle.example_named
    if len(example) != 1:
        return None
    (x,) = example.values()
    if not hasattr(x, "dim") or x.dim() == 0 or not x.is_floating_point():
        return None
    params = list(inspect.signature(handle.module.forward).parameters.values())
    if [p.name for p in params[: len(example)]] != list(example) or any(
        p.kind != p.POSITIONAL_OR_KEYWORD for p in params
    ):
        return None
    # the other arguments keep their defaults, as in export: fx traces them as such constants
    rest = params[len(example) :]
    if any(p.default is p.empty or not isinstance(p.default, (bool, int, float)) for p in rest):
        return None
    return example


def _defaults(module: Any, example: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(module.forward).parameters.values()
    return {p.name: p.default for p in params if p.name not in example}


def _odd_module(module: Any) -> str | None:
    """Why export's view of ``module`` is not certain from fx, or None: a module or tensor
    reachable under two names, a forward hook, a frozen BN, a lazy module, a BN class that is
    not a ``_BatchNorm``."""
    from torch.nn.modules.lazy import LazyModuleMixin

    from bncheck.backends.torch.discover import is_bn, is_frozen_bn

    mods = list(module.named_modules(remove_duplicate=False))
    if len({id(m) for _, m in mods}) != len(mods):
        return "a module reachable under two names"
    tensors = [id(t) for _, t in module.named_parameters(remove_duplicate=False)]
    tensors += [id(t) for _, t in module.named_buffers(remove_duplicate=False)]
    if len(set(tensors)) != len(tensors):
        return "a tensor reachable under two names"
    from torch.nn.modules import module as nn_module

    # a forward hook runs in export's trace (its ops recorded, weight_norm's weight computed)
    # but not in fx's, which records a leaf module as one call
    hooks = ("_global_forward_hooks", "_global_forward_pre_hooks")
    if any(getattr(nn_module, h, None) for h in hooks):
        return "a global forward hook"
    for name, m in mods:
        cls = type(m)
        if m._forward_hooks or m._forward_pre_hooks:
            return f"{name or 'the model'}: a forward hook"
        if isinstance(m, LazyModuleMixin) or is_frozen_bn(m):
            return f"{name}: lazy or frozen BN"
        if is_bn(m) and not _is_batchnorm(m):
            return f"{name}: BN class {cls.__module__}.{cls.__qualname__}"
        torch_bn = _is_batchnorm(m) and cls.__module__.startswith("torch.nn.modules.")
        if torch_bn and cls.__name__ not in _BATCHNORM:
            return f"{name}: BN class {cls.__qualname__}"
    return None


def _trace(module: Any, concrete: dict[str, Any]) -> Any:
    """``torch.fx.symbolic_trace``, keeping ``x += y`` in place: fx's Proxy has no ``__iadd__``,
    so Python records ``x = x + y`` (``add``), while export records the in-place ``add_``."""
    import torch

    class InplaceProxy(torch.fx.Proxy):
        pass

    for op in ("iadd", "isub", "imul", "itruediv"):
        setattr(InplaceProxy, f"__{op}__", _inplace_method(getattr(operator, op)))

    class Tracer(torch.fx.Tracer):
        def proxy(self, node: Any) -> Any:
            return InplaceProxy(node, self)

    tracer = Tracer()
    graph = tracer.trace(module, concrete_args=concrete or None)
    return torch.fx.GraphModule(tracer.root, graph, type(module).__name__)


def _inplace_method(op: Any) -> Any:
    def impl(self: Any, other: Any) -> Any:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return impl


def _propagate(gm: Any, x: Any) -> dict[Any, Any]:
    """Run ``gm`` on ``x``: each node's result, a tensor as its (shape, dtype), anything else
    (a size, a flag, None) as ``_Const``."""
    import torch

    seen: dict[Any, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                seen[n] = (tuple(out.shape), out.dtype)
            elif n.op != "output":
                seen[n] = _Const(out)
            return out

    with torch.no_grad():
        Recorder(gm).run(x)
    return seen


def fx_program(handle: Any) -> FxProgram | None:
    """The export-shaped graph of ``handle``'s eager model from ``torch.fx.symbolic_trace``, or
    None where it could differ from what ``trace.trace`` exports (see the module docstring)."""
    return lower(handle)[0]


def lower(handle: Any) -> tuple[FxProgram | None, str | None]:
    """``fx_program``, with why there is none (for tests and debugging)."""
    import torch

    from bncheck.backends.torch.load import quiet_torch

    example = _eligible(handle)
    if example is None:
        return None, "not one batched tensor input of an eager model, or --dynamic-dims"
    odd = _odd_module(handle.module)
    if odd:
        return None, odd
    work = copy.deepcopy(handle.module).eval()
    (x,) = example.values()
    # batched as ``dynamic_spec`` batches it for export (a batch of 1 doubled, so that export
    # keeps it symbolic); not by calling it: its ``torch.export.Dim`` imports sympy (~1 s)
    batched = torch.cat([x, x]) if x.shape[0] == 1 else x
    one_more = torch.cat([batched, batched[:1]])
    try:
        with quiet_torch():
            gm = _trace(work, _defaults(handle.module, example))
            at_b = _propagate(gm, batched)
            at_b1 = _propagate(gm, one_more)
    except Exception as exc:
        return None, f"fx: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    vals = _batch_values(gm, at_b, at_b1)
    if vals is None:
        return None, "a value's shape depends on the batch size other than through dim 0"
    try:
        return _Lowering(gm, work, vals).run(), None
    except _Ambiguous as exc:
        return None, f"not in the tables: {exc}"
    except KeyError as exc:
        return None, f"no such tensor: {exc}"


def _batch_values(gm: Any, at_b: dict[Any, Any], at_b1: dict[Any, Any]) -> dict[Any, Any] | None:
    """Node → ``_Val`` (a tensor) or ``_Const`` (a Python value); dim 0 of the input and of the
    outputs is the symbol where it follows the batch. None when a value's rank, an output's
    other dims, or a Python value (export would record a size op for it) change with the
    batch."""
    vals: dict[Any, Any] = {}
    out = gm.graph.output_node()
    outputs = {a for a in _leaves(out.args[0]) if hasattr(a, "op")}
    for node, got in at_b.items():
        other = at_b1.get(node)
        if isinstance(got, _Const):
            if not isinstance(other, _Const):
                return None
            # a size that follows the batch: export records ops for it, if anything reads it
            vals[node] = got if _same(got.value, other.value) else _VARYING
            continue
        shape, dtype = got
        if not isinstance(other, tuple) or len(other[0]) != len(shape):
            return None
        free = tuple(a != b for a, b in zip(shape, other[0], strict=True))
        if (node.op == "placeholder" or node in outputs) and any(free[1:]):
            return None
        # every value that follows the batch, not only the outputs: an output may be an
        # earlier value passed through an op export records nothing for (Identity)
        symbolic = tuple("s0" if f else n for n, f in zip(shape, free, strict=True))
        vals[node] = _Val(symbolic, dtype, free)
        vals[node].sizes = got[0]
    return vals


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False
