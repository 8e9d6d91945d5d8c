"""The public API, and the only place that wires backends, data, numerics and rules together.

The CLI calls exactly these functions; so can a user's own script or notebook::

    import bncheck
    result = bncheck.inspect("model.onnx")
    for finding in result.findings:
        print(finding.code, finding.layer, finding.message)
"""

from bncheck.api._bench import BenchResult, BenchRow, BenchSide, bench
from bncheck.api._check import CheckResult, LayerCheck, OutputDivergence, check, check_paths
from bncheck.api._common import open_model
from bncheck.api._fold import FoldResult, Verification, fold, verify_same_function
from bncheck.api._inspect import InspectResult, InspectRun, ModelEntry, inspect, inspect_paths
from bncheck.api._optimize import OptimizeResult, optimize
from bncheck.api._recalibrate import RecalibrateResult, recalibrate

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
