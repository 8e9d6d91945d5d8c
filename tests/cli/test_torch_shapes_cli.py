"""State dicts and checkpoints from the command line: the shape comes from --input-shape or the
data, never from a guess that gets written; written files keep the batch and --dynamic-dims
dynamic and run other sizes; checkpoints with several state dicts; optimize passes shapes on."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import assert_clean_error
from onnx import TensorProto, helper, numpy_helper
from torch_fixtures import WideNet, randomize_bn, wide_files

ARCH = ("--arch", "torch_fixtures:wide_net")
TOL = {"rtol": 1e-4, "atol": 1e-5}  # float32 fold of two Conv+BN pairs: ~1e-7 in practice


@pytest.fixture
def wide(tmp_path):
    """A WideNet state dict (random BN statistics), 8 samples of 224×224 data, the model."""
    return wide_files(tmp_path, samples=8, seed=2)


def _eager(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _onnx_dims(path) -> list:
    (inp,) = onnx.load(str(path)).graph.input
    return [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]


def _run_onnx(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_check_takes_the_shape_of_the_data(run_cli, wide):
    _, f, data = wide
    r = run_cli("check", f, *ARCH, "--data", data, "--format", "json", "--fail-on", "never")
    assert r.code == 0, r
    out = json.loads(r.out)
    assert out["data"]["samples"] == 8
    assert "(3, 224, 224)" in out["data"]["description"]
    assert (out["summary"]["bn_layers"], out["summary"]["measured"]) == (2, 2)


def test_fold_refuses_to_write_a_guessed_shape(run_cli, wide, tmp_path):
    _, f, _ = wide
    for name in ("out.onnx", "out.pt2"):
        r = run_cli("fold", f, *ARCH, "-o", tmp_path / name)
        assert_clean_error(r, "guessed", "--input-shape")
        assert not (tmp_path / name).exists()


def test_fold_with_data_writes_the_data_shape_and_a_dynamic_batch(run_cli, wide, tmp_path):
    model, f, data = wide
    out = tmp_path / "folded.onnx"
    r = run_cli("fold", f, *ARCH, "--data", data, "-o", out)
    assert r.code == 0, r
    assert _onnx_dims(out) == ["batch", 3, 224, 224]
    x = np.random.default_rng(5).standard_normal((3, 3, 224, 224)).astype(np.float32)
    np.testing.assert_allclose(_run_onnx(out, x), _eager(model, x), **TOL)


def test_fold_dynamic_dims_onnx_and_pt2_run_other_sizes(run_cli, wide, tmp_path):
    model, f, _ = wide
    shape = ("--input-shape", "1,3,224,224")
    onnx_out, pt2_out = tmp_path / "dyn.onnx", tmp_path / "dyn.pt2"
    assert (
        run_cli("fold", f, *ARCH, *shape, "--dynamic-dims", "height,width", "-o", onnx_out).code
        == 0
    )
    assert run_cli("fold", f, *ARCH, *shape, "--dynamic-dims", "2,3", "-o", pt2_out).code == 0
    assert _onnx_dims(onnx_out) == ["batch", 3, "height", "width"]
    x = np.random.default_rng(6).standard_normal((5, 3, 160, 96)).astype(np.float32)
    np.testing.assert_allclose(_run_onnx(onnx_out, x), _eager(model, x), **TOL)
    ep = torch.export.load(pt2_out)
    with torch.no_grad():
        got = ep.module()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, _eager(model, x), **TOL)
    # Without --dynamic-dims the batch stays dynamic and the spatial dims are the given ones.
    fixed = tmp_path / "fixed.onnx"
    assert run_cli("fold", f, *ARCH, *shape, "-o", fixed).code == 0
    assert _onnx_dims(fixed) == ["batch", 3, 224, 224]


def test_dynamic_dims_the_model_ties_are_refused(run_cli, tmp_path):
    f = tmp_path / "fixed_head.pt"
    torch.save(randomize_bn(WideNet(fixed_head=True).eval()).state_dict(), f)
    out = tmp_path / "out.onnx"
    r = run_cli(
        "fold", f, "--arch", "torch_fixtures:fixed_head_net", "--input-shape", "1,3,224,224",
        "--dynamic-dims", "2,3", "-o", out,
    )  # fmt: skip
    assert_clean_error(r, "--dynamic-dims", "dim 2, 3", "--input-shape")
    assert not out.exists()


def test_inspect_a_failed_guess_advises_input_shape(run_cli, tmp_path):
    f = tmp_path / "fixed_head.pt"
    torch.save(randomize_bn(WideNet(fixed_head=True).eval()).state_dict(), f)
    r = run_cli("inspect", f, "--arch", "torch_fixtures:fixed_head_net", "--format", "json")
    assert r.code == 0, r
    (bn302,) = [x for x in json.loads(r.out)["findings"] if x["code"] == "BN302"]
    assert "guessed input x[2, 3, 32, 32]" in bn302["message"]
    assert "--input-shape" in bn302["hint"] and "torch.export" not in bn302["hint"]
    ok = run_cli(
        "inspect", f, "--arch", "torch_fixtures:fixed_head_net", "--input-shape", "1,3,224,224",
        "--format", "json",
    )  # fmt: skip
    assert ok.code == 0 and "BN302" not in ok.out


def test_checkpoint_key_from_the_command_line(run_cli, wide, tmp_path):
    model, _, _ = wide
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    ema["bn2.running_var"] *= 2.0
    f = tmp_path / "train.pth"
    torch.save({"epoch": 9, "net": model.state_dict(), "ema": ema, "optimizer": {}}, f)
    assert_clean_error(run_cli("inspect", f, *ARCH), "'net', 'ema'", "--checkpoint-key")
    r = run_cli("inspect", f, *ARCH, "--checkpoint-key", "ema", "--format", "json")
    assert r.code == 0, r
    out = json.loads(r.out)
    var = next(x for x in out["bn_layers"] if x["name"] == "bn2")["running_var"]
    np.testing.assert_allclose(var["min"], float(ema["bn2.running_var"].min()), rtol=1e-6)
    assert "state dict taken from checkpoint entry 'ema'" in out["notes"]


def test_recalibrate_pt2_keeps_dynamic_dims_and_refuses_them_for_a_state_dict(
    run_cli, wide, tmp_path
):
    model, f, data = wide
    src = tmp_path / "wide.pt2"
    batch = torch.export.Dim("batch", min=1)
    ep = torch.export.export(model, (torch.randn(2, 3, 224, 224),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, src)
    out = tmp_path / "recal.pt2"
    r = run_cli("recalibrate", src, "--data", data, "--dynamic-dims", "2,3", "-o", out)
    assert r.code == 0, r
    x = torch.randn(3, 3, 128, 192)
    with torch.no_grad():
        got = torch.export.load(out).module()(x)
    assert got.shape == (3, 5)
    sd_out = tmp_path / "recal.pt"
    r = run_cli("recalibrate", f, *ARCH, "--data", data, "--dynamic-dims", "2,3", "-o", sd_out)
    assert_clean_error(r, "--dynamic-dims applies to .pt2 and .onnx")
    assert not sd_out.exists()


def _onnx_dynamic_hw(path) -> None:
    """Conv → BatchNormalization, input (N, 2, H, W): every dim but the channels dynamic."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(3, 2, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 3).astype(np.float32), "scale"),
        numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 3).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "scale", "beta", "mean", "var"], ["y"], name="bn"
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))


