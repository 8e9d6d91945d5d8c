"""``inspect``: static findings for every BN layer."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bncheck.api._common import as_handle
from bncheck.backends import ModelHandle
from bncheck.layers import Finding, ModelInfo, Severity
from bncheck.rules import all_rules, run_rules, validate_codes


@dataclass
class InspectResult:
    """What ``inspect`` found: the model's layers and the findings of the selected rules."""

    info: ModelInfo
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. a guessed input shape

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
    handle = as_handle(model, **open_options)
    info = handle.info()
    findings = run_rules(info, select=select, ignore=ignore)
    return InspectResult(info=info, findings=findings, notes=list(getattr(handle, "notes", [])))
