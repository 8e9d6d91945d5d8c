"""The example input a PyTorch model is traced with, and the dims a written file keeps dynamic.

A state dict records no input shape, so it is taken, in this order, from:

1. ``--input-shape`` (source ``--input-shape``);
2. the shape of the ``--data`` samples (source ``data``; the api hands it over before tracing);
3. the factory's ``example_input_shape``: an attribute of the module it returns, of the
   factory itself, or of the Python module defining it (source ``example_input_shape``);
4. a guess from the first Conv/Linear layer (source ``guess``): good enough to list the BN
   layers, never written into a file (``check_writable``).

Every traced program keeps dim 0 (the batch) dynamic where the model allows it, plus the dims
named by ``--dynamic-dims``; a .pt2 is re-exported when it lacks a requested dim.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bncheck.errors import InputError

__all__ = [
    "DATA",
    "FACTORY",
    "GIVEN",
    "GUESS",
    "PROGRAM",
    "axes_for",
    "build_example",
    "check_output",
    "dynamic_spec",
    "forward_args",
    "run_error",
    "seeded_randn",
    "symbolic_axes",
    "widen_dynamic",
]

GIVEN, DATA, FACTORY, GUESS, PROGRAM = (
    "--input-shape",
    "data",
    "example_input_shape",
    "guess",
    "program",
)
_GUESS_SPATIAL = {"Conv1d": (32,), "Conv2d": (32, 32), "Conv3d": (16, 16, 16)}
# Named dims of --dynamic-dims, counted from the end as in NCHW / NCDHW layouts.
DIM_NAMES = {"batch": 0, "n": 0, "depth": -3, "d": -3, "height": -2, "h": -2, "width": -1, "w": -1}
_AXIS_NAMES = {-3: "depth", -2: "height", -1: "width"}


def forward_args(module: Any) -> tuple[list[str], list[str]]:
    """Positional forward arguments, and those of them without a default."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return [], []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p for p in params if p.kind in kinds]
    return [p.name for p in names], [p.name for p in names if p.default is inspect.Parameter.empty]


def seeded_randn(shape: Any, dtype: Any) -> Any:
    """An example input from a fixed seed: the trace embeds it in a written .pt2
    (sample_inputs), and the same command must write the same bytes."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randn(tuple(shape), generator=gen).to(dtype)


def _is_shape(value: Any) -> bool:
    return (
        isinstance(value, (tuple, list))
        and bool(value)
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value)
    )


def build_example(
    path: Any,
    module: Any,
    shapes: Mapping[str, Sequence[int]] | None,
    source: str | None,
    factory_shape: Any = None,
) -> tuple[dict[str, Any], str | None, str | None]:
    """Named example tensors for an eager ``module``: (tensors, source, note).

    ``shapes`` (input name or ``""`` for the only input → full shape) came from ``source``
    (``--input-shape`` or ``data``); without them the module's or the factory's
    ``example_input_shape``, else a guess, which the note names.
    """
    import torch

    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    dtype = dtype or torch.float32
    names, required = forward_args(module)
    first = names[0] if names else "x"
    if shapes:
        return _from_shapes(path, shapes, names, required, dtype, source), source, None
    for shape in (getattr(module, "example_input_shape", None), factory_shape):
        if _is_shape(shape):
            return {first: seeded_randn(tuple(shape), dtype)}, FACTORY, None
    for name, m in module.named_modules():
        kind = type(m).__name__
        if kind in _GUESS_SPATIAL and hasattr(m, "in_channels"):
            shape = (2, m.in_channels, *_GUESS_SPATIAL[kind])
        elif kind == "Linear" and hasattr(m, "in_features"):
            shape = (2, m.in_features)
        else:
            continue
        note = (
            f"example input {first}{list(shape)} guessed from '{name}' ({kind}); "
            "pass --input-shape to set it"
        )
        return {first: seeded_randn(shape, dtype)}, GUESS, note
    return {}, None, None


def _from_shapes(
    path: Any,
    shapes: Mapping[str, Sequence[int]],
    names: list[str],
    required: list[str],
    dtype: Any,
    source: str | None,
) -> dict[str, Any]:
    where = "the data" if source == DATA else "--input-shape"
    if "" in shapes:
        if len(shapes) > 1 or len(required) > 1:
            raise InputError(
                f"{path}: model takes inputs {', '.join(names)}; "
                "give --input-shape name=dims for each"
            )
        return {names[0] if names else "x": seeded_randn(shapes[""], dtype)}
    unknown = [k for k in shapes if k not in names]
    if unknown:
        raise InputError(
            f"{path}: {where} names input {unknown[0]!r}, but the model's inputs are "
            f"{', '.join(names) or 'none'} (give --input-shape name=dims for each)"
        )
    given = [n for n in names if n in shapes]
    if given != names[: len(given)] or not set(required) <= set(given):
        raise InputError(f"{path}: give --input-shape for inputs {', '.join(names)}")
    return {n: seeded_randn(shapes[n], dtype) for n in given}


def axes_for(
    dynamic_dims: Mapping[str, Sequence[int]] | None, name: str, rank: int, only_input: bool
) -> list[int]:
    """The axes of input ``name`` (of rank ``rank``) that --dynamic-dims asks to keep dynamic,
    counted from 0; negative entries count from the end. Raises InputError for an axis the
    input lacks."""
    if not dynamic_dims:
        return []
    wanted = dynamic_dims.get(name)
    if wanted is None and only_input:
        wanted = dynamic_dims.get("")
    if wanted is None:
        return []
    axes = []
    for axis in wanted:
        real = axis + rank if axis < 0 else axis
        if not 0 <= real < rank:
            raise InputError(
                f"--dynamic-dims: input {name!r} has {rank} dims (0..{rank - 1}), no dim {axis}; "
                "give its full shape with --input-shape"
            )
        axes.append(real)
    return sorted(set(axes))


def dynamic_spec(
    example: Mapping[str, Any], dynamic_dims: Mapping[str, Sequence[int]] | None
) -> tuple[tuple[Any, ...], tuple[Any, ...], bool]:
    """(example tensors, ``dynamic_shapes``, any dim requested) for ``torch.export``.

    Dim 0 of every input is the dynamic ``batch`` (any size from 1); each axis --dynamic-dims
    names is ``Dim.AUTO``: export derives its range from the model's guards (a strided conv
    wants at least a few pixels) instead of failing on them, and ``symbolic_axes`` then shows
    whether it stayed dynamic. A dynamic dim of size 1 in the example is doubled, so export does
    not specialize it to 1.
    """
    import torch

    several = len(example) > 1
    tensors, spec, requested = [], [], False
    for name, x in example.items():
        if not hasattr(x, "dim") or x.dim() == 0:
            tensors.append(x)
            spec.append(None)
            continue
        entry: dict[int, Any] = {0: torch.export.Dim("batch", min=1)}
        for axis in axes_for(dynamic_dims, name, x.dim(), not several):
            if axis != 0:
                requested = True
                entry[axis] = torch.export.Dim.AUTO
        tensors.append(widen_dynamic(x, entry))
        spec.append(entry)
    return tuple(tensors), tuple(spec), requested


def widen_dynamic(x: Any, axes: Iterable[int]) -> Any:
    """``x`` with each of ``axes`` of size 1 doubled: export specializes a size-1 dim to 1, so
    the example it traces (and any graph meant to match that trace) has 2 there."""
    import torch

    for axis in axes:
        if x.shape[axis] == 1:
            x = torch.cat([x, x], dim=axis)
    return x


def axis_label(name: str, axis: int, rank: int, several: bool) -> str:
    """A readable name for a dynamic dim in a written file: ``batch``, ``height``, ``width``,
    ``depth`` (counted from the end of a 3-5 dim input), else ``dim<axis>``; prefixed with the
    input's name when the model has several inputs."""
    if axis == 0:
        label = "batch"
    else:
        label = _AXIS_NAMES.get(axis - rank, f"dim{axis}") if 3 <= rank <= 5 else f"dim{axis}"
    return f"{name}_{label}" if several and axis else label


