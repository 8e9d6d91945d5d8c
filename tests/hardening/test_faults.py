"""Faults around the run: bad output paths, a full disk, Ctrl-C, models past the 2 GB limit.

CI runs as root, which ignores chmod, so a full disk is simulated with RLIMIT_FSIZE in a
subprocess (SIGXFSZ ignored, so the write fails with EFBIG instead of killing the process).
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ROOT, assert_clean_error
from corpus import conv_bn_onnx
from corpus_data import good_data
from onnx import helper, numpy_helper

TESTS = ROOT / "tests"


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def model(tmp_path) -> Path:
    p = tmp_path / "m.onnx"
    p.write_bytes(conv_bn_onnx().SerializeToString())
    return p


@pytest.fixture
def data(tmp_path) -> Path:
    p = tmp_path / "d.npy"
    np.save(p, good_data(16, cin=2))
    return p


# ---- output paths ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["fold", "recalibrate"])
def test_output_folder_missing(run_cli, model, data, tmp_path, command):
    out = tmp_path / "no" / "such" / "out.onnx"
    extra = ["--data", data] if command == "recalibrate" else []
    before = files(tmp_path)
    assert_clean_error(run_cli(command, model, *extra, "-o", out), "out.onnx", "does not exist")
    assert files(tmp_path) == before and not (tmp_path / "no").exists()


@pytest.mark.parametrize("command", ["fold", "recalibrate"])
def test_output_is_input_needs_in_place(run_cli, model, data, tmp_path, command):
    extra = ["--data", data] if command == "recalibrate" else []
    digest, before = sha(model), files(tmp_path)
    # The same file under another spelling is still the input.
    alias = tmp_path / "." / model.name
    assert_clean_error(run_cli(command, model, *extra, "-o", alias), "--in-place")
    assert sha(model) == digest and files(tmp_path) == before


def test_fold_in_place_replaces_atomically(run_cli, model, tmp_path):
    digest, before = sha(model), files(tmp_path)
    result = run_cli("fold", model, "-o", model, "--in-place", "--format", "json")
    assert result.code == 0, result
    assert sha(model) != digest and files(tmp_path) == before  # no temp file left
    folded = onnx.load(str(model))
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]


# ---- a full disk -----------------------------------------------------------------------------

RUNNER = """
import sys
import bncheck.backends.onnx.run as onnx_run
onnx_run.EXTERNAL_DATA_THRESHOLD = {threshold}
onnx_run.EXTERNAL_TENSOR_MIN_BYTES = {min_bytes}
from bncheck.cli import main
main(sys.argv[1:])
"""


def run_limited(
    args: list,
    cwd: Path,
    *,
    fsize: int | None,
    threshold: int = 2_000_000_000,
    min_bytes: int = 1024,
    timeout: float = 60,
) -> subprocess.CompletedProcess:
    """``bncheck ARGS`` in a subprocess whose files cannot grow past ``fsize`` bytes."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), not a kill
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]),
        PYTHONDONTWRITEBYTECODE="1",
        COLUMNS="200",
    )
    code = RUNNER.format(threshold=threshold, min_bytes=min_bytes)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit,
    )


def one_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bncheck: error: "), proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_disk_full_onnx_keeps_previous_output(model, tmp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous output, must survive")
    before = files(tmp_path)
    proc = run_limited(["fold", model, "-o", out], tmp_path, fsize=100)
    one_clean_error(proc, "out.onnx", "cannot write")
    assert out.read_bytes() == b"previous output, must survive"
    assert files(tmp_path) == before


def test_disk_full_onnx_external_data_keeps_previous_output(tmp_path):
    """The external-data write path (the >2 GB code path, threshold lowered) fails cleanly too."""
    m = big_weight_model()
    src = tmp_path / "big.onnx"
    src.write_bytes(m.SerializeToString())
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")
    before = files(tmp_path)
    # --no-verify: verification builds an onnxruntime session, which for a model past the
    # threshold goes through a temporary file too; here only the output write may fail.
    args = ["fold", src, "-o", out, "--no-verify"]
    proc = run_limited(args, tmp_path, fsize=1000, threshold=100, min_bytes=256)
    one_clean_error(proc, "out.onnx", "cannot write")
    assert out.read_bytes() == b"previous"
    assert files(tmp_path) == before  # neither the temp model nor a .data file is left


