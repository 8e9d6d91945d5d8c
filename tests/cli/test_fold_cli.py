"""``bncheck fold`` end to end: verdict lines that state the comparison made (and never
contradict themselves), BN counts apart from other merges, nothing-to-fold runs, broken exports
answered in one clean line, and the verification batch."""

from __future__ import annotations

import json
import re

import onnx
import pytest
from conftest import assert_clean_error
from fold_fixtures import (
    batch_one_reshape,
    conv3d_bad_bias,
    conv_bias_add,
    conv_relu,
    corrupt_one_channel,
    deep_convnet,
    unlimited_verification_time,  # noqa: F401  (a fixture)
)

# Sample counts must not depend on machine speed (the time budget is tested with seconds=0).
pytestmark = pytest.mark.usefixtures("unlimited_verification_time")


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def deep(tmp_path):
    path = tmp_path / "deep.onnx"
    onnx.save(deep_convnet(24), str(path))
    return path


def verdict(out: str) -> tuple[str, float, str, float]:
    """(passed|FAILED, max|Δ|, ≤|>, bound) as the verification line prints them."""
    m = re.search(
        r"verification (passed|FAILED) on \d+ samples: worst output 'y': max\|Δ\| (\S+) .*? "
        r"([≤>]) bound (\S+) ",
        flat(out),
    )
    assert m, out
    return m.group(1), float(m.group(2)), m.group(3), float(m.group(4))


def test_deep_model_passes_and_the_line_states_its_comparison(run_cli, deep, tmp_path):
    result = run_cli("fold", deep, "-o", tmp_path / "out.onnx", "--input-shape", "1,3,16,16")
    assert result.code == 0, result
    word, err, op, bound = verdict(result.out)
    assert (word, op) == ("passed", "≤") and err <= bound
    assert "deep.onnx: folded 24 of 24 BN layers (BN left: 0)" in flat(result.out)


def test_wrong_fold_fails_says_by_how_much_and_which_rtol_would_pass(
    run_cli, deep, tmp_path, monkeypatch
):
    corrupt_one_channel(monkeypatch, call=12)
    out = tmp_path / "out.onnx"
    result = run_cli("fold", deep, "-o", out, "--input-shape", "1,3,16,16")
    assert result.code == 1, result
    word, err, op, bound = verdict(result.out)
    assert (word, op) == ("FAILED", ">") and err > bound
    assert not out.exists() and "no file written" in result.out
    rtol = re.search(r"--rtol (\S+) would pass", flat(result.out)).group(1)
    again = run_cli("fold", deep, "-o", out, "--input-shape", "1,3,16,16", "--rtol", rtol)
    assert again.code == 0, again
    word, err, op, bound = verdict(again.out)
    assert (word, op) == ("passed", "≤") and err <= bound and out.exists()
    assert f"rtol {float(rtol):.2g}: as given" in flat(again.out)


def test_bias_add_is_merged_but_not_counted_as_bn(run_cli, tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bias_add(), str(src))
    text = flat(run_cli("fold", src).out)
    assert not re.search(r"folded \d+ of \d+ BN", text)  # was "folded 1 of 1 BN layers"
    assert "merged 1 per-channel Mul/Add run" in text
    assert "m.onnx: no BN layers (BN left: 0), merged 1 Mul/Add" in text
    doc = json.loads(run_cli("fold", src, "--format", "json").out)
    assert doc["summary"]["bn_layers"] == 0 and doc["summary"]["folded"] == 0
    assert doc["summary"]["merged"] == 1 and doc["merges"] == [
        {"nodes": "bias_add", "into": "conv"}
    ]
    assert doc["verification"]["passed"] is True


def test_nothing_to_fold_says_so_and_writes_the_input(run_cli, tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(conv_relu(), str(src))
    result = run_cli("fold", src, "-o", out)
    assert result.code == 0, result
    text = flat(result.out)
    assert "not verified: nothing changed, the model is the input as it was" in text
    assert f"m.onnx: nothing to fold (no BN layers) · wrote {out} (the input, unchanged)" in text
    assert onnx.load(str(out)).graph == onnx.load(str(src)).graph
    doc = json.loads(run_cli("fold", src, "--format", "json").out)
    assert doc["verification"] is None and doc["unverified"] == "nothing changed"
    assert doc["summary"]["changed"] is False


def test_conv_bias_of_the_wrong_shape_is_one_clean_line(run_cli, tmp_path):
    src = tmp_path / "bad.onnx"
    onnx.save(conv3d_bad_bias(), str(src))
    result = run_cli("fold", src, "-o", tmp_path / "out.onnx")
    assert_clean_error(result, "bad.onnx", "Conv 'conv3d' bias has shape (8, 2), expected (8,)")
    assert "internal error" not in result.err and not (tmp_path / "out.onnx").exists()
    doc = json.loads(run_cli("inspect", src, "--format", "json", "--fail-on", "never").out)
    (layer,) = doc["bn_layers"]
    assert layer["fold"]["into"] is None
    assert "bias has shape (8, 2), expected (8,)" in layer["fold"]["reason"]


def test_graph_that_runs_only_at_batch_one(run_cli, tmp_path):
    src = tmp_path / "b1.onnx"
    onnx.save(batch_one_reshape(), str(src))
    result = run_cli("fold", src, "-o", tmp_path / "out.onnx")
    assert result.code == 0, result
    text = flat(result.out)
    assert "does not run at batch 8" in text and "verified sample by sample" in text
    assert verdict(result.out)[0] == "passed"


def test_input_shape_batch_is_the_verification_batch(run_cli, deep):
    result = run_cli("fold", deep, "--input-shape", "4,3,16,16", "--format", "json")
    assert result.code == 0, result
    v = json.loads(result.out)["verification"]
    assert (v["batch_size"], v["samples"], v["worst_output"]) == (4, 32, "y")
    (out,) = v["outputs"]
    assert out["name"] == "y" and out["max_abs_error"] <= out["bound"]


def test_negative_tolerance_is_refused(run_cli, deep):
    assert_clean_error(run_cli("fold", deep, "--rtol", "-1e-4"), "--rtol must be a number ≥ 0")
