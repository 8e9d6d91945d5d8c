"""Import a callable the user named as ``pkg.module:attr`` (``--arch``, ``--data``).

Such code is the user's own, named on the command line: it is imported from the working folder
(put first on ``sys.path`` while importing) and never because a config file names it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from bncheck.errors import InputError, first_line

_TARGET = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def looks_like_target(text: str) -> bool:
    """Whether ``text`` has the form ``pkg.module:attr`` (dotted names around one colon)."""
    return bool(_TARGET.match(text))


def import_callable(spec: str, option: str, what: str) -> Callable[..., Any]:
    """Import ``pkg.module:attr`` (cwd first on sys.path) and return the callable it names.

    ``option`` and ``what`` ("--arch", "factory") only word the errors.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise InputError(f"{option} {spec!r}: expected 'pkg.module:{what}'")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        mod = importlib.import_module(module_name)
    except Exception as exc:
        raise InputError(
            f"{option} {spec!r}: cannot import {module_name!r} ({first_line(exc)})"
        ) from exc
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)
    target: Any = mod
    for part in attr.split("."):
        if not hasattr(target, part):
            raise InputError(f"{option} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise InputError(f"{option} {spec!r}: {attr!r} is not callable")
    return target
