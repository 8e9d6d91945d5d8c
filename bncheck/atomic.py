"""Temporary files for atomic writes: created beside the target, renamed into place by callers.

``mkstemp`` creates files readable by their owner alone (0600); a model or report bncheck writes
is an ordinary file, so the temp file gets the mode a new file would get under the umask.

A temp file is flushed to disk (fsync) before its rename only when the rename replaces a file
(``--in-place``, a rerun over an earlier output): after a crash the path then holds the old
content or the new, never a file the crash cut short. A new file is not flushed, as
``onnx.save`` and ``torch.save`` do not: a crash can cost only that file, which the same command
writes again, and flushing 500 MB takes 0.4 s on a disk like CI's.
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


def sync_if_replacing(tmp: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Flush ``tmp`` to disk when renaming it onto ``target`` will replace a file (see above)."""
    if not os.path.lexists(target):
        return
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
