"""Atomic writers for PyTorch models: .pt2, ONNX, state dict, safetensors, trusted pickle.

Every writer goes to a temporary file in the target folder and is renamed into place (flushed
to disk first when it replaces a file: ``bncheck.atomic``); on any failure the temporary file
is removed and an existing file at the target is left as it was.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bncheck.atomic import sync_if_replacing, temp_beside
from bncheck.errors import InputError

ONNX_OPSET = 18


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed onto ``path`` if the block succeeds."""
    path = Path(path)
    # The suffix stays last: torch.export.save warns about any other name.
    fd, tmp_path = temp_beside(path, path.suffix)
    os.close(fd)
    try:
        yield tmp_path
        sync_if_replacing(tmp_path, path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _write(path: Path, writer: Callable[[Path], None], what: str) -> None:
    from bncheck.backends.torch.load import quiet_torch

    try:
        with atomic_path(path) as tmp, quiet_torch():
            writer(tmp)
    except OSError as exc:
        raise InputError(f"{path}: cannot write {what} ({exc.strerror or exc})") from None


def _buffered(path: Path, dump: Callable[[io.BytesIO], None]) -> None:
    """Serialize into memory, then write the bytes with Python I/O. torch's zip writer, writing
    to a path itself, turns a failed write (disk full, EFBIG) into a C++ error whose destructor
    aborts the process; a Python ``write`` raises OSError instead."""
    buf = io.BytesIO()
    dump(buf)
    with open(path, "wb") as f:
        f.write(buf.getbuffer())


@contextlib.contextmanager
def _stable_graph_ids(ep: Any) -> Iterator[None]:
    """Number the graphs named in nodes' ``from_node`` provenance by first appearance while the
    program is written, and put the originals back after.

    torch records a graph by ``id()`` of its Python object, a memory address that changes from
    run to run; written as it is, the same fold would give different bytes every time.
    """
    infos: dict[int, tuple[Any, int]] = {}  # id(NodeInfo) -> (NodeInfo, original graph_id)
    sources: dict[int, Any] = {}
    numbering: dict[int, int] = {}

    def visit(source: Any) -> None:
        if id(source) in sources:
            return
        sources[id(source)] = source
        info = getattr(source, "node_info", None)
        if info is not None and id(info) not in infos:
            infos[id(info)] = (info, info.graph_id)
            info.graph_id = numbering.setdefault(info.graph_id, len(numbering))
        for parent in getattr(source, "from_node", None) or ():
            visit(parent)

    def forget_cached_dicts() -> None:
        for source in sources.values():
            if hasattr(source, "_dict"):
                source._dict = None  # to_dict() caches the ids it saw

    for module in ep.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in getattr(graph, "nodes", ()):
            for source in node.meta.get("from_node") or ():
                visit(source)
    forget_cached_dicts()
    try:
        yield
    finally:
        for info, original in infos.values():
            info.graph_id = original
        forget_cached_dicts()


def save_pt2(ep: Any, path: Path) -> None:
    """``torch.export.save``: weights stored raw, no pickled payload, so bncheck's own .pt2
    validation (``load.validate_pt2``) accepts the file. The bytes depend only on the program:
    the archive is built in memory (its root folder is then torch's fixed ``archive``, not the
    temporary file's name) and graph ids are numbered, not memory addresses."""
    import torch

    def dump(buf: io.BytesIO) -> None:
        with _stable_graph_ids(ep):
            torch.export.save(ep, buf)

    _write(path, lambda tmp: _buffered(tmp, dump), "the .pt2")


def save_onnx_from_program(ep: Any, path: Path, output_names: list[str] | None = None) -> None:
    """Export an ExportedProgram to ONNX (dynamo exporter, opset 18) without its BN fusion, so
    the written graph is the one bncheck verified; constants folded, unused nodes dropped."""
    import onnx
    import torch

    try:
        import onnx_ir.passes.common as common_passes
        from onnxscript.optimizer import fold_constants
    except ImportError as exc:  # pragma: no cover - onnxscript is a dependency
        raise InputError(f"writing ONNX from PyTorch needs onnxscript ({exc})") from None

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                ep, dynamo=True, optimize=False, opset_version=ONNX_OPSET, verbose=False,
                output_names=output_names,
            )  # fmt: skip
        common_passes.IdentityEliminationPass()(program.model)
        fold_constants(program.model)
        common_passes.RemoveUnusedNodesPass()(program.model)
        proto = program.model_proto
        _name_dims(proto, ep)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))

    _write(path, write, "the ONNX model")


