"""A GraphModule's tensor attributes by qualified name (``"layer1.0.conv.weight"``): find,
bind, drop, and count the ``get_attr`` nodes that read them. The fold's plumbing."""

from __future__ import annotations

from typing import Any

__all__ = ["delete", "fresh_name", "get", "has_attr", "is_param", "owner", "read_counts", "store"]


def owner(gm: Any, fqn: str, create: bool = False) -> tuple[Any, str]:
    import torch

    path, _, leaf = fqn.rpartition(".")
    mod = gm
    for part in path.split(".") if path else ():
        if not hasattr(mod, part):
            if not create:
                raise AttributeError(fqn)
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    return mod, leaf


def get(gm: Any, fqn: str) -> Any:
    """The tensor (or module) bound to ``fqn``."""
    mod, leaf = owner(gm, fqn)
    return getattr(mod, leaf)


def has_attr(gm: Any, fqn: str) -> bool:
    try:
        mod, leaf = owner(gm, fqn)
    except AttributeError:
        return False
    return leaf in mod.__dict__ or leaf in mod._parameters or leaf in mod._buffers or (
        leaf in mod._modules
    )  # fmt: skip


def store(gm: Any, fqn: str, value: Any, *, param: bool) -> None:
    """Bind ``fqn`` to a new tensor (the old tensor object is dropped, never written to)."""
    import torch

    mod, leaf = owner(gm, fqn, create=True)
    for table in (mod._parameters, mod._buffers):
        table.pop(leaf, None)
    mod.__dict__.pop(leaf, None)
    if param:
        mod.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    else:
        mod.register_buffer(leaf, value)


def delete(gm: Any, fqn: str) -> None:
    try:
        mod, leaf = owner(gm, fqn)
    except AttributeError:
        return
    for table in (mod._parameters, mod._buffers):
        table.pop(leaf, None)
    mod.__dict__.pop(leaf, None)


def is_param(gm: Any, fqn: str) -> bool:
    mod, leaf = owner(gm, fqn)
    return leaf in mod._parameters


def fresh_name(gm: Any, fqn: str) -> str:
    name, n = fqn, 0
    while has_attr(gm, name):
        n += 1
        name = f"{fqn}_folded{'' if n == 1 else n}"
    return name


def read_counts(gm: Any) -> dict[str, int]:
    """get_attr target → number of nodes reading it (summed over duplicate get_attr nodes)."""
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            out[n.target] = out.get(n.target, 0) + len(n.users)
    return out
