"""A folder of images as model input: decode, resize, crop, scale, normalize, lay out.

Pillow is an optional extra (``pip install bncheck[images]``); it is imported only when a folder
of images is actually read. The pipeline per image is torchvision's common evaluation transform
on PIL images (``Resize(N)``, ``CenterCrop``, ``ToTensor``, ``Normalize``), so the statistics
gathered here are those of the input a torchvision-trained model saw:

1. decode, apply the EXIF orientation (a photo is used the way a viewer shows it), and convert
   by the model input's channel count: 3 (or dynamic) → ``RGB`` (grayscale is replicated,
   alpha is dropped, a palette is expanded), 1 → ``L`` (ITU-R 601 luma), 4 → ``RGBA``;
   images of more than 8 bits per channel are refused (Pillow's conversion would clip them);
2. ``resize`` N: scale so the *shorter* side is N, the longer ``int(N * long / short)``, with
   Pillow's bilinear filter (antialiased when shrinking) — as ``torchvision Resize(N)`` does
   on a PIL image; an image whose shorter side is already N is left as it is;
3. ``crop`` (h, w): centre crop at ``top = round((H - h) / 2)``, ``left = round((W - w) / 2)``
   — as ``CenterCrop``; a crop larger than the image is refused (torchvision would pad zeros);
4. ``channel_order`` ``bgr`` reverses the colour channels (models trained on OpenCV images);
5. ``x = (pixel / scale - mean[c]) / std[c]`` in float32, ``c`` counted after step 4
   (no mean/std: just ``pixel / scale``; ``scale`` defaults to 255, as ``ToTensor``);
6. ``layout``: ``nchw`` gives ``(C, H, W)`` samples, ``nhwc`` gives ``(H, W, C)``; unset, it
   follows the model input (``nhwc`` when only its last dim is 1, 3 or 4).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bncheck.errors import InputError

# torchvision's ImageFolder extensions: what a folder of training images usually holds.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp"}
)
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@dataclass(frozen=True)
class ImageOptions:
    """How images become input tensors; see the module docstring for the exact pipeline.

    ``crop`` is one size (square) or ``(height, width)``; ``layout`` None follows the model.
    """

    resize: int | None = None
    crop: int | tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float = 255.0
    channel_order: Literal["rgb", "bgr"] = "rgb"
    layout: Literal["nchw", "nhwc"] | None = None

    @property
    def crop_hw(self) -> tuple[int, int] | None:
        if self.crop is None:
            return None
        if isinstance(self.crop, int):
            return (self.crop, self.crop)
        h, w = self.crop
        return (int(h), int(w))


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise InputError(
            "reading images needs Pillow, which is not installed: "
            "pip install 'bncheck[images]' (or pip install pillow)"
        ) from None
    return Image


def list_images(folder: Path) -> tuple[list[Path], list[str]]:
    """Image files under ``folder`` (recursively, hidden entries skipped), sorted by relative
    path; and the relative paths of the other files, which are skipped.

    Files are chosen by suffix (those of torchvision's ``ImageFolder``) so a README or a
    labels file beside the images is no error; a chosen file that does not decode is.
    """
    found: list[tuple[str, Path]] = []
    skipped: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            full = Path(root) / name
            rel = full.relative_to(folder).as_posix()
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append((rel, full))
            else:
                skipped.append(rel)
    found.sort(key=lambda item: item[0])
    return [p for _, p in found], sorted(skipped)


def choose_layout(options: ImageOptions, model_shape: tuple[int | str | None, ...]) -> str:
    """The options' layout, else the model's: ``nhwc`` when only its last dim is 1, 3 or 4."""
    if options.layout is not None:
        if options.layout not in ("nchw", "nhwc"):
            raise InputError(f"image layout must be 'nchw' or 'nhwc', not {options.layout!r}")
        return options.layout
    if len(model_shape) == 4:
        c_first, c_last = model_shape[1], model_shape[3]
        if c_last in _MODES and c_first not in _MODES:
            return "nhwc"
    return "nchw"


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
        self.layout = choose_layout(options, model_shape)
        if options.channel_order not in ("rgb", "bgr"):
            raise InputError(
                f"image channel order must be 'rgb' or 'bgr', not {options.channel_order!r}"
            )
        crop = options.crop_hw
        for what, value in (("resize", options.resize), *(("crop", c) for c in crop or ())):
            if value is not None and value < 1:
                raise InputError(f"image {what} must be a positive size, not {value}")
        if not (np.isfinite(options.scale) and options.scale > 0):
            raise InputError(f"image scale must be a positive number, not {options.scale}")
        channels = _channels(model_shape, self.layout)
        if channels is not None and channels not in _MODES:
            raise InputError(
                f"model input {input_name!r} has {channels} channels ({self.layout}); "
                "images give 1, 3 or 4 — check the layout option"
            )
        self.files = list(files)
        self.options = options
        self.crop = crop
        self.model_shape = model_shape
        self.mode = _MODES[channels] if channels is not None else "RGB"
        n_ch = {"L": 1, "RGB": 3, "RGBA": 4}[self.mode]
        self.order = list(range(n_ch))
        if options.channel_order == "bgr" and n_ch >= 3:
            self.order[:3] = [2, 1, 0]
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
            raise InputError(
                f"image {what} (--{what}) has {len(values)} values; the model input has {n_ch} "
                f"channel{'s' if n_ch > 1 else ''}: give {n_ch} (or 1 for all)"
            )
        return np.broadcast_to(np.asarray(values, dtype=np.float32), (n_ch,)).copy()

    def decode(self, path: Path) -> Any:
        """Open ``path`` as a PIL image, upright by its EXIF orientation, in the model's mode."""
        image_mod = _pil()
        from PIL import ImageOps

        try:
            # Pillow warns about palette transparency on convert; the alpha is dropped anyway.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                with image_mod.open(path) as img:
                    img.load()
                    if img.mode.startswith(("I", "F")):
                        # Pillow would clip these to 0..255 and saturate: wrong statistics.
                        raise InputError(
                            f"{path}: a {img.mode} image (more than 8 bits per channel); bncheck "
                            "reads 8-bit images: scale them yourself in a .npy or a --data hook"
                        )
                    img = ImageOps.exif_transpose(img)
                    return img.convert(self.mode)
        except image_mod.DecompressionBombError:
            raise InputError(f"{path}: image too large to decode safely") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"{path}: not a decodable image ({exc})") from None

    def load(self, path: Path) -> np.ndarray:
        """Decode one image into a float32 sample laid out as the options say."""
        image_mod = _pil()
        img = self.decode(path)
        opts = self.options
        if opts.resize is not None:
            w, h = img.size
            # torchvision Resize(int): the shorter side becomes `resize`, aspect ratio kept.
            if w <= h:
                size = (opts.resize, int(opts.resize * h / w))
            else:
                size = (int(opts.resize * w / h), opts.resize)
            if size != img.size:
                img = img.resize(size, image_mod.Resampling.BILINEAR)
        if self.crop is not None:
            w, h = img.size
            ch, cw = self.crop
            if ch > h or cw > w:
                resized = " after --resize" if opts.resize is not None else ""
                raise InputError(
                    f"{path}: image is {w}x{h}{resized}, smaller than the crop {cw}x{ch} "
                    "(width x height)"
                )
            top, left = round((h - ch) / 2.0), round((w - cw) / 2.0)
            img = img.crop((left, top, left + cw, top + ch))
        arr = np.asarray(img, dtype=np.float32) / np.float32(opts.scale)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if self.order != sorted(self.order):
            arr = arr[:, :, self.order]
        arr = (arr - self.mean) / self.std
        if self.layout == "nchw":
            arr = arr.transpose(2, 0, 1)
        return np.ascontiguousarray(arr, dtype=np.float32)

    def hint(self) -> str:
        """What to give when the decoded images do not fit the model: the options that would."""
        spatial = self.model_shape[2:] if self.layout == "nchw" else self.model_shape[1:3]
        if len(spatial) == 2 and all(isinstance(d, int) for d in spatial):
            h, w = spatial
            size = f"{h}" if h == w else f"{h},{w}"
            if self.options.resize is None:
                return (
                    f"give --resize N --crop {size} (N: your training's resize, often {h * 8 // 7})"
                )
            return f"give --crop {size}"
        return "give --resize N and --crop N"

    def batches(self, bounds: Sequence[tuple[int, int]]) -> Iterator[np.ndarray]:
        for start, stop in bounds:
            out = np.empty((stop - start, *self.sample_shape), dtype=np.float32)
            for i, path in enumerate(self.files[start:stop]):
                sample = self.load(path)
                if sample.shape != self.sample_shape:
                    raise InputError(
                        f"{path}: gives a sample of shape {sample.shape}, unlike "
                        f"{self.files[0].name} {self.sample_shape}: images of different sizes "
                        "need --resize N and --crop N"
                    )
                out[i] = sample
            yield out
