"""Trace a PyTorch model for bncheck and for the files it writes.

``trace`` exports an eval copy with dim 0 (the batch) and the ``--dynamic-dims`` dynamic
(``example.dynamic_spec``); a model that pins them is traced as it is. ``judge_pinned`` then
decides: a ``--dynamic-dims`` dim the program fixes, or ties to a size through its guards, is an
error; a pinned batch is a note, and a written file runs that batch size only.
``program_to_write`` gives the program a .pt2/.onnx is written from, exported again when a
loaded .pt2 fixes a wanted dim.
"""

from __future__ import annotations

from typing import Any

from bncheck.backends.torch.copying import copy_module
from bncheck.backends.torch.example import GUESS, axes_for, dynamic_spec, symbolic_axes
from bncheck.backends.torch.load import quiet_torch
from bncheck.errors import InputError, first_line

__all__ = ["judge_pinned", "missing_axes", "program_to_write", "trace", "trace_error"]


def trace(handle: Any) -> tuple[Any, str | None]:
    """Export an eval copy with dim 0 and the --dynamic-dims dynamic; a model that pins
    them is traced as it is (``judge_pinned`` decides whether that is an error). A .pt2 is
    exported again only when it fixes a dim --dynamic-dims asks for."""
    import torch

    if handle.format == "pt2":
        ep = handle._exported
        return (program_to_write(handle) if missing_axes(handle, ep) else ep), None
    example = handle.example_named
    if not example:
        return None, "could not trace the model: no example input (pass --input-shape)"
    work = copy_module(handle.module).eval()
    batched, spec, _ = dynamic_spec(example, handle._dynamic_dims)
    with quiet_torch():
        try:
            ep = torch.export.export(work, batched, dynamic_shapes=spec, strict=False)
        except Exception as exc:
            dynamic_error: BaseException | None = exc
        else:
            dynamic_error = None
        if dynamic_error is not None:
            try:
                ep = torch.export.export(work, tuple(example.values()), strict=False)
            except Exception as exc:
                return None, trace_error(handle, exc)
    judge_pinned(handle, ep, dynamic_error)
    return ep, None


def trace_error(handle: Any, exc: BaseException) -> str:
    if handle._shape_source == GUESS:
        shapes = ", ".join(f"{k}{list(v)}" for k, v in handle.example_shapes.items())
        return (
            f"could not trace the model on the guessed input {shapes} ({first_line(exc)}): "
            "pass --input-shape with the model's real input shape"
        )
    return f"could not trace the model: {first_line(exc)}"


def program_to_write(handle: Any) -> Any:
    """The ExportedProgram a .pt2/.onnx is written from: dim 0 of every input and the
    --dynamic-dims dynamic. A program that fixes one of them (a .pt2 exported so) is
    exported again from its graph; when the model itself pins its batch size the file
    keeps it (said in ``notes``), and a --dynamic-dims dim it pins is an error."""
    import torch

    ep = handle.exported
    if ep is None:
        raise InputError(f"{handle.path}: cannot write a traced model: {handle.graph_error}")
    if not missing_axes(handle, ep):
        return ep
    batched, spec, _ = dynamic_spec(handle.example_named, handle._dynamic_dims)
    try:
        with quiet_torch():
            # The program's own input guards pin the sizes it was exported at; its graph
            # decides what it can run (a size baked into a reshape shows up as a tie).
            module = ep.module(check_guards=False)
            new = torch.export.export(module, batched, dynamic_shapes=spec, strict=False)
    except Exception as exc:
        judge_pinned(handle, ep, exc)
        return ep
    judge_pinned(handle, new, None)
    return new


def missing_axes(handle: Any, ep: Any) -> dict[str, list[int]]:
    """Per input, the axes that should be dynamic in ``ep`` but are not."""
    have = symbolic_axes(ep)
    shapes = handle.example_shapes
    missing = {}
    for name in have:
        rank = len(shapes.get(name, ()))
        if not rank:
            continue
        want = {0, *axes_for(handle._dynamic_dims, name, rank, len(have) == 1)}
        lost = sorted(want - have[name])
        if lost:
            missing[name] = lost
    return missing


def judge_pinned(handle: Any, ep: Any, exc: BaseException | None) -> None:
    """Judge the dims ``ep`` left static (``exc``: why the dynamic export failed, if it
    did): a --dynamic-dims dim is an error; a batch dim only, a note that a written file
    runs that batch size only."""
    missing = missing_axes(handle, ep)
    if not missing:
        return
    shapes = handle.example_shapes
    why = f" ({first_line(exc)})" if exc is not None else ""
    asked = {k: [a for a in v if a] for k, v in missing.items() if any(v)}
    if asked:
        dims = "; ".join(f"dim {', '.join(map(str, v))} of input {k!r}" for k, v in asked.items())
        raise InputError(
            f"{handle.path}: --dynamic-dims: the model ties {dims} to the size it was traced at "
            f"({', '.join(f'{k}{list(v)}' for k, v in shapes.items())}){why}, so a written "
            "file runs that size only: leave them out of --dynamic-dims and give the size "
            "with --input-shape"
        )
    note = (
        "the model fixes its batch size when traced: a written file runs inputs of shape "
        f"{', '.join(f'{k}{list(v)}' for k, v in shapes.items())} only{why}"
    )
    if note not in handle.notes:
        handle.notes.append(note)