def test_disk_full_pt2_keeps_previous_output(tmp_path):
    import torch
    from torch_fixtures import conv_bn, randomize_bn

    sd = tmp_path / "m.pt"
    torch.save(randomize_bn(conv_bn(4).eval()).state_dict(), sd)
    out = tmp_path / "out.pt2"
    out.write_bytes(b"previous")
    before = files(tmp_path)
    proc = run_limited(
        ["fold", sd, "--arch", "torch_fixtures:conv_bn", "-o", out], tmp_path, fsize=4096
    )
    one_clean_error(proc, "out.pt2", "cannot write")
    assert out.read_bytes() == b"previous"
    assert files(tmp_path) == before


# ---- models past 2 GB: external data (threshold lowered) -----------------------------------


def big_weight_model() -> onnx.ModelProto:
    """conv_bn_onnx with 16 output channels: the 16×2×3×3 conv weight (1152 B) goes external
    once the thresholds are lowered; the BN vectors (64 B) stay inline."""
    return conv_bn_onnx(channels=16)


def test_fold_writes_external_data_past_threshold(run_cli, tmp_path, monkeypatch):
    import bncheck.backends.onnx.run as onnx_run
    from bncheck.backends import open_model

    monkeypatch.setattr(onnx_run, "EXTERNAL_DATA_THRESHOLD", 100)
    monkeypatch.setattr(onnx_run, "EXTERNAL_TENSOR_MIN_BYTES", 256)
    src = tmp_path / "big.onnx"
    src.write_bytes(big_weight_model().SerializeToString())
    out = tmp_path / "out.onnx"
    for _ in range(2):  # the second run replaces the first output and its data file
        result = run_cli("fold", src, "-o", out, "--format", "json")
        assert result.code == 0, result
        data_files = sorted(p.name for p in tmp_path.glob("out.*.data"))
        assert len(data_files) == 1, data_files
        assert files(tmp_path) == {"big.onnx", "out.onnx", data_files[0]}
    folded = onnx.load(str(out), load_external_data=False)
    w = next(t for t in folded.graph.initializer if len(t.dims) == 4)
    assert w.data_location == onnx.TensorProto.EXTERNAL
    assert {e.key: e.value for e in w.external_data}["location"] == data_files[0]
    # The written model reads back through bncheck's own safe loader and computes the
    # original function (fold is exact in float64; float32 rounding of the folded weights).
    x = np.random.default_rng(1).normal(size=(4, 2, 5, 5)).astype(np.float32)
    (ref,) = open_model(src).run({"x": x})
    (got,) = open_model(out).run({"x": x})
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


# ---- Ctrl-C ------------------------------------------------------------------------------------


