"""``--data`` end to end: a folder of photos with the user's preprocessing, and a data hook,
give the same figures as the same samples in a ``.npy`` (check, recalibrate, optimize).

The reference ``.npy`` is the preprocessing done by hand with Pillow (tests/data_photos.py),
and the hook yields it in uneven batches. Both routes feed the model the same float32 batches,
so the figures are equal: compared at rtol 1e-12, not bit for bit only to leave room for a
summation order that a backend might vary between runs. Across different batch sizes the
moments agree to 1e-6 relative: they merge exactly, but a float32 forward pass of another
batch shape may round differently inside the model (seen: 1.4e-9).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLES, assert_clean_error
from data_photos import by_hand, draw_photos

pytest.importorskip("PIL")

ONNX = SAMPLES / "resnet.onnx"  # input (batch, 3, 24, 24)
MEAN, STD = "0.485,0.456,0.406", "0.229,0.224,0.225"
IMAGE_ARGS = ("--resize", "28", "--crop", "24", "--mean", MEAN, "--std", STD)

HOOK = """
import numpy as np

REF = {ref!r}


def uneven(sizes=(2, 5, 1, 3)):
    x = np.load(REF)
    i = k = 0
    while i < len(x):
        s = sizes[k % len(sizes)]
        yield x[i : i + s], np.zeros(len(x[i : i + s]))
        i, k = i + s, k + 1


def first(n):
    return [np.load(REF)[:n]]


def boom():
    yield np.load(REF)[:2]
    raise ValueError("disk on fire")


def wrong_shape():
    return [np.load(REF)[:, :, :20]]
