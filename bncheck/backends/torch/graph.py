"""The traced graph of a PyTorch model and the BN fold decision made on it.

``GraphView`` wraps an ExportedProgram's graph with its signature (which placeholder is which
parameter); ``find_bn_calls`` / ``module_calls`` match each BN layer's applications (``BNCall``:
the batch-norm op or a frozen-BN module's plain ops, its data input and output value);
``match_fold(view, calls, channels, ...)`` returns a ``FoldDecision`` whose ``reason`` says why
not. ``inspect`` reports these decisions and ``fold`` executes exactly them.

Folding into the producer ``y = BN(W*x + b)`` is exact when the producer's output reaches nothing
but the BN: ``W' = W * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``
(per output channel). Folding into a consumer ``W*BN(x) + b`` is ``W' = W * s`` (per input
channel), ``b' = b + W @ (beta - mean * s)``; it is exact for Linear, and for Conv only when
nothing is zero-padded (padding 0) or the BN shift ``beta - mean * s`` is 0, because padding
inserts zeros after the BN, where the fold would insert them before it. A weight that other call
sites also read is folded into a copy (the fold installs a new tensor), so sharing does not block
a fold.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bncheck.layers import FoldDecision, Neighbour
from bncheck.numerics import bn_scale_shift

BN_OPS = frozenset(
    {
        "batch_norm",
        "native_batch_norm",
        "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training",
        "_native_batch_norm_legit_functional",
        "cudnn_batch_norm",
        "miopen_batch_norm",
        "_batch_norm_impl_index",
        "_batch_norm_with_update",
        "_batch_norm_with_update_functional",
        "_batch_norm_no_update",
    }
)
NORM_OPS = {"layer_norm": "LayerNorm", "group_norm": "GroupNorm", "instance_norm": "InstanceNorm",
            "rms_norm": "RMSNorm"}  # fmt: skip
_WEIGHTED = {"Conv", "ConvTranspose", "Linear", "MatMul"}
_OPS = {
    **{f"conv{d}d": "Conv" for d in (1, 2, 3)},
    **{f"conv_transpose{d}d": "ConvTranspose" for d in (1, 2, 3)},
    "linear": "Linear", "matmul": "MatMul", "mm": "MatMul", "addmm": "MatMul", "bmm": "MatMul",
}  # fmt: skip


def packet(node: Any) -> str | None:
    """The aten op name of a call_function node (``conv2d`` for ``aten.conv2d.default``)."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:
        return "getitem"
    pkt = getattr(node.target, "_overloadpacket", None)
    return getattr(pkt, "__name__", None) or getattr(node.target, "__name__", str(node.target))


