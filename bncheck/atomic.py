"""Temporary files for atomic writes: created beside the target, renamed into place by callers.

``mkstemp`` creates files readable by their owner alone (0600); a model or report bncheck writes
is an ordinary file, so the temp file gets the mode a new file would get under the umask.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 & ~umask."""
    return 0o666 & ~umask()


def as_new_file(path: str | os.PathLike[str]) -> None:
    """Give ``path`` the mode a new file gets. For files other libraries create 0600 (onnx's
    external-data writer, ``mkstemp``): a service reading the model as another user must be
    able to read all of it, as it can read the ``.onnx`` beside it."""
    os.chmod(path, new_file_mode())


def temp_beside(path: Path, suffix: str) -> tuple[int, Path]:
    """An open (fd, path) for a hidden temp file in ``path``'s folder, mode 0666 & ~umask."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    as_new_file(tmp)
    return fd, Path(tmp)
