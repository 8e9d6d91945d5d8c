"""Atomic writers for PyTorch models: .pt2, ONNX, state dict, safetensors, trusted pickle.

Every writer goes to a temporary file in the target folder, is flushed to disk, and is renamed
into place; on any failure the temporary file is removed and an existing file at the target
is left as it was.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bncheck.atomic import temp_beside
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
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
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


def save_pt2(ep: Any, path: Path) -> None:
    import torch

    _write(path, lambda tmp: torch.export.save(ep, str(tmp)), "the .pt2")


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
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))

    _write(path, write, "the ONNX model")


def save_state_dict(module: Any, path: Path) -> None:
    import torch

    _write(path, lambda tmp: torch.save(module.state_dict(), str(tmp)), "the state dict")


def save_safetensors(module: Any, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    _write(path, lambda tmp: save_file(state, str(tmp)), "the safetensors file")


def save_pickle(module: Any, path: Path) -> None:
    import torch

    _write(path, lambda tmp: torch.save(module, str(tmp)), "the model")
