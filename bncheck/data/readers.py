"""File readers behind ``bncheck.data``: each turns one stored array into a *column*.

A column knows its sample count ``n``, its per-sample shape and source dtype, and yields the
raw rows for a list of ``(start, stop)`` bounds, in order, without reading the whole file:
``.npy`` through a memory map, ``.npz`` members through the zip stream, ``.pt`` through
``torch.load(weights_only=True, mmap=True)``, synthetic data from a seeded generator.
``bncheck.data`` converts, validates and batches what they yield.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bncheck.errors import InputError, first_line, zip_names
from bncheck.layers import TensorSpec


def fmt_shape(shape: Sequence[int | str | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


class Column(Protocol):
    n: int
    sample_shape: tuple[int, ...]
    dtype: np.dtype

    def batches(self, bounds: Sequence[tuple[int, int]]) -> Iterator[Any]: ...


def sniff_data(path: Path) -> str:
    """Say what a data path holds: ``npy``, ``npz``, ``pt``, ``images`` (a folder) or ``image``."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return "images"
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    names = zip_names(path, head)
    if names is not None:
        if any(n.endswith("data.pkl") for n in names):
            return "pt"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise InputError(f"{path}: a zip archive that is neither an .npz nor a torch.save file")
    if head[:1] == b"\x80":
        return "pt"  # legacy torch.save (a pickle stream); loaded weights-only
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff"):
        return "image"
    hint = f"not a {path.suffix} file: " if path.suffix else ""
    raise InputError(
        f"{path}: {hint}unrecognised data (expected .npy, .npz, .pt or a folder of images)"
    )


def load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "object" in str(exc).lower() or "pickle" in str(exc).lower():
            raise InputError(f"{path}: holds Python objects, not numbers; refused") from None
        raise InputError(f"{path}: damaged .npy file ({exc})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read .npy file ({exc})") from None


class ArrayColumn:
    """Rows of an array already in memory or memory-mapped."""

    def __init__(self, array: np.ndarray, path: Path) -> None:
        if array.ndim == 0:
            raise InputError(f"{path}: holds a single number, not a batch of samples")
        self.array = array
        self.n = int(array.shape[0])
        self.sample_shape = tuple(int(d) for d in array.shape[1:])
        self.dtype = array.dtype

    def batches(self, bounds: Sequence[tuple[int, int]]) -> Iterator[np.ndarray]:
        for start, stop in bounds:
            yield self.array[start:stop]


def _read_npy_header(fp: Any, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fp)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(fp)
    except ValueError as exc:
        if "object" in str(exc).lower() or "pickle" in str(exc).lower():
            raise InputError(f"{where}: holds Python objects, not numbers; refused") from None
        raise InputError(f"{where}: damaged array header ({exc})") from None
    raise InputError(f"{where}: npy format version {version} not supported")


def npz_members(path: Path) -> dict[str, str]:
    with zipfile.ZipFile(path) as zf:
        return {name[: -len(".npy")]: name for name in zf.namelist()}


class NpzColumn:
    """One .npz member, read batch by batch through the zip stream."""

    def __init__(self, path: Path, member: str) -> None:
        self.path, self.member = path, member
        where = f"{path} [{member}]"
        try:
            with zipfile.ZipFile(path) as zf, zf.open(member) as fp:
                shape, self.fortran, dtype = _read_npy_header(fp, where)
                header = fp.tell()
                size = zf.getinfo(member).file_size
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise InputError(f"{where}: damaged archive member ({exc})") from None
        if dtype.hasobject:
            raise InputError(f"{where}: holds Python objects, not numbers; refused")
        if len(shape) == 0:
            raise InputError(f"{where}: holds a single number, not a batch of samples")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if size - header != expected:
            raise InputError(
                f"{where}: header declares {shape} {dtype} ({expected} bytes) "
                f"but the member holds {size - header}"
            )
        self.n = int(shape[0])
        self.sample_shape = tuple(int(d) for d in shape[1:])
        self.dtype = dtype

    def batches(self, bounds: Sequence[tuple[int, int]]) -> Iterator[np.ndarray]:
        where = f"{self.path} [{self.member}]"
        row = int(np.prod(self.sample_shape, dtype=np.int64)) * self.dtype.itemsize
        try:
            with zipfile.ZipFile(self.path) as zf:
                if self.fortran:
                    # Column-major rows are scattered through the member: load it whole.
                    with zf.open(self.member) as fp:
                        whole = np.lib.format.read_array(fp, allow_pickle=False)
                    for start, stop in bounds:
                        yield whole[start:stop]
                    return
                with zf.open(self.member) as fp:
                    _read_npy_header(fp, where)
                    pos = 0
                    for start, stop in bounds:
                        if start != pos:
                            fp.read((start - pos) * row)
                        buf = fp.read((stop - start) * row)
                        if len(buf) != (stop - start) * row:
                            raise InputError(f"{where}: member ends early")
                        yield np.frombuffer(buf, dtype=self.dtype).reshape(
                            stop - start, *self.sample_shape
                        )
                        pos = stop
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise InputError(f"{where}: damaged archive member ({exc})") from None


