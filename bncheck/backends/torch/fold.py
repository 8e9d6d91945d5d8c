"""Fold BN into its neighbours on the traced graph of a PyTorch model.

Which BN folds, and into what, is decided once, by the checks ``inspect`` reports
(``graph.match_fold`` through ``handle.info()``); this module only executes those decisions, so
the two always agree. The rewrite works on a deep copy of the unlifted ``GraphModule`` of the
model's ExportedProgram (``ep.module()``: parameters are ``get_attr`` nodes), so any model that
``torch.export`` traces folds, not only ``nn.Sequential`` patterns. The BN calls found in the
ExportedProgram's graph are located in the copy by node name (unlifting keeps the names of every
node but the parameter placeholders).

Per fold, in float64 (``bncheck.numerics``), with ``s = γ/√(σ² + ε)``, ``t = β − μ·s``:

- into the producer P (``BN(P(x))``): ``W' = s·W`` per output channel, ``b' = s·b + t``;
- into the consumer C (``C(BN(x))``): ``W' = W·s`` per input channel, ``b' = b + Σ W·t``.

The new tensors are cast back to the parameter's dtype (an overflow leaves the layer unfolded)
and installed as new tensors on the copy; a weight other call sites also read is folded into a
new attribute, so they keep computing bit-identical outputs. The BN's users then read the
producer's output (or the consumer reads the BN's input), the BN's nodes are erased and its
tensors deleted. With ``affine``, an inference-mode BN that cannot fold becomes
``x * s.view(1, C, 1, …) + t.view(1, C, 1, …)``. The result is exported again, keeping every
dynamic input dimension of the source (the sample ``.pt2`` files have a dynamic batch).

A model that does not trace folds the Conv/Linear→BN pairs its module tree shows safe, in a deep
copy of the module (``fold_eager.fold_eager``).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any

import numpy as np

from bncheck.backends.torch.attrs import delete, fresh_name, get, is_param, read_counts, store
from bncheck.backends.torch.discover import layer_calls
from bncheck.backends.torch.fold_beyond import plan_of
from bncheck.backends.torch.graph import BNCall, GraphView, op_args, packet
from bncheck.backends.torch.reparam import BranchMerge
from bncheck.backends.torch.reparam_merge import merge_sums
from bncheck.layers import BNLayer, FoldStep
from bncheck.numerics import bn_scale_shift, cast_checked, fold_into_consumer, fold_into_producer

__all__ = ["fold_consumer", "fold_graph", "fold_producer"]

_BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_TRAINING_OPS = {"_batch_norm_with_update", "_batch_norm_with_update_functional"}


class _Skip(Exception):
    """This BN cannot be rewritten after all; the message is the reason reported."""


# ----------------------------------------------------------------------------- tensor plumbing


def _f64(t: Any) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().double().numpy()


def _to_torch(a: np.ndarray, dtype: Any, what: str) -> Any:
    """float64 ``a`` in the torch ``dtype``; ``_Skip`` when a finite value overflows it."""
    import torch

    name = str(dtype).removeprefix("torch.")
    if not np.all(np.isfinite(a)):
        raise _Skip(f"folded {what} would not be finite (BN variance + eps <= 0?)")
    _, overflowed = cast_checked(a, name)
    if overflowed:
        raise _Skip(f"folded {what} overflow {name} in {overflowed} elements")
    # torch rounds float64 → float16/bfloat16/float32 to nearest-even, as numpy does.
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


# ------------------------------------------------------------------------------ the rewrite


def _weights(gm: Any, node: Any) -> tuple[Any, Any | None]:
    """The get_attr nodes of ``node``'s weight and bias (bias None when absent)."""
    args = op_args(node)
    w, b = args.get("weight"), args.get("bias")
    if getattr(w, "op", None) != "get_attr" or (b is not None and b.op != "get_attr"):
        raise _Skip(f"the weights of '{node.name}' are computed in the graph, not stored")
    return w, b


def _kind(node: Any) -> tuple[str, int]:
    """(numerics op, groups) of a conv / conv_transpose / linear node."""
    name = packet(node) or ""
    args = op_args(node)
    if name == "linear":
        return "linear", 1
    transposed = bool(args.get("transposed")) or name.startswith("conv_transpose")
    if name.startswith("conv") or name in ("convolution", "_convolution"):
        return ("conv_transpose" if transposed else "conv"), int(args.get("groups", 1))
    raise _Skip(f"'{node.name}' ({name}) is not a conv or linear")


