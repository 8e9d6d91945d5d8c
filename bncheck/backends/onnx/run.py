"""onnxruntime sessions (quiet, errors turned into ours, large weights shared from memory) and
atomic ONNX writes."""

from __future__ import annotations

import os
import re
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto, TensorProto

from bncheck.atomic import as_new_file, sync_if_replacing, temp_beside
from bncheck.backends.onnx.encoding import plain_raw, without_initializers
from bncheck.backends.onnx.graph import tensor_element_count
from bncheck.backends.onnx.load import iter_tensors, serialized_size
from bncheck.errors import InputError, one_line

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "SHARED_MIN_BYTES",
    "SharedWeights",
    "make_session",
    "ort_message",
    "save_onnx",
]

#: Serialized size (bytes) above which a model is written with external data: protobuf
#: cannot serialize 2 GiB, and the copy made to serialize must stay well under it.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
#: Tensors at least this large (bytes) go to the external data file.
EXTERNAL_TENSOR_MIN_BYTES = 1024
#: Initializers at least this large (bytes) reach a session built with :class:`SharedWeights`
#: from memory: smaller ones cost less to serialize than to set up.
SHARED_MIN_BYTES = 1 << 20

# Element types whose raw bytes are a native little-endian numpy array onnxruntime takes as is.
_SHAREABLE = {
    TensorProto.FLOAT: np.float32,
    TensorProto.DOUBLE: np.float64,
    TensorProto.FLOAT16: np.float16,
    TensorProto.INT8: np.int8,
    TensorProto.UINT8: np.uint8,
    TensorProto.INT16: np.int16,
    TensorProto.UINT16: np.uint16,
    TensorProto.INT32: np.int32,
    TensorProto.UINT32: np.uint32,
    TensorProto.INT64: np.int64,
    TensorProto.UINT64: np.uint64,
    TensorProto.BOOL: np.bool_,
}
# Where every placeholder's data lies: an empty file, so a placeholder read by mistake fails the
# load (past the end of the file) instead of reading as zeros.
_PLACEHOLDER_FILE = "bncheck-placeholder.bin"

_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
# "/onnxruntime_src/…/reshape_helper.h:84 " at the start or after "Status Message: ".
_SOURCE_LOC = re.compile(r"(?:^|(?<=\s))\S+\.(?:h|cc|cpp):\d+ ")


def ort_message(exc: BaseException) -> str:
    """One readable line from an onnxruntime exception, every line of it kept (the figures
    often come after the first: "index: 1 Got: 4 Expected: 3"); the status prefix and the C++
    source location and function signature it carries are dropped."""
    text = _ORT_PREFIX.sub("", one_line(exc, limit=2000)).removeprefix("Error in execution: ")
    loc = _SOURCE_LOC.search(text)
    if loc is not None:
        # "file.h:46 void ns::f(args…) message": skip up to the signature's closing paren.
        depth, seen = 0, False
        for i in range(loc.end(), len(text)):
            ch = text[i]
            if ch == "(":
                depth, seen = depth + 1, True
            elif ch == ")":
                depth -= 1
                if seen and depth == 0:
                    rest = text[i + 1 :].strip()
                    if rest:
                        text = text[: loc.start()] + rest
                    break
    return text


