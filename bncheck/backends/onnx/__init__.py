"""ONNX backend: safe loading, BN discovery and fold planning, onnxruntime runs, atomic saves.

Never imports torch; onnxruntime is imported only when a session is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from onnx import ModelProto

from bncheck.backends.base import ModelHandle
from bncheck.backends.onnx.discover import discover
from bncheck.backends.onnx.graph import GraphIndex, fixed_dim, unfix_dynamic_dims
from bncheck.backends.onnx.load import load_model
from bncheck.backends.onnx.run import SharedWeights, make_session, ort_message, save_onnx
from bncheck.errors import InputError
from bncheck.layers import FoldStep, ModelInfo

__all__ = ["OnnxHandle", "open_onnx"]


class OnnxHandle(ModelHandle):
    """A loaded ONNX model (external data read into memory)."""

    format = "onnx"
    framework = "onnx"

    def __init__(
        self,
        path: Path,
        model: ModelProto,
        *,
        input_shapes: dict[str, tuple[int, ...]] | None = None,
        external_data: bool = False,
        weights: SharedWeights | None = None,
    ) -> None:
        self.path = Path(path)
        self.model = model
        self.input_shapes = dict(input_shapes or {})
        self.external_data = external_data  # loaded with external data: saved the same way
        self._info: ModelInfo | None = None
        self._index: GraphIndex | None = None
        self._session: Any = None
        self._optimized: Any = None
        # large initializers for the session, shared with the handles folded from this one
        self.weights = SharedWeights() if weights is None else weights

    @property
    def index(self) -> GraphIndex:
        """Producer/consumer/constant index of the graph (built once)."""
        if self._index is None:
            self._index = GraphIndex.build(
                self.model, self.input_shapes or None, source=str(self.path)
            )
        return self._index

    def info(self) -> ModelInfo:
        if self._info is None:
            self._info = discover(self.index, str(self.path))
        return self._info

    def session(self) -> Any:
        """A cached onnxruntime session running the graph as written (ORT_DISABLE_ALL)."""
        if self._session is None:
            self._session = make_session(self.model, source=str(self.path), weights=self.weights)
        return self._session

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """All graph outputs for ``feeds`` (input name → array), in graph output order."""
        from bncheck.interrupt import run_session

        session = self.session()
        try:
            return list(run_session(session, None, feeds))  # Ctrl-C stops it mid-run
        except Exception as exc:
            raise InputError(f"{self.path}: onnxruntime run failed: {ort_message(exc)}") from None

    def prepare(self) -> None:
        self.session()

    def release(self) -> None:
        """Drop the cached sessions, and with them the weight arrays and the packed weights
        onnxruntime made for them: a later run builds them again."""
        self._session = self._optimized = None

    def run_reference(self, feeds: dict[str, np.ndarray]) -> tuple[list[np.ndarray], str]:
        """All outputs from a second, cached session with onnxruntime's graph optimizations on
        (ORT_ENABLE_ALL: Conv+BN fusion, reordered sums), for verification's noise yardstick."""
        from bncheck.interrupt import run_session

        if self._optimized is None:
            self._optimized = make_session(
                self.model, optimize=True, source=str(self.path), weights=self.weights
            )
        try:
            outputs = list(run_session(self._optimized, None, feeds))
        except Exception as exc:
            raise InputError(f"{self.path}: onnxruntime run failed: {ort_message(exc)}") from None
        return outputs, "onnxruntime ORT_ENABLE_ALL vs ORT_DISABLE_ALL"

    def folded(self, *, affine: bool = False) -> tuple[OnnxHandle, list[FoldStep]]:
        """Fold every foldable BN (see :mod:`bncheck.backends.onnx.fold`) into a new handle."""
        from bncheck.backends.onnx.fold import fold_model

        model, steps = fold_model(self.index, affine=affine)
        handle = OnnxHandle(
            self.path,
            model,
            input_shapes=self.input_shapes,
            external_data=self.external_data,
            weights=self.weights,  # the weights the fold left as they were: one array each
        )
        return handle, steps

    def changed_part(self, other: ModelHandle) -> tuple[OnnxHandle, OnnxHandle, str] | None:
        """Both models cut at the frontier of ``other``'s rewrites when the unchanged tail
        holds most of the weights (:mod:`bncheck.backends.onnx.region`)."""
        if not isinstance(other, OnnxHandle):
            return None
        from bncheck.backends.onnx.region import changed_part
        from bncheck.wording import plural

        part = changed_part(self.model, other.model)
        if part is None:
            return None

        def cut(model: ModelProto) -> OnnxHandle:
            return OnnxHandle(
                self.path, model, input_shapes=self.input_shapes, weights=self.weights
            )

        words = (
            f"where the changes end: the {plural(part.tail_nodes, 'node')} after "
            f"{'it' if len(part.frontier) == 1 else 'them'} are the original's, on the same "
            f"{part.tail_bytes / 2**20:,.0f} MiB of weights"
        )
        return cut(part.original), cut(part.folded), words

    def moment_runner(self, *, batch_stats: bool) -> Any:
        from bncheck.backends.onnx.stats import moment_runner

        return moment_runner(self, batch_stats=batch_stats)

    def with_stats(self, stats: Any, *, num_batches: int | None = None) -> Any:
        from bncheck.backends.onnx.stats import with_stats

        return with_stats(self, stats, num_batches=num_batches)

    def save(self, path: Path) -> None:
        """Write the model atomically (with external data if it was loaded with some)."""
        save_onnx(self.model, Path(path), external_data=True if self.external_data else None)