def _rewrite_weights(gm: Any, node: Any, w64: np.ndarray, b64: np.ndarray) -> None:
    """Give ``node`` the weight ``w64`` and bias ``b64`` (float64) in its parameter dtypes.

    A tensor read only by ``node`` is rebound under its own name; a shared one is left to its
    other readers and ``node`` gets a new attribute. A missing bias becomes a new attribute
    passed as the op's ``bias`` argument."""
    w_node, b_node = _weights(gm, node)
    w_old = get(gm, w_node.target)
    b_old = get(gm, b_node.target) if b_node is not None else None
    w_new = _to_torch(w64, w_old.dtype, "weights")
    b_new = _to_torch(b64, (b_old if b_old is not None else w_old).dtype, "bias")
    readers = read_counts(gm)
    prefix = w_node.target.rpartition(".")[0]
    for arg, old_node, value in (("weight", w_node, w_new), ("bias", b_node, b_new)):
        if (
            old_node is not None
            and readers.get(old_node.target, 0) == 1
            and len(old_node.users) == 1
        ):
            store(gm, old_node.target, value, param=is_param(gm, old_node.target))
            continue
        base = old_node.target if old_node is not None else (f"{prefix}.bias" if prefix else "bias")
        target = fresh_name(gm, base)
        param = is_param(gm, old_node.target if old_node is not None else w_node.target)
        store(gm, target, value, param=param)
        with gm.graph.inserting_before(node):
            new_node = gm.graph.get_attr(target)
        _set_arg(node, arg, new_node)


def fold_producer(gm: Any, parts: list[tuple[Any, np.ndarray, np.ndarray]]) -> None:
    """Fold ``s·z + t`` into the output channels of each producer node of ``parts``
    (``(node, s, t)`` each), all or nothing: ``_Skip`` before any change when one does not fit."""
    staged = []
    for prod, s, t in parts:
        op, groups = _kind(prod)
        w, b = (get(gm, n.target) if n is not None else None for n in _weights(gm, prod))
        w2, b2 = fold_into_producer(_f64(w), _f64(b), s, t, op=op, groups=groups)
        _to_torch(w2, w.dtype, "weights")  # the overflow checks, before anything changes
        _to_torch(b2, (b if b is not None else w).dtype, "bias")
        staged.append((prod, w2, b2))
    for prod, w2, b2 in staged:
        _rewrite_weights(gm, prod, w2, b2)


def _set_arg(node: Any, name: str, value: Any) -> None:
    """Set argument ``name`` (by schema) of an aten op node, positionally where it can be."""
    idx = [a.name for a in node.target._schema.arguments].index(name)
    if name in node.kwargs or idx > len(node.args):
        node.update_kwarg(name, value)
    elif idx == len(node.args):  # e.g. conv2d(x, w) without bias: bias is the third argument
        node.args = (*node.args, value)
    else:
        node.args = (*node.args[:idx], value, *node.args[idx + 1 :])


def _scale_shift(layer: BNLayer) -> tuple[np.ndarray, np.ndarray]:
    if layer.running_mean is None or layer.running_var is None:
        raise _Skip("no running statistics")
    return bn_scale_shift(
        layer.running_mean, layer.running_var, layer.weight, layer.bias, layer.eps
    )


def _erase(gm: Any, call: BNCall) -> None:
    """Erase the BN call's nodes once nothing reads them (reverse graph order)."""
    _erase_dead(gm, call.region)


