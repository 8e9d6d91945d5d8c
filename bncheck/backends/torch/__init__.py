"""PyTorch backend: load any torch format safely, trace it, discover its BN layers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bncheck.backends.base import ModelHandle
from bncheck.backends.torch.copying import copy_module
from bncheck.backends.torch.discover import build_info
from bncheck.backends.torch.example import (
    DATA,
    GIVEN,
    GUESS,
    PROGRAM,
    build_example,
    check_output,
    forward_args,
    run_error,
    seeded_randn,
)
from bncheck.backends.torch.load import load_torch, quiet_torch
from bncheck.backends.torch.trace import trace
from bncheck.errors import InputError, first_line
from bncheck.layers import FoldStep, ModelInfo

__all__ = ["TorchHandle", "open_torch"]

Shapes = Mapping[str, Sequence[int]]


class TorchHandle(ModelHandle):
    """A loaded PyTorch model: the eager module, and the ExportedProgram once traced.

    ``exported`` is traced lazily (deep copy in eval mode, ``torch.export.export(strict=False)``,
    dim 0 and the ``dynamic_dims`` dynamic) on first use; for a ``.pt2`` it is the loaded program
    (re-exported when ``dynamic_dims`` asks for a dim it fixes). The example input comes from
    ``input_shapes``, the data (:meth:`use_data_shapes`), ``example_input_shape``, or a guess
    (see ``example.py``); ``shape_source`` says which. ``notes`` collects remarks such as a
    guessed example input or the checkpoint entry a state dict was taken from.
    """

    framework = "torch"

    def __init__(
        self,
        path: Path,
        format: str,
        module: Any,
        exported: Any = None,
        *,
        input_shapes: dict[str, tuple[int, ...]] | None = None,
        dynamic_dims: Shapes | None = None,
        factory_shape: Any = None,
        notes: Sequence[str] = (),
    ) -> None:
        self.path = path
        self.format = format
        self.module = module
        self.notes: list[str] = list(notes)
        self._exported = exported
        self._input_shapes = input_shapes
        self._shape_source: str | None = GIVEN if input_shapes else None
        self._dynamic_dims = dynamic_dims
        self._factory_shape = factory_shape
        self._guess_note: str | None = None
        # A loaded .pt2 is traced already, unless --dynamic-dims asks for a dim it may fix.
        self._traced = format == "torchscript" or (exported is not None and not dynamic_dims)
        self._graph_error: str | None = (
            "TorchScript model: producers and consumers could not be traced"
            if format == "torchscript"
            else None
        )
        self._example: dict[str, Any] | None = None
        self._info: ModelInfo | None = None
        self._report: ModelInfo | None = None  # report_info()'s, when read from torch.fx
        self._runnable: Any = None

    @property
    def example_named(self) -> dict[str, Any]:
        """Example inputs by forward-argument name (tensors), built once."""
        if self._example is None:
            self._example = self._build_example()
        return self._example

    @property
    def example_inputs(self) -> tuple[Any, ...]:
        """Positional example inputs used to trace (and to run) the model."""
        return tuple(self.example_named.values())

    @property
    def example_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each example input, by name."""
        return {k: tuple(v.shape) for k, v in self.example_named.items() if hasattr(v, "shape")}

    @property
    def shape_source(self) -> str | None:
        """Where the example input's shape came from: ``--input-shape``, ``data``,
        ``example_input_shape``, ``guess``, ``program`` (a .pt2), or None (no example)."""
        _ = self.example_named
        return self._shape_source

    @property
    def input_names(self) -> list[str]:
        """The inputs data must feed, in order: a .pt2's user inputs; else the forward's
        positional arguments without a default (``forward(x, embed=False)`` takes ``x``)."""
        if self.format == "pt2" and self._exported is not None:
            return list(self._exported.graph_signature.user_inputs)
        names, required = forward_args(self.module)
        return required or names[:1] or ["x"]

    @property
    def wants_data_shapes(self) -> bool:
        """Whether :meth:`use_data_shapes` would take a shape: not a .pt2 (its program has
        one), not one given by ``--input-shape``. Reading a data hook's shape calls it."""
        return self.format != "pt2" and self._shape_source != GIVEN

    def use_data_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """Take the example input's shape from the data (``shapes``: input name → full shape)
        when ``--input-shape`` did not give it; a .pt2 keeps its program's. Forgets whatever
        was traced on the old shape. Returns whether the shape was taken."""
        if not self.wants_data_shapes or not shapes:
            return False
        if self._example is not None and self.example_shapes == dict(shapes):
            self._shape_source = DATA
            self._drop_guess_note()
            return True
        self._input_shapes = {k: tuple(v) for k, v in shapes.items()}
        self._shape_source = DATA
        self._drop_guess_note()
        self._example = None
        self._traced = self.format == "torchscript"
        self._exported = None
        self._graph_error = self._graph_error if self.format == "torchscript" else None
        self._info = None
        self._report = None
        self._runnable = None
        return True

    def check_output(self, out: Path) -> None:
        """Refuse, before any work, an output this model cannot be written to faithfully
        (``example.check_output``: a guessed shape, dims a weights-only file cannot keep)."""
        check_output(self, out)

    def _drop_guess_note(self) -> None:
        if self._guess_note in self.notes:
            self.notes.remove(self._guess_note)
        self._guess_note = None

    def derive(self, format: str, module: Any, exported: Any = None) -> TorchHandle:
        """A handle for a model made from this one (folded, recalibrated): same path, example
        input, shape source, dynamic dims and notes."""
        new = TorchHandle(
            self.path,
            format,
            module,
            exported,
            input_shapes=self._input_shapes,
            dynamic_dims=self._dynamic_dims,
            factory_shape=self._factory_shape,
            notes=self.notes,
        )
        new._example = dict(self.example_named)
        new._shape_source = self._shape_source
        new._guess_note = self._guess_note
        return new

    @property
    def exported(self) -> Any:
        """The ExportedProgram (None when the model could not be traced)."""
        if not self._traced:
            self._traced = True
            self._exported, self._graph_error = trace(self)
        return self._exported

    @property
    def graph_error(self) -> str | None:
        _ = self.exported
        return self._graph_error

    def info(self) -> ModelInfo:
        """Discover BN layers, other norms, inputs and outputs (cached)."""
        if self._info is None:
            # Mode is read before anything runs: tracing works on an eval copy.
            ep = self.exported
            outs: tuple[Any, ...] = ()
            if ep is None and self.format != "pt2":
                outs = self._eager_outputs()
            self._info = build_info(
                str(self.path),
                self.format,
                self.module,
                ep,
                self._graph_error,
                self.example_named if ep is None else {},
                outs,
            )
            if self._shape_source == GUESS:
                self._info = replace(self._info, input_guessed=True)
        return self._info

    def report_info(self) -> ModelInfo:
        """``info()`` for reporting: the same ModelInfo, read where it can be from a
        ``torch.fx`` trace instead of ``torch.export`` (``fxgraph.fx_program``: seconds less;
        None where the two could differ, and then ``info()`` itself). ``fold`` and the other
        commands call ``info()``, which always reads the exported graph."""
        if self._info is not None:
            return self._info
        if self._report is None and not self._traced:
            from bncheck.backends.torch.fxgraph import fx_program

            prog = fx_program(self)
            if prog is not None:
                info = build_info(str(self.path), self.format, self.module, prog, None, {})
                if self._shape_source == GUESS:
                    info = replace(info, input_guessed=True)
                self._report = info
        return self._report or self.info()

    def runnable(self) -> Any:
        """The module inference runs (cached): the graph of a .pt2, else an eval-mode copy.

        A .pt2 exported in train mode updates its BN buffers in place when it runs (its
        signature does not list them as mutated), and ``ep.module()`` shares them with the
        program: the runnable gets its own copy of every buffer (statistics are small; the
        parameters stay shared), so running never changes the loaded program's statistics."""
        if self._runnable is None:
            if self.format == "pt2" and self._exported is not None:
                gm = self._exported.module()
                for mod in gm.modules():
                    for key, buf in list(mod._buffers.items()):
                        if buf is not None:
                            mod._buffers[key] = buf.clone()
                self._runnable = gm
            else:
                self._runnable = copy_module(self.module).eval()
        return self._runnable

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Inference forward on CPU under ``torch.inference_mode``.

        The model runs as it is deployed for inference: an eager model in eval mode (an eval
        copy; the handle's module keeps its mode), a .pt2 as its graph was exported. Inputs as
        :meth:`input_tensors` makes them, outputs as :func:`numpy_outputs` flattens them.
        """
        import torch

        tensors = self.input_tensors(feeds)
        try:
            with torch.inference_mode(), quiet_torch():
                out = self.runnable()(*tensors)
        except Exception as exc:
            raise self.run_error(exc, tensors) from None
        return numpy_outputs(out)

    def run_error(self, exc: BaseException, tensors: Sequence[Any]) -> InputError:
        """The error for a forward that raised ``exc`` on ``tensors`` (``example.run_error``)."""
        return run_error(self, exc, tensors)

    def prepare(self) -> None:
        self.runnable()

    def run_reference(self, feeds: Mapping[str, np.ndarray]) -> tuple[list[np.ndarray], str]:
        """:meth:`run` in float64 (a cached float64 copy of the runnable, float inputs widened),
        for verification's noise yardstick."""
        import torch

        from bncheck.backends.torch.fold_eager import float64_copy

        if getattr(self, "_float64", None) is None:
            self._float64 = float64_copy(self.runnable())
        tensors = [t.double() if t.is_floating_point() else t for t in self.input_tensors(feeds)]
        try:
            with torch.inference_mode(), quiet_torch():
                out = self._float64(*tensors)
        except Exception as exc:
            raise InputError(f"{self.path}: no float64 run: {first_line(exc)}") from None
        return numpy_outputs(out), "float64 vs the model's dtype"

    def input_tensors(self, feeds: Mapping[str, np.ndarray]) -> list[Any]:
        """``feeds`` as the forward's positional tensors (CPU): matched by argument name, a
        single feed going to a single input whatever its name; floating-point feeds cast to the
        model's input dtype (numpy has no bfloat16)."""
        import torch

        names = list(self.example_named) or list(feeds)
        if len(feeds) == 1 and len(names) == 1:
            args = [next(iter(feeds.values()))]
        else:
            missing = [n for n in names if n not in feeds]
            if missing:
                raise InputError(f"{self.path}: no data for model input {missing[0]!r}")
            args = [feeds[n] for n in names]
        tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in args]
        for i, ref in enumerate(list(self.example_named.values())[: len(tensors)]):
            t = tensors[i]
            if t.is_floating_point() and ref.is_floating_point() and t.dtype != ref.dtype:
                tensors[i] = t.to(ref.dtype)
        return tensors

    def folded(self, *, affine: bool = False) -> tuple[TorchHandle, list[FoldStep]]:
        """Fold the BNs ``info()`` marks foldable (``affine``: the rest become ``x·s + t``).

        A traced model is folded on its graph and re-exported: the new handle holds that
        ExportedProgram and reports format ``pt2`` (its ``info()`` reads the graph, as the
        folded model is no longer the ``--arch`` class), path = the source path. A model
        that does not trace folds its safe eager Conv→BN pairs in a copy and keeps its format.
        """
        from bncheck.backends.torch.fold import fold_graph
        from bncheck.backends.torch.fold_eager import fold_eager

        if self.exported is not None:
            ep, steps = fold_graph(self, affine=affine)
            return self.derive("pt2", ep.module(), ep), steps
        module, steps = fold_eager(self)
        return self.derive(self.format, module), steps

    def moment_runner(self, *, batch_stats: bool) -> Any:
        from bncheck.backends.torch.stats import moment_runner

        return moment_runner(self, batch_stats=batch_stats)

    def with_stats(self, stats: Any, *, num_batches: int | None = None) -> Any:
        from bncheck.backends.torch.stats import with_stats

        return with_stats(self, stats, num_batches=num_batches)

    def save(self, path: Path) -> None:
        """Write atomically, by suffix: ``.pt2`` / ``.onnx`` from the traced program,
        ``.safetensors`` as safetensors; any other suffix writes the source format (state
        dict with the same keys, safetensors, trusted pickle)."""
        from bncheck.backends.torch.save import save_torch

        path = Path(path)
        suffix = path.suffix.lower()
        fmt = {".pt2": "pt2", ".onnx": "onnx", ".safetensors": "safetensors"}.get(suffix)
        if fmt is None and self.format in ("state_dict", "safetensors", "pickle"):
            fmt = self.format
        if fmt is None:
            raise InputError(f"{path}: cannot write a {self.format} model as {suffix or 'this'}")
        self.check_output(path)
        save_torch(self, path, fmt)

    def program_to_write(self) -> Any:
        """The ExportedProgram a .pt2/.onnx is written from (``trace.program_to_write``)."""
        from bncheck.backends.torch.trace import program_to_write

        return program_to_write(self)

    # ------------------------------------------------------------------------------------------

    def _build_example(self) -> dict[str, Any]:
        if self.format == "pt2":
            self._shape_source = GIVEN if self._input_shapes else PROGRAM
            return self._pt2_example()
        example, source, note = build_example(
            self.path, self.module, self._input_shapes, self._shape_source, self._factory_shape
        )
        self._shape_source = source
        if note and note not in self.notes:
            self._guess_note = note
            self.notes.append(note)
        return example

    def _pt2_example(self) -> dict[str, Any]:
        import torch

        ep = self._exported
        names = list(ep.graph_signature.user_inputs)
        nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        shapes = dict(self._input_shapes or {})
        if "" in shapes and names:
            shapes[names[0]] = shapes.pop("")
        ex = ep.example_inputs
        if ex and not shapes and len(ex[0]) == len(names):
            return dict(zip(names, ex[0], strict=True))
        out = {}
        for n in names:
            val = nodes[n].meta.get("val")
            if val is None:
                continue
            dims = shapes.get(n) or tuple(d if isinstance(d, int) else 2 for d in val.shape)
            out[n] = (
                seeded_randn(dims, val.dtype)
                if val.is_floating_point()
                else torch.zeros(dims, dtype=val.dtype)
            )
        return out

    def _eager_outputs(self) -> tuple[Any, ...]:
        import torch

        if not self.example_named or self.format == "torchscript":
            return ()
        try:
            work = copy_module(self.module).eval()
            with torch.no_grad(), quiet_torch():
                out = work(*self.example_inputs)
        except Exception:
            return ()
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def numpy_outputs(out: Any) -> list[np.ndarray]:
    """A model's outputs flattened (tuple/list/dict → list, in order) to numpy; bfloat16, which
    numpy lacks, as float32."""
    import torch

    return [
        (t.float() if t.dtype == torch.bfloat16 else t).detach().cpu().numpy()
        for t in _flat_tensors(out)
    ]


def _flat_tensors(out: Any) -> list[Any]:
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat_tensors(o)]
    return [out] if hasattr(out, "detach") else []


def open_torch(
    path: Path,
    *,
    kind: str,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    dynamic_dims: Shapes | None = None,
    checkpoint_key: str | None = None,
) -> TorchHandle:
    """Load a PyTorch file identified as ``kind`` by ``sniff`` and return its handle.

    ``dynamic_dims`` (input name or ``""`` → axes) are kept dynamic in written files;
    ``checkpoint_key`` picks the state dict of a checkpoint that holds several.
    Raises InputError for malformed files or a bad ``--arch``, UnsafeInputError for files that
    could run code without ``trust_pickle``.
    """
    loaded = load_torch(
        Path(path),
        kind=kind,
        arch=arch,
        arch_kwargs=arch_kwargs,
        trust_pickle=trust_pickle,
        checkpoint_key=checkpoint_key,
    )
    return TorchHandle(
        Path(path),
        loaded.format,
        loaded.module,
        loaded.exported,
        input_shapes=input_shapes,
        dynamic_dims=dynamic_dims,
        factory_shape=loaded.example_shape,
        notes=loaded.notes,
    )
