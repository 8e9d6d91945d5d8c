"""Tests for bncheck.data (the source, and the readers and image pipeline behind it)."""

from __future__ import annotations

import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bncheck.data import ImageOptions, open_data
from bncheck.errors import InputError
from bncheck.layers import TensorSpec

ONE = [TensorSpec("x", ("batch", 3, 4, 4), "float32")]
TWO = [
    TensorSpec("image", (None, 3, 4, 4), "float32"),
    TensorSpec("meta", ("batch", 5), "float32"),
]


def arr(n: int, *shape: int, seed: int = 0, dtype: str = "float32") -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(dtype)


def collect(source) -> dict[str, np.ndarray]:
    batches = list(source)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def sizes(source) -> list[int]:
    return [len(next(iter(b.values()))) for b in source]


# --- formats ------------------------------------------------------------------------------


def test_npy_batches_are_copies_in_model_dtype(tmp_path: Path) -> None:
    data = arr(70, 3, 4, 4)
    np.save(tmp_path / "d.npy", data)
    src = open_data(tmp_path / "d.npy", inputs=ONE, batch_size=32)
    assert (src.num_samples, src.num_batches, src.min_batch) == (70, 3, 6)
    assert sizes(src) == [32, 32, 6]
    batch = src.first_batch()["x"]
    assert type(batch) is np.ndarray and batch.flags.c_contiguous and batch.dtype == np.float32
    batch[:] = 0  # a copy: the file's data must not change
    np.testing.assert_array_equal(collect(src)["x"], data)  # exact: no conversion happened
    assert not src.synthetic and src.format == "npy"
    assert "d.npy" in src.description and "70 of 70 samples" in src.description