def _erase_dead(gm: Any, nodes: Any) -> set[Any]:
    """Erase ``nodes`` that nothing reads once the later ones are gone (reverse graph order);
    returns those erased."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    erased = set()
    for node in sorted(set(nodes), key=order.__getitem__, reverse=True):
        if not node.users:
            gm.graph.erase_node(node)
            erased.add(node)
    return erased


def _fold(gm: Any, layer: BNLayer, call: BNCall) -> None:
    if call.output is None or call.input is None:
        raise _Skip("BN input or output not found in the graph")
    s, t = _scale_shift(layer)
    if layer.fold.into == "producer":
        fold_producer(gm, [(call.input, s, t)])
        call.output.replace_all_uses_with(call.input)
    else:
        users = [u for u in call.output.users if u not in call.region]
        if len(users) != 1:
            raise _Skip(f"BN output feeds {len(users)} nodes")
        fold_consumer(gm, users[0], s, t)
        users[0].replace_input_with(call.output, call.input)
    _erase(gm, call)


def fold_consumer(gm: Any, cons: Any, s: np.ndarray, t: np.ndarray) -> None:
    """Fold ``s·x + t`` into the input channels of the consumer node ``cons``."""
    op, groups = _kind(cons)
    w, b = (get(gm, n.target) if n is not None else None for n in _weights(gm, cons))
    try:
        w2, b2 = fold_into_consumer(_f64(w), _f64(b), s, t, op=op, groups=groups)
    except ValueError as exc:
        raise _Skip(str(exc)) from None
    _rewrite_weights(gm, cons, w2, b2)


def _to_affine(gm: Any, layer: BNLayer, calls: list[BNCall]) -> None:
    """Replace every call of an inference-mode BN by ``x * scale + shift`` ((1, C, 1, …) tensors
    stored as ``<layer>.affine_scale`` / ``<layer>.affine_shift``)."""
    import torch

    aten = torch.ops.aten
    if not calls:
        raise _Skip("BN not found in the graph")
    for call in calls:
        if call.input is None or call.output is None:
            raise _Skip("BN input or output not found in the graph")
        if call.node is not None and (
            packet(call.node) in _TRAINING_OPS or op_args(call.node).get("training")
        ):
            raise _Skip("the graph normalizes with batch statistics")
    val = calls[0].input.meta.get("val")
    if not hasattr(val, "dim") or val.dim() < 2:
        raise _Skip("BN input rank unknown")
    s, t = _scale_shift(layer)
    shape = (1, len(s)) + (1,) * (val.dim() - 2)
    s_t = _to_torch(s.reshape(shape), val.dtype, "scale")
    t_t = _to_torch(t.reshape(shape), val.dtype, "shift")
    base = layer.name or "bn"
    names = [fresh_name(gm, f"{base}.affine_scale"), fresh_name(gm, f"{base}.affine_shift")]
    for name, value in zip(names, (s_t, t_t), strict=True):
        store(gm, name, value, param=False)
    for call in calls:
        with gm.graph.inserting_before(call.output):
            s_n, t_n = gm.graph.get_attr(names[0]), gm.graph.get_attr(names[1])
            mul = gm.graph.call_function(aten.mul.Tensor, (call.input, s_n))
            add = gm.graph.call_function(aten.add.Tensor, (mul, t_n))
        add.meta["val"] = call.output.meta.get("val")
        call.output.replace_all_uses_with(add)
        _erase(gm, call)


def _local_call(nodes: dict[str, Any], call: BNCall) -> BNCall:
    """The BNCall of the ExportedProgram's graph, in the unlifted copy (matched by node name)."""

    def get(n: Any) -> Any:
        if n is None:
            return None
        if n.name not in nodes:
            raise _Skip(f"node '{n.name}' not found in the unlifted graph")
        return nodes[n.name]

    return BNCall(get(call.node), {get(n) for n in call.region}, get(call.input), get(call.output))