def op_args(node: Any) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {}
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def module_path(node: Any) -> tuple[str, str] | None:
    """Innermost (module path, class qualname) from ``nn_module_stack``, when recorded."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    return path, cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def _flatten(x: Any) -> Iterable[Any]:
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flatten(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flatten(y)
    else:
        yield x


class GraphView:
    """An ExportedProgram's graph with the signature facts the checks need."""

    def __init__(self, ep: Any) -> None:
        sig = ep.graph_signature
        self.ep = ep
        self.graph = ep.graph
        self.fqn: dict[str, str] = {
            **sig.inputs_to_parameters,
            **sig.inputs_to_buffers,
            **sig.inputs_to_lifted_tensor_constants,
        }
        self.user_inputs = list(sig.user_inputs)
        out = self.graph.output_node()
        self.outputs = [n for n in _flatten(out.args) if hasattr(n, "op")]

    def stored(self, node: Any) -> bool:
        """A parameter, buffer or constant placeholder (a weight a fold may rewrite)."""
        return hasattr(node, "op") and node.op == "placeholder" and node.name in self.fqn

    def tensor(self, fqn: str) -> Any:
        if fqn in self.ep.state_dict:
            return self.ep.state_dict[fqn]
        return self.ep.constants.get(fqn)

    def kind(self, node: Any) -> str:
        """Normalized op: Conv, ConvTranspose, Linear, MatMul, input, or the aten name."""
        if node.op == "placeholder":
            return "input" if node.name in self.user_inputs else "constant"
        if node.op == "output":
            return "output"
        name = packet(node) or node.name
        if name in ("convolution", "_convolution"):
            return "ConvTranspose" if op_args(node).get("transposed") else "Conv"
        return _OPS.get(name, name)

    def weight(self, node: Any) -> Any:
        args = op_args(node)
        name = packet(node)
        if name == "addmm":
            return args.get("mat2")
        if name in ("mm", "bmm"):
            return args.get("mat2")
        if name == "matmul":
            return args.get("other")
        return args.get("weight")

    def name(self, node: Any) -> str:
        """Module path for nodes from a module (``layer1.0.conv1``), else the node name."""
        if node.op == "placeholder":
            return self.fqn.get(node.name, node.name)
        if self.kind(node) in _WEIGHTED:
            w = self.weight(node)
            if self.stored(w):
                return self.fqn[w.name].rsplit(".", 1)[0]
        mp = module_path(node)
        if mp and mp[0] and mp[1].startswith("torch.nn.modules."):
            return mp[0]
        return node.name

    def neighbour(self, node: Any) -> Neighbour:
        if node.op == "output":
            return Neighbour("output", "output")
        kind = self.kind(node)
        return Neighbour(
            self.name(node), kind, kind in _WEIGHTED and self.stored(self.weight(node))
        )


@dataclass
class BNCall:
    """One application of a BN layer in the graph: its nodes, data input and output value."""

    node: Any | None  # the batch-norm op, None for a frozen-BN module built from plain ops
    region: set[Any] = field(default_factory=set)
    input: Any | None = None
    output: Any | None = None


def call_from_op(node: Any) -> BNCall:
    """A BNCall for a batch-norm op node (its tuple outputs reached through getitem 0)."""
    region = {node}
    output = node
    if len(node.target._schema.returns) > 1:
        output = None
        for user in node.users:
            if packet(user) == "getitem":
                region.add(user)
                if user.args[1] == 0:
                    output = user
    return BNCall(node, region, op_args(node).get("input"), output)


def call_from_region(view: GraphView, nodes: list[Any]) -> BNCall:
    """A BNCall for a module's nodes: its one external data input and one escaping value."""
    region = set(nodes)
    bn = [n for n in nodes if packet(n) in BN_OPS]
    if len(bn) == 1:
        call = call_from_op(bn[0])
        call.region |= region
        return call
    inputs: list[Any] = []
    for n in nodes:
        for a in _flatten((n.args, n.kwargs)):
            if hasattr(a, "op") and a not in region and not view.stored(a) and a not in inputs:
                inputs.append(a)
    outs = [n for n in nodes if any(u not in region for u in n.users)]
    return BNCall(
        None, region, inputs[0] if len(inputs) == 1 else None, outs[0] if len(outs) == 1 else None
    )


def module_calls(view: GraphView, paths: Iterable[str]) -> dict[str, list[BNCall]]:
    """Module path → its calls in the graph (``nn_module_stack`` keys ``bn`` / ``bn@1`` …)."""
    wanted = set(paths)
    groups: dict[str, dict[str, list[Any]]] = {p: {} for p in wanted}
    for node in view.graph.nodes:
        for key, (path, _cls) in (node.meta.get("nn_module_stack") or {}).items():
            if path in wanted:
                groups[path].setdefault(key, []).append(node)
    return {p: [call_from_region(view, ns) for ns in g.values()] for p, g in groups.items()}


