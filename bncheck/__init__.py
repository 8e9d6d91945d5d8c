"""bncheck: inspect, check, recalibrate and fold the BatchNorm layers of PyTorch and ONNX models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "BenchResult",
    "CheckResult",
    "FoldResult",
    "InspectResult",
    "OptimizeResult",
    "RecalibrateResult",
    "__version__",
    "bench",
    "check",
    "fold",
    "inspect",
    "open_model",
    "optimize",
    "recalibrate",
]
# The public API is loaded on first use (PEP 562), so `import bncheck` and `bncheck --version`
# stay at the interpreter's start-up floor instead of pulling in numpy and every command.
_API = frozenset(__all__) - {"__version__"}

if TYPE_CHECKING:
    from bncheck.api import (
        BenchResult,
        CheckResult,
        FoldResult,
        InspectResult,
        OptimizeResult,
        RecalibrateResult,
        bench,
        check,
        fold,
        inspect,
        open_model,
        optimize,
        recalibrate,
    )


def __getattr__(name: str) -> Any:
    if name in _API:
        from bncheck import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bncheck' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API)
