"""Load an ONNX file safely: validate sizes and every external-data reference before anything
reads or allocates it.

The rules (DESIGN.md, security): an external-data ``location`` must be a relative path that,
after resolving symlinks, lies inside the model's folder; the file must exist, be a regular
file with a single hard link (onnxruntime follows hard links that onnx refuses), and hold
``offset + length`` bytes. Declared tensor sizes are checked against a cap and against the
bytes actually stored, so a small file cannot make us allocate gigabytes (the large
initializers of the main graph are counted from the file's size when it matches:
``encoding.sizes_as_declared``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto

from bncheck.backends.onnx.encoding import (
    _element_bytes,
    bare_copy,
    checker_view,
    serialized_size,
    sizes_as_declared,
    stub_in_place,
)
from bncheck.backends.onnx.graph import (
    constant_tensor,
    iter_graphs,
    opset_version,
    tensor_element_count,
)
from bncheck.errors import InputError, first_line

__all__ = [
    "MAX_ELEMENTS",
    "MAX_PROTO_BYTES",
    "checker_view",
    "iter_tensors",
    "load_model",
    "serialized_size",
]

#: Largest element count bncheck accepts for one declared tensor (or ConstantOfShape output).
MAX_ELEMENTS = 2**31
#: protobuf cannot serialize or parse a message at or above 2 GiB.
MAX_PROTO_BYTES = 2**31 - 1


def _attr_tensors(attrs: Iterator[AttributeProto] | list[AttributeProto]) -> Iterator[TensorProto]:
    for a in attrs:
        if a.type == AttributeProto.TENSOR:
            yield a.t
        elif a.type == AttributeProto.TENSORS:
            yield from a.tensors
        elif a.type == AttributeProto.SPARSE_TENSOR:
            yield a.sparse_tensor.values
            yield a.sparse_tensor.indices
        elif a.type == AttributeProto.SPARSE_TENSORS:
            for s in a.sparse_tensors:
                yield s.values
                yield s.indices


def _graph_tensors(graph: GraphProto) -> Iterator[TensorProto]:
    for g in iter_graphs(graph):
        yield from g.initializer
        for s in g.sparse_initializer:
            yield s.values
            yield s.indices
        for node in g.node:
            yield from _attr_tensors(node.attribute)


def iter_tensors(model: ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto in the model: initializers (dense and sparse), node attributes
    (``Constant`` values included), in the main graph, subgraphs and local functions."""
    yield from _graph_tensors(model.graph)
    for f in model.functions:
        for node in f.node:
            yield from _attr_tensors(node.attribute)
            for a in node.attribute:
                if a.type == AttributeProto.GRAPH:
                    yield from _graph_tensors(a.g)
                elif a.type == AttributeProto.GRAPHS:
                    for g in a.graphs:
                        yield from _graph_tensors(g)


def _external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _is_absolute(loc: str) -> bool:
    return (
        PurePosixPath(loc).is_absolute()
        or PureWindowsPath(loc).is_absolute()
        or bool(PureWindowsPath(loc).drive)
        or loc.startswith(("/", "\\"))
    )