def test_optimize_passes_input_shape_to_its_fold(run_cli, tmp_path):
    src = tmp_path / "dyn.onnx"
    _onnx_dynamic_hw(src)
    out = tmp_path / "opt.onnx"
    r = run_cli("optimize", src, "--input-shape", "1,2,6,5", "--no-bench", "-o", out)
    assert r.code == 0, r
    x = np.random.default_rng(1).standard_normal((2, 2, 6, 5)).astype(np.float32)
    np.testing.assert_allclose(_run_onnx(out, x), _run_onnx(src, x), **TOL)


def test_optimize_state_dict_with_dynamic_dims(run_cli, wide, tmp_path):
    model, f, _ = wide
    out = tmp_path / "opt.onnx"
    r = run_cli(
        "optimize", f, *ARCH, "--input-shape", "1,3,224,224", "--dynamic-dims", "2,3",
        "--no-bench", "-o", out,
    )  # fmt: skip
    assert r.code == 0, r
    assert _onnx_dims(out) == ["batch", 3, "height", "width"]
    x = np.random.default_rng(7).standard_normal((2, 3, 96, 128)).astype(np.float32)
    np.testing.assert_allclose(_run_onnx(out, x), _eager(model, x), **TOL)


def test_a_run_on_a_guessed_shape_that_fails_names_input_shape(run_cli, tmp_path):
    f = tmp_path / "fixed_head.pt"
    torch.save(randomize_bn(WideNet(fixed_head=True).eval()).state_dict(), f)
    arch = ("--arch", "torch_fixtures:fixed_head_net")
    assert_clean_error(run_cli("check", f, *arch, "--synthetic"), "guessed", "--input-shape")
    r = run_cli("fold", f, *arch)  # no graph on the guess: nothing could be folded
    assert_clean_error(
        r, "could not trace the model on the guessed input x[2, 3, 32, 32]", "--input-shape"
    )


def test_data_against_a_given_shape_names_input_shape(run_cli, wide):
    _, f, data = wide
    r = run_cli("check", f, *ARCH, "--data", data, "--input-shape", "1,3,96,96")
    assert_clean_error(r, "dim 2 is 224, not 96", "--input-shape")


def test_a_model_that_pins_its_batch_is_written_so_and_says_it(run_cli, tmp_path):
    from torch_fixtures import PinnedBatch

    f = tmp_path / "pinned.pt"
    torch.save(randomize_bn(PinnedBatch().eval()).state_dict(), f)
    out = tmp_path / "pinned.onnx"
    r = run_cli(
        "fold", f, "--arch", "torch_fixtures:pinned_batch", "--input-shape", "1,3,8,8",
        "-o", out, "--format", "json",
    )  # fmt: skip
    assert r.code == 0, r
    (note,) = json.loads(r.out)["notes"]
    assert note.startswith("the model fixes its batch size when traced") and "x[1, 3, 8, 8]" in note
    assert _onnx_dims(out) == [1, 3, 8, 8]
