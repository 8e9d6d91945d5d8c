"""A folder of images as model input: decode, resize, crop, normalize, lay out.

Pillow is an optional extra (``pip install bncheck[images]``); it is imported only when a folder
of images is actually read. The pipeline per image follows torchvision's common evaluation
transform, so statistics gathered here match what a torchvision-trained model saw:

1. convert to ``L`` / ``RGB`` / ``RGBA`` by the model input's channel count (RGB when dynamic);
2. ``resize``: scale so the *shorter* side equals ``resize`` (bilinear), the longer side
   ``int(resize * long / short)`` — as ``torchvision.transforms.Resize(int)``;
3. ``crop``: centre crop ``crop × crop`` at ``left = round((w - crop) / 2)``,
   ``top = round((h - crop) / 2)`` — as ``CenterCrop``;
4. ``x = (pixel / 255 - mean[c]) / std[c]`` in float32 (no mean/std: just ``pixel / 255``);
5. ``layout``: ``nchw`` gives ``(C, H, W)`` samples, ``nhwc`` gives ``(H, W, C)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bncheck.errors import InputError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@dataclass(frozen=True)
class ImageOptions:
    """How images become input tensors; see the module docstring for the exact pipeline."""

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: Literal["nchw", "nhwc"] = "nchw"


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise InputError(
            "reading a folder of images needs Pillow: install bncheck[images] (pip install pillow)"
        ) from None
    return Image


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden entries skipped), sorted by relative path.

    Files are chosen by suffix (PNG, JPEG, BMP, WebP) so a README beside the images is not an
    error; a chosen file that does not decode is.
    """
    found: list[tuple[str, Path]] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            full = Path(root) / name
            found.append((full.relative_to(folder).as_posix(), full))
    found.sort(key=lambda item: item[0])
    return [p for _, p in found]


def _channels(shape: tuple[int | str | None, ...], layout: str) -> int | None:
    if len(shape) != 4:
        return None
    c = shape[1] if layout == "nchw" else shape[3]
    return c if isinstance(c, int) else None


class ImageColumn:
    """The samples of one model input, decoded from image files batch by batch."""

    def __init__(
        self,
        files: Sequence[Path],
        options: ImageOptions,
        model_shape: tuple[int | str | None, ...],
        input_name: str,
    ) -> None:
        if options.layout not in ("nchw", "nhwc"):
            raise InputError(f"image layout must be 'nchw' or 'nhwc', not {options.layout!r}")
        for what, value in (("resize", options.resize), ("crop", options.crop)):
            if value is not None and value < 1:
                raise InputError(f"image {what} must be a positive size, not {value}")
        channels = _channels(model_shape, options.layout)
        if channels is not None and channels not in _MODES:
            raise InputError(
                f"model input {input_name!r} has {channels} channels ({options.layout}); "
                "images give 1, 3 or 4 — check the layout option"
            )
        self.files = list(files)
        self.options = options
        self.mode = _MODES[channels] if channels is not None else "RGB"
        n_ch = {"L": 1, "RGB": 3, "RGBA": 4}[self.mode]
        self.mean = self._per_channel("mean", options.mean, n_ch, 0.0)
        self.std = self._per_channel("std", options.std, n_ch, 1.0)
        if np.any(self.std == 0):
            raise InputError("image std must not contain 0")
        self.n = len(self.files)
        self.dtype = np.dtype(np.float32)
        first = self.load(self.files[0])
        self.sample_shape: tuple[int, ...] = first.shape

    @staticmethod
    def _per_channel(
        what: str, values: tuple[float, ...] | None, n_ch: int, default: float
    ) -> np.ndarray:
        if values is None:
            return np.full(n_ch, default, dtype=np.float32)
        if len(values) not in (1, n_ch):
            raise InputError(f"image {what} has {len(values)} values; the model wants {n_ch}")
        return np.broadcast_to(np.asarray(values, dtype=np.float32), (n_ch,)).copy()

    def load(self, path: Path) -> np.ndarray:
        """Decode one image into a float32 sample laid out as the options say."""
        image_mod = _pil()
        try:
            with image_mod.open(path) as img:
                img.load()
                img = img.convert(self.mode)
        except image_mod.DecompressionBombError:
            raise InputError(f"{path}: image too large to decode safely") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"{path}: not a decodable image ({exc})") from None
        opts = self.options
        if opts.resize is not None:
            w, h = img.size
            # torchvision Resize(int): the shorter side becomes `resize`, aspect ratio kept.
            if w <= h:
                size = (opts.resize, int(opts.resize * h / w))
            else:
                size = (int(opts.resize * w / h), opts.resize)
            img = img.resize(size, image_mod.Resampling.BILINEAR)
        if opts.crop is not None:
            w, h = img.size
            c = opts.crop
            if c > w or c > h:
                raise InputError(f"{path}: image is {w}x{h}, smaller than the crop {c}x{c}")
            left, top = round((w - c) / 2.0), round((h - c) / 2.0)
            img = img.crop((left, top, left + c, top + c))
        arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        arr = (arr - self.mean) / self.std
        if opts.layout == "nchw":
            arr = arr.transpose(2, 0, 1)
        return np.ascontiguousarray(arr, dtype=np.float32)

    def batches(self, bounds: Sequence[tuple[int, int]]) -> Iterator[np.ndarray]:
        for start, stop in bounds:
            out = np.empty((stop - start, *self.sample_shape), dtype=np.float32)
            for i, path in enumerate(self.files[start:stop]):
                sample = self.load(path)
                if sample.shape != self.sample_shape:
                    raise InputError(
                        f"{path}: gives a sample of shape {sample.shape}, unlike "
                        f"{self.files[0].name} {self.sample_shape}; give a resize and crop size"
                    )
                out[i] = sample
            yield out
