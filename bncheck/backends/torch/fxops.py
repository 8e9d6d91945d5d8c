"""The tables of ``fxgraph``: which ops ``torch.export`` records for each fx node.

Measured on torch 2.13's export IR (pre-dispatch ATen, what ``torch.export.export`` returns):
a ``torch.nn`` layer or functional call is one op of the same name, ``inplace=True`` makes it the
``op_`` variant; ``Identity``, ``contiguous()`` of a contiguous tensor and eval-mode
``stochastic_depth`` record nothing.
``tests/test_torch_fx_discover.py`` checks them against export on every architecture it builds.
"""

from __future__ import annotations

import operator
from typing import Any

__all__ = [
    "ACTIVATIONS",
    "BATCHNORM",
    "CASTS",
    "CONV",
    "DECONV",
    "METHODS",
    "PYTHON_OPS",
    "SIMPLE_MODULES",
    "TENSOR_FACTS",
    "Ambiguous",
    "function_table",
    "hashable",
    "is_batchnorm",
    "is_stochastic_depth",
    "upsample",
    "weighted_functions",
]


class Ambiguous(Exception):
    """The fx graph does not say for certain what export would record."""


# activation layers: class name → (op, whether `inplace=True` makes it the `op_` variant)
ACTIVATIONS = {
    "ReLU": ("relu", True), "ReLU6": ("hardtanh", True), "Hardtanh": ("hardtanh", True),
    "Hardswish": ("hardswish", True), "Hardsigmoid": ("hardsigmoid", True),
    "SiLU": ("silu", True), "Mish": ("mish", True), "LeakyReLU": ("leaky_relu", True),
    "ELU": ("elu", True), "GELU": ("gelu", False), "Sigmoid": ("sigmoid", False),
    "Tanh": ("tanh", False), "Softplus": ("softplus", False), "PReLU": ("prelu", False),
    "Softmax": ("softmax", False),
}  # fmt: skip
# other one-op layers: class name → op
SIMPLE_MODULES = {
    "MaxPool1d": "max_pool1d", "MaxPool2d": "max_pool2d", "MaxPool3d": "max_pool3d",
    "AvgPool1d": "avg_pool1d", "AvgPool2d": "avg_pool2d", "AvgPool3d": "avg_pool3d",
    "AdaptiveAvgPool1d": "adaptive_avg_pool1d", "AdaptiveAvgPool2d": "adaptive_avg_pool2d",
    "AdaptiveAvgPool3d": "adaptive_avg_pool3d", "Flatten": "flatten", "Dropout": "dropout",
    "Dropout2d": "feature_dropout", "Dropout3d": "feature_dropout",
    "AlphaDropout": "alpha_dropout", "ChannelShuffle": "channel_shuffle",
    "PixelShuffle": "pixel_shuffle", "ZeroPad2d": "pad", "LayerNorm": "layer_norm",
    "GroupNorm": "group_norm",
}  # fmt: skip
CONV = {"Conv1d": "conv1d", "Conv2d": "conv2d", "Conv3d": "conv3d"}
DECONV = {"ConvTranspose1d": "conv_transpose1d", "ConvTranspose2d": "conv_transpose2d",
           "ConvTranspose3d": "conv_transpose3d"}  # fmt: skip
BATCHNORM = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"}

# Python operators on sizes and flags (a tensor result goes to the op tables instead)
PYTHON_OPS = {
    operator.getitem, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
    operator.ge, operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
    operator.mod, operator.neg, operator.not_,
}  # fmt: skip
TENSOR_FACTS = {"shape", "ndim", "dtype", "device", "is_cuda"}

# call_method name → op; the `_` variants are in-place, as in export
METHODS = {
    name: name
    for name in (
        "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "flatten", "mean", "sum", "view",
        "reshape", "permute", "transpose", "add", "add_", "mul", "mul_", "sub", "div", "clamp",
        "softmax", "expand_as", "neg", "matmul", "exp", "sqrt", "pow", "amax", "unsqueeze",
        "squeeze", "sigmoid_", "hardswish", "hardswish_", "reshape_as", "view_as", "sub_",
        "div_", "clamp_",
    )
}  # fmt: skip
METHODS["contiguous"] = "contiguous"  # an op only where the input is not (fxlower)
# dtype casts: export checks the input's metadata (a node reading the input), then casts
CASTS = {"float", "half", "double", "bfloat16", "to"}


def function_table() -> dict[Any, tuple[str, int | None]]:
    """call_function target → (op, position of its ``inplace`` argument or None)."""
    import torch
    import torch.nn.functional as F

    table: dict[Any, tuple[str, int | None]] = {
        operator.add: ("add", None), operator.iadd: ("add_", None),
        operator.mul: ("mul", None), operator.imul: ("mul_", None),
        operator.sub: ("sub", None), operator.isub: ("sub_", None),
        operator.truediv: ("div", None), operator.itruediv: ("div_", None),
        operator.neg: ("neg", None), operator.matmul: ("matmul", None),
        torch.add: ("add", None), torch.mul: ("mul", None), torch.cat: ("cat", None),
        torch.relu: ("relu", None), torch.sigmoid: ("sigmoid", None), torch.tanh: ("tanh", None),
        torch.flatten: ("flatten", None), torch.mean: ("mean", None),
        torch.unsqueeze: ("unsqueeze", None), torch.squeeze: ("squeeze", None),
        torch.transpose: ("transpose", None), torch.permute: ("permute", None),
        torch.reshape: ("reshape", None), torch.sum: ("sum", None), torch.clamp: ("clamp", None),
        torch.softmax: ("softmax", None), torch.exp: ("exp", None), torch.sub: ("sub", None),
        torch.div: ("div", None), torch.maximum: ("maximum", None),
        torch.matmul: ("matmul", None),
        F.relu: ("relu", 1), F.relu6: ("relu6", 1), F.silu: ("silu", 1),
        F.hardswish: ("hardswish", 1), F.hardsigmoid: ("hardsigmoid", 1), F.mish: ("mish", 1),
        F.gelu: ("gelu", None), F.sigmoid: ("sigmoid", None), F.tanh: ("tanh", None),
        F.leaky_relu: ("leaky_relu", 2), F.elu: ("elu", 2), F.hardtanh: ("hardtanh", 3),
        F.softmax: ("softmax", None), F.adaptive_avg_pool2d: ("adaptive_avg_pool2d", None),
        F.avg_pool2d: ("avg_pool2d", None), F.pad: ("pad", None),
        F.max_pool1d: ("max_pool1d", None), F.max_pool2d: ("max_pool2d", None),
        F.avg_pool1d: ("avg_pool1d", None), F.adaptive_avg_pool1d: ("adaptive_avg_pool1d", None),
    }  # fmt: skip
    return table


def weighted_functions() -> set[Any]:
    import torch.nn.functional as F

    return {F.linear, F.conv1d, F.conv2d, F.conv3d}


def is_batchnorm(m: Any) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return isinstance(m, _BatchNorm)


def is_stochastic_depth(target: Any) -> bool:
    # torchvision.ops.stochastic_depth: an fx-wrapped function that is the identity in eval
    return getattr(target, "__name__", "") == "stochastic_depth" and getattr(
        target, "__module__", ""
    ).startswith("torchvision.ops")


def upsample(mode: str, size: Any, scale: Any) -> str:
    ops = {"nearest": "upsample_nearest", "bilinear": "upsample_bilinear", "linear": None}
    base = ops.get(mode)
    if base is None or (size is None) == (scale is None):
        raise Ambiguous(f"upsample mode {mode}")
    return f"{base}2d"


def hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True
