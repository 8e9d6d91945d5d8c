"""Find the BN layers (and other norms) of a PyTorch model, their neighbours and whether they fold.

The traced graph (``torch.export``, eval mode) decides producers, consumers and call sites; the
module tree decides which modules are BN layers and supplies their statistics. A ``.pt2`` has no
modules: its batch-norm ops are mapped to state-dict names through the graph signature. The graph
matching and the fold decision live in ``graph.py``; this module turns them
into ``BNLayer`` / ``ModelInfo`` records. A model that does not trace falls back to the module
tree (``eager_pairs``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from bncheck.backends.torch.graph import (
    _WEIGHTED,
    BNCall,
    GraphView,
    bn_shift_is_zero,
    consumers_of,
    find_bn_calls,
    match_fold,
    module_calls,
    module_path,
    op_args,
    output_name,
    packet,
    pt2_frozen_paths,
)
from bncheck.backends.torch.norms import class_name, graph_norms, module_norms, norm_types
from bncheck.layers import BNLayer, FoldDecision, ModelInfo, Neighbour, TensorSpec

__all__ = [
    "BNStats",
    "build_info",
    "class_name",
    "eager_pairs",
    "is_bn",
    "is_frozen_bn",
    "layer_calls",
    "module_stats",
    "op_stats",
    "to_numpy",
]

# ------------------------------------------------------------------------------------- records

_BN_NAMES = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LazyBatchNorm1d",
             "LazyBatchNorm2d", "LazyBatchNorm3d"}  # fmt: skip
_CONV_NAMES = {"Conv1d": "Conv", "Conv2d": "Conv", "Conv3d": "Conv", "Linear": "Linear",
               "ConvTranspose1d": "ConvTranspose", "ConvTranspose2d": "ConvTranspose",
               "ConvTranspose3d": "ConvTranspose"}  # fmt: skip


def is_bn(m: Any) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return isinstance(m, _BatchNorm) or (
        hasattr(m, "original_name") and m.original_name in _BN_NAMES
    )


def is_frozen_bn(m: Any) -> bool:
    """A leaf module holding BN's four tensors that is not a _BatchNorm (FrozenBatchNorm2d…)."""
    import torch

    if is_bn(m) or any(True for _ in m.children()) or isinstance(m, norm_types()):
        return False
    ts = [getattr(m, k, None) for k in ("weight", "bias", "running_mean", "running_var")]
    return all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in ts) and (
        len({t.numel() for t in ts}) == 1 and ts[0].numel() > 0
    )


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


def layer_calls(view: GraphView, fmt: str, module: Any) -> dict[str, list[BNCall]]:
    """BN layer name → its calls in ``view``, matched exactly as ``build_info`` matches them
    (batch-norm ops and frozen-BN modules of a .pt2; BN modules of an eager model)."""
    if fmt == "pt2":
        calls = find_bn_calls(view)
        return {**calls, **module_calls(view, pt2_frozen_paths(view, set(calls)))}
    return module_calls(view, [n for n, m in module.named_modules() if is_bn(m) or is_frozen_bn(m)])


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
