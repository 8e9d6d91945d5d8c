"""Fold BN into its neighbours on the traced graph of a PyTorch model.

The graph is the unlifted ``GraphModule`` of the model's ExportedProgram (``ep.module()``), so any
model that ``torch.export`` traces folds, not only ``nn.Sequential`` patterns. Which BN folds, and
into what, is decided by the same checks ``inspect`` reports (``discover.match_fold``); this module
only rewrites. Per fold: the new weight and bias come from ``bncheck.numerics`` in float64, cast
back to the parameter's dtype (an overflow leaves the layer unfolded); they are installed as new
tensors on the GraphModule (the source model's tensors are never written to); the BN's users read
the producer's output (or the consumer reads the BN's input); the BN's nodes and attributes are
removed. The result is exported again, with a dynamic batch dimension where the source had one.

A model that does not trace folds the Conv→BN pairs its module tree shows safe, in a copy.
"""

from __future__ import annotations

import copy
import operator
import warnings
from typing import Any

import numpy as np

from bncheck.backends.torch.discover import (
    BN_OPS,
    eager_pairs,
    op_args,
    packet,
)
from bncheck.layers import BNLayer, FoldStep
from bncheck.numerics import bn_scale_shift, cast_checked, fold_into_consumer, fold_into_producer

_NUMERICS_OP = {"Conv": "conv", "ConvTranspose": "conv_transpose", "Linear": "linear"}
_BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _np(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float64) if t is not None else None


def _attr_target(node: Any) -> str | None:
    return node.target if hasattr(node, "op") and node.op == "get_attr" else None


def _get(gm: Any, target: str) -> Any:
    return operator.attrgetter(target)(gm)


def _set_param(gm: Any, target: str, value: Any) -> None:
    import torch

    owner_path, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if leaf in owner._parameters or leaf in owner._buffers:
        delattr(owner, leaf)
    owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))


def _bn_nodes(gm: Any) -> dict[str, Any]:
    """BN layer name (prefix of its running_mean attribute) → batch-norm op node."""
    found: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if packet(node) not in BN_OPS:
            continue
        mean = _attr_target(op_args(node).get("running_mean"))
        if mean:
            found.setdefault(mean.rsplit(".", 1)[0], node)
    return found


def _bn_output(node: Any) -> Any:
    """The value a BN op produces for its users (getitem 0 for tuple-returning ops)."""
    if len(node.target._schema.returns) > 1:
        for user in node.users:
            if packet(user) == "getitem" and user.args[1] == 0:
                return user
        return None
    return node


def _weighted_arg_names(node: Any) -> tuple[str, str, int]:
    """(weight arg name, bias arg name, positional index of bias) of a conv/linear node."""
    schema = node.target._schema
    names = [a.name for a in schema.arguments]
    return "weight", "bias", names.index("bias")


def _layer_params(gm: Any, node: Any) -> tuple[str, str | None, Any, Any]:
    args = op_args(node)
    w_t = _attr_target(args.get("weight"))
    b_t = _attr_target(args.get("bias")) if args.get("bias") is not None else None
    if w_t is None or (args.get("bias") is not None and b_t is None):
        raise _Skip("weights are computed in the graph, not stored")
    return w_t, b_t, _get(gm, w_t), (_get(gm, b_t) if b_t else None)


class _Skip(Exception):
    pass


def _kind(node: Any) -> str:
    name = packet(node)
    if name in ("convolution", "_convolution"):
        return "ConvTranspose" if op_args(node).get("transposed") else "Conv"
    if name and name.startswith("conv_transpose"):
        return "ConvTranspose"
    if name and name.startswith("conv"):
        return "Conv"
    return "Linear"


def _install(
    gm: Any, node: Any, w_t: str, b_t: str | None, w: np.ndarray, b: np.ndarray, like: Any
) -> None:
    import torch

    bias_like = _get(gm, b_t) if b_t else like
    w_new, w_over = cast_checked(w, _np_dtype(like))
    b_new, b_over = cast_checked(b, _np_dtype(bias_like))
    if w_over or b_over:
        raise _Skip(f"folded weights overflow {like.dtype}".replace("torch.", ""))
    _set_param(gm, w_t, torch.from_numpy(np.ascontiguousarray(w_new)).to(like.dtype))
    if b_t is None:
        b_t = f"{w_t.rsplit('.', 1)[0]}.bias" if "." in w_t else "bias"
        taken = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        while b_t in taken or _has_attr(gm, b_t):
            b_t += "_folded"
        _set_param(gm, b_t, torch.from_numpy(np.ascontiguousarray(b_new)).to(bias_like.dtype))
        with gm.graph.inserting_before(node):
            b_node = gm.graph.get_attr(b_t)
        _, _, idx = _weighted_arg_names(node)
        args = list(node.args)
        while len(args) <= idx:
            args.append(None)
        args[idx] = b_node
        node.args = tuple(args)
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}
    else:
        _set_param(gm, b_t, torch.from_numpy(np.ascontiguousarray(b_new)).to(bias_like.dtype))


