"""What every api function shares: opening a model from a path or taking a handle, the input
shape a PyTorch state dict is traced with, and the checks on an output path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bncheck.backends import ModelHandle
from bncheck.backends import open_model as _open_model
from bncheck.errors import InputError


def open_model(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    dynamic_dims: dict[str, tuple[int, ...]] | None = None,
    checkpoint_key: str | None = None,
) -> ModelHandle:
    """Load a model file safely; the backend is chosen by the file's bytes.

    ``arch`` (``pkg.module:factory``) builds the module a state dict or safetensors file loads
    into; ``checkpoint_key`` picks its state dict in a checkpoint holding several;
    ``trust_pickle`` allows formats that can run code (pickled modules, TorchScript);
    ``input_shapes`` (input name or ``""`` for the only input → shape) fixes dynamic dims;
    ``dynamic_dims`` (same keys → axes) stay dynamic in .pt2/.onnx files written from PyTorch.
    """
    return _open_model(
        path,
        arch=arch,
        arch_kwargs=arch_kwargs,
        trust_pickle=trust_pickle,
        input_shapes=input_shapes,
        dynamic_dims=dynamic_dims,
        checkpoint_key=checkpoint_key,
    )


def as_handle(
    model: str | os.PathLike[str] | ModelHandle,
    *,
    data: Any = None,
    **open_options: Any,
) -> ModelHandle:
    """A handle as is, or a path opened with ``open_options``; with ``data``, a model that
    was given no input shape takes its data's (:func:`use_data_shapes`)."""
    handle = model if isinstance(model, ModelHandle) else open_model(model, **open_options)
    if data is not None:
        use_data_shapes(handle, data)
    return handle


def use_data_shapes(handle: ModelHandle, data: Any) -> None:
    """Give a PyTorch model that has no ``--input-shape`` the shape of its ``data`` samples,
    before anything is traced: the order is --input-shape, the data, the factory's
    ``example_input_shape``, a guess. ``data`` is a path or a ``DataSpec`` (image options
    apply); data that cannot be read is left for ``open_data`` to report with the model's
    inputs at hand."""
    take = getattr(handle, "use_data_shapes", None)
    if take is None or not getattr(handle, "wants_data_shapes", True):
        return  # an ONNX model carries its own shapes, so does a .pt2 or an --input-shape
    from bncheck.data.source import sample_shapes

    try:
        shapes = sample_shapes(data, handle.input_names)  # type: ignore[attr-defined]
    except InputError:
        return
    # Dim 0 is the batch, traced dynamic; 2 samples keep export from specializing it.
    take({name: (2, *shape) for name, shape in shapes.items()})


def is_folder(path: str | os.PathLike[str]) -> bool:
    """True for an existing folder, or a path written as one (ending in a slash): an output
    path the user meant as a place to put a file, not the file's name."""
    text = os.fspath(path)
    return Path(text).is_dir() or text.endswith(("/", os.sep))


def check_output_path(
    handle: ModelHandle,
    output: str | os.PathLike[str] | None,
    *,
    in_place: bool = False,
    allowed: tuple[str, ...] = (),
) -> Path | None:
    """Refuse an output path that cannot be written, before any work is done.

    The input file is never overwritten unless ``in_place``; the folder must exist; the suffix
    decides the format, so it must be one of ``allowed``.
    """
    if output is None:
        return None
    out = Path(output)
    if is_folder(output):
        example = out / f"{Path(handle.path).stem}{allowed[0] if allowed else ''}"
        raise InputError(
            f"{os.fspath(output)}: is a folder, not a file name; give one, e.g. {example}"
        )
    if allowed and out.suffix.lower() not in allowed:
        raise InputError(f"{out}: the output must end in {' or '.join(allowed)}")
    if not out.parent.resolve().is_dir():
        raise InputError(f"{out}: folder {out.parent} does not exist")
    if not os.access(out.parent.resolve(), os.W_OK):
        raise InputError(f"{out}: folder {out.parent} is not writable")
    if out.exists() and out.resolve() == Path(handle.path).resolve() and not in_place:
        raise InputError(f"{out}: is the input file; pass --in-place to overwrite it")
    check = getattr(handle, "check_output", None)
    if check is not None:
        check(out)  # e.g. a .pt2/.onnx would carry a guessed input shape
    return out