def fold_graph(handle: Any, *, affine: bool = False) -> tuple[Any, list[FoldStep]]:
    """Fold the BNs of a traced model as ``handle.info()`` decided; returns
    (new ExportedProgram, one FoldStep per BN layer). The handle is not modified; when no BN
    can change, its own program is returned (no copy, no re-export)."""
    info = handle.info()
    if not (affine and info.bn_layers) and not any(b.fold.foldable for b in info.bn_layers):
        return handle.exported, [
            FoldStep(b.name, None, None, b.fold.reason) for b in info.bn_layers
        ]
    view = GraphView(handle.exported)
    calls = layer_calls(view, handle.format, handle.module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deepcopy of a GraphModule warns about pytree internals
        gm = copy.deepcopy(handle.exported.module())
    nodes = {n.name: n for n in gm.graph.nodes}
    read_before = set(read_counts(gm))
    removed: list[str] = []
    steps: list[FoldStep] = []
    pending: dict[str, tuple[int, BNLayer, list[BNCall]]] = {}  # identity BNs of a merge
    for layer in info.bn_layers:
        reason = layer.fold.reason
        try:
            local = [_local_call(nodes, c) for c in calls.get(layer.name, [])]
        except _Skip as exc:
            steps.append(FoldStep(layer.name, None, None, str(exc)))
            continue
        if layer.fold.into is not None:
            try:
                via = plan_of(view, calls[layer.name][0], layer)
                if via is None:
                    _fold(gm, layer, local[0])
                elif local[0].output is None:
                    raise _Skip("BN output not found in the graph")
                else:  # through layout ops or a cat; summed branches merge below
                    via.execute(gm, nodes, local[0], _scale_shift(layer))
                    if local[0].node is not None and isinstance(via, BranchMerge):
                        pending[local[0].node.name] = (len(steps), layer, local)
                steps.append(FoldStep(layer.name, layer.fold.into, layer.fold.target))
                removed.append(layer.name)
                continue
            except _Skip as exc:
                reason = str(exc)
        if affine:
            try:
                _to_affine(gm, layer, local)
                steps.append(FoldStep(layer.name, "affine", None, reason))
                removed.append(layer.name)
                continue
            except _Skip as exc:
                reason = f"{reason}; not made affine: {exc}"
        steps.append(FoldStep(layer.name, None, None, reason))
    for name, why in merge_sums(gm, set(pending)).items():  # summed branches → one conv
        i, layer, local = pending[name]
        removed.remove(layer.name)
        steps[i] = FoldStep(layer.name, None, None, why)
        if affine:
            with contextlib.suppress(_Skip):
                _to_affine(gm, layer, local)
                steps[i] = FoldStep(layer.name, "affine", None, why)
                removed.append(layer.name)
    gm.graph.eliminate_dead_code()
    _drop_dead_tensors(gm, read_before, removed)
    gm.graph.lint()
    gm.recompile()
    return _reexport(handle, gm), steps


def _drop_dead_tensors(gm: Any, read_before: set[str], removed: list[str]) -> None:
    """Delete the tensors the fold left unread (the removed BNs' statistics and parameters,
    replaced weights), so the re-exported program does not carry them."""
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
    read_after = set(read_counts(gm))
    dead = read_before - read_after
    dead |= {f"{name}.{k}" if name else k for name in removed for k in _BN_TENSORS}
    for fqn in dead - read_after:
        delete(gm, fqn)


def _reexport(handle: Any, gm: Any) -> Any:
    import torch

    from bncheck.backends.torch.load import quiet_torch

    example, dynamic = _export_inputs(handle)
    with quiet_torch():
        if dynamic is not None:
            try:
                return torch.export.export(gm, example, dynamic_shapes=dynamic, strict=False)
            except Exception:  # the rewrite pinned a dim: fall back to the traced shapes
                pass
        return torch.export.export(gm, tuple(handle.example_inputs), strict=False)


def _export_inputs(handle: Any) -> tuple[tuple[Any, ...], Any]:
    """Example inputs and ``dynamic_shapes`` reproducing each symbolic dim of the source
    program's user inputs with its own range (one ``Dim`` per distinct symbol). A dynamic
    dim whose example size is 1 is doubled in the example, so export does not specialize it."""
    import torch

    ep = handle.exported
    example = list(handle.example_inputs)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    vals = [placeholders[n].meta.get("val") for n in ep.graph_signature.user_inputs]
    dims: dict[str, Any] = {}
    spec: list[Any] = []
    for i, (x, val) in enumerate(zip(example, vals, strict=False)):
        if not hasattr(val, "shape") or not hasattr(x, "shape"):
            spec.append(None)
            continue
        entry = {}
        for axis, d in enumerate(val.shape):
            if isinstance(d, int) or not hasattr(d, "node"):
                continue
            key = str(d.node.expr)
            if key not in dims:
                rng = ep.range_constraints.get(d.node.expr)
                lo = max(int(rng.lower), 1) if rng is not None else 1
                hi = _finite(rng.upper) if rng is not None else None
                if dims:
                    # Other dims (--dynamic-dims) carry guards such as "a strided conv's output
                    # is not 1": AUTO lets export derive their range again instead of failing.
                    dim = torch.export.Dim.AUTO
                elif hi:
                    dim = torch.export.Dim("batch", min=lo, max=hi)
                else:
                    dim = torch.export.Dim("batch", min=lo)
                dims[key] = (dim, hi)
            dim, hi = dims[key]
            entry[axis] = dim
            if x.shape[axis] == 1 and (hi is None or hi >= 2):
                x = torch.cat([x, x], dim=axis)
        example[i] = x
        spec.append(entry or None)
    if not dims:
        return tuple(example), None
    return tuple(example), tuple(spec)


def _finite(bound: Any) -> int | None:
    """An upper range bound as int; None for torch's ``int_oo`` (whose ``is_finite`` is True)."""
    try:
        value = int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None
    return value if value < 2**62 else None