def _has_attr(gm: Any, target: str) -> bool:
    try:
        _get(gm, target)
        return True
    except AttributeError:
        return False


def _np_dtype(t: Any) -> str:
    return str(t.dtype).replace("torch.", "")


def _bn_scale_shift(layer: BNLayer) -> tuple[np.ndarray, np.ndarray]:
    return bn_scale_shift(
        layer.running_mean, layer.running_var, layer.weight, layer.bias, layer.eps
    )


def _fold_one(gm: Any, layer: BNLayer, bn: Any) -> None:
    out = _bn_output(bn)
    if out is None:
        raise _Skip("BN output not found in the graph")
    s, t = _bn_scale_shift(layer)
    args = op_args(bn)
    if layer.fold.into == "producer":
        prod = args["input"]
        kind = _kind(prod)
        w_t, b_t, w, b = _layer_params(gm, prod)
        groups = int(op_args(prod).get("groups", 1)) if kind != "Linear" else 1
        w2, b2 = fold_into_producer(_np(w), _np(b), s, t, op=_NUMERICS_OP[kind], groups=groups)
        _install(gm, prod, w_t, b_t, w2, b2, w)
        out.replace_all_uses_with(prod)
    else:
        cons = next(u for u in out.users if u.op == "call_function")
        kind = _kind(cons)
        w_t, b_t, w, b = _layer_params(gm, cons)
        groups = int(op_args(cons).get("groups", 1)) if kind != "Linear" else 1
        try:
            w2, b2 = fold_into_consumer(_np(w), _np(b), s, t, op=_NUMERICS_OP[kind], groups=groups)
        except ValueError as exc:
            raise _Skip(str(exc)) from None
        _install(gm, cons, w_t, b_t, w2, b2, w)
        out.replace_all_uses_with(args["input"])
    _erase_bn(gm, bn, layer.name)


def _erase_bn(gm: Any, bn: Any, name: str) -> None:
    for user in list(bn.users):
        if not user.users:
            gm.graph.erase_node(user)
    if not bn.users:
        gm.graph.erase_node(bn)
    gm.graph.eliminate_dead_code()
    owner = gm.get_submodule(name) if name else gm
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for leaf in _BN_PARAMS:
        if hasattr(owner, leaf) and f"{name}.{leaf}" not in still_read:
            delattr(owner, leaf)


def _to_affine(gm: Any, layer: BNLayer, bn: Any) -> None:
    """Replace an eval-mode BN op by ``x * s + t`` with (1, C, 1, …) constants."""
    import torch

    out = _bn_output(bn)
    x = op_args(bn)["input"]
    rank = x.meta["val"].dim() if "val" in x.meta else None
    if out is None or rank is None:
        raise _Skip("input rank unknown")
    s, t = _bn_scale_shift(layer)
    dtype = x.meta["val"].dtype
    shape = (1, len(s)) + (1,) * (rank - 2)
    base = layer.name.replace(".", "_") or "bn"
    s_t, t_t = f"{base}_affine_scale", f"{base}_affine_shift"
    gm.register_buffer(s_t, torch.from_numpy(s.reshape(shape)).to(dtype))
    gm.register_buffer(t_t, torch.from_numpy(t.reshape(shape)).to(dtype))
    with gm.graph.inserting_after(out):
        s_n = gm.graph.get_attr(s_t)
    with gm.graph.inserting_after(s_n):
        t_n = gm.graph.get_attr(t_t)
    with gm.graph.inserting_after(t_n):
        mul = gm.graph.call_function(torch.ops.aten.mul.Tensor, (x, s_n))
    with gm.graph.inserting_after(mul):
        add = gm.graph.call_function(torch.ops.aten.add.Tensor, (mul, t_n))
    out.replace_all_uses_with(add)
    _erase_bn(gm, bn, layer.name)


