"""Tests for bncheck.data.images and bncheck.data.options: photos as users have them, through
the user's preprocessing, equal to the same pipeline done by hand with Pillow."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from data_photos import by_hand, draw_photos, image_files

from bncheck.config import load_config
from bncheck.data import ImageOptions, open_data
from bncheck.data.options import image_options
from bncheck.errors import InputError
from bncheck.layers import TensorSpec

pytest.importorskip("PIL")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NCHW = [TensorSpec("input", ("batch", 3, 24, 24), "float32")]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return draw_photos(tmp_path_factory.mktemp("data") / "photos")


def read_all(folder: Path, inputs=NCHW, batch_size: int = 3, **options) -> tuple[np.ndarray, tuple]:
    src = open_data(
        folder, inputs=inputs, batch_size=batch_size, image_options=ImageOptions(**options)
    )
    return np.concatenate([b[inputs[0].name] for b in src]), src.notes


def test_photos_equal_the_pipeline_by_hand(photos: Path) -> None:
    got, notes = read_all(photos, resize=28, crop=24, mean=MEAN, std=STD)
    want = by_hand(photos, resize=28, crop=(24, 24), mean=MEAN, std=STD)
    assert got.shape == (7, 3, 24, 24) and got.dtype == np.float32
    # The same float32 operations in the same order: equal to the last bit, not just close.
    np.testing.assert_array_equal(got, want)
    assert any("skipped 1 file(s) that are not images: labels.txt" in n for n in notes)


def test_every_photo_becomes_rgb_the_way_a_viewer_shows_it(photos: Path) -> None:
    got, _ = read_all(photos, resize=24, crop=24, batch_size=8)
    names = [p.name for p in image_files(photos)]
    gray = got[names.index("c_gray.png")]
    np.testing.assert_array_equal(gray[0], gray[1])  # grayscale replicated into R, G, B
    np.testing.assert_array_equal(gray[0], gray[2])
    from PIL import Image

    # RGBA: the colour channels as stored, the alpha dropped (not composited on a background).
    with Image.open(photos / "d_rgba.png") as img:
        rgb = np.asarray(img.convert("RGB").resize((32, 24), Image.BILINEAR), np.float32)
    np.testing.assert_array_equal(
        got[names.index("d_rgba.png")], rgb[:, 4:28].transpose(2, 0, 1) / 255
    )
    # EXIF orientation 6: stored 56 × 40, used upright (40 wide, 56 high): rotated 90° clockwise.
    with Image.open(photos / "f_exif.jpg") as img:
        upright = img.transpose(Image.Transpose.ROTATE_270).convert("RGB")
    assert upright.size == (40, 56)
    want = np.asarray(upright.resize((24, 33), Image.BILINEAR), np.float32)[4:28] / 255
    np.testing.assert_array_equal(got[names.index("f_exif.jpg")], want.transpose(2, 0, 1))


def test_scale_bgr_nhwc_and_rectangular_crop(photos: Path) -> None:
    nhwc = [TensorSpec("x", (None, 20, 16, 3), "float32")]  # channels last: found from the model
    caffe_mean = (103.94, 116.78, 123.68)  # BGR means on 0..255 pixels (Caffe / OpenCV models)
    got, notes = read_all(
        photos, inputs=nhwc, resize=24, crop=(20, 16), mean=caffe_mean, scale=1.0,
        channel_order="bgr",
    )  # fmt: skip
    want = by_hand(
        photos, resize=24, crop=(20, 16), mean=caffe_mean, scale=1.0, bgr=True, nhwc=True
    )
    np.testing.assert_array_equal(got, want)
    assert "images laid out as (N, H, W, C), as the model input wants" in notes
    assert got[..., 0].mean() < 60  # pixels on 0..255 less ~104: far from the 0..1 range


def test_one_channel_model_gets_luma(photos: Path) -> None:
    got, _ = read_all(photos, inputs=[TensorSpec("x", (None, 1, 24, 24), "float32")],
                      resize=24, crop=24, mean=(0.5,), std=(0.25,))  # fmt: skip
    from PIL import Image

    with Image.open(photos / "b_portrait.png") as img:
        luma = np.asarray(img.convert("L").resize((24, 33), Image.BILINEAR), np.float32)[4:28]
    np.testing.assert_array_equal(got[1, 0], (luma / np.float32(255) - np.float32(0.5)) / 0.25)


def test_mixed_sizes_and_size_mismatch_name_the_options(photos: Path) -> None:
    dynamic = [TensorSpec("x", (None, 3, "h", "w"), "float32")]
    with pytest.raises(InputError, match=r"unlike a_landscape\.jpg .*need --resize N and --crop N"):
        read_all(photos, inputs=dynamic, layout="nchw")
    with pytest.raises(InputError, match=r"dim 2 is 48, not 224: give --resize N --crop 224 \(N: "
                       r"your training's resize, often 256\)"):  # fmt: skip
        read_all(photos, inputs=[TensorSpec("x", (None, 3, 224, 224), "float32")])
    with pytest.raises(InputError, match=r"dim 2 is 256, not 224: give --crop 224$"):
        read_all(photos, inputs=[TensorSpec("x", (None, 3, 224, 224), "float32")], resize=256)
    with pytest.raises(
        InputError,
        match=r"a_landscape\.jpg: image is 32x24 after --resize, smaller than the crop 30x30",
    ):
        read_all(photos, resize=24, crop=30)


def test_mean_std_and_layout_errors(photos: Path) -> None:
    with pytest.raises(InputError, match=r"image mean \(--mean\) has 2 values; the model input "
                       r"has 3 channels: give 3 \(or 1 for all\)"):  # fmt: skip
        read_all(photos, resize=28, crop=24, mean=(0.5, 0.5))
    with pytest.raises(InputError, match=r"has 2 channels \(nchw\); images give 1, 3 or 4"):
        read_all(photos, inputs=[TensorSpec("x", (None, 2, 24, 24), "float32")], crop=24)


def test_undecodable_image_is_refused_and_other_files_skipped(tmp_path: Path) -> None:
    folder = draw_photos(tmp_path / "p")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(InputError, match=r"broken\.jpg: not a decodable image"):
        read_all(folder, resize=28, crop=24)


def test_images_of_more_than_8_bits_are_refused_not_clipped(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "deep"
    folder.mkdir()
    Image.fromarray((np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)).save(folder / "a.png")
    with pytest.raises(InputError, match=r"a\.png: a I;16 image \(more than 8 bits per channel\)"):
        read_all(folder, inputs=[TensorSpec("x", (None, 1, 8, 8), "float32")])


def test_without_pillow_one_clear_line(photos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "PIL", None)  # `import PIL` now raises ImportError
    with pytest.raises(InputError) as exc:
        read_all(photos, resize=28, crop=24)
    assert str(exc.value) == (
        "reading images needs Pillow, which is not installed: pip install 'bncheck[images]' "
        "(or pip install pillow)"
    )


# --- options as written: command line > [tool.bncheck.data] > defaults ------------------------


def test_options_parse_and_merge() -> None:
    table = {"resize": 256, "crop": [224, 192], "mean": [0.5, 0.4, 0.3], "channel-order": "BGR"}
    opts = image_options({"--crop": "200", "--std": "0.2, 0.3,0.4"}, table, "pyproject")
    assert opts == ImageOptions(
        resize=256, crop=200, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4), channel_order="bgr"
    )
    assert image_options({"--crop": "224x160"}, {}, "t").crop_hw == (224, 160)
    assert image_options({}, {}, "t") is None
    assert image_options({"--scale": 1.0}, {}, "t").scale == 1.0


@pytest.mark.parametrize(
    ("given", "table", "message"),
    [
        ({"--resize": 0}, {}, r"^--resize 0: a size must be a positive number of pixels$"),
        ({"--crop": "224,160,3"}, {}, r"^--crop 224,160,3: give one size N, or height,width$"),
        (
            {"--mean": "0.5,a"},
            {},
            r"^--mean 0.5,a: numbers separated by commas, e.g. 0.485,0.456,0.406$",
        ),
        ({"--std": "0.2,0,0.2"}, {}, r"^--std 0.2,0.0,0.2: a std of 0 would divide by zero$"),
        ({"--scale": -1.0}, {}, r"^--scale -1.0: the pixel divisor must be a positive number$"),
        ({"--layout": "chw"}, {}, r"^--layout 'chw': choose nchw or nhwc$"),
        ({}, {"channel-order": "rbg"}, r"^T 'channel-order' 'rbg': choose rgb or bgr$"),
    ],
)
def test_option_errors(given: dict, table: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        image_options(given, table, "T")


def test_pyproject_data_table(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        "[tool.bncheck.data]\nresize = 256\ncrop = [224, 192]\nmean = [0.5, 0.5, 0.5]\n"
        'channel_order = "bgr"\ndata = "mypkg.loader:batches"\n'
    )
    cfg = load_config(tmp_path)
    assert cfg.get("data") == {
        "resize": 256, "crop": [224, 192], "mean": [0.5, 0.5, 0.5], "channel-order": "bgr"
    }  # fmt: skip
    # A hook runs code: never taken from the file a pull request controls.
    assert cfg.warnings == [
        f"{tmp_path / 'pyproject.toml'}: ignoring 'data' in [tool.bncheck.data]: the data (a "
        "file, or a hook that runs code) is named with --data on the command line only"
    ]
    (tmp_path / "pyproject.toml").write_text('[tool.bncheck]\ndata = "mypkg.loader:batches"\n')
    with pytest.raises(InputError, match=r"'data' must be the table \[tool.bncheck.data\]"):
        load_config(tmp_path)
    (tmp_path / "pyproject.toml").write_text("[tool.bncheck.data]\nresise = 256\n")
    with pytest.raises(InputError, match=r"unknown key 'resise' in \[tool.bncheck.data\]"):
        load_config(tmp_path)
    (tmp_path / "pyproject.toml").write_text("[tool.bncheck.data]\nresize = true\n")
    with pytest.raises(InputError, match=r"'resize' has the wrong type"):
        load_config(tmp_path)


def test_matches_torchvision_when_installed(photos: Path) -> None:
    T = pytest.importorskip("torchvision.transforms")
    from PIL import Image, ImageOps

    tf = T.Compose([T.Resize(28), T.CenterCrop(24), T.ToTensor(), T.Normalize(MEAN, STD)])
    want = []
    for path in image_files(photos):
        with Image.open(path) as img:
            want.append(tf(ImageOps.exif_transpose(img).convert("RGB")).numpy())
    got, _ = read_all(photos, resize=28, crop=24, mean=MEAN, std=STD)
    np.testing.assert_array_equal(got, np.stack(want))
