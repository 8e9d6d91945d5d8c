"""``bncheck bench`` end to end: json figures, A/B ratio and interval, CUDA refusal, CI gate."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import SAMPLES, assert_clean_error
from onnx import TensorProto, helper, numpy_helper

import bncheck.cli._bench  # noqa: F401  (registers the command until cli/__init__ imports it)
from bncheck import api

FAST = ["--threads", "1", "--time-budget", "0.2", "--warmup", "3"]


def bench_json(run_cli, *args, code=0):
    result = run_cli("bench", *args, "--format", "json")
    assert result.code == code, result
    doc = json.loads(result.out)
    assert doc["schema"] == "bncheck.bench/2"
    return doc


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "folded.onnx"
    assert api.fold(SAMPLES / "resnet.onnx", out).output == out
    return out


def conv_chain(path, depth: int) -> None:
    """x (1×8×16×16) → ``depth`` 3×3 Convs (padding 1) → y: cost grows with depth."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(depth):
        w = numpy_helper.from_array(0.1 * rng.standard_normal((8, 8, 3, 3)).astype("f4"), f"w{i}")
        inits.append(w)
        out = "y" if i == depth - 1 else f"h{i}"
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [out], pads=[1, 1, 1, 1]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 16, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_vs_folded_json(run_cli, folded):
    doc = bench_json(run_cli, SAMPLES / "resnet.onnx", "--vs", folded, *FAST)
    assert doc["model"]["bn_layers"] == 9 and doc["vs"]["bn_layers"] == 0
    assert doc["model"]["folds_bn_itself"] is True
    assert any("fuses Conv+BN itself" in n for n in doc["notes"])
    (row,) = doc["rows"]
    assert row["batch_size"] == 1
    for side in ("a", "b"):
        s = row[side]
        assert 0 < s["p10_ms"] <= s["median_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
        assert s["throughput_per_s"] == pytest.approx(1e3 / s["median_ms"], rel=1e-9)
        assert s["iterations"] == row["rounds"] * row["iters_per_round"]
    low, high = row["ratio_ci"]
    assert low <= row["ratio"] <= high
    assert row["ratio"] == pytest.approx(row["b"]["median_ms"] / row["a"]["median_ms"], rel=1e-9)
    assert row["confidence"] == 0.95
    assert row["memory"]["bytes"] > 0 and row["memory"]["kind"] == "peak RSS of the process"
    assert doc["summary"]["failed"] is False


def test_same_model_interval_contains_one(run_cli):
    # A correct 95% interval misses 1 in 20 runs by design: one retry makes a false failure
    # of this test a 1-in-400 event (the runs are independent).
    model = SAMPLES / "resnet.onnx"
    for _attempt in range(2):
        doc = bench_json(run_cli, model, "--vs", model, "--threads", "1", "--time-budget", "0.3")
        low, high = doc["rows"][0]["ratio_ci"]
        if low <= 1.0 <= high:
            break
    assert low <= 1.0 <= high, (low, high)
    assert doc["rows"][0]["verdict"] in ("no difference", "inconclusive")


def test_batch_sizes_one_row_each(run_cli):
    doc = bench_json(run_cli, SAMPLES / "resnet.onnx", "--batch-size", "1,4", "--rounds", "20")
    assert [r["batch_size"] for r in doc["rows"]] == [1, 4]
    assert [r["a"]["iterations"] for r in doc["rows"]] == [20, 20]
    assert all(r["b"] is None and "ratio" not in r for r in doc["rows"])


@pytest.fixture(scope="module")
def fast_and_slow(tmp_path_factory):
    """A 1-conv and a 12-conv chain: B is ~12× slower, an effect no machine load can hide."""
    folder = tmp_path_factory.mktemp("chains")
    fast, slow = folder / "fast.onnx", folder / "slow.onnx"
    conv_chain(fast, 1)
    conv_chain(slow, 12)
    return fast, slow


def test_fail_if_slower_exits_1(run_cli, fast_and_slow):
    fast, slow = fast_and_slow
    args = [fast, "--vs", slow, *FAST, "--fail-if-slower", "1.1"]
    doc = bench_json(run_cli, *args, code=1)
    row = doc["rows"][0]
    # Noisy or not, the whole interval lies above 1.1: the verdict and the gate follow it.
    assert row["ratio_ci"][0] > 1.10 and row["verdict"] == "B slower"
    assert row["threshold"] == 1.1
    assert doc["summary"] == {
        "rows": 1,
        "noisy": row["noisy"],
        "threshold": 1.1,
        "fail_if_slower": 1.1,
        "failed": True,
    }
    gh = run_cli("bench", *args, "--format", "github")
    assert gh.code == 1 and "::error file=" in gh.out and "FAILED" in gh.out
    # B faster than A never fails the gate.
    assert run_cli("bench", slow, "--vs", fast, *FAST, "--fail-if-slower", "1.1", "-q").code == 0


def test_fail_if_slower_takes_a_percentage(run_cli, fast_and_slow):
    fast, slow = fast_and_slow
    doc = bench_json(run_cli, fast, "--vs", slow, *FAST, "--fail-if-slower", "10%", code=1)
    assert doc["summary"]["fail_if_slower"] == pytest.approx(1.1)


def test_model_against_itself_never_fails_the_gate(run_cli):
    # The same file on both sides: its interval holds 1 (or a drift of a few percent under
    # load), never a lower bound above 1.1.
    model = SAMPLES / "resnet.onnx"
    for _ in range(2):
        result = run_cli("bench", model, "--vs", model, *FAST, "--fail-if-slower", "1.1", "-q")
        assert result.code == 0, result


def test_markdown_and_text(run_cli, folded):
    md = run_cli("bench", SAMPLES / "resnet.onnx", "--vs", folded, *FAST, "--format", "markdown")
    assert md.code == 0, md
    assert "| batch | model | median ms |" in md.out and "B/A (95% CI)" in md.out
    text = run_cli("bench", SAMPLES / "resnet.onnx", *FAST)
    assert text.code == 0 and "samples/s" in text.out and "peak RSS" in text.out


def test_cuda_without_gpu_is_a_clean_error(run_cli):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_clean_error(
        run_cli("bench", SAMPLES / "resnet.pt2", "--device", "cuda"), "CUDA is not available"
    )
    assert_clean_error(
        run_cli("bench", SAMPLES / "resnet.onnx", "--device", "cuda"), "CUDA is not available"
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--fail-if-slower", "1.05"], "--fail-if-slower needs --vs"),
        (["--vs", SAMPLES / "resnet.onnx", "--fail-if-slower", "0.9"], "a ratio B/A of at least 1"),
        (["--vs", SAMPLES / "resnet.onnx", "--fail-if-slower", "fast"], "give a ratio B/A"),
        (["--batch-size", "1,x"], "--batch-size"),
        (["--device", "npu"], "--device 'npu'"),
        (["--compile"], "--compile is for PyTorch models"),
    ],
)
def test_bad_options_exit_2(run_cli, args, needle):
    assert_clean_error(run_cli("bench", SAMPLES / "resnet.onnx", *args), needle)


def test_compile_failure_is_a_clean_error(run_cli, monkeypatch):
    import torch

    def broken(module, *a, **k):
        def fail(*args):
            raise RuntimeError("no C++ compiler found")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    assert_clean_error(
        run_cli("bench", SAMPLES / "resnet.pt2", "--compile", "--rounds", "3"),
        "torch.compile failed on this machine: no C++ compiler found",
    )
