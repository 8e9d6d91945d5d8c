"""Find the BN layers (and other norms) of a PyTorch model, their neighbours and whether they fold.

The traced graph (``torch.export``, eval mode) decides producers, consumers and call sites; the
module tree decides which modules are BN layers and supplies their statistics. A ``.pt2`` has no
modules: its batch-norm ops are mapped to state-dict names through the graph signature.

The fold check is a small reusable unit: ``find_bn_calls`` matches BN applications in a graph and
``match_fold(view, call, channels, shift_is_zero)`` returns a ``FoldDecision`` whose ``reason``
says why not. Folding into the producer ``y = BN(W*x + b)`` is exact when the producer's output
reaches nothing but the BN: ``W' = W * s``, ``b' = (b - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)`` (per output channel). Folding into a consumer ``W*BN(x) + b`` is
``W' = W * s`` (per input channel), ``b' = b + W @ (beta - mean * s)``; it is exact for Linear, and
for Conv only when nothing is zero-padded (padding 0) or the BN shift ``beta - mean * s`` is 0,
because padding inserts zeros after the BN, where the fold would insert them before it.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from bncheck.layers import BNLayer, FoldDecision, ModelInfo, Neighbour, NormLayer, TensorSpec
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
    others = _other_users(view, prod, call.region)
    if others:
        return None, f"producer '{nb.name}' output also feeds {', '.join(map(repr, others[:3]))}"
    for arg in ("weight", "bias"):
        t = op_args(prod).get(arg)
        if view.stored(t) and len(t.users) > 1:
            return None, f"{arg} of '{nb.name}' is shared with {len(t.users) - 1} other call sites"
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
    w = view.weight(users[0])
    if len(w.users) > 1:
        return None, f"weight of '{nb.name}' is shared with {len(w.users) - 1} other call sites"
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
    return FoldDecision(None, reason=f"{p_reason}; {c_reason}")


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


# ------------------------------------------------------------------------------------- records

_BN_NAMES = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LazyBatchNorm1d",
             "LazyBatchNorm2d", "LazyBatchNorm3d"}  # fmt: skip
_CONV_NAMES = {"Conv1d": "Conv", "Conv2d": "Conv", "Conv3d": "Conv", "Linear": "Linear",
               "ConvTranspose1d": "ConvTranspose", "ConvTranspose2d": "ConvTranspose",
               "ConvTranspose3d": "ConvTranspose"}  # fmt: skip


def class_name(m: Any) -> str:
    """The module's class name; a TorchScript module's original Python class name."""
    return getattr(m, "original_name", None) or type(m).__name__


def is_bn(m: Any) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return isinstance(m, _BatchNorm) or (
        hasattr(m, "original_name") and m.original_name in _BN_NAMES
    )


def is_frozen_bn(m: Any) -> bool:
    """A leaf module holding BN's four tensors that is not a _BatchNorm (FrozenBatchNorm2d…)."""
    import torch

    if is_bn(m) or any(True for _ in m.children()) or isinstance(m, _norm_types()):
        return False
    ts = [getattr(m, k, None) for k in ("weight", "bias", "running_mean", "running_var")]
    return all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in ts) and (
        len({t.numel() for t in ts}) == 1 and ts[0].numel() > 0
    )


def _norm_types() -> tuple[type, ...]:
    from torch import nn
    from torch.nn.modules.instancenorm import _InstanceNorm

    return (nn.LayerNorm, nn.GroupNorm, _InstanceNorm, nn.RMSNorm)


def to_numpy(t: Any) -> tuple[np.ndarray | None, str | None]:
    """``t`` as numpy in its own dtype; bfloat16 (no numpy dtype) → float32, named ``bfloat16``."""
    import torch

    if t is None:
        return None, None
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16,) or not _numpy_dtype(t):
        return t.float().numpy(), str(t.dtype).removeprefix("torch.")
    arr = t.numpy()
    return arr, str(arr.dtype)


def _numpy_dtype(t: Any) -> bool:
    try:
        t[:0].numpy()
    except (TypeError, RuntimeError):
        return False
    return True


