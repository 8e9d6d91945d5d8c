"""Verification sessions that take large initializers from memory (``run.SharedWeights``).

An ONNX model and its folded copy get their sessions from one pool: every initializer of at
least ``min_bytes`` reaches onnxruntime as an array (``add_initializer``) behind a data-less
placeholder, and a weight the fold left as it was is one array for both. The threshold is a
parameter, so these small models take the path that a 500 MB model takes by default. What must
hold: the outputs are bit-identical to a session of the whole model, a weight the fold changed
under its old name is never taken from the source's array, verification still fails a fold one
channel 1% off, and the written file is the one the whole-model path writes.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
from fold_fixtures import unlimited_verification_time  # noqa: F401  (a fixture)
from onnx import TensorProto, helper, numpy_helper

import bncheck
from bncheck.api import verify_same_function
from bncheck.backends.onnx import OnnxHandle, open_onnx
from bncheck.backends.onnx import run as run_mod
from bncheck.backends.onnx.run import SharedWeights, make_session

pytestmark = pytest.mark.usefixtures("unlimited_verification_time")

SMALL = 512  # bytes: the conv weights and the FC weight below are taken, BN vectors are not


def conv_bn_fc(dtype=TensorProto.FLOAT, seed: int = 0) -> onnx.ModelProto:
    """x(N,3,8,8) → Conv 3→16 (1.7 KB) → BN → Relu → Flatten → Gemm 1024→64 (256 KB, the
    weight a fold leaves as it is) → y; random BN statistics and signed γ."""
    rng = np.random.default_rng(seed)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)

    def init(name, value):
        return numpy_helper.from_array(np.asarray(value).astype(np_dtype), name)

    inits = [
        init("w", rng.normal(0, 0.5, (16, 3, 3, 3))),
        init("g", rng.uniform(0.5, 2.0, 16) * rng.choice([-1, 1], 16)),
        init("b", rng.normal(0, 1, 16)),
        init("m", rng.normal(0, 1, 16)),
        init("v", rng.uniform(0.2, 2.0, 16)),
        init("fc_w", rng.normal(0, 0.05, (64, 16 * 8 * 8))),
        init("fc_b", rng.normal(0, 0.1, 64)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4, name="conv"),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn"),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", dtype, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", dtype, ["N", 64])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def whole_model_session(model: onnx.ModelProto):
    """The whole model serialized for onnxruntime, as sessions were built before the pool."""
    return make_session(model)


def shared_arrays(session) -> dict[str, np.ndarray]:
    """The arrays a session took from its pool (empty: it got the whole model)."""
    values, _ = getattr(session, "_bncheck_weights", ({}, {}))
    return values


def feeds(dtype=np.float32, n: int = 4) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((n, 3, 8, 8)).astype(dtype)}


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_shared_session_is_bit_identical_to_the_whole_model(dtype):
    model = conv_bn_fc(dtype)
    pool = SharedWeights(SMALL)
    shared = make_session(model, weights=pool)
    whole = whole_model_session(model)
    assert sorted(shared_arrays(shared)) == ["fc_w", "w"] and len(pool) == 2
    assert shared_arrays(whole) == {}
    x = feeds(helper.tensor_dtype_to_np_dtype(dtype))
    (a,), (b,) = shared.run(None, x), whole.run(None, x)
    assert a.dtype == b.dtype and np.array_equal(a, b)
    assert np.abs(a).max() > 0.1  # the weights arrived: zeros would give a bias-only output


def test_fold_shares_the_weights_it_left_and_not_the_ones_it_changed():
    """The fold rewrites the conv weight under its old name ``w``: same name, other bytes. The
    folded session must get its own array for it, and the source's for ``fc_w``."""
    source = OnnxHandle("m.onnx", conv_bn_fc(), weights=SharedWeights(SMALL))
    folded, steps = source.folded()
    assert [s.into for s in steps] == ["producer"]
    assert folded.weights is source.weights
    a, b = shared_arrays(source.session()), shared_arrays(folded.session())
    assert sorted(a) == sorted(b) == ["fc_w", "w"]
    assert b["fc_w"] is a["fc_w"]  # one array for both sessions
    assert b["w"] is not a["w"] and not np.array_equal(a["w"], b["w"])
    folded_w = next(t for t in folded.model.graph.initializer if t.name == "w")
    assert np.array_equal(b["w"], numpy_helper.to_array(folded_w))
    x = feeds()
    ref, got = source.run(x)[0], folded.run(x)[0]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_verification_fails_a_fold_one_channel_off_on_the_shared_path(monkeypatch, tmp_path):
    from fold_fixtures import corrupt_one_channel

    built = []  # (optimized, session) of each session built from the pool
    real = run_mod._shared_session

    def spy(*args, copied=False):
        built.append((copied, real(*args, copied=copied)))
        return built[-1][1]

    monkeypatch.setattr(run_mod, "_shared_session", spy)
    ok = bncheck.fold(OnnxHandle("m.onnx", conv_bn_fc(), weights=SharedWeights(SMALL)))
    assert ok.verification.passed and ok.verification.samples == 32
    assert [c for c, _ in built] == [False, False] and all(shared_arrays(s) for _, s in built)

    corrupt_one_channel(monkeypatch, call=0)
    out = tmp_path / "out.onnx"
    bad = bncheck.fold(OnnxHandle("m.onnx", conv_bn_fc(), weights=SharedWeights(SMALL)), out)
    v = bad.verification
    assert not v.passed and v.samples == 32 and v.max_rel_error > 10 * v.rtol
    assert bad.output is None and not out.exists()
    # both models as written from the pool, then the original's optimized run for its spread
    assert [c for c, _ in built] == [False, False, False, False, True]
    assert all(shared_arrays(s) for c, s in built if not c)
    assert v.worst.basis == "spread"


