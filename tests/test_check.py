"""``bncheck.api.check`` and the BN4xx rules.

Three layers of evidence:

- a numpy fake model implementing the backend contract, checked against a whole-data float64
  reference computed here (streaming + Chan merge must equal one pass over everything to
  1e-12 relative: only float64 rounding separates them);
- the sample ResNet in both forms against a float64 torch reference (forward pre-hooks on the
  eval model in float64). The models run in float32, so figures agree to float32 accumulation
  error: 1e-5 relative on variances, 1e-5 of the channel's scale (|μ| + σ) on means — a mean
  near 0 has no meaningful relative error;
- controlled faults: input gain/offset (the stem BN must be first) and one mid-network BN's
  running_mean moved by 3 running std (that layer must be first).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLES

from bncheck.api._check import CheckResult, check
from bncheck.backends.base import ModelHandle
from bncheck.errors import InputError
from bncheck.layers import BNLayer, FoldDecision, ModelInfo, Severity, TensorSpec
from bncheck.mismatch import LayerMismatch, Thresholds, output_divergence
from bncheck.numerics import Moments
from bncheck.report.check import bar
from bncheck.rules_data import DATA_RULES, CheckThresholds, DataEvidence, run_data_rules

RTOL_F32 = 1e-5  # float32 network against float64 reference (see module docstring)


# --- a fake model implementing the moment-runner contract in numpy ---------------------------


def _bn_layer(name: str, mean, var, *, tracked: bool = True) -> BNLayer:
    return BNLayer(
        name=name,
        kind="BatchNorm2d",
        channels=len(mean),
        eps=1e-5,
        momentum=0.1,
        affine=False,
        track_running_stats=tracked,
        training=False,
        num_batches_tracked=10 if tracked else None,
        running_mean=np.asarray(mean, np.float32) if tracked else None,
        running_var=np.asarray(var, np.float32) if tracked else None,
        weight=None,
        bias=None,
        stats_dtype="float32" if tracked else None,
        param_dtype=None,
        producer=None,
        consumers=(),
        call_sites=1,
        fold=FoldDecision(None, reason="test"),
    )


class FakeHandle(ModelHandle):
    """x (N,3,4,4) → bn_a → relu·2+1 → bn_b → spatial mean → ·W → logits (N,5).

    bn_c has no running statistics (track_running_stats=False) and normalizes a copy of the
    input that goes nowhere: it must be reported as skipped.
    """

    format = "onnx"
    framework = "onnx"

    def __init__(self, stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        self.path = Path("fake.onnx")
        self.stats = stats
        self.w = np.random.default_rng(7).normal(size=(3, 5))

    def info(self) -> ModelInfo:
        layers = [_bn_layer(n, *self.stats[n]) for n in ("bn_a", "bn_b")]
        layers.append(_bn_layer("bn_c", [0, 0, 0], [1, 1, 1], tracked=False))
        return ModelInfo(
            path="fake.onnx",
            format="onnx",
            framework="onnx",
            bn_layers=tuple(layers),
            norm_layers=(),
            inputs=(TensorSpec("x", ("N", 3, 4, 4), "float32"),),
            outputs=(TensorSpec("logits", ("N", 5), "float32"),),
            training=False,
        )

    def forward(self, x: np.ndarray, batch_stats: bool):
        def bn(name: str, t: np.ndarray) -> np.ndarray:
            if batch_stats:
                mean, var = t.mean(axis=(0, 2, 3)), t.var(axis=(0, 2, 3))
            else:
                mean, var = (np.asarray(a, np.float64) for a in self.stats[name])
            return (t - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5)

        a = x.astype(np.float64)
        b = np.maximum(bn("bn_a", a), 0) * 2 + 1
        logits = bn("bn_b", b).mean(axis=(2, 3)) @ self.w
        return logits, {"bn_a": a, "bn_b": b, "bn_c": a}

    def moment_runner(self, *, batch_stats: bool):
        def run(feeds):
            out, inputs = self.forward(feeds["x"], batch_stats)
            moments = {k: Moments.from_batch(v) for k, v in inputs.items()}
            return [out], moments

        return run


def _fake_data(tmp_path: Path, n: int, *, gain=1.0, offset=0.0) -> Path:
    rng = np.random.default_rng(3)
    x = rng.normal(0.5, 1.5, size=(n, 3, 4, 4)) * gain + offset
    path = tmp_path / "x.npy"
    np.save(path, x.astype(np.float32))
    return path


def _fake_handle_matching(path: Path) -> FakeHandle:
    """Running stats = the exact population statistics of the data in inference mode."""
    x = np.load(path).astype(np.float64)
    h = FakeHandle({"bn_a": (np.zeros(3), np.ones(3)), "bn_b": (np.zeros(3), np.ones(3))})
    h.stats["bn_a"] = (x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3)))
    _, inputs = h.forward(x, batch_stats=False)
    b = inputs["bn_b"]
    h.stats["bn_b"] = (b.mean(axis=(0, 2, 3)), b.var(axis=(0, 2, 3)))
    return h


def test_streamed_figures_equal_a_whole_data_reference(tmp_path):
    data = _fake_data(tmp_path, 70)  # 70 = 4 batches of 16 + 6: uneven on purpose
    handle = _fake_handle_matching(data)
    # Move bn_b's stored mean so the figures are not trivially zero.
    mean_b, var_b = handle.stats["bn_b"]
    handle.stats["bn_b"] = (mean_b + 0.3 * np.sqrt(var_b), var_b)
    calls = []
    result = check(
        handle,
        data=data,
        batch_size=16,
        progress=lambda d, t: calls.append((d, t)),
        task="classify",
    )
    assert calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert (result.samples, result.batches) == (70, 5)

    x = np.load(data).astype(np.float64)
    ref_out, ref_inputs = handle.forward(x, batch_stats=False)
    for lc in result.layers[:2]:
        t = ref_inputs[lc.name]
        np.testing.assert_allclose(lc.data_mean, t.mean(axis=(0, 2, 3)), rtol=1e-12)
        np.testing.assert_allclose(lc.data_var, t.var(axis=(0, 2, 3)), rtol=1e-12)
        assert lc.moments.count == 70 * 16
    # bn_b: running mean = data mean + 0.3·√var (in float32) → shift ≈ −0.3 in every channel
    b = result.layers[1]
    np.testing.assert_allclose(b.metrics["mean_shift"], -0.3, rtol=1e-5)
    assert b.mismatch.over is False  # KL ≈ ½·0.09 = 0.045 < 0.1
    assert result.layers[2].mismatch is None
    assert "track_running_stats=False" in result.layers[2].skipped

    # Output divergence: per-batch batch-stat outputs, compared over everything at once.
    bs = np.concatenate(
        [handle.forward(x[i : i + 16], batch_stats=True)[0] for i in range(0, 70, 16)]
    )
    expect = output_divergence([ref_out], [bs])
    assert result.divergence.rel_l2 == pytest.approx(expect["rel_l2"], rel=1e-12)
    assert result.divergence.top1_agreement == expect["top1_agreement"]
    assert result.divergence.samples == 70
    assert result.divergence.outputs[0][0] == "logits"


def test_matching_data_passes_and_shifted_layer_is_first(tmp_path):
    data = _fake_data(tmp_path, 64)
    handle = _fake_handle_matching(data)
    result = check(handle, data=data)
    assert result.first_diverging is None
    assert result.findings == []
    assert all(lc.mismatch.score < 1e-12 for lc in result.measured)

    mean_b, var_b = handle.stats["bn_b"]
    handle.stats["bn_b"] = (mean_b + 2.0 * np.sqrt(var_b), var_b)  # KL = ½·2² = 2 per channel
    result = check(handle, data=data)
    assert result.first_diverging == "bn_b"
    # The 2σ shift moves every logit: the output comparison flags it as well.
    assert [(f.code, f.layer, f.severity) for f in result.findings] == [
        ("BN402", None, Severity.WARNING),
        ("BN401", "bn_b", Severity.ERROR),
    ]
    assert result.layers[1].mismatch.score == pytest.approx(2.0, rel=1e-5)


def test_single_sample_batch_is_left_out_of_the_output_comparison(tmp_path):
    data = _fake_data(tmp_path, 33)
    result = check(_fake_handle_matching(data), data=data, batch_size=16)
    assert result.divergence.samples == 32
    assert any("single-sample batch" in n for n in result.notes)
    assert result.layers[0].moments.count == 33 * 16  # the moments still use every sample


def test_synthetic_data_gives_bn403_and_divergence_can_be_skipped(tmp_path):
    handle = _fake_handle_matching(_fake_data(tmp_path, 32))
    result = check(handle, synthetic=True, max_samples=48, divergence=False)
    assert result.synthetic and result.samples == 48
    assert result.divergence is None
    assert ("BN403", Severity.INFO) in {(f.code, f.severity) for f in result.findings}


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({}, "check needs data"),
        ({"data": "x.npy", "synthetic": True}, "not both"),
        ({"synthetic": True, "select": ["BN9"]}, "unknown rule code"),
        ({"synthetic": True, "thresholds": {"kl": -1}}, "kl threshold must be a positive"),
    ],
)
def test_bad_arguments_raise_input_error(tmp_path, kwargs, needle):
    handle = _fake_handle_matching(_fake_data(tmp_path, 8))
    with pytest.raises(InputError, match=needle):
        check(handle, **kwargs)


# --- thresholds and rules ------------------------------------------------------------------


def test_thresholds_from_mapping():
    th = CheckThresholds.from_mapping(
        {"kl": 0.5, "max_share": 0.25, "output-rel-l2": 1, "top1_agreement": 0.8}
    )
    assert th.to_dict() == {
        "kl": 0.5,
        "max_share": 0.25,
        "output_rel_l2": 1.0,
        "top1_agreement": 0.8,
    }
    assert CheckThresholds.from_mapping(None) == CheckThresholds()
    for bad, needle in (
        ({"kll": 1}, "unknown threshold 'kll'"),
        ({"kl": "big"}, "must be a number"),
        ({"kl": True}, "must be a number"),
        ({"max-share": 1.0}, "max_share must be in"),
        ({"top1-agreement": 2}, "top1-agreement must be in"),
        ({"output-rel-l2": 0}, "output-rel-l2 must be a positive"),
    ):
        with pytest.raises(InputError, match=needle) as exc:
            CheckThresholds.from_mapping(bad, source="pyproject.toml: thresholds")
        assert str(exc.value).startswith("pyproject.toml: thresholds: ")


def _lm(name: str, score: float) -> LayerMismatch:
    th = Thresholds()
    return LayerMismatch(
        name=name,
        channels=10,
        median_abs_mean_shift=0.1,
        max_abs_mean_shift=0.2,
        median_abs_log_var_ratio=0.1,
        max_abs_log_var_ratio=0.2,
        median_kl=score / 2,
        max_kl=score * 2,
        worst_channel=3,
        share_over=0.5 if score > th.kl else 0.0,
        score=score,
        over=score > th.kl,
    )


def _evidence(layers, *, first, rel=0.1, top1=1.0, synthetic=False) -> DataEvidence:
    return DataEvidence(
        layers=tuple(layers),
        thresholds=CheckThresholds(),
        first=first,
        output_rel_l2=rel,
        top1_agreement=top1,
        synthetic=synthetic,
        samples=100,
    )


def test_rules_error_on_first_warn_downstream_and_on_outputs():
    layers = [_lm("a", 0.01), _lm("b", 0.5), _lm("c", 0.05), _lm("d", 2.0)]
    ev = _evidence(layers, first="b", rel=0.6, top1=0.85)
    got = [(f.code, f.layer, f.severity) for f in run_data_rules(ev)]
    assert got == [
        ("BN402", None, Severity.WARNING),
        ("BN401", "b", Severity.ERROR),
        ("BN404", "d", Severity.WARNING),
    ]
    msg = next(f.message for f in run_data_rules(ev) if f.code == "BN402")
    assert "relative L2 0.6 > 0.5" in msg and "top-1 agreement 85.0% < 90%" in msg
    first = next(f.message for f in run_data_rules(ev) if f.code == "BN401")
    assert "5 of 10 channels over KL 0.1" in first and "later layers inherit" in first
    assert [f.code for f in run_data_rules(ev, ignore=["BN40"])] == []
    assert [f.code for f in run_data_rules(ev, select=["BN401"])] == ["BN401"]


def test_output_rule_at_the_threshold_and_when_unmeasured():
    assert run_data_rules(_evidence([], first=None, rel=0.5, top1=0.9)) == []
    assert run_data_rules(_evidence([], first=None, rel=None, top1=None)) == []
    codes = [f.code for f in run_data_rules(_evidence([], first=None, synthetic=True))]
    assert codes == ["BN403"]
    (nan,) = run_data_rules(_evidence([], first=None, rel=math.nan, top1=None))
    assert nan.code == "BN402" and "NaN" in nan.message


def test_every_data_rule_documents_itself():
    assert sorted(DATA_RULES) == ["BN401", "BN402", "BN403", "BN404"]
    for rule in DATA_RULES.values():
        assert rule.summary and rule.hint and len(rule.doc.splitlines()) > 2


def test_bar_is_scaled_with_eighth_blocks():
    assert bar(1.0, 1.0, 8) == "█" * 8
    assert bar(math.inf, 1.0, 8) == "█" * 8
    assert bar(0.5, 1.0, 8) == "████"
    assert bar(0.5 + 3 / 64, 1.0, 8) == "████▍"  # 4 cells + 3/8 of one
    assert bar(0.0, 1.0, 8) == ""


# --- the sample ResNet against a float64 torch reference ----------------------------------


def _torch_reference(data: np.ndarray) -> dict[str, tuple]:
    """{module name: (running_mean, data mean, data var, elements per channel)}: one float64
    eval-mode pass over all the data at once (no batching, no merge)."""
    import torch

    from bncheck.samples import small_resnet

    model = small_resnet()
    model.load_state_dict(torch.load(SAMPLES / "resnet.pt", weights_only=True))
    model = model.double().eval()
    seen: dict[str, np.ndarray] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, args[0]))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model(torch.from_numpy(data.astype(np.float64)))
    for h in hooks:
        h.remove()
    out = {}
    for name, x in seen.items():
        a = x.numpy()
        rm = dict(model.named_buffers())[f"{name}.running_mean"].numpy()
        out[name] = (rm, a.mean(axis=(0, 2, 3)), a.var(axis=(0, 2, 3)), a.size // a.shape[1])
    return out


def _by_running_mean(result: CheckResult, ref: dict) -> dict[str, str]:
    """Map result layer names → torch module names: the stored running means are identical."""
    mapping = {}
    for lc in result.layers:
        rm = np.asarray(lc.layer.running_mean, np.float64)
        (name,) = [n for n, (r, *_) in ref.items() if np.array_equal(r, rm)]
        mapping[lc.name] = name
    return mapping


def _assert_moments_close(mean, var, ref_mean, ref_var, rtol=RTOL_F32):
    scale = np.abs(ref_mean) + np.sqrt(ref_var)
    assert np.all(np.abs(mean - ref_mean) <= rtol * scale), np.max(np.abs(mean - ref_mean) / scale)
    np.testing.assert_allclose(var, ref_var, rtol=rtol)


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    return np.load(SAMPLES / "resnet_calib.npy")


@pytest.fixture(scope="module")
def reference(calib):
    return _torch_reference(calib)


@pytest.fixture(scope="module")
def onnx_result() -> CheckResult:
    return check(SAMPLES / "resnet.onnx", data=SAMPLES / "resnet_calib.npy", task="classify")


@pytest.fixture(scope="module")
def pt2_result() -> CheckResult:
    return check(SAMPLES / "resnet.pt2", data=SAMPLES / "resnet_calib.npy", task="classify")


@pytest.mark.parametrize("form", ["onnx", "pt2"])
def test_resnet_on_its_own_data_passes_and_matches_float64(request, reference, form):
    result = request.getfixturevalue(f"{form}_result")
    assert [f.code for f in result.findings] == []
    assert result.first_diverging is None and len(result.measured) == 9
    # The saved statistics are the exact batch-statistics population moments; in inference
    # mode the inputs differ slightly, so scores are small but not 0 (max 1.7e-3 nats).
    assert max(lc.mismatch.score for lc in result.measured) < 0.01
    names = _by_running_mean(result, reference)
    assert names[result.layers[0].name] == "stem.1"
    for lc in result.layers:
        _, ref_mean, ref_var, count = reference[names[lc.name]]
        _assert_moments_close(lc.data_mean, lc.data_var, ref_mean, ref_var)
        assert lc.moments.count == count
    d = result.divergence
    assert d.samples == 256 and d.top1_agreement == 1.0
    assert 0.05 < d.rel_l2 < 0.3  # batch-of-32 noise only (0.147 measured)


def test_pt2_and_onnx_give_the_same_figures(onnx_result, pt2_result, reference):
    on = _by_running_mean(onnx_result, reference)
    pt = _by_running_mean(pt2_result, reference)
    assert [on[lc.name] for lc in onnx_result.layers] == [
        pt[lc.name] for lc in pt2_result.layers
    ]  # same graph order in both forms
    for a, b in zip(onnx_result.layers, pt2_result.layers, strict=True):
        _assert_moments_close(a.data_mean, a.data_var, b.data_mean, b.data_var)
        assert a.mismatch.score == pytest.approx(b.mismatch.score, rel=1e-3, abs=1e-9)
    assert onnx_result.divergence.rel_l2 == pytest.approx(pt2_result.divergence.rel_l2, rel=1e-4)


def test_shifted_input_makes_the_stem_first(tmp_path, calib, reference):
    shifted = tmp_path / "shifted.npy"
    np.save(shifted, (calib * 1.5 + 0.5).astype(np.float32))
    result = check(SAMPLES / "resnet.onnx", data=shifted)
    names = _by_running_mean(result, reference)
    assert names[result.first_diverging] == "stem.1"
    first = [f for f in result.findings if f.code == "BN401"]
    assert [(f.layer, f.severity) for f in first] == [(result.first_diverging, Severity.ERROR)]
    # Every layer's figures against a float64 eval pass over the shifted data.
    shifted_ref = _torch_reference(calib.astype(np.float64) * 1.5 + 0.5)
    for lc in result.layers:
        _, ref_mean, ref_var, _ = shifted_ref[names[lc.name]]
        _assert_moments_close(lc.data_mean, lc.data_var, ref_mean, ref_var)


def _perturbed_onnx(tmp_path: Path, index: int, sigmas: float) -> tuple[Path, str]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(SAMPLES / "resnet.onnx"))
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    inits = {t.name: t for t in model.graph.initializer}
    mean_t, var_t = inits[bns[index].input[3]], inits[bns[index].input[4]]
    mean, var = numpy_helper.to_array(mean_t), numpy_helper.to_array(var_t)
    mean_t.CopyFrom(numpy_helper.from_array(mean + sigmas * np.sqrt(var), mean_t.name))
    path = tmp_path / "perturbed.onnx"
    onnx.save(model, str(path))
    return path, bns[index].name


def test_perturbed_mid_layer_is_named_first(tmp_path):
    path, name = _perturbed_onnx(tmp_path, 4, 3.0)
    result = check(path, data=SAMPLES / "resnet_calib.npy")
    assert result.first_diverging == name == result.layers[4].name
    assert result.layers[4].mismatch.score > 4.0  # KL ≈ ½·3² = 4.5 in every channel
    assert np.median(result.layers[4].metrics["mean_shift"]) == pytest.approx(-3.0, rel=0.01)
    assert all(not lc.mismatch.over for lc in result.layers[:4])
    assert [f.layer for f in result.findings if f.code == "BN401"] == [name]