def find_bn_calls(view: GraphView) -> dict[str, list[BNCall]]:
    """Layer name → calls, for a graph without modules (.pt2): each batch-norm op, named by the
    common prefix of its weight/bias/running_mean/running_var state-dict names."""
    calls: dict[str, list[BNCall]] = {}
    for node in view.graph.nodes:
        if packet(node) not in BN_OPS:
            continue
        args = op_args(node)
        fqns = [
            view.fqn[a.name]
            for k in ("weight", "bias", "running_mean", "running_var")
            if view.stored(a := args.get(k))
        ]
        prefixes = {f.rsplit(".", 1)[0] if "." in f else "" for f in fqns}
        if len(prefixes) == 1:
            name = prefixes.pop()
        elif fqns:
            parts = [f.split(".")[:-1] for f in fqns]
            common = [p[0] for p in zip(*parts, strict=False) if len(set(p)) == 1]
            name = ".".join(common) or node.name
        else:
            mp = module_path(node)
            name = mp[0] if mp and mp[0] else node.name
        calls.setdefault(name, []).append(call_from_op(node))
    return calls


# ------------------------------------------------------------------------------------- folding


def out_channels(view: GraphView, node: Any) -> int | None:
    w = view.weight(node).meta.get("val")
    if w is None:
        return None
    if view.kind(node) == "ConvTranspose":
        return int(w.shape[1]) * int(op_args(node).get("groups", 1))
    return int(w.shape[0])


def _rank(node: Any) -> int | None:
    val = node.meta.get("val")
    return val.dim() if hasattr(val, "dim") else None


def _other_users(view: GraphView, node: Any, besides: set[Any]) -> list[str]:
    names = [view.neighbour(u).name for u in node.users if u not in besides]
    if node in view.outputs:
        names.append("output")
    return names


def producer_check(view: GraphView, call: BNCall, channels: int) -> tuple[str | None, str | None]:
    """(target, None) when the BN folds into its producer, else (None, reason)."""
    prod = call.input
    if prod is None:
        return None, "no single producer"
    nb = view.neighbour(prod)
    if nb.op not in ("Conv", "ConvTranspose", "Linear"):
        what = f"the model input '{nb.name}'" if nb.op == "input" else nb.name
        return None, f"no producer with weights (input comes from {what})"
    if not nb.has_weights:
        return None, f"weight of '{nb.name}' is computed in the graph, not stored"
    bias = op_args(prod).get("bias")
    if bias is not None and not view.stored(bias):
        return None, f"bias of '{nb.name}' is computed in the graph, not stored"
    others = _other_users(view, prod, call.region)
    if others:
        return None, f"producer '{nb.name}' output also feeds {', '.join(map(repr, others[:3]))}"
    oc = out_channels(view, prod)
    if oc != channels:
        return None, f"producer '{nb.name}' has {oc} output channels, the BN {channels}"
    if nb.op == "Linear" and _rank(prod) not in (None, 2):
        return (
            None,
            f"producer '{nb.name}' is a Linear on a {_rank(prod)}-D tensor; "
            "BN normalizes another axis",
        )
    return nb.name, None


def consumer_check(
    view: GraphView, call: BNCall, channels: int, shift_is_zero: bool
) -> tuple[str | None, str | None]:
    """(target, None) when the BN folds exactly into its one consumer, else (None, reason)."""
    out = call.output
    if out is None:
        return None, "BN output not found in the graph"
    if out in view.outputs:
        return None, "BN output is a model output"
    users = [u for u in out.users if u not in call.region]
    if len(users) != 1:
        names = ", ".join(repr(view.neighbour(u).name) for u in users[:3])
        return None, f"BN output feeds {len(users)} nodes ({names})"
    nb = view.neighbour(users[0])
    if nb.op not in ("Conv", "Linear") or not nb.has_weights:
        return None, f"consumer '{nb.name}' has no weights to absorb the BN"
    args = op_args(users[0])
    if args.get("input") is not out:
        return None, f"BN output is not the data input of '{nb.name}'"
    if args.get("bias") is not None and not view.stored(args["bias"]):
        return None, f"bias of '{nb.name}' is computed in the graph, not stored"
    w = view.weight(users[0])
    shape = w.meta["val"].shape
    cin = int(shape[1]) * int(args.get("groups", 1)) if nb.op == "Conv" else int(shape[-1])
    if cin != channels:
        return None, f"consumer '{nb.name}' takes {cin} input channels, the BN has {channels}"
    if nb.op == "Linear" and _rank(out) not in (None, 2):
        return None, f"consumer '{nb.name}' is a Linear on a {_rank(out)}-D tensor"
    padding = args.get("padding", 0)
    if isinstance(padding, str):
        padded = padding == "same"
    else:
        padded = any(int(p) != 0 for p in _flatten(padding))
    if nb.op == "Conv" and padded and not shift_is_zero:
        return (
            None,
            f"consumer '{nb.name}' zero-pads its input; the fold is exact only without padding",
        )
    return nb.name, None


