"""``--data pkg.module:function``: batches from the user's own Python code.

The function (called with ``--data-kwargs``) returns an iterable of batches, each one of:
a numpy array or torch tensor (a single-input model); a dict input name → array; or a tuple /
list whose first item is one of those (``(x, y)`` from a ``DataLoader``: the rest is ignored).
Every pass calls the function again, so it must give the same samples in the same order each
time (no shuffling): ``recalibrate`` compares passes.

The batches are streamed and re-cut into batches of the command's batch size: bncheck's figures
are then those of the same samples in a ``.npy`` whatever batch sizes the hook yields (moments
are exact in any batching, and recalibration's batch statistics see the same batches). At most
one batch of the hook and one of bncheck are held at a time. torch is never imported here: a
tensor is converted through its own methods.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from bncheck.data.checks import check_dtype, check_shape
from bncheck.data.source import IMAGE_OPTIONS, DataSource
from bncheck.data.spec import DataSpec
from bncheck.errors import BncheckError, InputError, first_line
from bncheck.layers import TensorSpec
from bncheck.usercode import import_callable, looks_like_target

__all__ = ["HookSource", "hook_batches", "hook_sample_shapes", "hook_target", "open_hook"]


def _call(where: str, make: Callable[[], Any], when: str) -> Any:
    try:
        return make()
    except (BncheckError, StopIteration):
        raise
    except Exception as exc:
        raise InputError(
            f"{where}: raised {type(exc).__name__}: {first_line(exc)} ({when})"
        ) from exc


def hook_batches(
    where: str, source: Any, kwargs: Mapping[str, Any] | None
) -> Callable[[], Iterator[Any]]:
    """A function that starts one pass over ``source``: a hook function (called with
    ``kwargs`` on every pass), an iterable of batches, or a single batch."""
    if kwargs and not callable(source):
        raise InputError(f"{where}: keyword arguments are for a data hook function")

    def start() -> Iterator[Any]:
        got = (
            _call(where, lambda: source(**(kwargs or {})), "when called")
            if callable(source)
            else source
        )
        if got is None:
            raise InputError(f"{where}: returned None; return (or yield) batches of input")
        if _is_batch(got):
            return iter([got])  # one batch: the whole data set
        try:
            return _call(where, lambda: iter(got), "starting the iteration")
        except InputError:
            raise InputError(
                f"{where}: returned a {type(got).__name__}, which is not an iterable of batches"
            ) from None

    return start


def _is_batch(obj: Any) -> bool:
    return isinstance(obj, np.ndarray | Mapping) or _is_tensor(obj)


def _is_tensor(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "detach")


def _as_numpy(where: str, name: str, index: int, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        arr = value
    elif _is_tensor(value):
        t = value.detach()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()  # numpy has no bfloat16
        arr = t.cpu().numpy()
    elif isinstance(value, np.generic) or hasattr(value, "__array__"):
        arr = np.asarray(value)
    else:
        raise InputError(
            f"{where}: batch {index} gives a {type(value).__name__} for input {name!r}; "
            "expected a numpy array or a torch tensor"
        )
    if arr.ndim == 0:
        raise InputError(
            f"{where}: batch {index} gives a single number for input {name!r}, not a batch"
        )
    return arr


class HookSource(DataSource):
    """Batches from a hook, re-cut to ``batch_size``; same interface as a file's DataSource.

    The sample count is known after the first complete pass. A caller that needs it before
    (``bounds``, ``num_samples``: recalibration plans its passes) makes bncheck count the
    samples in a pass that runs no model; ``sized`` says whether the count is known yet.
    """

    def __init__(
        self,
        *,
        where: str,
        start: Callable[[], Iterator[Any]],
        specs: Sequence[TensorSpec],
        targets: Mapping[str, np.dtype],
        batch_size: int,
        drop_last: bool,
        limit: int | None,
        notes: list[str],
    ) -> None:
        self.path = None
        self.format = "hook"
        self.columns = {}
        self.targets = dict(targets)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.synthetic = False
        self.label = where
        self._start = start
        self._limit = limit
        self._names = [s.name for s in specs]
        self._bounds: list[tuple[int, int]] | None = None
        self._shard: list[tuple[int, int]] | None = None
        self._hook_sizes: set[int] = set()
        # The first pass reuses the iterator opened here to validate the first batch.
        it = start()
        try:
            first = _call(where, lambda: next(it), "at batch 0")
        except StopIteration:
            raise InputError(f"{where}: yielded no batches") from None
        arrays = self._arrays(first, 0, notes)
        self._shapes = {n: a.shape[1:] for n, a in arrays.items()}
        self._dtypes = {n: a.dtype for n, a in arrays.items()}
        for spec in specs:
            check_dtype(where, spec.name, arrays[spec.name].dtype, targets[spec.name], notes)
            check_shape(where, spec, tuple(int(d) for d in arrays[spec.name].shape[1:]))
        self._pending: list[Any] = [it, arrays]
        self.notes = tuple(notes)

    @property
    def where(self) -> str:
        return self.label

    @property
    def sized(self) -> bool:
        return self._bounds is not None

    @property
    def bounds(self) -> list[tuple[int, int]]:  # type: ignore[override]
        if self._shard is not None:
            return self._shard
        if self._bounds is None:
            for _ in self._chunks():  # count only: no conversion, no model
                pass
            self.notes = (*self.notes, f"{self.label}: counted its samples in a pass of their own")
        assert self._bounds is not None
        return self._bounds

    @bounds.setter
    def bounds(self, value: Sequence[tuple[int, int]]) -> None:
        # distributed.shard() hands each rank a copy with its own share of the batches.
        self._shard = list(value)

    @property
    def description(self) -> str:  # type: ignore[override]
        shapes = "; ".join(
            f"{n} {tuple(int(d) for d in self._shapes[n])} {self.targets[n].name}"
            for n in self._names
        )
        count = f"{self.num_samples} samples" if self.sized else "samples"
        lo, hi = min(self._hook_sizes, default=0), max(self._hook_sizes, default=0)
        given = f" (the hook's batches held {lo} to {hi} samples)" if lo != hi else ""
        if lo == hi and lo and lo != self.batch_size:
            given = f" (the hook's batches held {lo} samples)"
        return f"{self.label}: {count} of {shapes}, batches of {self.batch_size}{given}"

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        wanted = None if self._shard is None else set(self._shard)
        chunks = self._chunks()
        try:
            for index, (start, stop, raw) in enumerate(chunks):
                if wanted is None or (start, stop) in wanted:
                    yield {n: self._convert(n, raw[n], index, start, stop) for n in self._names}
        finally:
            chunks.close()

    def _raw(self) -> Iterator[dict[str, np.ndarray]]:
        if self._pending:
            it, first = self._pending
            self._pending.clear()
        else:
            it, first = self._start(), None
        try:
            index = 0
            if first is not None:
                yield first
                index = 1
            while True:
                try:
                    item = _call(self.label, lambda: next(it), f"at batch {index}")
                except StopIteration:
                    return
                yield self._arrays(item, index, None)
                index += 1
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                _call(self.label, close, "when closed")

    def _chunks(self) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """(start, stop, raw arrays) per bncheck batch; sets the bounds after a full pass."""
        bs, limit = self.batch_size, self._limit
        buf: dict[str, list[np.ndarray]] = {n: [] for n in self._names}
        held = taken = done = 0
        raw = self._raw()
        try:
            for arrays in raw:
                n = len(next(iter(arrays.values())))
                self._hook_sizes.add(n)
                if limit is not None and taken + n > limit:
                    arrays = {k: a[: limit - taken] for k, a in arrays.items()}
                    n = limit - taken
                for k, a in arrays.items():
                    buf[k].append(a)
                held += n
                taken += n
                while held >= bs:
                    yield done, done + bs, {k: _take(buf[k], bs) for k in self._names}
                    done += bs
                    held -= bs
                if limit is not None and taken >= limit:
                    break
        finally:
            raw.close()
        if held and not self.drop_last:
            yield done, done + held, {k: _take(buf[k], held) for k in self._names}
            done += held
        if done == 0:
            more = f", fewer than one full batch of {bs}" if taken else ""
            raise InputError(f"{self.label}: {taken} samples{more}")
        bounds = [(s, min(s + bs, done)) for s in range(0, done, bs)]
        if self._bounds is not None and bounds != self._bounds:
            raise InputError(
                f"{self.label}: gave {done} samples in this pass and "
                f"{self._bounds[-1][1]} in an earlier one: every pass must give the same samples"
            )
        self._bounds = bounds

    def _arrays(self, item: Any, index: int, notes: list[str] | None) -> dict[str, np.ndarray]:
        """One batch of the hook as input name → array, validated against the first batch."""
        where = self.label
        arrays = _input_arrays(where, item, index, self._names, notes)
        if index and hasattr(self, "_shapes"):
            for n, a in arrays.items():
                if a.shape[1:] != self._shapes[n]:
                    raise InputError(
                        f"{where}: batch {index} has samples of shape {tuple(a.shape[1:])} for "
                        f"input {n!r}; batch 0 had {tuple(self._shapes[n])}: every batch must "
                        "hold samples of one shape"
                    )
                if a.dtype != self._dtypes[n]:
                    check_dtype(where, n, a.dtype, self.targets[n], [])
        return arrays


def _input_arrays(
    where: str, item: Any, index: int, names: Sequence[str], notes: list[str] | None
) -> dict[str, np.ndarray]:
    """One batch of a hook as model input name → numpy array (one sample count for all)."""
    if isinstance(item, tuple | list):
        if not item:
            raise InputError(f"{where}: batch {index} is an empty {type(item).__name__}")
        item = item[0]  # (x, y, ...): the first item is the input
    if isinstance(item, Mapping):
        if all(n in item for n in names):
            chosen = {n: item[n] for n in names}
            extra = sorted(str(k) for k in item if k not in names)
            if extra and notes is not None:
                notes.append(f"{where}: keys not used by the model: {', '.join(extra)}")
        elif len(item) == 1 and len(names) == 1:
            chosen = {names[0]: next(iter(item.values()))}
        else:
            missing = next(n for n in names if n not in item)
            keys = ", ".join(map(str, item)) or "none"
            raise InputError(
                f"{where}: batch {index} has no key {missing!r} for the model input "
                f"(its keys: {keys})"
            )
    else:
        if len(names) != 1:
            raise InputError(
                f"{where}: batch {index} is one array but the model has {len(names)} inputs "
                f"({', '.join(names)}): yield dicts input name → array"
            )
        chosen = {names[0]: item}
    arrays = {n: _as_numpy(where, n, index, v) for n, v in chosen.items()}
    if len({len(a) for a in arrays.values()}) > 1:
        raise InputError(f"{where}: batch {index} holds different sample counts per input")
    return arrays


def _take(pieces: list[np.ndarray], count: int) -> np.ndarray:
    """The first ``count`` rows held in ``pieces``, removed from it."""
    out = []
    while count:
        head = pieces[0]
        if len(head) <= count:
            out.append(head)
            pieces.pop(0)
            count -= len(head)
        else:
            out.append(head[:count])
            pieces[0] = head[count:]
            count = 0
    return out[0] if len(out) == 1 else np.concatenate(out)


def hook_target(spec: DataSpec) -> Any:
    """The hook ``spec`` names (imported), or None when its source is a file or folder.

    A string is a hook when it reads ``pkg.module:function`` and no such file exists."""
    src = spec.source
    if isinstance(src, str):
        if looks_like_target(src) and not os.path.exists(src):
            return import_callable(src, "--data", "function")
        return None
    if isinstance(src, os.PathLike | bytes):
        return None
    return src  # a function, an iterable of batches or one batch, given through the api


def open_hook(
    spec: DataSpec,
    hook: Any,
    specs: Sequence[TensorSpec],
    targets: Mapping[str, np.dtype],
    batch_size: int,
    drop_last: bool,
    notes: list[str],
    max_samples: int | None,
    max_batches: int | None,
) -> DataSource:
    where = f"data hook {spec}"
    given = sorted(spec.explicit & IMAGE_OPTIONS)
    if given:
        raise InputError(f"{where}: {', '.join(given)} preprocess a folder of images, not a hook")
    limits = [n for n in (max_samples, max_batches and max_batches * batch_size) if n]
    return HookSource(
        where=where,
        start=hook_batches(where, hook, spec.kwargs),
        specs=specs,
        targets=targets,
        batch_size=batch_size,
        drop_last=drop_last,
        limit=min(limits) if limits else None,
        notes=notes,
    )


def hook_sample_shapes(
    spec: DataSpec, hook: Any, names: Sequence[str]
) -> dict[str, tuple[int, ...]]:
    """The per-sample shape of each model input in the hook's first batch, for a model that
    has no input shape of its own yet (a state dict). This calls the hook once more than the
    passes do, which call it again each anyway, and reads one batch."""
    where = f"data hook {spec}"
    it = hook_batches(where, hook, spec.kwargs)()
    try:
        first = _call(where, lambda: next(it), "at batch 0")
    except StopIteration:
        raise InputError(f"{where}: yielded no batches") from None
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            _call(where, close, "when closed")
    arrays = _input_arrays(where, first, 0, names, None)
    return {n: tuple(int(d) for d in a.shape[1:]) for n, a in arrays.items()}
