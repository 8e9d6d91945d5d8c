"""What every api function shares: opening a model from a path or taking a handle."""

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


def as_handle(model: str | os.PathLike[str] | ModelHandle, **open_options: Any) -> ModelHandle:
    """A handle as is, or a path opened with ``open_options``."""
    return model if isinstance(model, ModelHandle) else open_model(model, **open_options)


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
    return out