class SharedWeights:
    """Large initializers as numpy arrays, given to onnxruntime from memory: a pool that the
    sessions of a model and of its folded copy share.

    A session built with it (:func:`make_session`) receives the model with each initializer of
    at least ``min_bytes`` replaced by a placeholder (external data in an empty file), and the
    array itself through ``SessionOptions.add_initializer``, which onnxruntime uses in place
    (no copy; the array is C-contiguous in the tensor's own dtype and outlives the session).
    So no serialized copy of the whole model is made and parsed again, onnxruntime holds no
    copy of those weights, and a weight the fold left as it was (same name and an equal
    TensorProto: dims, type and bytes) is one array for both sessions. ``min_bytes`` (default
    :data:`SHARED_MIN_BYTES`, read when the pool is made) lets a small model take this path.

    The pool holds an array only while a session uses it (the sessions keep them alive), so
    dropping the sessions frees the memory. Like a cached session, an array assumes that the
    model it was made from is not changed in place once its session is built.
    """

    def __init__(self, min_bytes: int | None = None) -> None:
        self.min_bytes = int(SHARED_MIN_BYTES if min_bytes is None else min_bytes)
        # name → (the TensorProto the array was made from, the array while a session holds it)
        self._entries: dict[str, tuple[TensorProto, weakref.ref[np.ndarray]]] = {}

    def __len__(self) -> int:
        """How many arrays the pool holds now."""
        return sum(1 for _, ref in self._entries.values() if ref() is not None)

    def takes(self, t: TensorProto) -> bool:
        """``t`` goes to a session from memory: plain little-endian raw data of a shareable
        type, at least ``min_bytes`` long (its size read from dims and type, not its bytes)."""
        dtype = _SHAREABLE.get(t.data_type)
        if dtype is None or sys.byteorder != "little" or not t.name or not plain_raw(t):
            return False
        return tensor_element_count(t) * np.dtype(dtype).itemsize >= max(self.min_bytes, 1)

    def array(self, t: TensorProto) -> np.ndarray:
        """``t``'s value: the pool's array when it holds one made from an equal TensorProto
        (protobuf compares the bytes without copying them), else a new one (one copy of the
        bytes, read-only) that the pool keeps."""
        hit = self._entries.get(t.name)
        arr = None if hit is None else hit[1]()
        if arr is not None and (hit[0] is t or hit[0] == t):
            return arr
        # reshape raises ValueError on bytes that do not fill the dims exactly
        arr = np.frombuffer(t.raw_data, dtype=_SHAREABLE[t.data_type]).reshape(tuple(t.dims))
        self._entries[t.name] = (
            t,
            weakref.ref(arr, lambda ref, name=t.name: self._drop(name, ref)),
        )
        return arr

    def _drop(self, name: str, ref: weakref.ref[np.ndarray]) -> None:
        # the array is gone: forget the TensorProto too (it keeps its whole model alive)
        if name in self._entries and self._entries[name][1] is ref:
            del self._entries[name]

    def skeleton(self, model: ModelProto) -> tuple[ModelProto, dict[str, np.ndarray]]:
        """``model`` with every initializer the pool takes replaced by a placeholder (name,
        type, dims, and its bytes as external data in :data:`_PLACEHOLDER_FILE`), and their
        values by name. Initializers that are also graph inputs (a caller could override
        them) stay as they are."""
        inputs = {i.name for i in model.graph.input}
        sk = without_initializers(model)
        values: dict[str, np.ndarray] = {}
        for t in model.graph.initializer:
            if t.name in inputs or t.name in values or not self.takes(t):
                sk.graph.initializer.append(t)
                continue
            arr = self.array(t)
            values[t.name] = arr
            p = sk.graph.initializer.add()
            p.name, p.data_type = t.name, t.data_type
            p.dims.extend(t.dims)
            p.data_location = TensorProto.EXTERNAL
            for key, value in (("location", _PLACEHOLDER_FILE), ("length", str(arr.nbytes))):
                entry = p.external_data.add()
                entry.key, entry.value = key, value
        return sk, values


