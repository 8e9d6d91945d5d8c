"""Calibration / evaluation data → an iterator of ``{input_name: np.ndarray}`` batches.

``open_data`` identifies the file by its bytes (suffix only names it in messages), validates it
against the model's inputs, and returns a re-iterable ``DataSource``. Nothing reads the whole
file at once:

* ``.npy`` — ``np.load(mmap_mode="r", allow_pickle=False)``; each batch is copied out of the map.
* ``.npz`` — one array per model input, matched by name (a single array feeds a single-input
  model). Zip members cannot be memory-mapped, so each member is *streamed*: its npy header is
  parsed and the batches are read sequentially through ``zipfile`` (stored or deflated alike);
  a Fortran-ordered member cannot be read row by row and is loaded whole (``allow_pickle=False``).
* ``.pt`` — ``torch.load(weights_only=True, mmap=True)``: a tensor, or a dict name → tensor
  (legacy non-zip files cannot be mapped and are loaded whole, still weights-only).
* a folder of images (or one PNG / JPEG) — see ``bncheck.images``; needs Pillow.
* ``synthetic=True`` — seeded standard-normal input of the model's input shape.

Each batch is C-contiguous, in the model input's dtype, and checked for NaN / Inf as it streams.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bncheck.errors import InputError
from bncheck.images import ImageColumn, ImageOptions, list_images
from bncheck.layers import TensorSpec
from bncheck.readers import (
    ArrayColumn,
    Column,
    NpzColumn,
    SyntheticColumn,
    TorchColumn,
    fmt_shape,
    load_npy,
    load_pt,
    npz_members,
    sniff_data,
)

__all__ = ["DataSource", "ImageOptions", "open_data", "sniff_data"]

_NUMERIC_KINDS = "biuf"


class DataSource:
    """Re-iterable batches of model input; every pass yields the same batches in the same order.

    ``num_samples`` / ``num_batches`` count what iteration yields (after ``max_samples``,
    ``max_batches`` and ``drop_last``); ``min_batch`` is the smallest batch (the last one), so a
    caller whose statistics need ≥ 2 samples per batch can refuse a batch of one.
    """

    def __init__(
        self,
        *,
        path: Path | None,
        format: str,
        columns: Mapping[str, Column],
        targets: Mapping[str, np.dtype],
        bounds: Sequence[tuple[int, int]],
        batch_size: int,
        drop_last: bool,
        synthetic: bool,
        description: str,
        notes: Sequence[str] = (),
    ) -> None:
        self.path = path
        self.format = format
        self.columns = dict(columns)
        self.targets = dict(targets)
        self.bounds = list(bounds)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.synthetic = synthetic
        self.description = description
        self.notes = tuple(notes)

    @property
    def num_samples(self) -> int:
        return self.bounds[-1][1]

    @property
    def num_batches(self) -> int:
        return len(self.bounds)

    @property
    def min_batch(self) -> int:
        return min(stop - start for start, stop in self.bounds)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        gens = {name: col.batches(self.bounds) for name, col in self.columns.items()}
        try:
            for index, (start, stop) in enumerate(self.bounds):
                yield {
                    name: self._convert(name, next(gen), index, start, stop)
                    for name, gen in gens.items()
                }
        finally:
            for gen in gens.values():
                gen.close()

    def first_batch(self) -> dict[str, np.ndarray]:
        """The first batch only (for benchmarking or verification), closing the file after."""
        it = iter(self)
        try:
            return next(it)
        finally:
            it.close()  # type: ignore[attr-defined]

    def _convert(self, name: str, raw: Any, index: int, start: int, stop: int) -> np.ndarray:
        target = self.targets[name]
        where = self.path if self.path is not None else "synthetic data"
        # np.array copies: a batch never aliases the memory map or the file buffer.
        raw = np.asarray(raw)
        if target.kind in "iu" and raw.dtype.kind in "iu" and raw.size:
            info = np.iinfo(target)
            lo, hi = raw.min(), raw.max()
            if lo < info.min or hi > info.max:
                raise InputError(
                    f"{where}: input {name!r} samples {start}..{stop - 1} (batch {index}) hold "
                    f"values {lo}..{hi}, outside the model's {target.name}"
                )
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught just below
            arr = np.array(raw, dtype=target, order="C")
        if target.kind == "f":
            finite = np.isfinite(arr)
            if not finite.all():
                bad = np.flatnonzero(~finite.reshape(len(arr), -1).all(axis=1))
                raise InputError(
                    f"{where}: input {name!r} has NaN or Inf in samples {start}..{stop - 1} "
                    f"(batch {index}), first at sample {start + int(bad[0])}"
                )
        return arr


def open_data(
    path: str | os.PathLike[str] | None,
    *,
    inputs: Sequence[TensorSpec],
    batch_size: int = 32,
    max_batches: int | None = None,
    max_samples: int | None = None,
    drop_last: bool = False,
    synthetic: bool = False,
    seed: int = 0,
    image_options: ImageOptions | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> DataSource:
    """Open calibration / evaluation data for a model whose inputs are ``inputs``.

    ``input_shapes`` (input name, or ``""`` for the only input → full shape) fixes dynamic dims;
    its batch dim is ignored: batches hold ``batch_size`` samples. A model input whose batch dim
    is a fixed int gets batches of exactly that size (``drop_last`` forced), since it cannot run
    any other. Synthetic data holds ``max_samples``, else ``max_batches × batch_size``, else one
    batch. Raises InputError, naming the file, for anything the model could not consume.
    """
    if not inputs:
        raise InputError("the model has no inputs to feed data to")
    for opt, value in (
        ("batch size", batch_size),
        ("max batches", max_batches),
        ("max samples", max_samples),
    ):
        if value is not None and value < 1:
            raise InputError(f"{opt} must be at least 1, not {value}")
    specs = _apply_shapes(inputs, input_shapes)
    targets = {s.name: _target_dtype(s) for s in specs}
    notes: list[str] = []
    batch_size, drop_last = _fixed_batch(specs, batch_size, drop_last, notes)

    if synthetic:
        if path is not None:
            raise InputError("give either a data file or synthetic data, not both")
        n = max_samples or (max_batches * batch_size if max_batches else batch_size)
        columns: dict[str, Column] = {
            s.name: SyntheticColumn(s, targets[s.name], n, seed, i) for i, s in enumerate(specs)
        }
        p, fmt = None, "synthetic"
    else:
        if path is None:
            raise InputError("no data given: pass a data file (--data) or ask for synthetic data")
        p = Path(path)
        fmt = sniff_data(p)
        columns = _open_columns(p, fmt, specs, image_options, notes)

    counts = {name: col.n for name, col in columns.items()}
    where = p if p is not None else "synthetic data"
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise InputError(f"{where}: inputs have different sample counts ({listed})")
    total = next(iter(counts.values()))
    if total == 0:
        raise InputError(f"{where}: holds no samples")
    for spec in specs:
        col = columns[spec.name]
        _check_dtype(where, spec.name, col.dtype, targets[spec.name], notes)
        _check_shape(where, spec, col.sample_shape)

    n = total
    if max_samples is not None:
        n = min(n, max_samples)
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    if drop_last:
        n -= n % batch_size
        if n == 0:
            raise InputError(f"{where}: {total} samples, fewer than one full batch of {batch_size}")
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]

    shapes = "; ".join(
        f"{name} {columns[name].sample_shape} {targets[name].name}" for name in columns
    )
    if synthetic:
        desc = (
            f"synthetic N(0, 1) input (seed {seed}), {n} samples of {shapes}, batches of "
            f"{batch_size}: figures computed on it say little about real data"
        )
    else:
        desc = f"{p.name}: {n} of {total} samples of {shapes}, batches of {batch_size}"  # type: ignore[union-attr]
    return DataSource(
        path=p,
        format=fmt,
        columns=columns,
        targets=targets,
        bounds=bounds,
        batch_size=batch_size,
        drop_last=drop_last,
        synthetic=synthetic,
        description=desc,
        notes=notes,
    )


def _apply_shapes(
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


def _target_dtype(spec: TensorSpec) -> np.dtype:
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


def _fixed_batch(
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
_SHAPE_FROM = " (the model's shape comes from its file, or from --input-shape where it is free)"


def _check_shape(where: object, spec: TensorSpec, sample_shape: tuple[int, ...]) -> None:
    data_shape = ("N", *sample_shape)
    if len(spec.shape) == 0:
        raise InputError(f"model input {spec.name!r} is a scalar: bncheck feeds batches")
    if len(data_shape) != len(spec.shape):
        raise InputError(
            f"{where}: data for input {spec.name!r} has shape {fmt_shape(data_shape)} "
            f"(rank {len(data_shape)}), the model wants {fmt_shape(spec.shape)} "
            f"(rank {len(spec.shape)}){_SHAPE_FROM}"
        )
    for i, (want, have) in enumerate(zip(spec.shape[1:], sample_shape, strict=True), start=1):
        if isinstance(want, int) and want != have:
            raise InputError(
                f"{where}: data for input {spec.name!r} has shape {fmt_shape(data_shape)}, "
                f"the model wants {fmt_shape(spec.shape)}: dim {i} is {have}, not {want}"
                f"{_SHAPE_FROM}"
            )


def _check_dtype(
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


def _open_columns(
    path: Path,
    fmt: str,
    specs: Sequence[TensorSpec],
    image_options: ImageOptions | None,
    notes: list[str],
) -> dict[str, Column]:
    names = [s.name for s in specs]
    if fmt in ("images", "image"):
        if len(specs) != 1:
            raise InputError(
                f"{path}: images feed a single-input model; this one has {len(specs)} inputs "
                f"({', '.join(names)}): use an .npz with one array per input"
            )
        files = list_images(path) if fmt == "images" else [path]
        if not files:
            raise InputError(f"{path}: no PNG or JPEG images in this folder")
        opts = image_options or ImageOptions()
        return {names[0]: ImageColumn(files, opts, specs[0].shape, names[0])}
    if fmt == "npy":
        if len(specs) != 1:
            raise InputError(
                f"{path}: a .npy holds one array but the model has {len(specs)} inputs "
                f"({', '.join(names)}): use an .npz with one array per input name"
            )
        return {names[0]: ArrayColumn(load_npy(path), path)}
    if fmt == "npz":
        members = npz_members(path)
        chosen = _match_names(path, members, names, notes)
        return {name: NpzColumn(path, member) for name, member in chosen.items()}
    tensors = load_pt(path)
    if not isinstance(tensors, dict):
        if len(specs) != 1:
            raise InputError(
                f"{path}: holds one tensor but the model has {len(specs)} inputs "
                f"({', '.join(names)}): save a dict name → tensor"
            )
        tensors = {names[0]: tensors}
    chosen = _match_names(path, tensors, names, notes)
    return {name: TorchColumn(path, name, t) for name, t in chosen.items()}


def _match_names(path: Path, have: Mapping[str, Any], names: list[str], notes: list[str]) -> dict:
    if all(n in have for n in names):
        extra = sorted(set(have) - set(names))
        if extra:
            notes.append(f"{path.name}: arrays not used by the model: {', '.join(extra)}")
        return {n: have[n] for n in names}
    if len(have) == 1 and len(names) == 1:
        return {names[0]: next(iter(have.values()))}
    missing = next(n for n in names if n not in have)
    return _raise(
        f"{path}: no array named {missing!r} for the model input; "
        f"it holds: {', '.join(sorted(have)) or 'nothing'}"
    )


def _raise(message: str) -> Any:
    raise InputError(message)


def sample_shapes(
    path: str | os.PathLike[str],
    names: Sequence[str],
    *,
    image_options: ImageOptions | None = None,
) -> dict[str, tuple[int, ...]]:
    """The per-sample shape (batch dim excluded) the data at ``path`` holds for each of the
    model inputs ``names``, read from headers (images: the first one decoded), for a model
    that has no input shape of its own yet. Raises InputError as :func:`open_data` does."""
    p = Path(path)
    specs = [TensorSpec(name, (), "float32") for name in names]
    columns = _open_columns(p, sniff_data(p), specs, image_options, [])
    return {name: tuple(col.sample_shape) for name, col in columns.items()}