class _ExternalFiles:
    """Opens each external data file once, after checking where it lies and what it is."""

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        self.base = model_path.parent
        self.base_resolved = self.base.resolve()
        self._open: dict[str, tuple[int, int]] = {}  # location -> (fd, size)

    def check(self, loc: str, tensor: str) -> tuple[int, int]:
        """Validate ``loc`` and return (fd, file size); fds are closed by ``close``."""
        if loc in self._open:
            return self._open[loc]
        outside = InputError(
            f"{self.model_path}: external data '{loc}' of tensor '{tensor}' points outside "
            "the model's folder"
        )
        if not loc or "\x00" in loc:
            raise InputError(
                f"{self.model_path}: tensor '{tensor}' has an empty or invalid external data "
                "location"
            )
        if _is_absolute(loc) or ".." in PureWindowsPath(loc).parts:
            raise outside
        candidate = self.base / loc
        resolved = candidate.resolve()
        if not resolved.is_relative_to(self.base_resolved) or resolved == self.base_resolved:
            raise outside
        if not resolved.exists():
            raise InputError(
                f"{self.model_path}: missing external data file '{loc}' (tensor '{tensor}')"
            )
        try:
            # O_NOFOLLOW: the resolved path has no links left; refuse one swapped in since.
            flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
            fd = os.open(resolved, flags)
        except OSError as exc:
            raise InputError(
                f"{self.model_path}: cannot open external data file '{loc}': {exc.strerror}"
            ) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise InputError(f"{self.model_path}: external data '{loc}' is not a regular file")
        if st.st_nlink > 1:
            os.close(fd)
            raise InputError(
                f"{self.model_path}: external data file '{loc}' has {st.st_nlink} hard links; "
                "bncheck refuses hard-linked data files (they can expose files elsewhere)"
            )
        self._open[loc] = (fd, st.st_size)
        return self._open[loc]

    def close(self) -> None:
        for fd, _ in self._open.values():
            os.close(fd)
        self._open.clear()


def _check_tensor(
    t: TensorProto, path: Path, files: _ExternalFiles, *, counted: bool = False
) -> None:
    """Declared size sane, stored bytes consistent, external reference safe (no reads).
    ``counted``: its raw bytes were found to match its dims by :func:`sizes_as_declared`."""
    name = t.name or "<unnamed>"
    n = 1
    for d in t.dims:
        if d < 0:
            raise InputError(f"{path}: tensor '{name}' declares a negative dimension ({d})")
        n *= int(d)
        if n > MAX_ELEMENTS:
            dims = "x".join(str(int(x)) for x in t.dims)
            raise InputError(
                f"{path}: tensor '{name}' declares {dims} elements, more than bncheck accepts "
                f"({MAX_ELEMENTS})"
            )
    expected = _element_bytes(t, n)
    if t.data_location == TensorProto.EXTERNAL:
        info = _external_info(t)
        loc = info.get("location", "")
        _, size = files.check(loc, name)
        try:
            offset = int(info.get("offset", "0") or 0)
            length = int(info["length"]) if info.get("length") else None
        except ValueError:
            raise InputError(
                f"{path}: tensor '{name}' has a malformed external data offset/length"
            ) from None
        if offset < 0 or (length is not None and length < 0):
            raise InputError(f"{path}: tensor '{name}' has a negative external data offset/length")
        available = size - offset
        stored = length if length is not None else available
        if offset > size or stored > available:
            raise InputError(
                f"{path}: external data of tensor '{name}' (offset {offset}, length {stored}) "
                f"lies past the end of '{loc}' ({size} bytes)"
            )
        if expected is not None and stored != expected:
            raise InputError(
                f"{path}: tensor '{name}' declares {expected} bytes but its external data "
                f"holds {stored}"
            )
    elif expected is not None and t.HasField("raw_data") and not counted:
        got = len(t.raw_data)  # a copy of the bytes: upb has no length accessor
        if got != expected:
            raise InputError(f"{path}: tensor '{name}' declares {expected} bytes but stores {got}")


def _read_external(t: TensorProto, files: _ExternalFiles) -> None:
    info = _external_info(t)
    fd, size = files.check(info["location"], t.name)
    offset = int(info.get("offset", "0") or 0)
    length = int(info["length"]) if info.get("length") else size - offset
    data = _read_at(fd, offset, length)
    if len(data) != length:  # the file shrank since it was checked
        raise InputError(f"{files.model_path}: external data '{info['location']}' was truncated")
    t.raw_data = data
    t.data_location = TensorProto.DEFAULT
    del t.external_data[:]


