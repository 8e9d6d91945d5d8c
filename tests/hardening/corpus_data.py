"""Generators of bad data files (for check, recalibrate and fold --data), built in tmp_path."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from corpus import conv_bn_onnx, patch_central_directory


def _write(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_bytes(data)
    return p


# ---- data cases (for data_model(): x[N,3,5,5], so images can feed it too) -------------------


def data_model() -> onnx.ModelProto:
    """The model every data case is fed to: conv_bn_onnx with 3 input channels."""
    return conv_bn_onnx(cin=3)


def good_data(n: int = 8, cin: int = 3) -> np.ndarray:
    return np.random.default_rng(5).normal(size=(n, cin, 5, 5)).astype(np.float32)


def _npy(folder: Path, name: str, arr: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    np.save(p, arr, allow_pickle=False)
    return p


def data_cases(marker: Path) -> dict[str, Callable[[Path], tuple[Path, tuple[str, ...]]]]:
    """Bad data files by case name → (path, needles of the error line)."""

    def wrong_shape(folder: Path):
        return _npy(folder, "shape.npy", np.zeros((8, 2, 5, 5), np.float32)), ("shape.npy",)

    def wrong_dtype(folder: Path):
        return _npy(folder, "cplx.npy", np.zeros((8, 3, 5, 5), np.complex64)), ("cplx.npy",)

    def strings(folder: Path):
        return _npy(folder, "str.npy", np.full((8, 3, 5, 5), "ab")), ("str.npy",)

    def with_nan(folder: Path):
        a = good_data()
        a[5, 1, 2, 3] = np.nan
        return _npy(folder, "nan.npy", a), ("nan.npy", "NaN")

    def with_inf(folder: Path):
        a = good_data()
        a[0, 0, 0, 0] = -np.inf
        return _npy(folder, "inf.npy", a), ("inf.npy", "Inf")

    def zero_samples(folder: Path):
        return _npy(folder, "zero.npy", np.zeros((0, 3, 5, 5), np.float32)), ("zero.npy",)

    def pickled_npy(folder: Path):
        from torch_fixtures import Evil

        folder.mkdir(parents=True, exist_ok=True)
        p = folder / "obj.npy"
        np.save(p, np.array([Evil(marker)], dtype=object), allow_pickle=True)
        return p, ("obj.npy",)

    def bad_image_folder(folder: Path):
        imgs = folder / "images"
        imgs.mkdir(parents=True, exist_ok=True)
        (imgs / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0garbage" * 16)
        return imgs, ("a.png",)

    def bad_image_file(folder: Path):
        return _write(folder, "broken.jpg", b"\xff\xd8\xff\xe0" + b"\x13" * 64), ("broken.jpg",)

    def empty_file(folder: Path):
        return _write(folder, "empty.npy", b""), ("empty.npy", "empty")

    def npz_bad_zip_name(folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        p = folder / "bad.npz"
        np.savez(p, x=good_data(4))
        p.write_bytes(patch_central_directory(p.read_bytes(), "utf8"))
        return p, ("bad.npz",)

    def multi_disk_zip(folder: Path):
        locator = b"PK\x06\x07" + struct.pack("<LQL", 0, 0, 2)
        return _write(folder, "disks.npz", locator + b"PK\x05\x06" + b"\0" * 18), ("disks.npz",)

    return {
        "npz_bad_zip_name": npz_bad_zip_name,
        "multi_disk_zip": multi_disk_zip,
        "wrong_shape": wrong_shape,
        "wrong_dtype_complex": wrong_dtype,
        "wrong_dtype_strings": strings,
        "nan": with_nan,
        "inf": with_inf,
        "zero_samples": zero_samples,
        "pickled_npy": pickled_npy,
        "bad_image_folder": bad_image_folder,
        "bad_image_file": bad_image_file,
        "empty_file": empty_file,
    }
