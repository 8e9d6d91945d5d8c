"""``--arch pkg.module:factory``: build the user's model and load a state dict into it.

The factory is the user's own code, imported from the working folder; the state dict's keys
and shapes are checked against the model first, so a mismatch names what differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bncheck.errors import InputError, first_line
from bncheck.usercode import import_callable

__all__ = ["build_arch", "load_into"]


def build_arch(spec: str, kwargs: dict[str, Any] | None) -> Any:
    """Import ``pkg.module:factory`` (cwd on sys.path) and call ``factory(**kwargs)``."""
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
    return model


def load_into(path: Path, model: Any, state: dict[str, Any], spec: str) -> None:
    """``load_state_dict(strict=True, assign=True)`` (keeps the file's dtypes), after checking keys
    and shapes so the error lists what differs."""
    expected = model.state_dict()
    if not set(state) & set(expected) and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}  # saved from DataParallel/DDP
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