def slow_model(layers: int = 8, ch: int = 64, hw: int = 32) -> onnx.ModelProto:
    """Conv-BN-ReLU ×8 at 64 channels, 32×32: about 5 ms per sample on one core."""
    rng = np.random.default_rng(0)
    nodes, inits, prev, cin = [], [], "x", 3
    for i in range(layers):
        w = rng.normal(size=(ch, cin, 3, 3)) / np.sqrt(9 * cin)
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        for name, v in (
            ("s", rng.uniform(0.5, 1.5, ch)),
            ("b", rng.normal(size=ch) * 0.1),
            ("m", rng.normal(size=ch) * 0.1),
            ("v", rng.uniform(0.5, 2, ch)),
        ):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{name}{i}"))
        nodes += [
            helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], pads=[1] * 4, name=f"conv{i}"),
            helper.make_node(
                "BatchNormalization",
                [f"c{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"],
                [f"n{i}"],
                name=f"bn{i}",
            ),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        prev, cin = f"r{i}", ch
    g = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, hw, hw])],
        [helper.make_tensor_value_info(prev, onnx.TensorProto.FLOAT, ["N", ch, hw, hw])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("slow")
    (d / "slow.onnx").write_bytes(slow_model().SerializeToString())
    x = np.lib.format.open_memmap(d / "slow.npy", "w+", np.float32, (2048, 3, 32, 32))
    x[:] = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    del x
    return d / "slow.onnx", d / "slow.npy"


def interrupt_after(
    args: list, cwd: Path, delay: float, grace: float
) -> tuple[int, str, str, float]:
    """Start ``bncheck ARGS``, SIGINT it after ``delay`` s; returns rc, out, err, seconds from
    SIGINT to exit (killed after ``grace`` s, rc -9)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200", OMP_NUM_THREADS="1")

    def default_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background job may inherit SIG_IGN

    proc = subprocess.Popen(
        [sys.executable, "-m", "bncheck", *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    time.sleep(delay)
    assert proc.poll() is None, f"finished before the interrupt: {proc.communicate()}"
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    try:
        out, err = proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err, time.monotonic() - sent


def assert_interrupted(rc: int, out: str, err: str, took: float, limit: float) -> None:
    assert rc == 130, (rc, err[-2000:])
    assert out == ""
    assert took < limit, f"exit took {took:.1f} s after SIGINT"
    if err == "":
        # typer.core turns KeyboardInterrupt into typer.Exit(130), which cli.main() passes on
        # silently; once main() prints for it, the assertion below takes over.
        pytest.xfail("exit 130 but no 'bncheck: interrupted' line (typer's Exit(130))")
    assert err.strip().splitlines() == ["bncheck: interrupted"], err[-2000:]


CTRL_C = {
    "check": lambda m, d, o: ["check", m, "--data", d, "--batch-size", "32"],
    "recalibrate": lambda m, d, o: [
        "recalibrate",
        m,
        "--data",
        d,
        "-o",
        o / "r.onnx",
        "--batch-size",
        "32",
        "--max-samples",
        "2048",
    ],
    "bench": lambda m, d, o: ["bench", m, "--batch-size", "32", "--time-budget", "20"],
}


@pytest.mark.parametrize("command", sorted(CTRL_C))
def test_ctrl_c_between_batches(slow, tmp_path, command):
    """Batches of 32 (~0.2 s each): the interrupt lands between two runs."""
    from test_corpus import need

    need(command)
    model, data = slow
    rc, out, err, took = interrupt_after(
        CTRL_C[command](model, data, tmp_path), tmp_path, 3.0, grace=8.0
    )
    assert_interrupted(rc, out, err, took, limit=5.0)
    assert files(tmp_path) == set()  # no output, no temporary file


def test_ctrl_c_inside_one_long_onnx_run(slow, tmp_path):
    """One batch of 2048 samples (~10 s in a single session.run on an idle machine, longer on a
    loaded one): Ctrl-C must end the run well before it would finish, through onnxruntime's
    terminate flag. The limit leaves a loaded machine time to exit, still 2.5× under the run."""
    model, data = slow
    args = ["check", model, "--data", data, "--batch-size", "2048"]
    rc, out, err, took = interrupt_after(args, tmp_path, 3.0, grace=8.0)
    assert_interrupted(rc, out, err, took, limit=4.0)


# ---- bncheck.interrupt itself -------------------------------------------------------------


def test_run_session_stops_a_long_run_and_restores_the_handler(slow):
    from bncheck.backends.onnx.run import make_session
    from bncheck.interrupt import interruptible, run_session

    model, _ = slow
    session = make_session(onnx.load(str(model)), source="slow")
    # 2048 samples at ~5 ms each on one core: seconds uninterrupted, and longer under load, so
    # stopping within 3 s of the start (the signal comes at 0.3 s) is a direction load keeps.
    x = np.random.default_rng(0).normal(size=(2048, 3, 32, 32)).astype(np.float32)
    start = time.monotonic()
    (y,) = run_session(session, None, {"x": x[:2]})  # outside the block: a plain run
    assert y.shape == (2, 64, 32, 32)
    previous = signal.getsignal(signal.SIGINT)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    with pytest.raises(KeyboardInterrupt), interruptible():
        start = time.monotonic()
        timer.start()
        run_session(session, None, {"x": x})
    took = time.monotonic() - start
    timer.join()
    assert took < 3.0, f"run_session took {took:.2f} s to stop"
    assert signal.getsignal(signal.SIGINT) is previous
    # The session still works after a terminated run (a fresh RunOptions per call).
    (y,) = run_session(session, None, {"x": x[:2]})
    assert np.isfinite(y).all()


def test_ctrl_c_that_surfaces_as_another_error_is_an_interrupt(monkeypatch, capsys):
    """Seen under load: SIGINT landing inside a C extension's import makes that import raise
    ``ImportError: initialization failed``. It is still Ctrl-C: 130 and one line, not an
    internal error."""
    import typer

    import bncheck.interrupt as interrupt
    from bncheck.cli import main

    class CutShort:
        def main(self, **kwargs):
            interrupt._interrupted.set()  # what the SIGINT handler records
            raise ImportError("initialization failed")

    monkeypatch.setattr(typer.main, "get_command", lambda app: CutShort())
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "x.onnx"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "bncheck: interrupted\n"