def _read_at(fd: int, offset: int, length: int) -> bytes:
    # One read returns at most ~2 GiB on Linux: loop until done or end of file.
    chunks, left, pos = [], length, offset
    while left:
        if hasattr(os, "pread"):
            b = os.pread(fd, min(left, 1 << 30), pos)
        else:
            os.lseek(fd, pos, os.SEEK_SET)
            b = os.read(fd, min(left, 1 << 30))
        if not b:
            break
        chunks.append(b)
        left -= len(b)
        pos += len(b)
    return b"".join(chunks)


def _check_constant_of_shape(model: ModelProto, path: Path) -> None:
    """Refuse a ConstantOfShape whose constant shape asks for more than MAX_ELEMENTS."""
    import numpy as np
    from onnx import numpy_helper

    for g in iter_graphs(model.graph):
        consts = {t.name: t for t in g.initializer}
        for node in g.node:
            t = constant_tensor(node) if node.op_type == "Constant" and node.output else None
            if t is not None:
                consts[node.output[0]] = t
        for node in g.node:
            if node.op_type != "ConstantOfShape" or not node.input:
                continue
            t = consts.get(node.input[0])
            if t is None or tensor_element_count(t) > 64:
                continue
            shape = numpy_helper.to_array(t).astype(np.int64).ravel().tolist()
            n = 1
            for d in shape:
                n *= max(int(d), 0)
            if n > MAX_ELEMENTS:
                raise InputError(
                    f"{path}: ConstantOfShape '{node.name or node.output[0]}' asks for "
                    f"{'x'.join(map(str, shape))} elements, more than bncheck accepts "
                    f"({MAX_ELEMENTS})"
                )


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def load_model(path: Path) -> tuple[ModelProto, bool]:
    """Parse, validate and fully load the ONNX model at ``path``.

    Returns the model (external data read into ``raw_data``) and whether it had external
    data. Every problem a user's file can have raises InputError naming ``path``.
    """
    from google.protobuf.message import DecodeError

    before = _stat(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as exc:
        raise InputError(f"{path}: not a valid ONNX model ({first_line(exc)})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # protobuf/onnx raise assorted types for malformed bytes
        raise InputError(f"{path}: not a valid ONNX model ({first_line(exc)})") from None

    if not model.HasField("graph"):
        raise InputError(f"{path}: ONNX model has no graph")
    if len(model.graph.node) == 0:
        raise InputError(f"{path}: ONNX graph has no nodes")
    if model.ir_version > onnx.IR_VERSION:
        raise InputError(
            f"{path}: ONNX IR version {model.ir_version} is newer than this onnx supports "
            f"({onnx.IR_VERSION}); upgrade onnx and onnxruntime"
        )
    opset = opset_version(model)
    known = onnx.defs.onnx_opset_version()
    if opset is not None and opset > known:
        raise InputError(
            f"{path}: uses opset {opset}, newer than the {known} this onnx knows; "
            "upgrade onnx and onnxruntime"
        )

    # The file read is the file stat'ed (same size and time before and after the read).
    read = before if before is not None and before == _stat(path) else None
    copy = bare_copy(model)  # the graph without its large weights' bytes: counted, checked
    counted = read is not None and sizes_as_declared(model, read[0], copy)
    files = _ExternalFiles(path)
    try:
        tensors = list(iter_tensors(model))
        for i, t in enumerate(tensors):  # iter_tensors yields the top-level initializers first
            _check_tensor(t, path, files, counted=counted and i in copy[1])
        external = [t for t in tensors if t.data_location == TensorProto.EXTERNAL]
        for t in external:
            _read_external(t, files)
    finally:
        files.close()

    _check_constant_of_shape(model, path)

    try:
        # external tensors were copied as references: read now, they are stubbed as well
        view = checker_view(model) if external else stub_in_place(*copy)
        if view.ByteSize() < MAX_PROTO_BYTES:
            onnx.checker.check_model(view)
        else:  # a graph too large to serialize in memory: let the checker read the file
            onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        raise InputError(f"{path}: invalid ONNX model ({first_line(exc)})") from None
    return model, bool(external)
