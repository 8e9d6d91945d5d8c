"""Folding outside the traced graph: a float64 copy of a module (the verification reference)
and the fallback fold of a model that does not trace (``fold_eager``: the Conv/Linear→BN pairs
its module tree shows safe, in a deep copy of the module)."""

from __future__ import annotations

import warnings
from typing import Any

from bncheck.backends.torch.copying import copy_module
from bncheck.backends.torch.discover import eager_pairs
from bncheck.backends.torch.fold import _f64, _scale_shift, _Skip, _to_torch
from bncheck.layers import FoldStep
from bncheck.numerics import fold_into_producer

__all__ = ["float64_copy", "fold_eager"]


def float64_copy(module: Any) -> Any:
    """A deep copy of ``module`` computing in float64: every floating-point parameter, buffer
    and plain tensor attribute (the constants of an unlifted ``ExportedProgram`` module) is
    widened. The source module is not touched."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deepcopy of a GraphModule warns about pytree internals
        copied = copy_module(module)
    copied = copied.double()
    for sub in copied.modules():
        for key, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                setattr(sub, key, value.double())
    return copied


# --------------------------------------------------------------------------- eager fallback


def fold_eager(handle: Any) -> tuple[Any, list[FoldStep]]:
    """Fold the Conv/Linear→BN pairs the module tree shows safe (``eager_pairs``, the decision
    ``inspect`` reports for an untraceable model) in an eval-mode deep copy: the producer gets
    ``W' = s·W``, ``b' = s·b + t`` and the BN becomes ``nn.Identity``."""
    import torch

    info = handle.info()
    module = copy_module(handle.module).eval()
    pairs = eager_pairs(module)
    steps: list[FoldStep] = []
    for layer in info.bn_layers:
        prod = pairs.get(layer.name, (None, None))[0]
        if layer.fold.into != "producer" or prod is None:
            steps.append(FoldStep(layer.name, None, None, layer.fold.reason or "not foldable"))
            continue
        conv = module.get_submodule(prod.name)
        op = {"Linear": "linear", "ConvTranspose": "conv_transpose"}.get(prod.op, "conv")
        try:
            s, t = _scale_shift(layer)
            w2, b2 = fold_into_producer(
                _f64(conv.weight), _f64(conv.bias), s, t, op=op, groups=getattr(conv, "groups", 1)
            )
            w_new = _to_torch(w2, conv.weight.dtype, "weights")
            b_dtype = (conv.bias if conv.bias is not None else conv.weight).dtype
            b_new = _to_torch(b2, b_dtype, "bias")
        except _Skip as exc:
            steps.append(FoldStep(layer.name, None, None, str(exc)))
            continue
        # New Parameters: the source module's tensors are never written to.
        conv.weight = torch.nn.Parameter(w_new, requires_grad=False)
        conv.bias = torch.nn.Parameter(b_new, requires_grad=False)
        parent, _, leaf = layer.name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, torch.nn.Identity())
        steps.append(FoldStep(layer.name, "producer", prod.name))
    return module, steps
