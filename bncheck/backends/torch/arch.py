"""``--arch pkg.module:factory``: build the user's model and load a state dict into it.

The factory is the user's own code, imported from the working folder; the state dict's keys
and shapes are checked against the model first, so a mismatch names what differs. Keys saved
through a wrapper (``module.`` from DataParallel/DDP, ``model.`` from Lightning, ``_orig_mod.``
from ``torch.compile``) lose that prefix when that makes them the model's keys.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bncheck.errors import InputError, first_line
from bncheck.usercode import import_callable

__all__ = ["build_arch", "load_into", "match_keys"]

# Wrappers whose attribute name prefixes every key of the model they hold.
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")


def build_arch(spec: str, kwargs: dict[str, Any] | None) -> tuple[Any, Any]:
    """Import ``pkg.module:factory`` (cwd on sys.path) and call ``factory(**kwargs)``.

    Returns (model, the ``example_input_shape`` the factory function or its Python module
    declares, or None)."""
    import torch

    factory = import_callable(spec, "--arch", "factory")
    try:
        model = factory(**(kwargs or {}))
    except Exception as exc:
        raise InputError(
            f"--arch {spec!r}: the factory raised {type(exc).__name__}: {first_line(exc)}"
        ) from None
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"--arch {spec!r}: returned {type(model).__name__}, not a torch.nn.Module")
    shape = getattr(factory, "example_input_shape", None)
    if shape is None:  # declared in the module that defines the factory
        shape = getattr(
            sys.modules.get(getattr(factory, "__module__", "")), "example_input_shape", None
        )
    return model, shape


def match_keys(state: dict[str, Any], expected: Any) -> tuple[dict[str, Any], list[str]]:
    """``state`` with the wrapper prefixes (``WRAPPER_PREFIXES``, up to three deep, as in
    ``module._orig_mod.``) removed that make the most of its keys the model's ``expected``
    keys; keys without the prefix go with it (a Lightning module's loss or metric buffers).
    Returns (state, prefixes removed, outermost first)."""
    want = set(expected)

    def best(current: dict[str, Any], depth: int) -> tuple[int, dict[str, Any], list[str]]:
        found = (len(want & set(current)), current, [])
        if depth == 3 or want <= set(current):
            return found
        for prefix in WRAPPER_PREFIXES:
            sub = {k[len(prefix) :]: v for k, v in current.items() if k.startswith(prefix)}
            if sub:
                score, inner, removed = best(sub, depth + 1)
                if score > found[0]:
                    found = (score, inner, [prefix, *removed])
        return found

    _, state, removed = best(state, 0)
    return state, removed


def load_into(path: Path, model: Any, state: dict[str, Any], spec: str) -> list[str]:
    """``load_state_dict(strict=True, assign=True)`` (keeps the file's dtypes), after stripping
    wrapper prefixes (:func:`match_keys`) and checking keys and shapes so the error lists what
    differs. Returns the prefixes stripped."""
    expected = model.state_dict()
    state, removed = match_keys(state, expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    if problems:
        raise InputError(f"{path}: does not match --arch {spec}: {'; '.join(problems)}")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except Exception as exc:
        raise InputError(f"{path}: load_state_dict failed ({first_line(exc)})") from None
    return removed
