from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bncheck.layers import BNLayer, FoldDecision, ModelInfo, Neighbour

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"


def make_layer(channels: int = 4, seed: int = 0, **overrides) -> BNLayer:
    """A healthy, calibrated BN layer with randomized statistics; override any field."""
    rng = np.random.default_rng(seed)
    fields = dict(
        name="bn1",
        kind="BatchNorm2d",
        channels=channels,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        training=False,
        num_batches_tracked=100,
        running_mean=rng.normal(0, 1, channels).astype(np.float32),
        running_var=rng.uniform(0.5, 2.0, channels).astype(np.float32),
        weight=rng.uniform(0.5, 1.5, channels).astype(np.float32),
        bias=rng.normal(0, 0.5, channels).astype(np.float32),
        stats_dtype="float32",
        param_dtype="float32",
        producer=Neighbour("conv1", "Conv", True),
        consumers=(Neighbour("relu1", "relu"),),
        call_sites=1,
        fold=FoldDecision("producer", "conv1"),
    )
    fields.update(overrides)
    return BNLayer(**fields)


def make_info(*layers: BNLayer, **overrides) -> ModelInfo:
    fields = dict(
        path="model.onnx",
        format="onnx",
        framework="onnx",
        bn_layers=tuple(layers),
        norm_layers=(),
        inputs=(),
        outputs=(),
        training=False,
    )
    fields.update(overrides)
    return ModelInfo(**fields)


@pytest.fixture
def samples_dir() -> Path:
    if not SAMPLES.is_dir():
        pytest.fail("sample_models/ is missing: run `make samples`")
    return SAMPLES


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, err={self.err!r}, out={self.out[-400:]!r})"


def _cli_runner(capture, monkeypatch):
    from bncheck.cli import main

    monkeypatch.setenv("COLUMNS", "200")

    def run(*args) -> CliResult:
        capture.readouterr()
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        cap = capture.readouterr()
        return CliResult(int(exc.value.code), cap.out, cap.err)

    return run


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run ``bncheck ARGS`` in-process; returns exit code, stdout, stderr."""
    return _cli_runner(capsys, monkeypatch)


@pytest.fixture
def run_cli_fd(capfd, monkeypatch):
    """Like ``run_cli``, capturing file descriptors 1 and 2: what C++ libraries print too."""
    return _cli_runner(capfd, monkeypatch)


def assert_clean_error(result: CliResult, *needles: str) -> None:
    """Exit 2, exactly one line on stderr naming the problem, no traceback."""
    assert result.code == 2, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("bncheck: error: "), lines[0]
    assert "Traceback" not in result.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def tiny_onnx_model(with_bn: bool = True):
    """Conv → BatchNormalization → Relu, randomized statistics; 1×2×5×5 input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(3, 2, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "scale"),
        numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, size=3).astype(np.float32), "var"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv")]
    if with_bn:
        nodes.append(
            helper.make_node(
                "BatchNormalization", ["c", "scale", "beta", "mean", "var"], ["b"], name="bn"
            )
        )
    nodes.append(helper.make_node("Relu", ["b" if with_bn else "c"], ["y"], name="relu"))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 3, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
