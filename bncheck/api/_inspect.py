"""``inspect``: static findings for every BN layer."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bncheck.api._common import as_handle
from bncheck.api._walk import expand, first_match, relative
from bncheck.backends import ModelHandle
from bncheck.errors import BncheckError, ExitCode, InputError, first_line
from bncheck.layers import Finding, ModelInfo, Severity
from bncheck.rules import run_rules, validate_codes


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
    validate_codes([*(select or []), *(ignore or [])])
    handle = as_handle(model, **open_options)
    # a backend may read the same ModelInfo more cheaply for a report (torch: fx, not export)
    info = getattr(handle, "report_info", handle.info)()
    findings = run_rules(info, select=select, ignore=ignore)
    return InspectResult(info=info, findings=findings, notes=list(getattr(handle, "notes", [])))


@dataclass
class ModelEntry:
    """One file of a run over several models: done (``result``: an ``InspectResult`` or a
    ``CheckResult``), unreadable (``error``, with the exit code that error calls for) or
    skipped (``skipped``, the reason). ``done`` is the word for a result: inspected, checked."""

    path: str
    result: Any = None
    error: str | None = None
    error_exit: int = int(ExitCode.ERROR)
    skipped: str | None = None
    seconds: float = 0.0
    exception: BaseException | None = field(default=None, repr=False)  # for -v tracebacks
    done: str = "inspected"

    @property
    def status(self) -> str:
        return self.done if self.result else ("error" if self.error else "skipped")


@dataclass
class InspectRun:
    """A command over several files and folders: one entry per model, in the walk's order;
    ``excluded`` lists the named paths that ``exclude`` globs left out."""

    entries: list[ModelEntry] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)

    @property
    def findings(self) -> list[Finding]:
        return [f for e in self.entries if e.result for f in e.result.findings]

    @property
    def errors(self) -> list[ModelEntry]:
        return [e for e in self.entries if e.error is not None]

    @property
    def skipped(self) -> list[ModelEntry]:
        return [e for e in self.entries if e.skipped is not None]


def inspect_paths(
    paths: Sequence[str | os.PathLike[str]],
    *,
    select: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    arch: str | Mapping[str, str] | None = None,
    root: str | os.PathLike[str] | None = None,
    on_error: Callable[[ModelEntry], None] | None = None,
    **open_options: Any,
) -> InspectRun:
    """``inspect`` every model in ``paths`` (files, and folders walked for model files).

    Globs (``include``, ``exclude``, the keys of an ``arch`` table) match paths relative to
    ``root`` (default: the working folder). ``arch`` is one factory for every state dict, or a
    table ``{glob: factory}`` (first match wins). A model that cannot be read becomes an error
    entry (``on_error`` is told at once) and the others are still inspected. A state dict found
    in a folder with no factory for it is skipped with a note; one named explicitly is an error.
    """
    validate_codes([*(select or []), *(ignore or [])])

    def one(path: Path, factory: str | None) -> InspectResult:
        return inspect(path, select=select, ignore=ignore, arch=factory, **open_options)

    return each_model(
        paths, one, include=include, exclude=exclude, arch=arch, root=root, on_error=on_error
    )


def each_model(
    paths: Sequence[str | os.PathLike[str]],
    run_one: Callable[[Path, str | None], Any],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    arch: str | Mapping[str, str] | None = None,
    root: str | os.PathLike[str] | None = None,
    on_error: Callable[[ModelEntry], None] | None = None,
    done: str = "inspected",
) -> InspectRun:
    """``run_one(path, factory)`` for every model in ``paths`` (see ``inspect_paths``): one
    model's error, even an internal one, becomes its entry and never hides the others."""
    base = Path(root) if root is not None else Path.cwd()
    targets, excluded = expand(paths, root=base, include=include, exclude=exclude)
    run = InspectRun(excluded=[str(p) for p in excluded])
    for target in targets:
        rel = relative(target.path, base)
        factory = arch if isinstance(arch, str) or arch is None else first_match(rel, dict(arch))
        entry = ModelEntry(path=str(target.path), done=done)
        start = time.perf_counter()
        try:
            entry.result = run_one(target.path, factory)
        except BncheckError as exc:
            if not target.explicit and factory is None and _needs_arch(exc):
                entry.skipped = "a state dict: no --arch, and no `arch` entry matches its path"
            else:
                entry.error, entry.error_exit = str(exc), int(exc.exit_code)
                entry.exception = exc
        except Exception as exc:  # one model's internal error must not hide the others
            entry.error = f"{target.path}: internal error: {type(exc).__name__}: {first_line(exc)}"
            entry.exception = exc
        entry.seconds = time.perf_counter() - start
        if entry.error is not None and on_error is not None:
            on_error(entry)
        run.entries.append(entry)
    return run


def _needs_arch(exc: BncheckError) -> bool:
    # The torch loader's one message for a weights-only file that needs a factory.
    return isinstance(exc, InputError) and "pass --arch" in str(exc)
