"""onnxruntime sessions (quiet, errors turned into ours) and atomic ONNX writes."""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import Any

import onnx
from onnx import ModelProto, TensorProto

from bncheck.atomic import as_new_file, temp_beside
from bncheck.backends.onnx.load import iter_tensors, serialized_size
from bncheck.errors import InputError, one_line

__all__ = ["EXTERNAL_DATA_THRESHOLD", "make_session", "ort_message", "save_onnx"]

#: Serialized size (bytes) above which a model is written with external data: protobuf
#: cannot serialize 2 GiB, and the copy made to serialize must stay well under it.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
#: Tensors at least this large (bytes) go to the external data file.
EXTERNAL_TENSOR_MIN_BYTES = 1024

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


def make_session(
    model: ModelProto,
    *,
    optimize: bool = False,
    providers: list[str] | None = None,
    threads: int | None = None,
    source: str | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``model``.

    Graph optimizations are off (``ORT_DISABLE_ALL``) unless ``optimize``: equivalence checks
    must run the graph as written, not one onnxruntime has fused itself. Models too large for
    one protobuf message go through a temporary file with external data, kept alive with the
    session. ``source`` names the model in error messages.
    """
    import onnxruntime as ort

    # 4 = FATAL only: at 3 onnxruntime still prints each failed run's error to stderr, beside
    # the one line bncheck reports for it.
    ort.set_default_logger_severity(4)
    who = source or "model"
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
    providers = list(providers or ["CPUExecutionProvider"])
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise InputError(
            f"{who}: onnxruntime has no {', '.join(missing)} here "
            f"(available: {', '.join(available)})"
        )
    tmp = None
    try:
        if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
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


def _fsync(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
                data = folder / f"{path.stem}.{secrets.token_hex(4)}.data"
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
                _fsync(data)
            else:  # no tensor was large enough to go out
                data = None
            _fsync(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(model.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
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
