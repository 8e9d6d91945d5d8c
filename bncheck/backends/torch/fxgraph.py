"""The graph ``torch.export`` would trace, rebuilt from a ``torch.fx`` symbolic trace in a tenth of
the time, for reporting (``inspect``).

``torch.export`` costs seconds: its machinery (dynamo, sympy) takes ~2.4 s to import and the first
trace ~3 s, more than building, loading and running the model. Its graph, in the IR it returns
(pre-dispatch ATen), keeps every ``torch.nn`` layer and functional call as one op of the same name
(``Conv2d`` → ``conv2d``, ``ReLU6(inplace=True)`` → ``hardtanh_``, ``x + y`` → ``add``, ``Identity``
→ nothing). ``torch.fx`` gives the same program one level up: ``call_module`` nodes for the
``torch.nn`` layers, ``call_function`` / ``call_method`` for the rest. ``fx_program`` traces the
model (``x += y`` kept in place), runs the traced graph at two batch sizes, and lowers each node
to the ops export records for it (``fxlower.Lowering``, with the tables of ``fxops``), named as
export names them, with the same placeholders, module stack and value shapes, into an object that
``GraphView`` reads like an ExportedProgram. Discovery (``discover.build_info``) then runs
unchanged on it: the same producers, consumers, fold decisions, reasons, inputs, outputs and node
count as on the exported graph.

It answers only where that is certain, and returns None (the caller exports) otherwise: an op not
in the tables (a multi-output op, an index by tensor, a size that follows the batch, …), a BN
called twice inside a module fx traces through, a frozen BN, a forward hook, a module or tensor
reachable under two names, an input signature export would see differently, ``--dynamic-dims``,
or a model whose batch size is not free. Export keeps dim 0 dynamic where the model allows it;
whether it does is seen by running the traced graph at two batch sizes (the example's, a batch of
1 doubled as ``dynamic_spec`` does, and one more): a model that pins its batch fails at one of
them or changes a non-batch output dim, and export (which also writes the note) takes over.

``fold`` never reads this graph: it rewrites the exported program.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

from bncheck.backends.torch.copying import copy_module
from bncheck.backends.torch.example import widen_dynamic
from bncheck.backends.torch.fxlower import Const, FxProgram, Lowering, Parts, Val, Varying
from bncheck.backends.torch.fxops import BATCHNORM, Ambiguous, is_batchnorm
from bncheck.backends.torch.graph import _flatten

__all__ = ["VERIFIED_TORCH", "FxProgram", "fx_program", "lower", "torch_verified"]

# the formats whose module is the user's eager nn.Module
_EAGER = ("state_dict", "safetensors", "pickle")
# the torch releases whose export IR the tables of fxops were measured on (names, in-place
# variants, the checks before a cast): another release may record other ops, so it exports
VERIFIED_TORCH = ("2.13",)


def torch_verified() -> bool:
    """Whether the installed torch is one the fast path was checked against."""
    import torch

    return torch.__version__.startswith(tuple(f"{v}." for v in VERIFIED_TORCH))


def _eligible(handle: Any) -> dict[str, Any] | None:
    """The one example input export would trace, when the fast path may answer at all."""
    if handle.format not in _EAGER or handle._dynamic_dims:
        return None
    example = handle.example_named
    if len(example) != 1:
        return None
    (x,) = example.values()
    if not hasattr(x, "dim") or x.dim() == 0 or not x.is_floating_point():
        return None
    params = list(inspect.signature(handle.module.forward).parameters.values())
    if [p.name for p in params[: len(example)]] != list(example) or any(
        p.kind != p.POSITIONAL_OR_KEYWORD for p in params
    ):
        return None
    # the other arguments keep their defaults, as in export: fx traces them as such constants
    rest = params[len(example) :]
    if any(p.default is p.empty or not isinstance(p.default, (bool, int, float)) for p in rest):
        return None
    return example


def _defaults(module: Any, example: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(module.forward).parameters.values()
    return {p.name: p.default for p in params if p.name not in example}


def _odd_module(module: Any) -> str | None:
    """Why export's view of ``module`` is not certain from fx, or None: a module or tensor
    reachable under two names, a forward hook, a frozen BN, a lazy module, a BN class that is
    not a ``_BatchNorm``."""
    from torch.nn.modules import module as nn_module
    from torch.nn.modules.lazy import LazyModuleMixin

    from bncheck.backends.torch.discover import is_bn, is_frozen_bn

    mods = list(module.named_modules(remove_duplicate=False))
    if len({id(m) for _, m in mods}) != len(mods):
        return "a module reachable under two names"
    tensors = [id(t) for _, t in module.named_parameters(remove_duplicate=False)]
    tensors += [id(t) for _, t in module.named_buffers(remove_duplicate=False)]
    if len(set(tensors)) != len(tensors):
        return "a tensor reachable under two names"
    # a forward hook runs in export's trace (its ops recorded, weight_norm's weight computed)
    # but not in fx's, which records a leaf module as one call
    hooks = ("_global_forward_hooks", "_global_forward_pre_hooks")
    if any(getattr(nn_module, h, None) for h in hooks):
        return "a global forward hook"
    for name, m in mods:
        cls = type(m)
        if m._forward_hooks or m._forward_pre_hooks:
            return f"{name or 'the model'}: a forward hook"
        if isinstance(m, LazyModuleMixin) or is_frozen_bn(m):
            return f"{name}: lazy or frozen BN"
        if is_bn(m) and not is_batchnorm(m):
            return f"{name}: BN class {cls.__module__}.{cls.__qualname__}"
        torch_bn = is_batchnorm(m) and cls.__module__.startswith("torch.nn.modules.")
        if torch_bn and cls.__name__ not in BATCHNORM:
            return f"{name}: BN class {cls.__qualname__}"
    return None


def _trace(module: Any, concrete: dict[str, Any]) -> Any:
    """``torch.fx.symbolic_trace``, keeping ``x += y`` in place: fx's Proxy has no ``__iadd__``,
    so Python records ``x = x + y`` (``add``), while export records the in-place ``add_``."""
    import torch

    class InplaceProxy(torch.fx.Proxy):
        pass

    for op in ("iadd", "isub", "imul", "itruediv"):
        setattr(InplaceProxy, f"__{op}__", _inplace_method(getattr(operator, op)))

    # fx finds a parameter's or buffer's name by walking every module's tensors on each access
    # (quadratic: ~5 s on timm's MobileOne); the same names, looked up once
    names = {id(t): n for n, t in module.named_parameters()}
    names.update((id(t), n) for n, t in module.named_buffers())

    class Tracer(torch.fx.Tracer):
        def proxy(self, node: Any) -> Any:
            return InplaceProxy(node, self)

        def getattr(self, attr: str, attr_val: Any, cache: dict[str, Any]) -> Any:
            # a parameter becomes a proxy (a buffer stays a tensor: proxy_buffer_attributes)
            name = names.get(id(attr_val)) if isinstance(attr_val, torch.nn.Parameter) else None
            if name is None:
                return super().getattr(attr, attr_val, cache)
            if name not in cache:
                cache[name] = self.create_proxy("get_attr", name, (), {})
            return cache[name]

        def create_arg(self, a: Any) -> Any:
            if isinstance(a, torch.Tensor) and id(a) in names:
                return self.create_node("get_attr", names[id(a)], (), {})
            return super().create_arg(a)

    tracer = Tracer()
    graph = tracer.trace(module, concrete_args=concrete or None)
    return torch.fx.GraphModule(tracer.root, graph, type(module).__name__)


def _inplace_method(op: Any) -> Any:
    def impl(self: Any, other: Any) -> Any:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return impl


def _propagate(gm: Any, x: Any) -> dict[Any, Any]:
    """Run ``gm`` on ``x``: each node's result, a tensor as its (shape, dtype, contiguous),
    several as a list of those, anything else (a size, a flag, None) as ``Const``."""
    import torch

    seen: dict[Any, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            out = super().run_node(n)
            if n.op == "output":
                return out
            if isinstance(out, torch.Tensor):
                seen[n] = (tuple(out.shape), out.dtype, out.is_contiguous())
            elif isinstance(out, (tuple, list)) and out and _all_tensors(out):
                seen[n] = [(tuple(t.shape), t.dtype, t.is_contiguous()) for t in out]
            else:
                seen[n] = Const(out)
            return out

    with torch.no_grad():
        Recorder(gm).run(x)
    return seen


def fx_program(handle: Any) -> FxProgram | None:
    """The export-shaped graph of ``handle``'s eager model from ``torch.fx.symbolic_trace``, or
    None where it could differ from what ``trace.trace`` exports (see the module docstring)."""
    return lower(handle)[0]


def lower(handle: Any) -> tuple[FxProgram | None, str | None]:
    """``fx_program``, with why there is none (for tests and debugging)."""
    import torch

    from bncheck.backends.torch.load import quiet_torch

    if not torch_verified():
        return None, "torch is not a release the fx tables were checked against"
    example = _eligible(handle)
    if example is None:
        return None, "not one batched tensor input of an eager model, or --dynamic-dims"
    odd = _odd_module(handle.module)
    if odd:
        return None, odd
    work = copy_module(handle.module).eval()
    (x,) = example.values()
    # batched as ``dynamic_spec`` batches it for export; not by calling it: its
    # ``torch.export.Dim`` imports sympy (~1 s)
    batched = widen_dynamic(x, (0,))
    one_more = torch.cat([batched, batched[:1]])
    try:
        with quiet_torch():
            gm = _trace(work, _defaults(handle.module, example))
            at_b = _propagate(gm, batched)
            at_b1 = _propagate(gm, one_more)
    except Exception as exc:
        return None, f"fx: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    vals = _batch_values(gm, at_b, at_b1)
    if vals is None:
        return None, "a value's shape depends on the batch size other than through dim 0"
    try:
        batch = (int(batched.shape[0]), int(one_more.shape[0]))
        return Lowering(gm, work, vals, batch).run(), None
    except Ambiguous as exc:
        return None, f"not in the tables: {exc}"
    except KeyError as exc:
        return None, f"no such tensor: {exc}"


def _batch_values(gm: Any, at_b: dict[Any, Any], at_b1: dict[Any, Any]) -> dict[Any, Any] | None:
    """Node → ``Val`` (a tensor) or ``Const`` (a Python value); dim 0 of the input and of the
    outputs is the symbol where it follows the batch. None when a value's rank, an output's
    other dims, or a Python value (export would record a size op for it) change with the
    batch."""
    vals: dict[Any, Any] = {}
    out = gm.graph.output_node()
    outputs = {a for a in _flatten(out.args[0]) if hasattr(a, "op")}
    for node, got in at_b.items():
        other = at_b1.get(node)
        if isinstance(got, Const):
            if not isinstance(other, Const):
                return None
            # a size that follows the batch: export records ops for it, if anything reads it
            vals[node] = got if _same(got.value, other.value) else Varying(got.value, other.value)
            continue
        if isinstance(got, list):
            if not isinstance(other, list) or len(other) != len(got):
                return None
            parts = [_val(a, b) for a, b in zip(got, other, strict=True)]
            if any(p is None for p in parts):
                return None
            vals[node] = Parts(tuple(parts))
            continue
        val = _val(got, other) if isinstance(other, tuple) else None
        if val is None:
            return None
        if (node.op == "placeholder" or node in outputs) and any(val.free[1:]):
            return None
        vals[node] = val
    return vals


def _val(got: tuple[Any, ...], other: tuple[Any, ...]) -> Val | None:
    """A tensor's ``Val`` from its (shape, dtype, contiguous) at the two batch sizes; None if
    the rank or the layout changes."""
    (shape, dtype, contiguous), (shape1, _, contiguous1) = got, other
    if len(shape1) != len(shape) or contiguous != contiguous1:
        return None
    free = tuple(a != b for a, b in zip(shape, shape1, strict=True))
    # every value that follows the batch gets the symbol, not only the outputs: an output may
    # be an earlier value passed through an op export records nothing for (Identity)
    symbolic = tuple("s0" if f else n for n, f in zip(shape, free, strict=True))
    return Val(symbolic, dtype, free, shape, contiguous)


def _all_tensors(values: Any) -> bool:
    import torch

    return all(isinstance(v, torch.Tensor) for v in values)


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False
