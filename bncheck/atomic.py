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


def temp_beside(path: Path, suffix: str) -> tuple[int, Path]:
    """An open (fd, path) for a hidden temp file in ``path``'s folder, mode 0666 & ~umask."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.chmod(tmp, 0o666 & ~umask())
    return fd, Path(tmp)