def test_verification_releases_the_sessions_and_their_arrays():
    source = OnnxHandle("m.onnx", conv_bn_fc(), weights=SharedWeights(SMALL))
    folded, _ = source.folded()
    v = verify_same_function(source, folded)
    assert v.passed
    assert source._session is None and folded._session is None
    assert len(source.weights) == 0  # no session holds an array: the memory is free
    # a later run builds what it needs again
    assert np.array_equal(source.run(feeds())[0], source.run(feeds())[0])
    assert len(source.weights) == 2


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_written_file_is_the_whole_model_paths_and_the_input_is_untouched(
    monkeypatch, tmp_path, run_cli
):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_fc(), str(src))
    before = sha(src)
    plain = tmp_path / "plain.onnx"
    monkeypatch.setattr(run_mod, "SHARED_MIN_BYTES", 1 << 40)  # nothing is large enough
    assert bncheck.fold(src, plain).passed
    monkeypatch.setattr(run_mod, "SHARED_MIN_BYTES", SMALL)
    assert open_onnx(src).weights.min_bytes == SMALL
    out = tmp_path / "out.onnx"
    result = run_cli("fold", src, "-o", out)
    assert result.code == 0, result
    assert "verification passed on 32 samples" in " ".join(result.out.split())
    assert sha(out) == sha(plain) and sha(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out.onnx", "plain.onnx"]
    inspected = run_cli("inspect", out, "--format", "json")
    assert inspected.code == 0, inspected
    assert json.loads(inspected.out)["bn_layers"] == []


def test_an_optimized_session_gets_the_weights_copied_before_its_optimizers_run():
    """onnxruntime's optimizers read initializers from the model: an optimized session gets
    the pool's arrays copied into the graph first (bit-identical to the whole model's
    optimized session; the pool keeps nothing, onnxruntime holds the copies)."""
    pool = SharedWeights(SMALL)
    session = make_session(conv_bn_fc(), optimize=True, weights=pool)
    assert hasattr(session, "_bncheck_tmpdir")  # built from the skeleton
    assert shared_arrays(session) == {} and len(pool) == 0
    x = feeds()
    whole = make_session(conv_bn_fc(), optimize=True)
    assert np.array_equal(session.run(None, x)[0], whole.run(None, x)[0])


@pytest.mark.parametrize("optimize", [False, True])
def test_a_placeholder_left_without_its_array_fails_the_load_not_reads_zeros(monkeypatch, optimize):
    """The placeholder file is empty (or, optimized, absent): onnxruntime cannot read a
    placeholder as zeros; the load fails and the whole model is used instead."""
    real = SharedWeights.skeleton

    def leave_one_out(self, model):
        skeleton, values = real(self, model)
        values.pop("fc_w")
        return skeleton, values

    x = feeds()
    expected = make_session(conv_bn_fc(), optimize=optimize, weights=SharedWeights(SMALL))
    assert hasattr(expected, "_bncheck_tmpdir")  # built from the skeleton
    monkeypatch.setattr(SharedWeights, "skeleton", leave_one_out)
    with pytest.raises(Exception, match="fc_w"):
        opts = run_mod._options(optimize, None)
        run_mod._shared_session(conv_bn_fc(), opts, SharedWeights(SMALL), copied=optimize)
    fallback = make_session(conv_bn_fc(), optimize=optimize, weights=SharedWeights(SMALL))
    assert not hasattr(fallback, "_bncheck_tmpdir")  # the whole model
    assert np.array_equal(fallback.run(None, x)[0], expected.run(None, x)[0])


def test_the_whole_model_when_the_shared_session_cannot_be_built(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("this onnxruntime refuses placeholders")

    monkeypatch.setattr(run_mod, "_shared_session", refuse)
    session = make_session(conv_bn_fc(), weights=SharedWeights(SMALL))
    assert shared_arrays(session) == {}
    x = feeds()
    assert np.array_equal(
        session.run(None, x)[0], whole_model_session(conv_bn_fc()).run(None, x)[0]
    )


def test_what_the_pool_takes():
    pool = SharedWeights(SMALL)
    big = numpy_helper.from_array(np.ones((8, 16), np.float32), "big")  # 512 bytes
    assert pool.takes(big)
    assert not pool.takes(numpy_helper.from_array(np.ones((7, 16), np.float32), "small"))
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [16, 16], [1.0] * 256)
    assert not typed.HasField("raw_data") and not pool.takes(typed)
    strings = helper.make_tensor("s", TensorProto.STRING, [300], [b"abcd"] * 300)
    assert not pool.takes(strings)
    # an initializer that is also a graph input can be fed instead: it stays in the model
    model = conv_bn_fc()
    model.graph.input.append(helper.make_tensor_value_info("fc_w", TensorProto.FLOAT, [64, 1024]))
    skeleton, values = pool.skeleton(model)
    assert sorted(values) == ["w"]
    kept = {t.name: t for t in skeleton.graph.initializer}
    assert kept["fc_w"].HasField("raw_data") and kept["fc_w"] == next(
        t for t in model.graph.initializer if t.name == "fc_w"
    )
    assert kept["w"].data_location == TensorProto.EXTERNAL and not kept["w"].raw_data
