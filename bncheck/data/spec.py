"""What the user named as data, with how to read it: the one value a command passes along."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bncheck.data.images import ImageOptions

__all__ = ["DataSpec"]


@dataclass(frozen=True)
class DataSpec:
    """Data and how to read it, for every ``data=`` argument of the api.

    ``source``: a file or folder path; ``"pkg.module:function"`` (a data hook, imported from
    the working folder); a callable returning an iterable of batches; or such an iterable
    itself (a ``DataLoader``, a list of arrays). ``images`` preprocess a folder of images;
    ``kwargs`` are passed to a hook; ``max_samples`` caps the samples read by every pass.
    ``explicit`` names the options the user gave on the command line: those are refused for
    data they do not apply to, while defaults from ``pyproject.toml`` are then just unused.
    """

    source: Any
    images: ImageOptions | None = None
    kwargs: Mapping[str, Any] | None = None
    max_samples: int | None = None
    explicit: frozenset[str] = field(default_factory=frozenset)

    def __str__(self) -> str:
        src = self.source
        if isinstance(src, str | os.PathLike):
            return os.fspath(src)
        name = getattr(src, "__qualname__", None) or type(src).__name__
        return f"{getattr(src, '__module__', None) or '?'}:{name}"

    def __fspath__(self) -> str:
        # Lets messages and ``Path(data).name`` that predate hooks name the data as given.
        return str(self)