def load_pt(path: Path) -> Any:
    import torch

    def load(mmap: bool) -> Any:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            obj = load(mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = load(mmap=False)  # legacy (non-zip) format: no mapping; still weights-only
    except pickle.UnpicklingError as exc:
        first = first_line(exc)
        raise InputError(
            f"{path}: not a plain tensor file; weights-only load refused: {first}"
        ) from None
    except Exception as exc:
        raise InputError(f"{path}: cannot be read as a torch tensor file ({exc})") from None
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        return dict(obj)
    raise InputError(
        f"{path}: holds a {type(obj).__name__}; expected a tensor or a dict name → tensor"
    )


class TorchColumn:
    """Rows of a (memory-mapped) torch tensor."""

    def __init__(self, path: Path, name: str, tensor: Any) -> None:
        import torch

        if tensor.layout != torch.strided or tensor.is_quantized:
            raise InputError(f"{path}: tensor {name!r} is sparse or quantized; save a dense one")
        if tensor.dim() == 0:
            raise InputError(f"{path}: tensor {name!r} is a single number, not a batch")
        self.tensor = tensor.detach()
        self.n = int(tensor.shape[0])
        self.sample_shape = tuple(int(d) for d in tensor.shape[1:])
        if tensor.dtype == torch.bfloat16:
            self.dtype = np.dtype(np.float32)
        elif tensor.is_complex():
            self.dtype = np.dtype(np.complex64)  # refused by the dtype check, with its name
        else:
            self.dtype = torch.empty(0, dtype=tensor.dtype).numpy().dtype

    def batches(self, bounds: Sequence[tuple[int, int]]) -> Iterator[np.ndarray]:
        import torch

        for start, stop in bounds:
            part = self.tensor[start:stop]
            if part.dtype == torch.bfloat16:
                part = part.float()
            yield part.numpy()


class SyntheticColumn:
    """Seeded samples: N(0, 1) for float inputs, integers 0..9 for int inputs, coin flips for bool.

    The generator is ``np.random.default_rng([seed, input_index])``, restarted on every pass,
    so two passes (or two runs with one seed) see identical arrays.
    """

    def __init__(self, spec: TensorSpec, dtype: np.dtype, n: int, seed: int, index: int) -> None:
        dynamic = [d for d in spec.shape[1:] if not isinstance(d, int)]
        if dynamic:
            raise InputError(
                f"model input {spec.name!r} has dynamic dims {fmt_shape(spec.shape)}: "
                "synthetic data needs a shape — give --input-shape"
            )
        self.n = n
        self.sample_shape = tuple(int(d) for d in spec.shape[1:])  # type: ignore[arg-type]
        self.dtype = dtype
        self.seed, self.index = seed, index

    def batches(self, bounds: Sequence[tuple[int, int]]) -> Iterator[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.index])
        for start, stop in bounds:
            shape = (stop - start, *self.sample_shape)
            if self.dtype.kind == "f":
                gen = np.float32 if self.dtype.itemsize <= 4 else np.float64
                yield rng.standard_normal(shape, dtype=gen).astype(self.dtype, copy=False)
            elif self.dtype.kind in "iu":
                yield rng.integers(0, 10, size=shape).astype(self.dtype)
            else:
                yield rng.random(shape) < 0.5
