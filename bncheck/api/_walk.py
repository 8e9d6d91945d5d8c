"""Which files a run over several paths inspects: files as given, folders walked for models.

A folder's model files come in the order of their sorted paths (stable across machines and
runs). A file found there counts
as a model when its suffix says so (``.onnx``, ``.pt2``, ``.pt``, ``.pth``, ``.safetensors``: a
damaged one is reported, not hidden) or when its bytes do (a PyTorch zip, a safetensors header,
a protobuf whose top-level fields are exactly those of an ONNX ModelProto). README files, data
files (``.npy``, ``.npz``, ``.csv``) and ONNX external-data files are none of these.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from bncheck.backends import sniff
from bncheck.errors import BncheckError

MODEL_SUFFIXES = {".onnx", ".pt2", ".pt", ".pth", ".safetensors"}
# Folders a walk never enters, besides hidden ones (.git, .venv, ...): caches and installs.
SKIP_DIRS = {"__pycache__", "node_modules", "venv", "site-packages"}

# ONNX ModelProto's top-level fields by wire type (onnx.proto3): varint 1 ir_version,
# 5 model_version; length-delimited 2-4 producer/domain, 6 doc_string, 7 graph, 8 opset_import,
# 14 metadata_props, 20 training_info, 21 functions, 25 configuration.
_VARINT_FIELDS = {1, 5}
_LEN_FIELDS = {2, 3, 4, 6, 7, 8, 14, 20, 21, 25}
_MAX_TOP_FIELDS = 100_000  # a real model has tens; a crafted file must not keep us walking


@dataclass(frozen=True)
class Target:
    """One file a run looks at. ``explicit``: named on the command line (a demand, so a state
    dict without an architecture is an error), else found in a folder (skipped with a note)."""

    path: Path
    explicit: bool


def glob_match(rel: str, pattern: str) -> bool:
    """Whether the relative posix path ``rel`` matches a config glob.

    A pattern without ``/`` matches any one component (``*.pt``, ``legacy``); one with ``/``
    matches the whole path from the config's folder (``*`` crosses ``/``, as in ruff's globs),
    or a folder above it (``models/old`` matches ``models/old/a.onnx``).
    """
    pat = pattern.strip().rstrip("/")
    while pat.startswith("./"):
        pat = pat[2:]
    if not pat:
        return False
    if "/" not in pat:
        return any(fnmatchcase(part, pat) for part in rel.split("/"))
    candidates = [pat, pat[3:]] if pat.startswith("**/") else [pat]
    return any(fnmatchcase(rel, p) or fnmatchcase(rel, p + "/*") for p in candidates)


def relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as a posix string; the absolute path when outside it."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(Path(os.path.abspath(root))).as_posix()
    except ValueError:
        return absolute.as_posix()


def expand(
    paths: Sequence[str | os.PathLike[str]],
    *,
    root: Path,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> tuple[list[Target], list[Path]]:
    """The files to inspect for ``paths``, in order, each once; and the paths ``exclude`` left out.

    Files named in ``paths`` are kept whatever their content (bncheck reports what they are);
    ``exclude`` applies to them too, so a pre-commit hook honours it. ``include``, when given,
    keeps only the files found in folders that match one of its globs.
    """
    targets: list[Target] = []
    excluded: list[Path] = []
    seen: set[str] = set()

    def add(p: Path, explicit: bool) -> None:
        key = os.path.normcase(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            targets.append(Target(p, explicit))

    for raw in paths:
        p = Path(raw)
        if any(glob_match(relative(p, root), g) for g in exclude):
            excluded.append(p)
        elif p.is_dir():
            for found in sorted(_walk(p, root, exclude), key=lambda q: q.parts):
                if not include or any(glob_match(relative(found, root), g) for g in include):
                    add(found, explicit=False)
        else:
            add(p, explicit=True)  # missing or odd files are reported when opened
    return targets, excluded


def _walk(folder: Path, root: Path, exclude: Sequence[str]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):  # links to folders are not followed
        here = Path(dirpath)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".")
            and d not in SKIP_DIRS
            and not any(glob_match(relative(here / d, root), g) for g in exclude)
        )
        for name in sorted(filenames):
            p = here / name
            if any(glob_match(relative(p, root), g) for g in exclude):
                continue
            if is_model_file(p):
                yield p


def is_model_file(path: Path) -> bool:
    """Whether a file found in a folder is a model bncheck should look at (see module doc)."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # never open a fifo or a device
            return False
    except OSError:
        return False
    if path.suffix.lower() in MODEL_SUFFIXES:
        return True
    try:
        kind = sniff(path)
    except (BncheckError, OSError):
        return False
    if kind in ("pt2", "torchscript", "torch_zip", "safetensors"):
        return True
    if kind == "onnx":
        return is_onnx_protobuf(path)
    return False  # a bare pickle without a model suffix: data, not a model


def is_onnx_protobuf(path: Path) -> bool:
    """Whether the file's top-level protobuf fields are exactly ModelProto's and fill the file
    to the byte, with a graph among them. Reads only the tags and lengths, not the payloads."""
    size = path.stat().st_size
    has_graph = False
    with open(path, "rb") as f:
        pos = 0
        for _ in range(_MAX_TOP_FIELDS):
            if pos == size:
                return has_graph
            tag = _varint(f)
            if tag is None:
                return False
            field, wire = tag >> 3, tag & 7
            value = _varint(f)
            if value is None:
                return False
            if wire == 0 and field in _VARINT_FIELDS:
                pass
            elif wire == 2 and field in _LEN_FIELDS:
                has_graph |= field == 7
                f.seek(value, os.SEEK_CUR)
            else:
                return False
            pos = f.tell()
            if pos > size:
                return False
    return False


def _varint(f) -> int | None:
    out = 0
    for shift in range(0, 70, 7):
        b = f.read(1)
        if not b:
            return None
        out |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return out
    return None


def first_match(rel: str, table: dict[str, str] | Iterable[tuple[str, str]]) -> str | None:
    """The value of the first ``glob → value`` entry whose glob matches ``rel``."""
    items = table.items() if isinstance(table, dict) else table
    return next((v for g, v in items if glob_match(rel, g)), None)
