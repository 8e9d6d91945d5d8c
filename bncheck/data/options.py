"""Image options as the user writes them (``--crop 224,160``, ``mean = [0.485, ...]``) →
``ImageOptions``, merged: command line > ``[tool.bncheck.data]`` > defaults."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from bncheck.data.images import ImageOptions
from bncheck.errors import InputError

__all__ = ["image_options"]


def image_options(
    given: Mapping[str, Any], table: Mapping[str, Any], where: str
) -> ImageOptions | None:
    """``given``: option name (``--crop``) → command-line value or None; ``table``: the
    ``[tool.bncheck.data]`` keys (``crop``); ``where`` names that table in errors. None when
    neither sets anything (images then follow the model's shape as they are)."""

    def pick(option: str) -> tuple[Any, str]:
        value = given.get(option)
        if value is not None:
            return value, option
        key = option.removeprefix("--")
        return table.get(key), f"{where} '{key}'"

    resize, src = pick("--resize")
    if resize is not None:
        resize = _size(resize, src)
    crop, src = pick("--crop")
    if crop is not None:
        crop = _crop(crop, src)
    mean, src = pick("--mean")
    mean = None if mean is None else _floats(mean, src)
    std, src = pick("--std")
    std = None if std is None else _floats(std, src)
    if std is not None and any(v == 0 for v in std):
        raise InputError(f"{src} {_show(std)}: a std of 0 would divide by zero")
    scale, src = pick("--scale")
    if scale is not None:
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise InputError(f"{src} {scale}: the pixel divisor must be a positive number")
    order, src = pick("--channel-order")
    if order is not None:
        order = str(order).lower()
        if order not in ("rgb", "bgr"):
            raise InputError(f"{src} {order!r}: choose rgb or bgr")
    layout, src = pick("--layout")
    if layout is not None:
        layout = str(layout).lower()
        if layout not in ("nchw", "nhwc"):
            raise InputError(f"{src} {layout!r}: choose nchw or nhwc")
    if all(v is None for v in (resize, crop, mean, std, scale, order, layout)):
        return None
    return ImageOptions(
        resize=resize,
        crop=crop,
        mean=mean,
        std=std,
        scale=255.0 if scale is None else scale,
        channel_order=order or "rgb",
        layout=layout,
    )


def _show(values: Any) -> str:
    return ",".join(str(v) for v in values) if isinstance(values, list | tuple) else str(values)


def _size(value: Any, src: str) -> int:
    try:
        size = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise InputError(f"{src} {value!r}: a size in pixels, e.g. 256") from None
    if isinstance(value, bool) or size < 1:
        raise InputError(f"{src} {value!r}: a size must be a positive number of pixels")
    return size


def _crop(value: Any, src: str) -> int | tuple[int, int]:
    if isinstance(value, int):
        return _size(value, src)
    parts = value if isinstance(value, list) else str(value).replace("x", ",").split(",")
    sizes = [_size(p, src) for p in parts]
    if len(sizes) == 1:
        return sizes[0]
    if len(sizes) != 2:
        raise InputError(f"{src} {_show(value)}: give one size N, or height,width")
    return (sizes[0], sizes[1])


def _floats(value: Any, src: str) -> tuple[float, ...]:
    parts = value if isinstance(value, list) else str(value).split(",")
    try:
        out = tuple(float(p) for p in parts if not isinstance(p, str) or p.strip())
    except (TypeError, ValueError):
        raise InputError(
            f"{src} {_show(value)}: numbers separated by commas, e.g. 0.485,0.456,0.406"
        ) from None
    if not out or not all(math.isfinite(v) for v in out):
        raise InputError(f"{src} {_show(value)}: give one finite number per channel")
    return out