@dataclass
class BNStats:
    """A BN layer's configuration and tensors, however they were found."""

    kind: str
    channels: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    training: bool
    num_batches_tracked: int | None
    mean: Any
    var: Any
    weight: Any
    bias: Any
    frozen: bool = False


def module_stats(m: Any) -> BNStats:
    """BN facts from an eager (or TorchScript) module."""
    frozen = not is_bn(m)
    mean = getattr(m, "running_mean", None)
    nbt = getattr(m, "num_batches_tracked", None)
    channels = getattr(m, "num_features", None) or (mean.numel() if mean is not None else 0)
    return BNStats(
        kind=class_name(m),
        channels=int(channels),
        eps=float(getattr(m, "eps", 1e-5)),
        momentum=None if frozen else getattr(m, "momentum", None),
        affine=True if frozen else bool(getattr(m, "affine", True)),
        track_running_stats=True if frozen else bool(getattr(m, "track_running_stats", True)),
        training=False if frozen else bool(m.training),
        num_batches_tracked=None if nbt is None else int(nbt),
        mean=mean,
        var=getattr(m, "running_var", None),
        weight=getattr(m, "weight", None),
        bias=getattr(m, "bias", None),
        frozen=frozen,
    )


def op_stats(view: GraphView, name: str, call: BNCall) -> BNStats:
    """BN facts from a batch-norm op of a .pt2 graph and the state dict behind its placeholders."""
    args = op_args(call.node)
    pkt = packet(call.node)

    def tensor(key: str) -> Any:
        a = args.get(key)
        return view.tensor(view.fqn[a.name]) if view.stored(a) else None

    training = args.get(
        "training", pkt in ("_batch_norm_with_update", "_batch_norm_with_update_functional")
    )
    mean, weight = tensor("running_mean"), tensor("weight")
    inp = args.get("input")
    shape = inp.meta.get("val").shape if hasattr(inp, "meta") and "val" in inp.meta else ()
    channels = next((t.numel() for t in (mean, weight) if t is not None), None)
    channels = channels or (int(shape[1]) if len(shape) > 1 else 0)
    mp = module_path(call.node)
    kind = mp[1].rsplit(".", 1)[-1] if mp and "Norm" in mp[1] else ""
    if not kind:
        kind = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}.get(
            len(shape), "BatchNorm"
        )
    nbt = view.tensor(f"{name}.num_batches_tracked") if name else None
    momentum = args.get("momentum", args.get("exponential_average_factor"))
    return BNStats(
        kind=kind,
        channels=int(channels),
        eps=float(args.get("eps", args.get("epsilon", 1e-5))),
        momentum=None if momentum is None else float(momentum),
        affine=weight is not None,
        track_running_stats=mean is not None,
        training=bool(training),
        num_batches_tracked=None if nbt is None else int(nbt),
        mean=mean,
        var=tensor("running_var"),
        weight=weight,
        bias=tensor("bias"),
    )


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


def eager_pairs(module: Any) -> dict[str, tuple[Neighbour, Neighbour | None]]:
    """BN path → (producer, next sibling) for a Conv/Linear directly before a BN in a Sequential
    with matching channels, each module appearing once in the tree (no graph needed)."""
    counts: dict[int, int] = {}
    for _, m in module.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    pairs: dict[str, tuple[Neighbour, Neighbour | None]] = {}
    for path, seq in module.named_modules():
        if class_name(seq) != "Sequential":
            continue
        kids = list(seq.named_children())
        for i in range(1, len(kids)):
            (pname, prev), (bname, bn) = kids[i - 1], kids[i]
            op = _CONV_NAMES.get(class_name(prev))
            w = getattr(prev, "weight", None)
            if not (is_bn(bn) or is_frozen_bn(bn)) or op is None or w is None:
                continue
            oc = w.shape[1] * getattr(prev, "groups", 1) if op == "ConvTranspose" else w.shape[0]
            if counts[id(prev)] != 1 or counts[id(bn)] != 1 or oc != module_stats(bn).channels:
                continue
            full = f"{path}.{{}}" if path else "{}"
            nxt = None
            if i + 1 < len(kids):
                nname, nmod = kids[i + 1]
                nop = _CONV_NAMES.get(class_name(nmod), class_name(nmod))
                nxt = Neighbour(full.format(nname), nop, nop in _WEIGHTED)
            pairs[full.format(bname)] = (Neighbour(full.format(pname), op, True), nxt)
    return pairs