def match_fold(
    view: GraphView,
    calls: list[BNCall],
    channels: int,
    *,
    track_running_stats: bool,
    shift_is_zero: bool,
) -> FoldDecision:
    """Decide whether a BN folds (eval semantics), into what, and if not, why."""
    if not calls:
        return FoldDecision(None, reason="BN module is not called in the traced forward")
    if len(calls) > 1:
        return FoldDecision(None, reason=f"BN module called at {len(calls)} places")
    if not track_running_stats:
        return FoldDecision(
            None, reason="no running statistics: it normalizes with batch statistics"
        )
    target, p_reason = producer_check(view, calls[0], channels)
    if target:
        return FoldDecision("producer", target)
    target, c_reason = consumer_check(view, calls[0], channels, shift_is_zero)
    if target:
        return FoldDecision("consumer", target)
    from bncheck.backends.torch.fold_beyond import further  # it imports this module

    via = further(view, calls[0], channels, shift_is_zero)  # layout ops, cat, branches, …
    if not isinstance(via, str):
        return FoldDecision(via.into, via.target)
    return FoldDecision(None, reason=f"{p_reason}{f' ({via})' if via else ''}; {c_reason}")


def bn_shift_is_zero(mean: Any, var: Any, weight: Any, bias: Any, eps: float) -> bool:
    """True when ``beta - mean * gamma / sqrt(var + eps)`` is exactly 0 for every channel
    (float64; gamma = 1, beta = 0 when absent)."""
    if mean is None or var is None:
        return False
    _, shift = bn_scale_shift(mean, var, weight, bias, eps)
    return bool(np.all(shift == 0))


def consumers_of(view: GraphView, call: BNCall) -> tuple[Neighbour, ...]:
    """Neighbours reading the BN output; ``Neighbour("output…", "output")`` for a model output."""
    if call.output is None:
        return ()
    found: list[Neighbour] = []
    for user in call.output.users:
        if user in call.region:
            continue
        if user.op == "output":
            found.append(Neighbour(output_name(view, call.output), "output"))
        else:
            found.append(view.neighbour(user))
    return tuple(dict.fromkeys(found))


def output_name(view: GraphView, node: Any) -> str:
    if len(view.outputs) == 1:
        return "output"
    return f"output_{view.outputs.index(node)}" if node in view.outputs else "output"


def pt2_frozen_paths(view: GraphView, bn_names: set[str]) -> dict[str, str]:
    """Module path → class name of frozen-BN modules recorded in a .pt2's ``nn_module_stack``."""
    classes: dict[str, str] = {}
    for node in view.graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            classes[path] = cls if isinstance(cls, str) else cls.__name__
    names = set(view.fqn.values())
    found = {}
    for path, cls in classes.items():
        leaf = not any(p.startswith(path + ".") for p in classes if p != path) and path
        keys = [f"{path}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
        if leaf and path not in bn_names and all(k in names for k in keys):
            found[path] = cls.rsplit(".", 1)[-1]
    return found
