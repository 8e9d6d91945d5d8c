"""CUDA latency: runners synchronize and report device memory. Skipped without a GPU."""

from __future__ import annotations

import pytest
from conftest import SAMPLES

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_torch_cuda_runner_syncs_and_counts_memory():
    import numpy as np

    from bncheck.api import open_model
    from bncheck.backends.torch.latency import latency_runner

    handle = open_model(SAMPLES / "resnet.pt2")
    x = np.random.default_rng(0).standard_normal((8, 3, 24, 24)).astype(np.float32)
    runner = latency_runner(handle, {"x": x}, device="cuda")
    assert runner.sync is torch.cuda.synchronize
    runner.run()
    runner.sync()
    assert runner.peak_memory() > 0
    # The handle's own module stays on CPU: CPU inference still works after.
    assert handle.run({"x": x})[0].shape == (8, 10)


def test_bench_on_cuda_reports_cuda_memory():
    from bncheck.api._bench import bench

    result = bench(SAMPLES / "resnet.pt2", device="cuda", batch_sizes=(1, 16), time_budget_s=0.2)
    assert [r.batch_size for r in result.rows] == [1, 16]
    assert all(r.memory_kind == "CUDA max allocated" and r.memory_bytes > 0 for r in result.rows)
    assert all(r.a.median > 0 for r in result.rows)


def test_onnxruntime_cuda_when_available():
    import onnxruntime as ort

    from bncheck.api._bench import bench

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDAExecutionProvider")
    result = bench(SAMPLES / "resnet.onnx", device="cuda", time_budget_s=0.2)
    assert "CUDAExecutionProvider" in result.a.engine
