"""Open a model file with the right backend, chosen by its bytes, never by its suffix alone."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from bncheck.backends.base import ModelHandle
from bncheck.errors import InputError, zip_names

__all__ = ["ModelHandle", "open_model", "sniff"]

TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".pt2", ".safetensors", ".ptl", ".jit", ".torchscript"}


def sniff(path: Path) -> str:
    """Say what a file is from its first bytes and, for zips, its member names.

    Returns one of ``onnx``, ``pt2``, ``torchscript``, ``torch_zip`` (``torch.save`` zip: a state
    dict or a pickled module, told apart only by a weights-only load), ``pickle`` (legacy
    ``torch.save`` or a raw pickle), ``safetensors``. Raises InputError for anything else.
    """
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a model file")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path}: empty file")
    with open(path, "rb") as f:
        head = f.read(16)
    names = zip_names(path, head)
    if names is not None:
        return _sniff_zip(path, names)
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        return "pickle"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and header_len > 0:
            return "safetensors"
    if _looks_like_onnx(head):
        return "onnx"
    suffix = path.suffix.lower()
    what = "an ONNX model" if suffix == ".onnx" else "a model file bncheck can read"
    raise InputError(f"{path}: not {what} (unrecognised content)")


def _sniff_zip(path: Path, names: list[str]) -> str:
    # torch.export writes <name>/archive_format holding "pt2"; TorchScript never does.
    if any(n == "archive_format" or n.endswith("/archive_format") for n in names):
        return "pt2"
    if any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "torch_zip"
    raise InputError(f"{path}: a zip archive that is not a PyTorch file")


def _looks_like_onnx(head: bytes) -> bool:
    # A ModelProto almost always starts with field 1 (ir_version, varint): tag byte 0x08.
    # Other serializers may order fields differently, so accept any plausible protobuf tag
    # of ModelProto's fields and let onnx decide.
    if not head:
        return False
    tag = head[0]
    field, wire = tag >> 3, tag & 7
    return 1 <= field <= 20 and wire in (0, 2)


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
    """Load ``path`` with the backend its bytes call for.

    ONNX files never import torch. ``input_shapes`` (input name, or ``""`` for the only input,
    → shape) fixes dynamic dims and gives PyTorch models an example input to trace with;
    ``dynamic_dims`` (same keys → axes) are kept dynamic in files written from a PyTorch model;
    ``checkpoint_key`` picks the state dict of a checkpoint holding several.
    """
    p = Path(path)
    kind = sniff(p)
    if kind == "onnx":
        from bncheck.backends.onnx import open_onnx

        if dynamic_dims:
            raise InputError(
                f"{p}: --dynamic-dims applies to PyTorch models; an ONNX model keeps the dims "
                "its file declares"
            )

        return open_onnx(p, input_shapes=input_shapes)
    if p.suffix.lower() == ".onnx":
        raise InputError(f"{p}: named .onnx but holds a {kind.replace('_', ' ')} file")
    from bncheck.backends.torch import open_torch

    return open_torch(
        p,
        kind=kind,
        arch=arch,
        arch_kwargs=arch_kwargs,
        trust_pickle=trust_pickle,
        input_shapes=input_shapes,
        dynamic_dims=dynamic_dims,
        checkpoint_key=checkpoint_key,
    )
