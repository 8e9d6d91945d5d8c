"""A private copy of a user's module, so that running or rewriting it never touches theirs.

``copy.deepcopy`` refuses a module that uses the old ``torch.nn.utils.weight_norm``: its
forward pre-hook stores the weight it computes from ``weight_g``/``weight_v`` as a plain
attribute, a non-leaf tensor, and torch only deep-copies graph leaves. Audio models (HiFi-GAN
style vocoders, pitch trackers) still ship with it. That attribute is recomputed by the hook on
every call, so it is left out of the copy and computed again on both sides.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["copy_module"]


def _weight_norm_hooks(module: Any) -> list[tuple[Any, Any]]:
    from torch.nn.utils.weight_norm import WeightNorm

    return [
        (mod, hook)
        for mod in module.modules()
        for hook in mod._forward_pre_hooks.values()
        if isinstance(hook, WeightNorm)
    ]


def copy_module(module: Any) -> Any:
    """A deep copy of ``module``, weight-normed layers included; ``module`` is left as it was."""
    hooks = _weight_norm_hooks(module)
    if not hooks:
        return copy.deepcopy(module)
    computed = [(mod, hook.name, mod.__dict__.pop(hook.name, None)) for mod, hook in hooks]
    try:
        out = copy.deepcopy(module)
    finally:
        for mod, name, value in computed:
            if value is not None:
                mod.__dict__[name] = value
    for mod, hook in _weight_norm_hooks(out):
        setattr(mod, hook.name, hook.compute_weight(mod))
    return out
