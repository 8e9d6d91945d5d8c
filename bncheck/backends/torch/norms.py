"""The other norms of a PyTorch model (LayerNorm, GroupNorm, InstanceNorm, RMSNorm): an
inventory for ``inspect``, from the module tree or, for a ``.pt2``, from the graph's ops."""

from __future__ import annotations

from typing import Any

from bncheck.backends.torch.graph import NORM_OPS, GraphView, module_path, op_args, packet
from bncheck.layers import NormLayer
from bncheck.wording import plural

__all__ = ["class_name", "graph_norms", "module_norms", "norm_types"]


def class_name(m: Any) -> str:
    """The module's class name; a TorchScript module's original Python class name."""
    return getattr(m, "original_name", None) or type(m).__name__


def norm_types() -> tuple[type, ...]:
    from torch import nn
    from torch.nn.modules.instancenorm import _InstanceNorm

    return (nn.LayerNorm, nn.GroupNorm, _InstanceNorm, nn.RMSNorm)


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
            shape = f"{plural(m.num_groups, 'group')}, {plural(m.num_channels, 'channel')}"
            found.append(NormLayer(name, "GroupNorm", shape, m.eps, bool(m.affine)))
        elif isinstance(m, norm_types()):
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
            shape = f"{plural(args['num_groups'], 'group')}, {plural(channels, 'channel')}"
        else:
            shape = f"{channels} channels"
        eps = args.get("eps")
        found.append(
            NormLayer(name, kind, shape, None if eps is None else float(eps), w is not None)
        )
    return found