def symbolic_axes(ep: Any) -> dict[str, set[int]]:
    """For each user input of an ExportedProgram, the axes whose size is free: symbolic, and
    not tied by an equality among the program's input guards (``6·⌈H/8⌉·⌈W/8⌉ == 4704`` from a
    fixed-size Linear head leaves H and W symbolic, yet only 224×224 runs)."""
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    tied: dict[str, set[int]] = {}
    # torch keeps the guards an exported module checks on its inputs as source strings.
    for guard in getattr(ep, "_guards_code", None) or ():
        if "==" in str(guard):
            for name, axis in re.findall(r"L\['(\w+)'\]\.size\(\)\[(\d+)\]", str(guard)):
                tied.setdefault(name, set()).add(int(axis))
    out: dict[str, set[int]] = {}
    for name in ep.graph_signature.user_inputs:
        val = nodes[name].meta.get("val") if name in nodes else None
        shape = getattr(val, "shape", ())
        free = {i for i, d in enumerate(shape) if not str(d).lstrip("-").isdigit()}
        out[name] = free - tied.get(name, set())
    return out


def check_output(handle: Any, out: Any) -> None:
    """Refuse an output ``handle`` cannot be written to faithfully: a .pt2/.onnx traced on a
    guessed shape (or none) would be fixed to it; --dynamic-dims asks for dims a weights-only
    file does not store."""
    from pathlib import Path

    suffix = Path(out).suffix.lower()
    if suffix in (".pt2", ".onnx"):
        if handle.shape_source == GUESS:
            shapes = ", ".join(f"{k}{list(v)}" for k, v in handle.example_shapes.items())
            raise InputError(
                f"{out}: the input shape {shapes} was guessed, and a written model would be "
                "fixed to it: pass --input-shape with the model's real input shape (or --data)"
            )
        if handle.shape_source is None and handle.format != "pt2":
            raise InputError(f"{out}: the model has no known input shape: pass --input-shape")
    elif handle._dynamic_dims:
        raise InputError(
            f"{out}: --dynamic-dims applies to .pt2 and .onnx outputs; a {suffix or 'this'} "
            "file stores weights only, no input shape"
        )


def run_error(handle: Any, exc: BaseException, tensors: Sequence[Any]) -> InputError:
    """The error for a forward of ``handle`` that raised ``exc`` on ``tensors``: it names the
    shapes fed, and --input-shape when they came from a guess."""
    from bncheck.errors import first_line

    names = list(handle.example_named) or [f"input{i}" for i in range(len(tensors))]
    fed = ", ".join(
        f"{n}{list(t.shape)}" for n, t in zip(names, tensors, strict=False) if hasattr(t, "shape")
    )
    hint = (
        ": that shape was guessed, pass --input-shape with the model's real input shape"
        if handle.shape_source == GUESS
        else ""
    )
    return InputError(f"{handle.path}: the model failed to run on {fed} ({first_line(exc)}){hint}")
