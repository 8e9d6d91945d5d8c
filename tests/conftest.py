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