def _name_dims(proto: Any, ep: Any) -> None:
    """Rename the exporter's symbols (``s77``) in the written graph's dims to what they are
    (``batch``, ``height``, ``width``: ``example.axis_label``), inputs, outputs and value
    infos alike, so a reader of the .onnx sees which dims are free."""
    import re

    from bncheck.backends.torch.example import axis_label

    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    inputs = list(ep.graph_signature.user_inputs)
    names: dict[str, str] = {}
    for name in inputs:
        shape = getattr(nodes[name].meta.get("val"), "shape", ()) if name in nodes else ()
        for axis, d in enumerate(shape):
            sym = str(d)
            if re.fullmatch(r"s\d+", sym) and sym not in names:
                names[sym] = axis_label(name, axis, len(shape), len(inputs) > 1)
    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    graph = proto.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: names[m.group(1)], dim.dim_param)


def save_state_dict(module: Any, path: Path) -> None:
    """``torch.save(module.state_dict())``: the keys the ``--arch`` factory loads."""
    import torch

    state = module.state_dict()
    _write(path, lambda tmp: _buffered(tmp, lambda buf: torch.save(state, buf)), "the state dict")


def save_safetensors(module: Any, path: Path) -> None:
    """The state dict as safetensors (tensors made contiguous; tied tensors written once each
    under every name, as ``save_file`` requires no shared storage)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    _write(path, lambda tmp: save_file(state, str(tmp)), "the safetensors file")


def save_pickle(module: Any, path: Path) -> None:
    """``torch.save(module)``: a whole pickled module (loads only with --trust-pickle)."""
    import torch

    _write(path, lambda tmp: _buffered(tmp, lambda buf: torch.save(module, buf)), "the model")


FORMATS = ("pt2", "onnx", "state_dict", "safetensors", "pickle")


def save_torch(model: Any, path: Path, fmt: str) -> None:
    """Write ``model`` (a TorchHandle, an ``nn.Module`` or an ExportedProgram) to ``path`` as
    ``fmt`` (one of ``FORMATS``), atomically.

    ``pt2`` / ``onnx`` need a traced program (a handle's ``exported`` or an ExportedProgram);
    ``state_dict`` / ``safetensors`` / ``pickle`` need a module.
    """
    path = Path(path)
    ep = module = None
    if hasattr(model, "graph_signature"):
        ep = model
    elif hasattr(model, "framework") and hasattr(model, "module"):
        module = model.module
        # The program a file is written from keeps the batch and --dynamic-dims dynamic.
        ep = model.program_to_write() if fmt in ("pt2", "onnx") else None
    else:
        module = model
    if fmt in ("pt2", "onnx"):
        if ep is None:
            raise InputError(f"{path}: cannot write {fmt} from an untraced module")
        (save_pt2 if fmt == "pt2" else save_onnx_from_program)(ep, path)
        return
    writers = {
        "state_dict": save_state_dict,
        "safetensors": save_safetensors,
        "pickle": save_pickle,
    }
    if fmt not in writers:
        raise InputError(f"{path}: cannot write a PyTorch model as {fmt!r}")
    if module is None or not hasattr(module, "state_dict") or hasattr(module, "graph_signature"):
        raise InputError(f"{path}: cannot write {fmt}: no module")
    writers[fmt](module, path)