def make_session(
    model: ModelProto,
    *,
    optimize: bool = False,
    providers: list[str] | None = None,
    threads: int | None = None,
    source: str | None = None,
    weights: SharedWeights | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``model``.

    Graph optimizations are off (``ORT_DISABLE_ALL``) unless ``optimize``: equivalence checks
    must run the graph as written, not one onnxruntime has fused itself. With ``weights``
    (CPU only) the large initializers come from that pool's arrays (:class:`SharedWeights`):
    used in place by a session of the graph as written; copied into the graph before the
    optimizers run by an optimized one (they read initializers from the model, where a
    placeholder would read as zeros). Either computes bit for bit what a session of the
    whole model computes. onnxruntime still prepacks each session's MatMul/Gemm weights
    (a packed copy per session: 2×490 MB for VGG-11's FC layers): without, its runs are
    ~10% slower and the time-budgeted verification runs fewer samples. Other models too large
    for one protobuf message go through a temporary file with external data, kept alive with
    the session. ``source`` names the model in error messages.
    """
    import onnxruntime as ort

    # 4 = FATAL only: at 3 onnxruntime still prints each failed run's error to stderr, beside
    # the one line bncheck reports for it.
    ort.set_default_logger_severity(4)
    who = source or "model"
    providers = list(providers or ["CPUExecutionProvider"])
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise InputError(
            f"{who}: onnxruntime has no {', '.join(missing)} here "
            f"(available: {', '.join(available)})"
        )
    session = None
    if weights is not None and providers == ["CPUExecutionProvider"]:
        try:
            session = _shared_session(model, _options(optimize, threads), weights, copied=optimize)
        except Exception:  # an onnxruntime that refuses the placeholders, or the model's own
            session = None  # error: loading the whole model says which, in its own words
    if session is not None:
        return session
    opts = _options(optimize, threads)
    tmp = None
    try:
        if serialized_size(model) > EXTERNAL_DATA_THRESHOLD:
            tmp = tempfile.TemporaryDirectory(prefix="bncheck-ort-")
            file = Path(tmp.name) / "model.onnx"
            save_onnx(model, file, external_data=True)
            session = ort.InferenceSession(str(file), opts, providers=providers)
            session._bncheck_tmpdir = tmp  # onnxruntime may map the data file: keep it
        else:
            session = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    except InputError:
        raise
    except Exception as exc:  # onnxruntime's pybind errors share no useful base class
        if tmp is not None:
            tmp.cleanup()
        raise InputError(f"{who}: onnxruntime cannot load it: {ort_message(exc)}") from None
    return session


def _options(optimize: bool, threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return opts


def _shared_session(
    model: ModelProto, opts: Any, weights: SharedWeights, *, copied: bool = False
) -> Any:
    """A CPU session of ``model`` whose large initializers come from ``weights``' arrays; None
    when it has none, or when the rest alone is too large for one protobuf message.

    Every placeholder in the skeleton has its array added by name (``add_initializer``), so
    onnxruntime reads none of them; the placeholder file beside the skeleton's only has to
    exist for onnxruntime's external-data checks, and is empty: a placeholder left without its
    array fails the load (its bytes lie past the end of the file), it cannot read as zeros.
    The session keeps the arrays, their OrtValues and the folder alive: onnxruntime uses the
    arrays' memory while it runs.

    ``copied`` (an optimized session): onnxruntime copies each array into the graph before
    its optimizers run (``add_external_initializers``), so they read the real weights; here
    no placeholder file exists at all.
    """
    import onnxruntime as ort

    sk, values = weights.skeleton(model)
    if not values or serialized_size(sk) > EXTERNAL_DATA_THRESHOLD:
        return None  # nothing to share, or too many small tensors: the whole model it is
    tmp = tempfile.TemporaryDirectory(prefix="bncheck-ort-")
    folder = Path(tmp.name)
    try:
        (folder / "model.onnx").write_bytes(sk.SerializeToString())
        kept = {name: ort.OrtValue.ortvalue_from_numpy(arr) for name, arr in values.items()}
        if copied:
            opts.add_external_initializers(list(kept), list(kept.values()))
        else:
            (folder / _PLACEHOLDER_FILE).write_bytes(b"")
            for name, value in kept.items():
                opts.add_initializer(name, value)
        session = ort.InferenceSession(
            str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"]
        )
    except BaseException:
        tmp.cleanup()
        raise
    session._bncheck_tmpdir = tmp
    session._bncheck_weights = ({}, {}) if copied else (values, kept)
    return session


def _external_locations(path: Path) -> set[str]:
    """External-data locations the ONNX file at ``path`` refers to (empty on any problem)."""
    try:
        old = onnx.load(str(path), load_external_data=False)
    except Exception:
        return set()
    locs = set()
    for t in iter_tensors(old):
        if t.data_location == TensorProto.EXTERNAL:
            locs.update(e.value for e in t.external_data if e.key == "location")
    return locs


def _unlink(p: Path | None) -> None:
    if p is not None:
        p.unlink(missing_ok=True)


def save_onnx(model: ModelProto, path: Path, *, external_data: bool | None = None) -> None:
    """Write ``model`` to ``path`` atomically.

    The model goes to a temporary file beside ``path`` and is renamed into place, so a failed
    write leaves any existing file untouched. With external data (``external_data=True``, or
    ``None`` and a serialized size over :data:`EXTERNAL_DATA_THRESHOLD`) tensors of at least
    :data:`EXTERNAL_TENSOR_MIN_BYTES` go to a fresh ``<stem>.<random>.data`` beside it (fresh
    because ``onnx.save`` appends to an existing data file); data files of the same
    ``<stem>.<hex>.data`` pattern that the replaced output used are removed afterwards.
    ``model`` itself is not modified.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"{path}: output folder does not exist")
    if any(t.data_location == TensorProto.EXTERNAL for t in iter_tensors(model)):
        raise ValueError("save_onnx needs a model whose external data is loaded in memory")
    if external_data is None:
        size = serialized_size(model)
        if abs(size - EXTERNAL_DATA_THRESHOLD) < 1 << 20:  # too close to call: the exact size
            size = model.ByteSize()
        external_data = size > EXTERNAL_DATA_THRESHOLD
    # Parsing the replaced output (a full read when it holds its weights) is only worth it
    # when a data file of ours could be among its references.
    ours = re.compile(rf"^{re.escape(path.stem)}\.[0-9a-f]{{8}}\.data$")
    candidates = path.exists() and any(ours.match(p.name) for p in folder.iterdir())
    previous = _external_locations(path) if candidates else set()

    fd, tmp = temp_beside(path, ".tmp")
    data: Path | None = None
    try:
        if external_data:
            os.close(fd)
            while True:
                data = folder / f"{path.stem}.{os.urandom(4).hex()}.data"
                if not data.exists():
                    break
            copy = ModelProto()
            copy.CopyFrom(model)  # onnx.save_model rewrites the tensors it externalizes
            onnx.save_model(
                copy,
                str(tmp),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data.name,
                size_threshold=EXTERNAL_TENSOR_MIN_BYTES,
            )
            del copy
            if data.exists():
                as_new_file(data)  # onnx creates it 0600; the .onnx beside it is 0644
                sync_if_replacing(data, path)  # the replaced .onnx's data goes with it
            else:  # no tensor was large enough to go out
                data = None
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(model.SerializeToString())
        sync_if_replacing(tmp, path)
        os.replace(tmp, path)
    except BaseException as exc:
        _unlink(tmp)
        _unlink(data)
        if isinstance(exc, OSError):
            raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise
    for loc in previous:
        if ours.match(loc) and (data is None or loc != data.name):
            _unlink(folder / loc)
