"""Training checkpoints: find the state dicts a loaded file holds and pick the one to use.

Training scripts save more than weights: ``{'epoch', 'net', 'ema', 'optimizer'}``, Lightning's
``{'state_dict', 'optimizer_states', …}``, timm's ``state_dict`` beside ``state_dict_ema``.
``--checkpoint-key`` picks one; without it the only state dict, or the only one whose keys fit
``--arch``, is taken, and an ambiguous file is refused with the list of candidates.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bncheck.backends.torch.arch import match_keys
from bncheck.errors import InputError

__all__ = ["pick_state_dict", "state_dicts"]


def state_dicts(obj: Any, path: str = "", depth: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """Every state dict (a non-empty mapping of str → tensor) in a loaded checkpoint: ``obj``
    itself, or a value up to two mappings down, each with its key path (``a.b``; ``""`` for
    ``obj``). An optimizer's state (int keys) is not one."""
    import torch

    if not isinstance(obj, Mapping) or not obj:
        return []
    if all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return [(path, dict(obj))]
    found: list[tuple[str, dict[str, Any]]] = []
    if depth < 2:
        for k, v in obj.items():
            if isinstance(k, str) and isinstance(v, Mapping):
                found += state_dicts(v, f"{path}.{k}" if path else k, depth + 1)
    return found


def pick_state_dict(
    path: Path, obj: Any, key: str | None, expected: Any = None
) -> tuple[str, dict[str, Any]]:
    """(key path, state dict) of the checkpoint ``obj``: the one under ``key``; else the only
    one; else the only one whose keys (wrapper prefixes stripped) cover ``expected`` (the
    ``--arch`` model's keys). Refuses an ambiguous checkpoint, listing its candidates."""
    found = state_dicts(obj)
    listed = ", ".join(repr(p) for p, _ in found)
    if key is not None:
        for p, state in found:
            if p == key:
                return p, state
        if not found:
            raise InputError(f"{path}: --checkpoint-key {key!r}: the file holds no state dict")
        raise InputError(
            f"{path}: --checkpoint-key {key!r}: no state dict under that key; "
            f"it holds state dicts under {listed}"
        )
    if not found:
        if not isinstance(obj, Mapping) or not obj:
            raise InputError(f"{path}: holds a {type(obj).__name__}, not a model or a state dict")
        keys = ", ".join(repr(k) for k in list(obj)[:8]) + (", …" if len(obj) > 8 else "")
        raise InputError(
            f"{path}: holds a {type(obj).__name__} with keys {keys}, not a model or a state dict, "
            "and none of its entries is a state dict (names → tensors)"
        )
    if len(found) == 1:
        return found[0]
    if expected is not None:
        want = set(expected)
        fits = [(p, s) for p, s in found if want <= set(match_keys(s, want)[0])]
        if len(fits) == 1:
            return fits[0]
        if fits:
            found = fits
            listed = ", ".join(repr(p) for p, _ in found)
    raise InputError(
        f"{path}: a checkpoint holding {len(found)} state dicts ({listed}): "
        f"pick one with --checkpoint-key, e.g. --checkpoint-key {found[0][0]}"
    )
