"""PyTorch backend: load any torch format safely, trace it, discover its BN layers."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bncheck.backends.base import ModelHandle
from bncheck.backends.torch.discover import build_info, class_name
from bncheck.backends.torch.load import load_torch, quiet_torch
from bncheck.errors import InputError, first_line
from bncheck.layers import FoldStep, ModelInfo

__all__ = ["TorchHandle", "open_torch"]

_GUESS_SPATIAL = {"Conv1d": (32,), "Conv2d": (32, 32), "Conv3d": (16, 16, 16)}


class TorchHandle(ModelHandle):
    """A loaded PyTorch model: the eager module, and the ExportedProgram once traced.

    ``exported`` is traced lazily (deep copy in eval mode, ``torch.export.export(strict=False)``)
    on first use; for a ``.pt2`` it is the loaded program. ``notes`` collects remarks such as a
    guessed example input.
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
    ) -> None:
        self.path = path
        self.format = format
        self.module = module
        self.notes: list[str] = []
        self._exported = exported
        self._input_shapes = input_shapes
        self._traced = exported is not None or format == "torchscript"
        self._graph_error: str | None = (
            "TorchScript model: producers and consumers could not be traced"
            if format == "torchscript"
            else None
        )
        self._example: dict[str, Any] | None = None
        self._info: ModelInfo | None = None

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
    def exported(self) -> Any:
        """The ExportedProgram (None when the model could not be traced)."""
        if not self._traced:
            self._traced = True
            self._exported, self._graph_error = self._trace()
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
        return self._info

    def runnable(self) -> Any:
        """The module inference runs (cached): the graph of a .pt2, else an eval-mode copy.

        A .pt2 exported in train mode updates its BN buffers in place when it runs (its
        signature does not list them as mutated), and ``ep.module()`` shares them with the
        program: the runnable gets its own copy of every buffer (statistics are small; the
        parameters stay shared), so running never changes the loaded program's statistics."""
        if getattr(self, "_runnable", None) is None:
            if self.format == "pt2" and self._exported is not None:
                gm = self._exported.module()
                for mod in gm.modules():
                    for key, buf in list(mod._buffers.items()):
                        if buf is not None:
                            mod._buffers[key] = buf.clone()
                self._runnable = gm
            else:
                self._runnable = copy.deepcopy(self.module).eval()
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
            raise InputError(f"{self.path}: the model failed to run: {first_line(exc)}") from None
        return numpy_outputs(out)

    def prepare(self) -> None:
        self.runnable()

    def run_reference(self, feeds: Mapping[str, np.ndarray]) -> tuple[list[np.ndarray], str]:
        """:meth:`run` in float64 (a cached float64 copy of the runnable, float inputs widened),
        for verification's noise yardstick."""
        import torch

        from bncheck.backends.torch.fold import float64_copy

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
        from bncheck.backends.torch.fold import fold_eager, fold_graph

        if self.exported is not None:
            ep, steps = fold_graph(self, affine=affine)
            new = TorchHandle(self.path, "pt2", ep.module(), ep)
            new._example = dict(self.example_named)
            return new, steps
        module, steps = fold_eager(self)
        new = TorchHandle(self.path, self.format, module, input_shapes=self._input_shapes)
        new._example = dict(self.example_named)
        return new, steps

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
        save_torch(self, path, fmt)

    # ------------------------------------------------------------------------------------------

    def _build_example(self) -> dict[str, Any]:
        import torch

        shapes = self._input_shapes
        if self.format == "pt2":
            return self._pt2_example()
        dtype = next((p.dtype for p in self.module.parameters() if p.is_floating_point()), None)
        dtype = dtype or torch.float32
        names, required = _forward_args(self.module)
        if shapes:
            if "" in shapes:
                if len(shapes) > 1 or len(required) > 1:
                    raise InputError(
                        f"{self.path}: model takes inputs {', '.join(names)}; "
                        "give --input-shape name=dims for each"
                    )
                return {names[0] if names else "x": _seeded_randn(shapes[""], dtype)}
            unknown = [k for k in shapes if k not in names]
            if unknown:
                raise InputError(
                    f"{self.path}: no model input named {unknown[0]!r} (inputs: {', '.join(names)})"
                )
            given = [n for n in names if n in shapes]
            if given != names[: len(given)] or not set(required) <= set(given):
                raise InputError(f"{self.path}: give --input-shape for inputs {', '.join(names)}")
            return {n: _seeded_randn(shapes[n], dtype) for n in given}
        first = names[0] if names else "x"
        shape = getattr(self.module, "example_input_shape", None)
        if isinstance(shape, (tuple, list)) and all(isinstance(d, int) for d in shape):
            return {first: _seeded_randn(tuple(shape), dtype)}
        for name, m in self.module.named_modules():
            kind = class_name(m)
            if kind in _GUESS_SPATIAL and hasattr(m, "in_channels"):
                shape = (2, m.in_channels, *_GUESS_SPATIAL[kind])
            elif kind == "Linear" and hasattr(m, "in_features"):
                shape = (2, m.in_features)
            else:
                continue
            self.notes.append(
                f"example input {first}{list(shape)} guessed from '{name}' ({kind}); "
                "pass --input-shape to set it"
            )
            return {first: _seeded_randn(shape, dtype)}
        return {}

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
                _seeded_randn(dims, val.dtype)
                if val.is_floating_point()
                else torch.zeros(dims, dtype=val.dtype)
            )
        return out

    def _trace(self) -> tuple[Any, str | None]:
        import torch

        example = self.example_named
        if not example:
            return None, "could not trace the model: no example input (pass --input-shape)"
        work = copy.deepcopy(self.module).eval()
        # A dynamic batch dim first, so the traced graph (and a fold written from it) runs any
        # batch size; a model that pins its batch size is traced as it is.
        batched = tuple(
            torch.cat([x, x]) if hasattr(x, "dim") and x.dim() > 0 and x.shape[0] == 1 else x
            for x in example.values()
        )
        dims = tuple(
            {0: torch.export.Dim("batch", min=1)} if hasattr(x, "dim") and x.dim() > 0 else None
            for x in batched
        )
        with quiet_torch():
            try:
                return torch.export.export(work, batched, dynamic_shapes=dims, strict=False), None
            except Exception:
                pass
            try:
                return torch.export.export(work, tuple(example.values()), strict=False), None
            except InputError:
                raise
            except Exception as exc:
                return None, f"could not trace the model: {first_line(exc)}"

    def _eager_outputs(self) -> tuple[Any, ...]:
        import torch

        if not self.example_named or self.format == "torchscript":
            return ()
        try:
            work = copy.deepcopy(self.module).eval()
            with torch.no_grad(), quiet_torch():
                out = work(*self.example_inputs)
        except Exception:
            return ()
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _seeded_randn(shape: Any, dtype: Any) -> Any:
    """An example input from a fixed seed: the trace embeds it in a written .pt2
    (sample_inputs), and the same command must write the same bytes."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randn(tuple(shape), generator=gen).to(dtype)


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


def _forward_args(module: Any) -> tuple[list[str], list[str]]:
    """Positional forward arguments, and those of them without a default."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return [], []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p for p in params if p.kind in kinds]
    return [p.name for p in names], [p.name for p in names if p.default is inspect.Parameter.empty]


def open_torch(
    path: Path,
    *,
    kind: str,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> TorchHandle:
    """Load a PyTorch file identified as ``kind`` by ``sniff`` and return its handle.

    Raises InputError for malformed files or a bad ``--arch``, UnsafeInputError for files that
    could run code without ``trust_pickle``.
    """
    loaded = load_torch(
        Path(path), kind=kind, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle
    )
    return TorchHandle(
        Path(path), loaded.format, loaded.module, loaded.exported, input_shapes=input_shapes
    )
