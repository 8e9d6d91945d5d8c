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
* a folder of images (or one PNG / JPEG) — see ``bncheck.data.images``; needs Pillow.
* ``synthetic=True`` — seeded standard-normal input of the model's input shape.

Each batch is C-contiguous, in the model input's dtype, and checked for NaN / Inf as it streams.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bncheck.data.checks import (
    SHAPE_FROM,
    apply_shapes,
    check_dtype,
    check_shape,
    fixed_batch,
    target_dtype,
)
from bncheck.data.images import ImageColumn, ImageOptions, list_images
from bncheck.data.readers import (
    ArrayColumn,
    Column,
    NpzColumn,
    SyntheticColumn,
    TorchColumn,
    load_npy,
    load_pt,
    npz_members,
    sniff_data,
)
from bncheck.data.spec import DataSpec
from bncheck.errors import InputError
from bncheck.layers import TensorSpec
from bncheck.wording import plural

__all__ = ["DataSource", "DataSpec", "ImageOptions", "open_data", "sample_shapes", "sniff_data"]

# The command-line options that only mean something for images.
IMAGE_OPTIONS = frozenset(
    {"--resize", "--crop", "--mean", "--std", "--scale", "--channel-order", "--layout"}
)


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

    @property
    def where(self) -> str:
        """How messages name this data."""
        return str(self.path) if self.path is not None else "synthetic data"

    @property
    def sized(self) -> bool:
        """Whether the sample count is known without a pass (always, for files)."""
        return True

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
        where = self.where
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
    path: str | os.PathLike[str] | DataSpec | None,
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
    batch. ``path`` may be a :class:`DataSpec` (image options, a data hook, a sample cap), whose
    image options replace ``image_options``. Raises InputError, naming the file, for anything
    the model could not consume.
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
    spec = path if isinstance(path, DataSpec) else None if path is None else DataSpec(path)
    if spec is not None:
        image_options = spec.images or image_options
        if spec.max_samples is not None:
            max_samples = min(max_samples or spec.max_samples, spec.max_samples)
    specs = apply_shapes(inputs, input_shapes)
    targets = {s.name: target_dtype(s) for s in specs}
    notes: list[str] = []
    batch_size, drop_last = fixed_batch(specs, batch_size, drop_last, notes)

    if synthetic:
        if path is not None:
            raise InputError("give either a data file or synthetic data, not both")
        n = max_samples or (max_batches * batch_size if max_batches else batch_size)
        columns: dict[str, Column] = {
            s.name: SyntheticColumn(s, targets[s.name], n, seed, i) for i, s in enumerate(specs)
        }
        p, fmt = None, "synthetic"
    else:
        if spec is None:
            raise InputError("no data given: pass a data file (--data) or ask for synthetic data")
        from bncheck.data.hook import hook_target, open_hook

        hook = hook_target(spec)
        if hook is not None:
            return open_hook(spec, hook, specs, targets, batch_size, drop_last, notes,
                              max_samples, max_batches)  # fmt: skip
        if spec.kwargs:
            raise InputError(f"{spec}: --data-kwargs is for a data hook (--data pkg.module:fn)")
        p = Path(spec.source)
        fmt = sniff_data(p)
        given = sorted(spec.explicit & IMAGE_OPTIONS)
        if given and fmt not in ("images", "image"):
            raise InputError(
                f"{p}: {', '.join(given)} preprocess images; this is a .{fmt} file of arrays"
            )
        columns = _open_columns(p, fmt, specs, image_options, notes)

    counts = {name: col.n for name, col in columns.items()}
    where = p if p is not None else "synthetic data"
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise InputError(f"{where}: inputs have different sample counts ({listed})")
    total = next(iter(counts.values()))
    if total == 0:
        raise InputError(f"{where}: holds no samples")
    for s in specs:
        col = columns[s.name]
        check_dtype(where, s.name, col.dtype, targets[s.name], notes)
        try:
            check_shape(where, s, col.sample_shape)
        except InputError as exc:
            if isinstance(col, ImageColumn):
                raise InputError(f"{exc}: {col.hint()}") from None
            raise InputError(f"{exc}{SHAPE_FROM}") from None

    n = total
    if max_samples is not None:
        n = min(n, max_samples)
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    if drop_last:
        n -= n % batch_size
        if n == 0:
            raise InputError(
                f"{where}: {plural(total, 'sample')}, fewer than one full batch of {batch_size}"
            )
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]

    shapes = "; ".join(
        f"{name} {columns[name].sample_shape} {targets[name].name}" for name in columns
    )
    if synthetic:
        desc = (
            f"synthetic N(0, 1) input (seed {seed}), {plural(n, 'sample')} of {shapes}, batches of "
            f"{batch_size}: figures computed on it say little about real data"
        )
    else:
        desc = f"{p.name}: {n} of {plural(total, 'sample')} of {shapes}, batches of {batch_size}"  # type: ignore[union-attr]
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
        files, skipped = list_images(path) if fmt == "images" else ([path], [])
        if not files:
            raise InputError(f"{path}: no images (PNG, JPEG, BMP, TIFF, WebP) in this folder")
        if skipped:
            shown = ", ".join(skipped[:3]) + (", …" if len(skipped) > 3 else "")
            notes.append(
                f"{path.name}: skipped {len(skipped)} file(s) that are not images: {shown}"
            )
        opts = image_options or ImageOptions()
        column = ImageColumn(files, opts, specs[0].shape, names[0])
        if opts.layout is None and column.layout == "nhwc":
            notes.append("images laid out as (N, H, W, C), as the model input wants")
        return {names[0]: column}
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
    data: str | os.PathLike[str] | DataSpec, names: Sequence[str]
) -> dict[str, tuple[int, ...]]:
    """The per-sample shape (batch dim excluded) the data holds for each of the model inputs
    ``names``, read from headers (images: the first one, preprocessed as the spec says; a data
    hook: its first batch), for a model that has no input shape of its own yet. Raises
    InputError as :func:`open_data` does."""
    from bncheck.data.hook import hook_sample_shapes, hook_target

    spec = data if isinstance(data, DataSpec) else DataSpec(data)
    hook = hook_target(spec)
    if hook is not None:
        return hook_sample_shapes(spec, hook, names)
    p = Path(spec.source)
    specs = [TensorSpec(name, (), "float32") for name in names]
    columns = _open_columns(p, sniff_data(p), specs, spec.images, [])
    return {name: tuple(col.sample_shape) for name, col in columns.items()}