"""


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    folder = draw_photos(root / "photos")
    ref = root / "by_hand.npy"
    mean = tuple(float(v) for v in MEAN.split(","))
    std = tuple(float(v) for v in STD.split(","))
    np.save(ref, by_hand(folder, resize=28, crop=(24, 24), mean=mean, std=std))
    return folder, ref


@pytest.fixture
def hook(photos, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "photo_hooks.py").write_text(HOOK.format(ref=str(photos[1])))
    monkeypatch.chdir(tmp_path)  # --data imports from the working folder, as --arch does
    sys.modules.pop("photo_hooks", None)
    yield "photo_hooks"
    sys.modules.pop("photo_hooks", None)


def check_doc(run_cli, *args: object, code: int | None = None) -> dict:
    result = run_cli("check", ONNX, *args, "--format", "json", "--fail-on", "never")
    assert result.code == (0 if code is None else code), result
    return json.loads(result.out)


def figures(doc: dict) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for layer in doc["layers"]:
        for key, values in layer["per_channel"].items():
            out[f"{layer['name']}.{key}"] = np.asarray(values, np.float64)
        out[f"{layer['name']}.count"] = np.asarray(layer["count"])
    div = doc["output_divergence"]
    # top-1 agreement is judged with --task classify only; these models' outputs are no classes
    out["rel_l2"] = np.asarray(div["rel_l2"])
    return out


def assert_same_figures(a: dict, b: dict, rtol: float = 1e-12, keys=None) -> None:
    fa, fb = figures(a), figures(b)
    assert fa.keys() == fb.keys()
    for key in keys or fa:
        np.testing.assert_allclose(fa[key], fb[key], rtol=rtol, atol=0, err_msg=key)
    assert a["data"]["samples"] == b["data"]["samples"] == 7


def test_check_photos_equal_the_npy_by_hand(run_cli, photos) -> None:
    folder, ref = photos
    by_folder = check_doc(run_cli, "--data", folder, *IMAGE_ARGS, "--batch-size", "3")
    by_npy = check_doc(run_cli, "--data", ref, "--batch-size", "3")
    assert_same_figures(by_folder, by_npy)
    assert by_folder["data"]["batches"] == 3
    assert "photos: skipped 1 file(s) that are not images: labels.txt" in by_folder["notes"]


def test_check_hook_equals_the_npy_whatever_its_batches(run_cli, photos, hook) -> None:
    _, ref = photos
    by_hook = check_doc(run_cli, "--data", f"{hook}:uneven", "--batch-size", "3")
    by_npy = check_doc(run_cli, "--data", ref, "--batch-size", "3")
    assert_same_figures(by_hook, by_npy)
    assert by_hook["data"]["description"] == (
        "data hook photo_hooks:uneven: 7 samples of input (3, 24, 24) float32, batches of 3 "
        "(the hook's batches held 2 to 5 samples)"
    )
    # Another batch size: the moments merge exactly (float64, Chan), but the model's float32
    # forward pass may round differently on another batch shape: 1e-6 relative.
    by_hook_4 = check_doc(run_cli, "--data", f"{hook}:uneven", "--batch-size", "4")
    moments = [f"{layer['name']}.data_mean" for layer in by_npy["layers"]]
    moments += [f"{layer['name']}.data_var" for layer in by_npy["layers"]]
    assert_same_figures(by_hook_4, by_npy, rtol=1e-6, keys=moments)
    kw = check_doc(run_cli, "--data", f"{hook}:first", "--data-kwargs", '{"n": 5}')
    assert kw["data"]["samples"] == 5


def bn_stats(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {
        f"{n.name}.{i}": inits[n.input[i]]
        for n in model.graph.node
        if n.op_type == "BatchNormalization"
        for i in (3, 4)
    }


def test_recalibrate_photos_and_hook_equal_the_npy(run_cli, photos, hook, tmp_path) -> None:
    folder, ref = photos
    outs = {}
    for name, data in (
        ("npy", (ref,)),
        ("folder", (folder, *IMAGE_ARGS)),
        ("hook", (f"{hook}:uneven",)),
    ):
        outs[name] = tmp_path / f"{name}.onnx"
        result = run_cli("recalibrate", ONNX, "--data", *data, "--batch-size", "4",
                         "--no-compare", "-o", outs[name], "-q")  # fmt: skip
        assert result.code == 0, result
    want = bn_stats(outs["npy"])
    before = bn_stats(ONNX)
    assert len(want) == 18 and any(not np.allclose(want[k], before[k]) for k in want)
    for name in ("folder", "hook"):
        got = bn_stats(outs[name])
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name} {key}")


def test_optimize_on_photos(run_cli, photos, tmp_path) -> None:
    folder, _ = photos
    out = tmp_path / "opt.onnx"
    result = run_cli("optimize", ONNX, "--data", folder, *IMAGE_ARGS, "--no-bench",
                     "--max-samples", "6", "-o", out, "--format", "json")  # fmt: skip
    assert result.code == 0, result
    doc = json.loads(result.out)
    assert doc["recalibration"]["data"].startswith("photos: 6 of 7 samples of input (3, 24, 24)")
    assert out.is_file()


def test_fold_verifies_on_photos_and_on_a_hook(run_cli, photos, hook, tmp_path) -> None:
    # fold's --data takes what check's does: the verification runs on the user's samples.
    folder, ref = photos
    docs = {}
    for name, args in {
        "photos": ("--data", folder, *IMAGE_ARGS),
        "hook": ("--data", f"{hook}:uneven"),
        "npy": ("--data", ref),
    }.items():
        out = tmp_path / f"{name}.onnx"
        result = run_cli("fold", ONNX, *args, "-o", out, "--format", "json")
        assert result.code == 0, result
        docs[name] = json.loads(result.out)["verification"]
        assert out.is_file()
    assert {d["samples"] for d in docs.values()} == {7}
    assert "photos" in docs["photos"]["inputs"] and "synthetic" not in docs["hook"]["inputs"]
    # The same samples through each route: the same worst error, to float tolerance.
    errors = [docs[k]["max_abs_error"] for k in ("photos", "hook", "npy")]
    assert errors[0] == pytest.approx(errors[2], rel=1e-6)
    assert errors[1] == pytest.approx(errors[2], rel=1e-6)


def test_bench_times_on_the_first_batch_of_photos(run_cli, photos) -> None:
    folder, _ = photos
    args = ("--batch-size", "2", "--rounds", "3", "--format", "json")
    result = run_cli("bench", ONNX, "--data", folder, *IMAGE_ARGS, *args)
    assert result.code == 0, result
    doc = json.loads(result.out)
    assert doc["inputs"] == "first batch of photos: input (3, 24, 24) float32"
    assert doc["rows"][0]["batch_size"] == 2


def test_image_options_from_pyproject(run_cli, photos, tmp_path, monkeypatch) -> None:
    folder, ref = photos
    (tmp_path / "pyproject.toml").write_text(
        "[tool.bncheck.data]\nresize = 28\ncrop = 24\n"
        f"mean = [{MEAN}]\nstd = [{STD}]\n"
        'data = "photo_hooks:uneven"\n'  # never taken from here: a hook runs code
    )
    monkeypatch.chdir(tmp_path)
    result = run_cli("check", ONNX, "--data", folder, "--format", "json", "--fail-on", "never")
    assert result.code == 0, result
    assert "ignoring 'data' in [tool.bncheck.data]" in result.err
    assert_same_figures(json.loads(result.out), check_doc(run_cli, "--data", ref))
    # Defaults from the file do not apply to arrays, and are no error there.
    assert check_doc(run_cli, "--data", ref)["data"]["samples"] == 7
    # The command line wins: a centre crop of a larger resize is other data.
    other = check_doc(run_cli, "--data", folder, "--resize", "32")["layers"][0]["per_channel"]
    same = check_doc(run_cli, "--data", ref)["layers"][0]["per_channel"]
    assert not np.allclose(other["data_mean"], same["data_mean"], rtol=1e-3)


def test_photos_without_pillow(run_cli, photos, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "PIL", None)  # `import PIL` now raises ImportError
    result = run_cli("check", ONNX, "--data", photos[0], *IMAGE_ARGS)
    assert_clean_error(result, "reading images needs Pillow, which is not installed: "
                       "pip install 'bncheck[images]'")  # fmt: skip


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--resize", "28", "--crop", "24", "--mean", "0.5,0.5"),
         "image mean (--mean) has 2 values; the model input has 3 channels: give 3 (or 1 for all)"),
        (("--resize", "28", "--crop", "24", "--std", "0.2,0,0.2"), "a std of 0 would divide"),
        (("--crop", "24,24,3"), "--crop 24,24,3: give one size N, or height,width"),
        (("--layout", "hwc"), "--layout 'hwc': choose nchw or nhwc"),
        ((), "dim 2 is 48, not 24: give --resize N --crop 24"),
        (("--resize", "28"), "give --crop 24"),
        (("--data-kwargs", '{"n": 1}'), "--data-kwargs is for a data hook"),
    ],
)  # fmt: skip
def test_image_option_errors(run_cli, photos, args, needle) -> None:
    assert_clean_error(run_cli("check", ONNX, "--data", photos[0], *args), needle)


def test_data_option_errors(run_cli, photos, hook) -> None:
    ref = photos[1]
    cases = [
        (("--data", ref, "--resize", "28"), "by_hand.npy: --resize preprocess images; this is a "
         ".npy file of arrays"),
        (("--synthetic", "--crop", "24"), "--crop applies to --data, which is not given"),
        (("--data", f"{hook}:missing"), "--data 'photo_hooks:missing': module 'photo_hooks' has "
         "no attribute 'missing'"),
        (("--data", "no_such_pkg.data:load"), "--data 'no_such_pkg.data:load': cannot import"),
        (("--data", f"{hook}:boom"), "data hook photo_hooks:boom: raised ValueError: disk on fire "
         "(at batch 1)"),
        (("--data", f"{hook}:wrong_shape"), "data hook photo_hooks:wrong_shape: data for input "
         "'input' has shape (N, 3, 20, 24), the model wants (batch, 3, 24, 24): dim 2 is 20"),
        (("--data", f"{hook}:first", "--data-kwargs", "{n: 1}"), "--data-kwargs is not valid JSON"),
        (("--data", f"{hook}:first", "--resize", "28"), "--resize preprocess a folder of images, "
         "not a hook"),
    ]  # fmt: skip
    for args, needle in cases:
        assert_clean_error(run_cli("check", ONNX, *args), needle)
    result = run_cli("recalibrate", ONNX, "-o", "x.onnx")
    assert_clean_error(result, "recalibrate needs calibration data: give --data")