# ---------------------------------------------------------------------------------- model info


def _spec(name: str, val: Any) -> TensorSpec:
    # A symbolic leading dim is the dynamic batch bncheck traced with: call it that.
    shape = tuple(
        int(d) if str(d).lstrip("-").isdigit() else ("batch" if i == 0 else str(d))
        for i, d in enumerate(val.shape)
    )
    return TensorSpec(name, shape, str(val.dtype).removeprefix("torch."))


def _bn_layer(
    name: str,
    st: BNStats,
    producer: Neighbour | None,
    consumers: tuple[Neighbour, ...],
    call_sites: int,
    fold: FoldDecision,
) -> BNLayer:
    mean, sdtype = to_numpy(st.mean)
    var, _ = to_numpy(st.var)
    weight, pdtype = to_numpy(st.weight)
    bias, bdtype = to_numpy(st.bias)
    return BNLayer(
        name=name,
        kind=st.kind,
        channels=st.channels,
        eps=st.eps,
        momentum=st.momentum,
        affine=st.affine,
        track_running_stats=st.track_running_stats,
        training=st.training,
        num_batches_tracked=st.num_batches_tracked,
        running_mean=mean,
        running_var=var,
        weight=weight,
        bias=bias,
        stats_dtype=sdtype,
        param_dtype=pdtype or bdtype,
        producer=producer,
        consumers=consumers,
        call_sites=call_sites,
        fold=fold,
        frozen=st.frozen,
    )


def _graph_layer(view: GraphView, name: str, st: BNStats, calls: list[BNCall]) -> BNLayer:
    first = calls[0] if calls else None
    producer = view.neighbour(first.input) if first and first.input is not None else None
    consumers = consumers_of(view, first) if first else ()
    shift0 = bn_shift_is_zero(
        *(to_numpy(t)[0] for t in (st.mean, st.var, st.weight, st.bias)), st.eps
    )
    fold = match_fold(
        view, calls, st.channels, track_running_stats=st.track_running_stats, shift_is_zero=shift0
    )
    return _bn_layer(name, st, producer, consumers, len(calls), fold)


def module_norms(module: Any) -> list[NormLayer]:
    """LayerNorm, GroupNorm, InstanceNorm and RMSNorm modules (inventory only)."""
    from torch import nn

    found = []
    for name, m in module.named_modules():
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            found.append(
                NormLayer(
                    name,
                    class_name(m),
                    str(tuple(m.normalized_shape)),
                    m.eps,
                    bool(m.elementwise_affine),
                )
            )
        elif isinstance(m, nn.GroupNorm):
            shape = f"{m.num_groups} groups, {m.num_channels} channels"
            found.append(NormLayer(name, "GroupNorm", shape, m.eps, bool(m.affine)))
        elif isinstance(m, _norm_types()):
            found.append(
                NormLayer(name, class_name(m), f"{m.num_features} channels", m.eps, bool(m.affine))
            )
    return found


def graph_norms(view: GraphView) -> list[NormLayer]:
    """Other norms of a .pt2, from their ops."""
    found = []
    for node in view.graph.nodes:
        kind = NORM_OPS.get(packet(node) or "")
        if kind is None:
            continue
        args = op_args(node)
        w = args.get("weight")
        mp = module_path(node)
        if mp and mp[0] and "Norm" in mp[1]:
            name, kind = mp[0], mp[1].rsplit(".", 1)[-1]
        else:
            name = view.fqn[w.name].rsplit(".", 1)[0] if view.stored(w) else node.name
        inp = args["input"].meta.get("val")
        channels = int(inp.shape[1]) if inp is not None and inp.dim() > 1 else None
        if "normalized_shape" in args:
            shape = str(tuple(int(d) for d in args["normalized_shape"]))
        elif "num_groups" in args:
            shape = f"{args['num_groups']} groups, {channels} channels"
        else:
            shape = f"{channels} channels"
        eps = args.get("eps")
        found.append(
            NormLayer(name, kind, shape, None if eps is None else float(eps), w is not None)
        )
    return found


