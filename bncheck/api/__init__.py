"""The public API, and the only place that wires backends, data, numerics and rules together.

The CLI calls exactly these functions; so can a user's own script or notebook::

    import bncheck
    result = bncheck.inspect("model.onnx")
    for finding in result.findings:
        print(finding.code, finding.layer, finding.message)

Each name loads its own module on first use (PEP 562): ``inspect`` does not pay for the bench
harness, nor ``fold`` for the mismatch statistics.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name → the private module that defines it
_WHERE = {
    "BenchResult": "_bench",
    "BenchRow": "_bench",
    "BenchSide": "_bench",
    "bench": "_bench",
    "CheckResult": "_check",
    "LayerCheck": "_check",
    "OutputDivergence": "_check",
    "check": "_check",
    "check_paths": "_check",
    "open_model": "_common",
    "FoldResult": "_fold",
    "Verification": "_fold",
    "fold": "_fold",
    "verify_same_function": "_fold",
    "InspectResult": "_inspect",
    "InspectRun": "_inspect",
    "ModelEntry": "_inspect",
    "inspect": "_inspect",
    "inspect_paths": "_inspect",
    "OptimizeResult": "_optimize",
    "optimize": "_optimize",
    "RecalibrateResult": "_recalibrate",
    "recalibrate": "_recalibrate",
}

if TYPE_CHECKING:
    from bncheck.api._bench import BenchResult, BenchRow, BenchSide, bench
    from bncheck.api._check import CheckResult, LayerCheck, OutputDivergence, check, check_paths
    from bncheck.api._common import open_model
    from bncheck.api._fold import FoldResult, Verification, fold, verify_same_function
    from bncheck.api._inspect import (
        InspectResult,
        InspectRun,
        ModelEntry,
        inspect,
        inspect_paths,
    )
    from bncheck.api._optimize import OptimizeResult, optimize
    from bncheck.api._recalibrate import RecalibrateResult, recalibrate


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'bncheck.api' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"bncheck.api.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__all__ = [
    "BenchResult",
    "BenchRow",
    "BenchSide",
    "CheckResult",
    "FoldResult",
    "InspectResult",
    "InspectRun",
    "LayerCheck",
    "ModelEntry",
    "OptimizeResult",
    "OutputDivergence",
    "RecalibrateResult",
    "Verification",
    "bench",
    "check",
    "check_paths",
    "fold",
    "inspect",
    "inspect_paths",
    "open_model",
    "optimize",
    "recalibrate",
    "verify_same_function",
]
