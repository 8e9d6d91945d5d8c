"""What every api function shares: opening a model from a path or taking a handle."""

from __future__ import annotations

import os
from typing import Any

from bncheck.backends import ModelHandle
from bncheck.backends import open_model as _open_model


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
