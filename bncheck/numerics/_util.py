"""Array helpers shared by the numerics modules."""

from __future__ import annotations

from typing import Any

import numpy as np


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _vec(name: str, a: Any, n: int) -> np.ndarray:
    v = _f64(a)
    if v.shape != (n,):
        raise ValueError(f"{name} has shape {v.shape}, expected ({n},)")
    return v
