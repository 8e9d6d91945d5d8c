"""Sizes of ONNX tensors and models read without encoding their weights.

protobuf (upb) has no length accessor for a bytes field: reading ``raw_data`` copies it, and
``ByteSize`` encodes the whole message (seconds for a 500 MB model). What ``load`` checks and
``run`` decides by size is computed here from dims and types instead.
"""

from __future__ import annotations

import onnx
from google.protobuf.message import Message
from onnx import GraphProto, ModelProto, TensorProto

from bncheck.backends.onnx.graph import tensor_element_count

# Sub-byte types are packed: bits per element.
_PACKED_BITS = {
    getattr(TensorProto, n): bits
    for n, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(TensorProto, n)
}


def _element_bytes(t: TensorProto, n: int) -> int | None:
    """Bytes ``n`` elements of ``t``'s type take in raw_data; None when not fixed (strings)."""
    if t.data_type in _PACKED_BITS:
        return (n * _PACKED_BITS[t.data_type] + 7) // 8
    if t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return n * itemsize


def declared_bytes(t: TensorProto) -> int:
    """Bytes ``t``'s dims and type declare for its raw data (0 for strings), read without
    touching the data."""
    return _element_bytes(t, tensor_element_count(t)) or 0


# A top-level initializer above this many bytes reaches the checker as a one-element stub.
_STUB_ABOVE_BYTES = 4096
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data",
                 "uint64_data", "external_data")  # fmt: skip


def _copy_fields(src: Message, dst: Message, skip: str) -> None:
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def without_initializers(model: ModelProto) -> ModelProto:
    """A copy of ``model`` whose main graph has no initializers (each caller adds its own
    version of them: as they are, stubbed, bare of bytes, or as placeholders)."""
    out = ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    return out


def plain_raw(t: TensorProto) -> bool:
    """Whether ``t`` holds its values only as whole-byte elements in ``raw_data`` in the
    message: no typed fields, no segment, not external, not a packed sub-byte type. Such a
    tensor's size follows from its dims and type (touching ``raw_data`` would copy it)."""
    return not (
        t.data_type in _PACKED_BITS
        or not t.HasField("raw_data")
        or t.data_location != TensorProto.DEFAULT
        or t.HasField("segment")
        or any(len(getattr(t, f)) for f in _TYPED_FIELDS)
    )


def _stub_bytes(t: TensorProto) -> int | None:
    """Bytes of one element when ``t`` holds only raw data larger than the stub limit (read
    from its dims and type: touching ``raw_data`` would copy the whole buffer)."""
    if not plain_raw(t):
        return None
    itemsize = _element_bytes(t, 1)
    if not itemsize or itemsize * tensor_element_count(t) <= _STUB_ABOVE_BYTES:
        return None
    return itemsize


def bare_copy(model: ModelProto) -> tuple[ModelProto, dict[int, int]]:
    """A copy of ``model`` in which each large plain-raw top-level initializer keeps every
    field but its bytes; with those initializers' positions and element sizes.

    What needs the graph and not the weights reads this copy: the model's encoded size
    (:func:`declared_size`) and the checker (:func:`stub_in_place`). One copy serves both in
    ``load``, where the model is copied once."""
    view = without_initializers(model)
    bare: dict[int, int] = {}
    for i, t in enumerate(model.graph.initializer):
        itemsize = _stub_bytes(t)
        if itemsize is None:
            view.graph.initializer.append(t)
        else:
            _copy_all_but_raw(t, view.graph.initializer.add())
            bare[i] = itemsize
    return view, bare


def declared_size(view: ModelProto, bare: dict[int, int]) -> int:
    """Bytes of the model ``view`` was copied from (:func:`bare_copy`) when each bare tensor
    holds the bytes its dims and type declare, as protobuf encodes it.

    Each bare tensor is encoded without its bytes, and its ``raw_data`` field, the
    initializer's and the graph's length prefixes are added by arithmetic."""
    raw = TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
    init = GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
    graph = ModelProto.DESCRIPTOR.fields_by_name["graph"].number
    grow = 0
    for i in bare:
        t = view.graph.initializer[i]
        size = t.ByteSize()
        full = size + _field_bytes(raw, declared_bytes(t))
        grow += _field_bytes(init, full) - _field_bytes(init, size)
    g = view.graph.ByteSize()
    return view.ByteSize() - _field_bytes(graph, g) + _field_bytes(graph, g + grow)


def stub_in_place(view: ModelProto, bare: dict[int, int]) -> ModelProto:
    """``view`` (:func:`bare_copy`) for ``onnx.checker``: each bare tensor becomes a
    one-element tensor of the same name and type.

    The checker serializes the whole model (a full copy of every weight, plus onnx's size
    check: most of the time ``inspect`` took on a 100 MB model) but, of a plain raw-data
    tensor, only checks that its bytes match its dims — which loading has already checked for
    every tensor (``load._check_tensor``; for these, the file's size may stand in:
    :func:`sizes_as_declared`). Everything else it checks (nodes, names, types, opsets,
    functions, subgraphs) is kept."""
    for i, itemsize in bare.items():
        t = view.graph.initializer[i]
        t.ClearField("dims")
        t.dims.append(1)
        t.raw_data = bytes(itemsize)
    return view


def checker_view(model: ModelProto) -> ModelProto:
    """``model`` for ``onnx.checker`` (:func:`stub_in_place`)."""
    return stub_in_place(*bare_copy(model))


def serialized_size(model: ModelProto) -> int:
    """``model.ByteSize()`` without encoding every weight (protobuf's ByteSize serializes the
    whole message: seconds for a 500 MB model)."""
    return declared_size(*bare_copy(model))


def _vlen(n: int) -> int:
    """Bytes of ``n`` as a protobuf varint."""
    return max(1, (n.bit_length() + 6) // 7)


def _field_bytes(number: int, size: int) -> int:
    """Bytes of a length-delimited field: tag, length, payload."""
    return _vlen(number << 3) + _vlen(size) + size


def _copy_all_but_raw(src: TensorProto, dst: TensorProto) -> None:
    # ListFields would hand raw_data over as a copy of its bytes: ask field by field instead
    for fd in TensorProto.DESCRIPTOR.fields:
        if fd.name == "raw_data":
            continue
        if fd.is_repeated:
            if len(getattr(src, fd.name)):
                getattr(dst, fd.name).extend(getattr(src, fd.name))
        elif src.HasField(fd.name):
            if fd.message_type is not None:
                getattr(dst, fd.name).CopyFrom(getattr(src, fd.name))
            else:
                setattr(dst, fd.name, getattr(src, fd.name))


def sizes_as_declared(
    model: ModelProto, file_size: int, copy: tuple[ModelProto, dict[int, int]] | None = None
) -> bool:
    """Whether the large raw-data initializers of the main graph (those :func:`bare_copy`
    leaves bare) hold, together, exactly the bytes their dims and types declare: the model,
    encoded with each of them holding its declared bytes, is as long as the file it was read
    from. ``copy``: ``bare_copy(model)``, when the caller has it.

    Reading ``raw_data`` copies it (0.8 s for a 500 MB model), the tensors' sizes do not
    (:func:`declared_size`). A file encoded other than the way protobuf writes it (packed
    dims, say) does not match, and its tensors are then counted one by one. Equal totals from
    a tensor that stores more than it declares and one that stores less reach later readers,
    which refuse such a tensor (:meth:`GraphIndex.const`)."""
    view, bare = copy or bare_copy(model)
    if not bare:
        return False  # nothing to count (weights held in Constant nodes, say)
    return declared_size(view, bare) == file_size
