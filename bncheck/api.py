"""The public API, and the only place that wires backends, data, numerics and rules together.

The CLI calls exactly these functions; so can a user's own script or notebook::

    import bncheck
    result = bncheck.inspect("model.onnx")
    for finding in result.findings:
        print(finding.code, finding.layer, finding.message)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bncheck.backends import ModelHandle
from bncheck.backends import open_model as _open_model
from bncheck.layers import Finding, ModelInfo, Severity
from bncheck.rules import all_rules, run_rules, validate_codes


def open_model(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> ModelHandle:
    """Load a model file safely; the backend is chosen by the file's bytes.

    ``arch`` (``pkg.module:factory``) builds the module a state dict or safetensors file loads
    into; ``trust_pickle`` allows formats that can run code (pickled modules, TorchScript);
    ``input_shapes`` (input name or ``""`` for the only input → shape) fixes dynamic dims.
    """
    return _open_model(
        path,
        arch=arch,
        arch_kwargs=arch_kwargs,
        trust_pickle=trust_pickle,
        input_shapes=input_shapes,
    )


def _as_handle(model: str | os.PathLike[str] | ModelHandle, **open_options: Any) -> ModelHandle:
    return model if isinstance(model, ModelHandle) else open_model(model, **open_options)


@dataclass
class InspectResult:
    """What ``inspect`` found: the model's layers and the findings of the selected rules."""

    info: ModelInfo
    findings: list[Finding] = field(default_factory=list)

    def count(self, severity: Severity) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    def worst(self) -> Severity | None:
        return max((f.severity for f in self.findings), key=lambda s: s.rank, default=None)


def inspect(
    model: str | os.PathLike[str] | ModelHandle,
    *,
    select: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None,
    **open_options: Any,
) -> InspectResult:
    """Static findings for every BN layer of ``model``; no data needed.

    ``select`` / ``ignore`` take rule codes or prefixes (``BN1``, ``BN204``), like ruff.
    """
    codes = all_rules().keys()
    validate_codes([*(select or []), *(ignore or [])], codes)
    handle = _as_handle(model, **open_options)
    info = handle.info()
    return InspectResult(info=info, findings=run_rules(info, select=select, ignore=ignore))
