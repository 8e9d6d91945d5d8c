"""A folder of "photos" drawn with Pillow, and the preprocessing done by hand into an array.

The photos are what users bring: mixed sizes and formats (JPEG, PNG, BMP in a subfolder), one
grayscale, one RGBA, one palette image with transparency, one JPEG whose EXIF says "rotate 90°",
and a text file among them. ``by_hand`` is torchvision's evaluation transform written out with
Pillow and numpy, independently of bncheck's code: bncheck on the folder must give its array.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp"}


def _scene(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth colour gradient with a few ellipses and seeded noise: varied, like a photo."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [
            120 + 100 * np.sin(xx / (w / 3.0) + seed),
            120 + 100 * np.cos(yy / (h / 2.5) - seed),
            60 + 150 * (xx + yy) / (w + h),
        ],
        axis=-1,
    )
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, w - 4), rng.integers(0, h - 4)
        x1, y1 = x0 + rng.integers(3, w // 2 + 4), y0 + rng.integers(3, h // 2 + 4)
        draw.ellipse([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, size=(h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def draw_photos(folder: Path) -> Path:
    """Write the photos into ``folder`` (created) and return it."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    Image.fromarray(_scene(64, 48, 1)).save(folder / "a_landscape.jpg", quality=92)
    Image.fromarray(_scene(40, 56, 2)).save(folder / "b_portrait.png")
    Image.fromarray(_scene(50, 50, 3)).convert("L").save(folder / "c_gray.png")
    rgba = np.dstack([_scene(60, 45, 4), np.linspace(0, 255, 60 * 45).reshape(45, 60)])
    Image.fromarray(rgba.astype(np.uint8), "RGBA").save(folder / "d_rgba.png")
    pal = Image.fromarray(_scene(48, 64, 5)).quantize(colors=32)
    pal.save(folder / "e_palette.png", transparency=0)
    # Stored 56 wide and 40 high; EXIF orientation 6 says: shown rotated 90° clockwise.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_scene(56, 40, 6)).save(folder / "f_exif.jpg", quality=92, exif=exif)
    Image.fromarray(_scene(45, 45, 7)).save(folder / "sub" / "g.bmp")
    (folder / "labels.txt").write_text("not an image: skipped\n")
    return folder


def image_files(folder: Path) -> list[Path]:
    files = [p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def by_hand(
    folder: Path,
    *,
    resize: int,
    crop: tuple[int, int],
    mean: tuple[float, ...] = (0.0, 0.0, 0.0),
    std: tuple[float, ...] = (1.0, 1.0, 1.0),
    scale: float = 255.0,
    bgr: bool = False,
    nhwc: bool = False,
) -> np.ndarray:
    """transforms.Compose([Resize(resize), CenterCrop(crop), ToTensor(), Normalize(mean, std)])
    on each photo opened upright in RGB, written out with Pillow; float32 (N, 3, h, w)."""
    from PIL import Image, ImageOps

    out = []
    for path in image_files(folder):
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
        w, h = img.size
        short, long = min(w, h), max(w, h)
        new_short, new_long = resize, int(resize * long / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)
        if size != img.size:
            img = img.resize(size, Image.BILINEAR)
        ch, cw = crop
        top = round((img.height - ch) / 2.0)
        left = round((img.width - cw) / 2.0)
        img = img.crop((left, top, left + cw, top + ch))
        x = np.asarray(img, dtype=np.float32) / np.float32(scale)
        if bgr:
            x = x[:, :, ::-1]
        x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        out.append(x if nhwc else x.transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)