def fold_graph(handle: Any, *, affine: bool = False) -> tuple[Any, list[FoldStep]]:
    """Fold the BNs of a traced model; returns (new ExportedProgram, steps)."""
    import torch

    from bncheck.backends.torch.load import quiet_torch

    info = handle.info()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deepcopy of a GraphModule warns about pytree internals
        gm = copy.deepcopy(handle.exported.module())
    nodes = _bn_nodes(gm)
    steps: list[FoldStep] = []
    for layer in info.bn_layers:
        bn = nodes.get(layer.name)
        reason = None
        if layer.training:
            reason = "BN is in training mode"
        elif bn is None:
            reason = layer.fold.reason or "BN op not found in the graph"
        elif not layer.fold.foldable:
            reason = layer.fold.reason
        else:
            try:
                _fold_one(gm, layer, bn)
                steps.append(FoldStep(layer.name, layer.fold.into, layer.fold.target))
                continue
            except _Skip as exc:
                reason = str(exc)
        if affine and bn is not None and not layer.training and layer.running_var is not None:
            try:
                _to_affine(gm, layer, bn)
                steps.append(FoldStep(layer.name, "affine", None, reason))
                continue
            except _Skip:
                pass
        steps.append(FoldStep(layer.name, None, None, reason))
    gm.graph.lint()
    gm.recompile()
    example = _batch2(handle.example_inputs)
    dynamic = _dynamic_shapes(handle, example)
    with quiet_torch():
        try:
            ep = torch.export.export(gm, example, dynamic_shapes=dynamic, strict=False)
        except Exception:  # a model that pins its batch size: keep the traced shapes
            ep = torch.export.export(gm, tuple(handle.example_inputs), strict=False)
    return ep, steps


def _batch2(example: tuple[Any, ...]) -> tuple[Any, ...]:
    """Example inputs with batch 2, so a dynamic batch dim does not specialize to 1."""
    import torch

    out = []
    for x in example:
        if hasattr(x, "shape") and x.dim() > 0 and x.shape[0] == 1:
            x = torch.cat([x, x], dim=0)
        out.append(x)
    return tuple(out)


def _dynamic_shapes(handle: Any, example: tuple[Any, ...]) -> Any:
    """A dynamic batch dim for each input: the source program's own range for a .pt2 (whose
    graph guards it), an open range for a model traced here from one example."""
    import torch

    lo, hi = 1, None
    if handle.format == "pt2":
        ep = handle.exported
        vals = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"]
        user = [
            v
            for n, v in zip(ep.graph.nodes, vals, strict=False)
            if n.name in ep.graph_signature.user_inputs
        ]
        dims = [v.shape[0] for v in user if v is not None and v.dim() > 0]
        if not dims or all(isinstance(d, int) for d in dims):
            return None  # the source pins its batch size
        rng = ep.range_constraints.get(dims[0].node.expr)
        if rng is not None:
            lo = int(rng.lower)
            hi = None if not rng.upper.is_finite else int(rng.upper)
    batch = torch.export.Dim("batch", min=lo, max=hi) if hi else torch.export.Dim("batch", min=lo)
    return tuple({0: batch} if hasattr(x, "dim") and x.dim() > 0 else None for x in example)


def fold_eager(handle: Any) -> tuple[Any, list[FoldStep]]:
    """Fold the Conv/Linear→BN pairs the module tree shows safe, in a deep copy of the module."""
    import torch

    info = handle.info()
    module = copy.deepcopy(handle.module).eval()
    pairs = eager_pairs(module)
    steps: list[FoldStep] = []
    for layer in info.bn_layers:
        prod = pairs.get(layer.name, (None, None))[0]
        if not layer.fold.foldable or prod is None or layer.training:
            steps.append(FoldStep(layer.name, None, None, layer.fold.reason or "not foldable"))
            continue
        conv = module.get_submodule(prod.name)
        kind = {"Linear": "linear", "ConvTranspose": "conv_transpose"}.get(prod.op, "conv")
        s, t = _bn_scale_shift(layer)
        w2, b2 = fold_into_producer(
            _np(conv.weight), _np(conv.bias), s, t, op=kind, groups=getattr(conv, "groups", 1)
        )
        w_new, over_w = cast_checked(w2, _np_dtype(conv.weight))
        b_new, over_b = cast_checked(b2, _np_dtype(conv.weight))
        if over_w or over_b:
            steps.append(FoldStep(layer.name, None, None, "folded weights overflow"))
            continue
        dtype = conv.weight.dtype
        conv.weight = torch.nn.Parameter(torch.from_numpy(w_new).to(dtype), requires_grad=False)
        conv.bias = torch.nn.Parameter(torch.from_numpy(b_new).to(dtype), requires_grad=False)
        parent, _, leaf = layer.name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, torch.nn.Identity())
        steps.append(FoldStep(layer.name, "producer", prod.name))
    return module, steps