def test_npy_refuses_multi_input_model(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", arr(4, 3, 4, 4))
    with pytest.raises(InputError, match=r"d\.npy: a \.npy holds one array .* 2 inputs"):
        open_data(tmp_path / "d.npy", inputs=TWO)


def test_npz_matches_inputs_by_name(tmp_path: Path) -> None:
    image, meta = arr(10, 3, 4, 4), arr(10, 5, seed=1)
    np.savez(tmp_path / "d.npz", meta=meta, image=image, label=np.arange(10))
    src = open_data(tmp_path / "d.npz", inputs=TWO, batch_size=4)
    got = collect(src)
    np.testing.assert_array_equal(got["image"], image)
    np.testing.assert_array_equal(got["meta"], meta)
    assert sizes(src) == [4, 4, 2]
    assert any("not used by the model: label" in n for n in src.notes)


def test_npz_compressed_and_fortran_members_stream_correctly(tmp_path: Path) -> None:
    image = arr(9, 3, 4, 4)
    meta = np.asfortranarray(arr(9, 5, seed=1))
    np.savez_compressed(tmp_path / "d.npz", image=image, meta=meta)
    with zipfile.ZipFile(tmp_path / "d.npz") as zf:
        assert zf.getinfo("image.npy").compress_type == zipfile.ZIP_DEFLATED
    got = collect(open_data(tmp_path / "d.npz", inputs=TWO, batch_size=2))
    np.testing.assert_array_equal(got["image"], image)
    np.testing.assert_array_equal(got["meta"], meta)


def test_npz_single_array_feeds_single_input(tmp_path: Path) -> None:
    data = arr(5, 3, 4, 4)
    np.savez(tmp_path / "d.npz", data)  # stored as arr_0
    np.testing.assert_array_equal(collect(open_data(tmp_path / "d.npz", inputs=ONE))["x"], data)


def test_npz_missing_input_lists_what_it_has(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", image=arr(4, 3, 4, 4), extra=arr(4, 5))
    with pytest.raises(InputError, match=r"d\.npz: no array named 'meta' .* holds: extra, image"):
        open_data(tmp_path / "d.npz", inputs=TWO)


def test_npz_inputs_with_different_counts(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", image=arr(4, 3, 4, 4), meta=arr(3, 5))
    with pytest.raises(InputError, match=r"different sample counts \(image: 4, meta: 3\)"):
        open_data(tmp_path / "d.npz", inputs=TWO)


def test_pt_tensor_and_dict(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    one = arr(6, 3, 4, 4)
    torch.save(torch.from_numpy(one), tmp_path / "one.pt")
    np.testing.assert_array_equal(collect(open_data(tmp_path / "one.pt", inputs=ONE))["x"], one)
    image, meta = arr(6, 3, 4, 4), arr(6, 5, seed=1)
    torch.save(
        {"image": torch.from_numpy(image), "meta": torch.from_numpy(meta)}, tmp_path / "two.pt"
    )
    src = open_data(tmp_path / "two.pt", inputs=TWO, batch_size=4)
    got = collect(src)
    np.testing.assert_array_equal(got["image"], image)
    np.testing.assert_array_equal(got["meta"], meta)
    assert src.format == "pt" and sizes(src) == [4, 2]


def test_pt_bfloat16_and_refusals(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    t = torch.randn(4, 3, 4, 4).to(torch.bfloat16)
    torch.save(t, tmp_path / "bf.pt")
    got = collect(open_data(tmp_path / "bf.pt", inputs=ONE))["x"]
    np.testing.assert_array_equal(got, t.float().numpy())  # bf16 → f32 is exact
    torch.save([t], tmp_path / "list.pt")
    with pytest.raises(InputError, match=r"list\.pt: holds a list; expected a tensor"):
        open_data(tmp_path / "list.pt", inputs=ONE)
    torch.save({"x": t, "f": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match=r"evil\.pt: not a plain tensor file; weights-only"):
        open_data(tmp_path / "evil.pt", inputs=ONE)


class _Evil:
    """An object a weights-only load must refuse."""


def test_unrecognised_missing_and_empty_files(tmp_path: Path) -> None:
    (tmp_path / "d.npy").write_bytes(b"hello world, not numpy")
    with pytest.raises(InputError, match=r"d\.npy: not a \.npy file: unrecognised data"):
        open_data(tmp_path / "d.npy", inputs=ONE)
    (tmp_path / "e.npy").write_bytes(b"")
    with pytest.raises(InputError, match=r"e\.npy: empty file"):
        open_data(tmp_path / "e.npy", inputs=ONE)
    with pytest.raises(InputError, match=r"nope\.npy: no such file"):
        open_data(tmp_path / "nope.npy", inputs=ONE)
    with pytest.raises(InputError, match="no data given"):
        open_data(None, inputs=ONE)
    with zipfile.ZipFile(tmp_path / "z.npz", "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(InputError, match=r"neither an \.npz nor a torch\.save"):
        open_data(tmp_path / "z.npz", inputs=ONE)


# --- validation -----------------------------------------------------------------------------


def test_dtype_conversion_with_note(tmp_path: Path) -> None:
    ints = np.arange(2 * 48, dtype=np.int64).reshape(2, 3, 4, 4)
    np.save(tmp_path / "i.npy", ints)
    src = open_data(tmp_path / "i.npy", inputs=ONE)
    got = collect(src)["x"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ints.astype(np.float32))
    assert "input 'x': int64 data converted to float32" in src.notes
    np.save(tmp_path / "f64.npy", arr(3, 3, 4, 4, dtype="float64"))
    got = collect(open_data(tmp_path / "f64.npy", inputs=ONE))["x"]
    assert got.dtype == np.float32
    # float64 → float32 rounds to nearest: within float32's half-ulp (rel 2^-24)
    np.testing.assert_allclose(got, np.load(tmp_path / "f64.npy"), rtol=2**-24, atol=0)


def test_dtype_refusals(tmp_path: Path) -> None:
    np.save(tmp_path / "c.npy", arr(2, 3, 4, 4).astype(np.complex64))
    with pytest.raises(InputError, match=r"c\.npy: input 'x' holds complex64 values, not numbers"):
        open_data(tmp_path / "c.npy", inputs=ONE)
    np.save(tmp_path / "o.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=r"o\.npy: holds Python objects"):
        open_data(tmp_path / "o.npy", inputs=ONE)
    ids = [TensorSpec("ids", ("batch", 8), "int32")]
    np.save(tmp_path / "f.npy", arr(2, 8))
    with pytest.raises(InputError, match=r"holds float32 data; the model wants integers \(int32\)"):
        open_data(tmp_path / "f.npy", inputs=ids)
    big = np.zeros((2, 8), dtype=np.int64)
    big[1, 3] = 2**40
    np.save(tmp_path / "big.npy", big)
    with pytest.raises(
        InputError, match=r"samples 0\.\.1 \(batch 0\) hold values 0\.\.1099511627776"
    ):
        list(open_data(tmp_path / "big.npy", inputs=ids))


def test_nan_detection_names_batch_and_samples(tmp_path: Path) -> None:
    data = arr(64, 3, 4, 4)
    data[40, 1, 2, 3] = np.nan
    data[45, 0, 0, 0] = np.inf
    np.save(tmp_path / "n.npy", data)
    src = open_data(tmp_path / "n.npy", inputs=ONE, batch_size=16)
    it = iter(src)
    assert len(next(it)["x"]) == 16 and len(next(it)["x"]) == 16  # batches 0, 1 are clean
    with pytest.raises(
        InputError,
        match=r"n\.npy: input 'x' has NaN or Inf in samples 32\.\.47 \(batch 2\), "
        r"first at sample 40",
    ):
        next(it)


def test_overflow_to_inf_after_conversion_is_caught(tmp_path: Path) -> None:
    data = np.ones((2, 3, 4, 4))
    data[1, 0, 0, 0] = 1e300  # finite in float64, inf in float32
    np.save(tmp_path / "o.npy", data)
    with pytest.raises(InputError, match="first at sample 1"):
        list(open_data(tmp_path / "o.npy", inputs=ONE))


def test_wrong_shape_messages(tmp_path: Path) -> None:
    np.save(tmp_path / "s.npy", arr(10, 3, 5, 4))
    with pytest.raises(
        InputError,
        match=r"s\.npy: data for input 'x' has shape \(N, 3, 5, 4\), the model wants "
        r"\(batch, 3, 4, 4\): dim 2 is 5, not 4",
    ):
        open_data(tmp_path / "s.npy", inputs=ONE)
    np.save(tmp_path / "r.npy", arr(10, 3, 16))
    with pytest.raises(InputError, match=r"shape \(N, 3, 16\) \(rank 3\), the model .* \(rank 4\)"):
        open_data(tmp_path / "r.npy", inputs=ONE)
    dynamic = [TensorSpec("x", ("batch", 3, "h", None), "float32")]
    assert open_data(tmp_path / "s.npy", inputs=dynamic).num_samples == 10  # free dims


def test_zero_samples(tmp_path: Path) -> None:
    np.save(tmp_path / "z.npy", np.zeros((0, 3, 4, 4), dtype=np.float32))
    with pytest.raises(InputError, match=r"z\.npy: holds no samples"):
        open_data(tmp_path / "z.npy", inputs=ONE)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, [32, 32, 32, 4]),
        ({"max_samples": 50}, [32, 18]),
        ({"max_batches": 2}, [32, 32]),
        ({"max_batches": 2, "max_samples": 40}, [32, 8]),
        ({"drop_last": True}, [32, 32, 32]),
        ({"drop_last": True, "max_samples": 70}, [32, 32]),
        ({"batch_size": 33}, [33, 33, 33, 1]),  # a last batch of one: allowed, min_batch says so
    ],
)
def test_limits_exact(tmp_path: Path, kwargs: dict, expected: list[int]) -> None:
    np.save(tmp_path / "d.npy", arr(100, 3, 4, 4))
    src = open_data(tmp_path / "d.npy", inputs=ONE, **{"batch_size": 32, **kwargs})
    assert sizes(src) == expected
    assert src.num_samples == sum(expected) and src.num_batches == len(expected)
    assert src.min_batch == min(expected) and len(src) == len(expected)


def test_limit_errors(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", arr(10, 3, 4, 4))
    with pytest.raises(InputError, match="10 samples, fewer than one full batch of 32"):
        open_data(tmp_path / "d.npy", inputs=ONE, drop_last=True)
    with pytest.raises(InputError, match="batch size must be at least 1, not 0"):
        open_data(tmp_path / "d.npy", inputs=ONE, batch_size=0)
    one = open_data(tmp_path / "d.npy", inputs=ONE, max_samples=1)
    assert one.num_samples == 1 and one.min_batch == 1


def test_fixed_model_batch_dim(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", arr(10, 3, 4, 4))
    fixed = [TensorSpec("x", (4, 3, 4, 4), "float32")]
    src = open_data(tmp_path / "d.npy", inputs=fixed, batch_size=32)
    assert sizes(src) == [4, 4]  # the model can run only batches of 4: the rest is dropped
    assert src.batch_size == 4 and src.drop_last
    assert "the model fixes the batch size to 4: using batches of 4" in src.notes


def test_reiteration_is_identical(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "d.npz", x=arr(20, 3, 4, 4))
    src = open_data(tmp_path / "d.npz", inputs=ONE, batch_size=6)
    first, second = collect(src)["x"], collect(src)["x"]
    np.testing.assert_array_equal(first, second)


# --- synthetic ------------------------------------------------------------------------------


def test_synthetic_is_seeded() -> None:
    a = collect(open_data(None, inputs=TWO, synthetic=True, seed=3, max_samples=40))
    b = collect(open_data(None, inputs=TWO, synthetic=True, seed=3, max_samples=40))
    c = collect(open_data(None, inputs=TWO, synthetic=True, seed=4, max_samples=40))
    for name in ("image", "meta"):
        np.testing.assert_array_equal(a[name], b[name])
        assert not np.array_equal(a[name], c[name])
    assert a["image"].shape == (40, 3, 4, 4) and a["meta"].shape == (40, 5)
    assert not np.array_equal(a["image"][:, 0, 0, :].ravel()[:5], a["meta"][:, :4].ravel()[:5])


def test_synthetic_sizes_and_statistics() -> None:
    src = open_data(None, inputs=ONE, synthetic=True, batch_size=8, max_batches=250)
    assert src.synthetic and src.num_samples == 2000 and src.format == "synthetic"
    assert "say little about real data" in src.description
    x = collect(src)["x"]
    # 96 000 N(0, 1) draws: mean within 5 σ/√n ≈ 0.016, std within ~1 %
    assert abs(x.mean()) < 0.02 and x.std() == pytest.approx(1.0, rel=0.02)
    assert open_data(None, inputs=ONE, synthetic=True, batch_size=8).num_samples == 8
    ids = [TensorSpec("ids", ("batch", 16), "int64")]
    got = collect(open_data(None, inputs=ids, synthetic=True, max_samples=50))["ids"]
    assert got.dtype == np.int64 and got.min() >= 0 and got.max() <= 9


def test_synthetic_needs_shape_for_dynamic_dims(tmp_path: Path) -> None:
    dynamic = [TensorSpec("x", ("batch", 3, "h", "w"), "float32")]
    with pytest.raises(InputError, match=r"'x' has dynamic dims \(batch, 3, h, w\).*--input-shape"):
        open_data(None, inputs=dynamic, synthetic=True)
    src = open_data(
        None, inputs=dynamic, synthetic=True, batch_size=2, input_shapes={"": (1, 3, 8, 6)}
    )
    assert src.first_batch()["x"].shape == (2, 3, 8, 6)
    with pytest.raises(InputError, match="dim 1 is 4, but the model fixes it to 3"):
        open_data(None, inputs=dynamic, synthetic=True, input_shapes={"x": (1, 4, 8, 6)})
    np.save(tmp_path / "d.npy", arr(2, 3, 4, 4))
    with pytest.raises(InputError, match="not both"):
        open_data(tmp_path / "d.npy", inputs=ONE, synthetic=True)


# --- images ---------------------------------------------------------------------------------


def _png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def _pixels(h: int, w: int) -> np.ndarray:
    hh, ww, cc = np.meshgrid(np.arange(h), np.arange(w), np.arange(3), indexing="ij")
    return (hh * w + ww) * 10 + cc  # distinct, ≤ 255 for 4 × 6


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_images_crop_normalize_layout_by_hand(tmp_path: Path, layout: str) -> None:
    pytest.importorskip("PIL")
    px = _pixels(4, 6)
    _png(tmp_path / "imgs" / "a.png", px)
    _png(tmp_path / "imgs" / "b.png", 255 - px)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    spec = (None, 3, 2, 2) if layout == "nchw" else (None, 2, 2, 3)
    src = open_data(
        tmp_path / "imgs",
        inputs=[TensorSpec("x", spec, "float32")],
        image_options=ImageOptions(crop=2, mean=mean, std=std, layout=layout),
    )
    got = collect(src)["x"]
    # centre crop of 6 × 4 to 2 × 2: left = round(4/2) = 2, top = round(2/2) = 1
    expected = np.stack([px, 255 - px])[:, 1:3, 2:4, :] / 255.0
    expected = (expected - np.array(mean)) / np.array(std)
    if layout == "nchw":
        expected = expected.transpose(0, 3, 1, 2)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)  # float32 arithmetic


def test_images_resize_shorter_side_and_grayscale(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    _png(tmp_path / "imgs" / "u.png", np.broadcast_to([10, 20, 30], (4, 8, 3)))
    # 8 × 4 → shorter side 2: 4 × 2 (w × h); bilinear keeps a uniform colour exactly
    rgb = open_data(
        tmp_path / "imgs",
        inputs=[TensorSpec("x", (None, 3, 2, 4), "float32")],
        image_options=ImageOptions(resize=2),
    )
    got = rgb.first_batch()["x"]
    assert got.shape == (1, 3, 2, 4)
    np.testing.assert_allclose(got[0, :, 0, 0], np.array([10, 20, 30]) / 255, atol=1e-7)
    assert np.ptp(got[0], axis=(1, 2)).max() == 0
    # one channel: Pillow's L = (299 R + 587 G + 114 B) / 1000 = 18.15 → 18
    gray = open_data(
        tmp_path / "imgs",
        inputs=[TensorSpec("x", (None, 1, 2, 2), "float32")],
        image_options=ImageOptions(resize=2, crop=2),
    )
    np.testing.assert_allclose(gray.first_batch()["x"], np.full((1, 1, 2, 2), 18 / 255), atol=1e-7)


def test_images_sorted_recursive_and_skip_other_files(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    folder = tmp_path / "imgs"
    for name, value in (("b.png", 2), ("a.png", 1), ("sub/c.png", 3), (".hidden.png", 9)):
        _png(folder / name, np.full((2, 2, 3), value))
    (folder / "README.txt").write_text("not an image")
    src = open_data(folder, inputs=[TensorSpec("x", (None, 3, 2, 2), "float32")], batch_size=2)
    got = collect(src)["x"]
    np.testing.assert_allclose(got[:, 0, 0, 0] * 255, [1, 2, 3], atol=1e-4)
    assert src.num_samples == 3 and src.format == "images"


def test_images_errors(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    spec = [TensorSpec("x", (None, 3, "h", "w"), "float32")]
    folder = tmp_path / "imgs"
    _png(folder / "a.png", np.zeros((4, 4, 3)))
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InputError, match=r"b\.png: not a decodable image"):
        list(open_data(folder, inputs=spec))
    (folder / "b.png").unlink()
    _png(folder / "c.png", np.zeros((5, 4, 3)))
    with pytest.raises(InputError, match=r"c\.png: gives a sample of shape \(3, 5, 4\)"):
        list(open_data(folder, inputs=spec))
    with pytest.raises(InputError, match=r"a\.png: image is 4x4, smaller than the crop 6x6"):
        list(open_data(folder, inputs=spec, image_options=ImageOptions(crop=6)))
    with pytest.raises(InputError, match="images feed a single-input model"):
        open_data(folder, inputs=TWO)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no images \(PNG, JPEG, BMP, TIFF, WebP\)"):
        open_data(tmp_path / "empty", inputs=spec)


def test_images_without_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now raises ImportError
    with pytest.raises(
        InputError, match=r"needs Pillow, which is not installed: pip install 'bncheck\[images\]'"
    ):
        open_data(tmp_path / "imgs", inputs=ONE)


# --- streaming ------------------------------------------------------------------------------


def test_npy_streams_with_flat_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.npy"
    n, shape = 16384, (3, 32, 32)  # 16384 × 12 KiB = 192 MiB of float32
    try:
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, *shape))
        for s in range(0, n, 2048):
            mm[s : s + 2048] = (np.arange(s, s + 2048, dtype=np.float32) % 7)[:, None, None, None]
        mm.flush()
        del mm
        src = open_data(path, inputs=[TensorSpec("x", (None, *shape), "float32")], batch_size=32)
        batch_bytes = 32 * 3 * 32 * 32 * 4  # 384 KiB
        total = 0.0
        tracemalloc.start()
        try:
            for batch in src:
                total += float(batch["x"][:, 0, 0, 0].sum())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert total == float((np.arange(n) % 7).sum())  # every sample was read, in order
        assert peak < 8 * batch_bytes, f"peak {peak / 2**20:.1f} MiB"  # the file is 192 MiB
    finally:
        path.unlink(missing_ok=True)


def test_npz_streams_with_flat_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.npz"
    np.savez_compressed(path, x=np.zeros((4096, 3, 32, 32), dtype=np.float32))  # 48 MiB raw
    src = open_data(path, inputs=[TensorSpec("x", (None, 3, 32, 32), "float32")])
    tracemalloc.start()
    try:
        count = sum(len(b["x"]) for b in src)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 4096
    assert peak < 8 * 32 * 3 * 32 * 32 * 4, f"peak {peak / 2**20:.1f} MiB"


def test_object_arrays_are_refused_unread(tmp_path: Path) -> None:
    # An object dtype would need unpickling: refused from the header, for npy and npz alike.
    spec = [TensorSpec("x", (None,), "float32")]
    payload = np.array([1, "a"], dtype=object)
    with open(tmp_path / "p.npy", "wb") as f:
        np.lib.format.write_array(f, payload, allow_pickle=True)
    with pytest.raises(InputError, match=r"p\.npy: holds Python objects"):
        open_data(tmp_path / "p.npy", inputs=spec)
    np.savez(tmp_path / "p.npz", x=payload)
    with pytest.raises(InputError, match=r"p\.npz \[x\.npy\]: holds Python objects"):
        open_data(tmp_path / "p.npz", inputs=spec)
