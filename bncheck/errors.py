"""Errors bncheck raises on purpose, and the exit codes the CLI maps them to.

Deep code raises a subclass with a message a user can act on; only ``cli.py`` turns it into
``bncheck: error: …`` and an exit code.
"""

from __future__ import annotations

import enum
import zipfile
from pathlib import Path


class ExitCode(enum.IntEnum):
    OK = 0
    FINDINGS = 1  # findings at or above --fail-on, or a fold whose verification failed
    ERROR = 2  # the run could not be done: bad input, bad option, missing file, unsafe file
    INTERRUPTED = 130


class BncheckError(Exception):
    """Base class: the run could not be done. Exit code 2."""

    exit_code: ExitCode = ExitCode.ERROR


class InputError(BncheckError):
    """A model, data or option the user gave is missing, malformed or inconsistent."""


class UnsafeInputError(BncheckError):
    """A file that could run code when loaded (pickle, TorchScript) and no --trust-pickle."""


class VerificationError(BncheckError):
    """A transformed model does not compute the same function as the original. Exit code 1."""

    exit_code = ExitCode.FINDINGS


# zipfile raises all of these on a malformed archive (a name flagged UTF-8 that is not, an
# unsupported version, truncated records), not only BadZipFile: loaders catch them together.
ZIP_ERRORS = (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError)


def zip_names(path: Path, head: bytes) -> list[str] | None:
    """The member names of the zip archive at ``path`` (whose first bytes are ``head``), None
    when it is no zip; InputError when it is a damaged one.

    ``zipfile.is_zipfile`` itself raises on some damaged end records (a zip64 locator that
    claims several disks): such a file counts as a zip, and opening it reports the damage.
    """
    if not head.startswith(b"PK\x03\x04"):
        try:
            if not zipfile.is_zipfile(path):
                return None
        except ZIP_ERRORS:
            pass
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except ZIP_ERRORS as exc:
        raise InputError(f"{path}: damaged zip archive ({exc})") from None


def first_line(exc: BaseException, limit: int = 300) -> str:
    """One line for an error message from a library's exception: its first line (the type's
    name when it has no text), cut at ``limit`` characters."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def one_line(exc: BaseException, limit: int = 1000) -> str:
    """Every line of a library's exception text on one line (whitespace collapsed; the type's
    name when it has no text). Libraries such as onnxruntime put the useful part after the
    first line ("Got invalid dimensions …" / "index: 1 Got: 4 Expected: 3"), so nothing is
    dropped; past ``limit`` characters the middle is cut, keeping the start (what failed) and
    the end (the figures)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"