def _float_elements(tensors: Iterable[Any]) -> int:
    return sum(t.numel() for t in tensors if t is not None and t.is_floating_point())


def build_info(
    path: str,
    fmt: str,
    module: Any,
    ep: Any,
    graph_error: str | None,
    example: dict[str, Any],
    eager_outputs: tuple[Any, ...] = (),
) -> ModelInfo:
    """Assemble the ModelInfo of a loaded model.

    ``module`` is the eager module (unused for .pt2), ``ep`` the traced / loaded ExportedProgram
    or None, ``example`` the named example inputs, ``eager_outputs`` outputs of an eager run
    used for output specs when there is no graph.
    """
    view = GraphView(ep) if ep is not None else None
    layers: list[BNLayer] = []
    if fmt == "pt2":
        calls = find_bn_calls(view)
        for name, cs in calls.items():
            layer = _graph_layer(view, name, op_stats(view, name, cs[0]), cs)
            if layer.training:  # the graph itself normalizes with batch statistics
                layer = replace(layer, fold=FoldDecision(None, reason="BN is in training mode"))
            layers.append(layer)
        frozen = pt2_frozen_paths(view, set(calls))
        for name, cs in module_calls(view, frozen).items():
            mean, var, weight, bias = (
                view.tensor(f"{name}.{k}")
                for k in ("running_mean", "running_var", "weight", "bias")
            )
            # eps is not recorded in the graph's state; FrozenBatchNorm2d's default.
            st = BNStats(
                frozen[name],
                mean.numel(),
                1e-5,
                None,
                True,
                True,
                False,
                None,
                mean,
                var,
                weight,
                bias,
                frozen=True,
            )
            layers.append(_graph_layer(view, name, st, cs))
        norms = graph_norms(view)
        training = any(layer.training for layer in layers)
        tensors = [*ep.state_dict.values(), *ep.constants.values()]
        params = _float_elements(t for t in tensors if hasattr(t, "is_floating_point"))
    else:
        bns = [(n, m) for n, m in module.named_modules() if is_bn(m) or is_frozen_bn(m)]
        mcalls = module_calls(view, [n for n, _ in bns]) if view else {}
        pairs = {} if view else eager_pairs(module)
        for name, m in bns:
            st = module_stats(m)
            if view is not None:
                layers.append(_graph_layer(view, name, st, mcalls[name]))
                continue
            prod, nxt = pairs.get(name, (None, None))
            fold = (
                FoldDecision("producer", prod.name)
                if prod
                else FoldDecision(None, reason=graph_error)
            )
            layers.append(_bn_layer(name, st, prod, (nxt,) if nxt else (), 0, fold))
        norms = module_norms(module)
        training = bool(getattr(module, "training", False)) or any(
            m.training for _, m in bns if is_bn(m)
        )
        params = _float_elements([*module.parameters(), *module.buffers()])
    if view is not None:
        ins = {n.name: n for n in view.graph.nodes if n.op == "placeholder"}
        inputs = tuple(
            _spec(n, ins[n].meta["val"]) for n in view.user_inputs if "val" in ins[n].meta
        )
        outputs = tuple(
            _spec(output_name(view, o), o.meta["val"])
            for o in view.outputs
            if hasattr(o.meta.get("val"), "shape")
        )
    else:
        inputs = tuple(_spec(k, v) for k, v in example.items())
        outs = [o for o in eager_outputs if hasattr(o, "shape")]
        outputs = tuple(
            _spec("output" if len(outs) == 1 else f"output_{i}", o) for i, o in enumerate(outs)
        )
    return ModelInfo(
        path=path,
        format=fmt,
        framework="torch",
        bn_layers=tuple(layers),
        norm_layers=tuple(norms),
        inputs=inputs,
        outputs=outputs,
        training=training,
        graph_error=graph_error,
        parameters=params,
        nodes=len(view.graph.nodes) if view else None,
    )
