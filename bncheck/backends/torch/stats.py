"""Statistics glue for PyTorch models: BN input moments per batch, and new running statistics.

``moment_runner`` works on a copy of the traced graph (``ep.module()``) in which every
batch-norm op is replaced by a call that records the per-channel moments of its input
(``bncheck.numerics.Moments``, float64) and then normalizes, either with the running statistics
(inference) or, with ``batch_stats``, with the statistics of the current batch, as in training
(``F.batch_norm(training=True)`` without running buffers, so nothing is updated). Every other op
runs as traced, in eval mode: dropout stays off.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from bncheck.backends.torch.discover import BN_OPS, op_args, packet
from bncheck.errors import InputError
from bncheck.numerics import Moments

MomentRunner = Callable[[Mapping[str, np.ndarray]], tuple[list[np.ndarray], dict[str, Moments]]]


def _layer_name(gm: Any, node: Any) -> str | None:
    mean = op_args(node).get("running_mean")
    if getattr(mean, "op", None) == "get_attr":
        return mean.target.rsplit(".", 1)[0]
    return None


def moment_runner(handle: Any, *, batch_stats: bool) -> MomentRunner:
    """One batch in → (model outputs, {BN layer name: Moments of its input})."""
    import torch
    import torch.nn.functional as F

    from bncheck.backends.torch import _flat_tensors
    from bncheck.backends.torch.load import quiet_torch

    ep = handle.exported
    if ep is None:
        raise InputError(f"{handle.path}: statistics need a traceable model ({handle.graph_error})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = copy.deepcopy(ep.module())
    names = {layer.name for layer in handle.info().bn_layers if not layer.frozen}
    current: dict[str, Moments] = {}

    def record(name: str, x: Any, weight: Any, bias: Any, mean: Any, var: Any, eps: float) -> Any:
        m = Moments.from_batch(x.detach().double().cpu().numpy(), channel_axis=1)
        current[name] = current[name] + m if name in current else m
        if batch_stats:
            return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
        return F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)

    replaced = 0
    for node in list(gm.graph.nodes):
        if packet(node) not in BN_OPS:
            continue
        name = _layer_name(gm, node)
        if name not in names:
            continue
        a = op_args(node)
        eps = float(a.get("eps", 1e-5))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                record,
                (name, a["input"], a.get("weight"), a.get("bias"), a.get("running_mean"),
                 a.get("running_var"), eps),
            )  # fmt: skip
        if len(node.target._schema.returns) > 1:
            for user in list(node.users):
                if user.target is operator.getitem and user.args[1] == 0:
                    user.replace_all_uses_with(new)
                    gm.graph.erase_node(user)
            for user in list(node.users):
                if not user.users:
                    gm.graph.erase_node(user)
        else:
            node.replace_all_uses_with(new)
        if not node.users:
            gm.graph.erase_node(node)
        replaced += 1
    gm.recompile()
    order = list(handle.example_named)

    def run(feeds: Mapping[str, np.ndarray]) -> tuple[list[np.ndarray], dict[str, Moments]]:
        current.clear()
        args = [next(iter(feeds.values()))] if len(feeds) == 1 else [feeds[n] for n in order]
        tensors = [torch.from_numpy(np.ascontiguousarray(x)) for x in args]
        try:
            with torch.no_grad(), quiet_torch():
                out = gm(*tensors)
        except Exception as exc:
            raise InputError(f"{handle.path}: the model failed to run: {exc}") from None
        outs = [t.detach().float().cpu().numpy() for t in _flat_tensors(out)]
        return outs, dict(current)

    return run


def with_stats(
    handle: Any,
    stats: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    num_batches: int | None = None,
) -> Any:
    """A new handle whose BN running_mean/running_var hold ``stats``, cast to the stored dtype,
    ``num_batches_tracked`` set to ``num_batches`` when given; every other tensor untouched."""
    import torch

    from bncheck.backends.torch import TorchHandle

    def put(tensors: dict[str, Any], prefix: str, mean: np.ndarray, var: np.ndarray) -> None:
        for key, value in (("running_mean", mean), ("running_var", var)):
            fqn = f"{prefix}.{key}" if prefix else key
            if fqn not in tensors:
                raise InputError(f"{handle.path}: BN '{prefix}' has no {key} to write")
            old = tensors[fqn]
            tensors[fqn] = torch.from_numpy(np.asarray(value, np.float64)).to(old.dtype)
        nbt = f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked"
        if num_batches is not None and nbt in tensors:
            tensors[nbt] = torch.tensor(num_batches, dtype=tensors[nbt].dtype)

    if handle.format == "pt2":
        ep = copy.copy(handle.exported)
        state = dict(ep.state_dict)
        for name, (mean, var) in stats.items():
            put(state, name, mean, var)
        ep._state_dict = state  # a shallow copy with its own state dict: the source is unchanged
        new = TorchHandle(handle.path, "pt2", ep.module(), ep)
    else:
        module = copy.deepcopy(handle.module)
        for name, (mean, var) in stats.items():
            owner = module.get_submodule(name)
            keys = ("running_mean", "running_var", "num_batches_tracked")
            buffers = {k: getattr(owner, k) for k in keys if hasattr(owner, k)}
            put(buffers, "", mean, var)
            for k, v in buffers.items():
                owner._buffers[k] = v
        new = TorchHandle(handle.path, handle.format, module, input_shapes=handle._input_shapes)
    new._example = dict(handle.example_named)
    return new
