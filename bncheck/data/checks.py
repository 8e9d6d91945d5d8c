"""Does the data fit the model? Shapes, dtypes and batch sizes, checked before a batch runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bncheck.data.readers import fmt_shape
from bncheck.errors import InputError
from bncheck.layers import TensorSpec

_NUMERIC_KINDS = "biuf"


def apply_shapes(
    inputs: Sequence[TensorSpec], shapes: Mapping[str, Sequence[int]] | None
) -> list[TensorSpec]:
    specs = list(inputs)
    if not shapes:
        return specs
    out = []
    for spec in specs:
        given = shapes.get(spec.name, shapes.get("") if len(specs) == 1 else None)
        if given is None:
            out.append(spec)
            continue
        if len(given) != len(spec.shape):
            raise InputError(
                f"input shape {tuple(given)} for {spec.name!r} has rank {len(given)}; "
                f"the model input {fmt_shape(spec.shape)} has rank {len(spec.shape)}"
            )
        dims = [spec.shape[0]]
        for i, (want, have) in enumerate(zip(spec.shape[1:], given[1:], strict=True), start=1):
            if isinstance(want, int) and want != have:
                raise InputError(
                    f"input shape {tuple(given)} for {spec.name!r}: dim {i} is {have}, "
                    f"but the model fixes it to {want}"
                )
            dims.append(int(have))
        out.append(TensorSpec(spec.name, tuple(dims), spec.dtype))
    unknown = set(shapes) - {s.name for s in specs} - {""}
    if unknown:
        names = ", ".join(s.name for s in specs)
        raise InputError(f"input shape for unknown input {sorted(unknown)[0]!r} (inputs: {names})")
    return out


def target_dtype(spec: TensorSpec) -> np.dtype:
    if spec.dtype == "bfloat16":
        return np.dtype(np.float32)  # numpy has no bfloat16; the backend casts on the way in
    try:
        dt = np.dtype(spec.dtype)
    except TypeError:
        raise InputError(
            f"model input {spec.name!r} has dtype {spec.dtype}, which bncheck cannot feed"
        ) from None
    if dt.kind not in _NUMERIC_KINDS:
        raise InputError(f"model input {spec.name!r} has dtype {spec.dtype}, not a number type")
    return dt


def fixed_batch(
    specs: Sequence[TensorSpec], batch_size: int, drop_last: bool, notes: list[str]
) -> tuple[int, bool]:
    fixed = {s.name: s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)}
    if len(set(fixed.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in fixed.items())
        raise InputError(f"model inputs fix different batch sizes ({listed})")
    if not fixed:
        return batch_size, drop_last
    (size,) = set(fixed.values())
    if size < 1:
        raise InputError(f"model input {next(iter(fixed))!r} fixes its batch dim to {size}")
    if size != batch_size:
        notes.append(f"the model fixes the batch size to {size}: using batches of {size}")
    return size, True


# Where a model's input shape comes from, so a shape error says what to change.
SHAPE_FROM = " (the model's shape comes from its file, or from --input-shape where it is free)"


def check_shape(where: object, spec: TensorSpec, sample_shape: tuple[int, ...]) -> None:
    data_shape = ("N", *sample_shape)
    if len(spec.shape) == 0:
        raise InputError(f"model input {spec.name!r} is a scalar: bncheck feeds batches")
    if len(data_shape) != len(spec.shape):
        raise InputError(
            f"{where}: data for input {spec.name!r} has shape {fmt_shape(data_shape)} "
            f"(rank {len(data_shape)}), the model wants {fmt_shape(spec.shape)} "
            f"(rank {len(spec.shape)})"
        )
    for i, (want, have) in enumerate(zip(spec.shape[1:], sample_shape, strict=True), start=1):
        if isinstance(want, int) and want != have:
            raise InputError(
                f"{where}: data for input {spec.name!r} has shape {fmt_shape(data_shape)}, "
                f"the model wants {fmt_shape(spec.shape)}: dim {i} is {have}, not {want}"
            )


def check_dtype(
    where: object, name: str, source: np.dtype, target: np.dtype, notes: list[str]
) -> None:
    if source.hasobject:
        raise InputError(f"{where}: input {name!r} holds Python objects, not numbers")
    if source.kind not in _NUMERIC_KINDS:
        raise InputError(f"{where}: input {name!r} holds {source} values, not numbers")
    if target.kind in "iu" and source.kind == "f":
        raise InputError(
            f"{where}: input {name!r} holds {source} data; the model wants integers ({target})"
        )
    if target.kind == "b" and source.kind != "b":
        raise InputError(f"{where}: input {name!r} holds {source} data; the model wants bool")
    if source != target:
        notes.append(f"input {name!r}: {source} data converted to {target}")