def _normalize_shapes(
    path: Path, model: ModelProto, shapes: dict[str, tuple[int, ...]] | None
) -> dict[str, tuple[int, ...]]:
    """Map ``""`` to the only input, and check names, ranks and fixed dims against the graph."""
    if not shapes:
        return {}
    inits = {t.name for t in model.graph.initializer}
    inputs = {vi.name: vi for vi in model.graph.input if vi.name not in inits}
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        if name == "":
            if len(inputs) != 1:
                raise InputError(
                    f"{path}: the model has {len(inputs)} inputs; name each --input-shape "
                    f"(inputs: {', '.join(inputs)})"
                )
            name = next(iter(inputs))
        if name not in inputs:
            raise InputError(
                f"{path}: no input named '{name}' (inputs: {', '.join(inputs) or 'none'})"
            )
        shape = tuple(int(d) for d in shape)
        if any(d <= 0 for d in shape):
            raise InputError(f"{path}: input shape {shape} for '{name}' has a non-positive dim")
        tt = inputs[name].type.tensor_type
        if tt.HasField("shape"):
            dims = tt.shape.dim
            if len(dims) != len(shape):
                raise InputError(
                    f"{path}: input '{name}' has rank {len(dims)}, --input-shape "
                    f"{shape} has rank {len(shape)}"
                )
            for i, (d, s) in enumerate(zip(dims, shape, strict=True)):
                size = fixed_dim(d)
                if size is not None and size != s:
                    raise InputError(
                        f"{path}: input '{name}' has size {size} in dim {i}, --input-shape says {s}"
                    )
        out[name] = shape
    return out


def open_onnx(path: Path, *, input_shapes: dict[str, tuple[int, ...]] | None = None) -> OnnxHandle:
    """Load an ONNX model safely (see :mod:`bncheck.backends.onnx.load`) into a handle.

    ``input_shapes`` maps an input name (or ``""`` for the only input) to a shape that fixes
    its dynamic dims; it must agree with the dims the graph fixes. Dims written as ``-1`` or
    ``0`` are dynamic and become unknown dims in the handle's model (see
    :func:`~bncheck.backends.onnx.graph.unfix_dynamic_dims`), so files written from it keep
    them dynamic.
    """
    path = Path(path)
    model, external = load_model(path)
    unfix_dynamic_dims(model)
    shapes = _normalize_shapes(path, model, input_shapes)
    return OnnxHandle(path, model, input_shapes=shapes, external_data=external)
