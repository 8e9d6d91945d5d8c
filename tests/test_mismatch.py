"""bncheck.mismatch against hand-computed float64 values (and torch's Gaussian KL as a cross-check).

Closed-form figures are asserted to 1e-12 relative (a handful of float64 operations); identical
statistics must give exactly 0.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from bncheck.mismatch import (
    LayerMismatch,
    Thresholds,
    channel_metrics,
    first_diverging,
    output_divergence,
    summarize_layer,
)
from bncheck.numerics import Moments


def test_identical_statistics_give_zeros():
    rng = np.random.default_rng(0)
    mu, var = rng.normal(size=16), rng.uniform(0.0, 3.0, 16)
    m = channel_metrics(mu, var, mu.copy(), var.copy(), eps=1e-5)
    for key in ("mean_shift", "log_var_ratio", "kl"):
        assert m[key].dtype == np.float64
        np.testing.assert_array_equal(m[key], np.zeros(16))
    layer = summarize_layer("bn", m, Thresholds())
    assert (layer.score, layer.max_kl, layer.share_over, layer.over) == (0.0, 0.0, 0.0, False)


def test_known_mean_shift_gives_analytic_values():
    run_mean, run_var, eps = np.array([1.0, -3.0]), np.array([4.0, 0.25]), 1e-3
    std = np.sqrt(run_var + eps)
    m = channel_metrics(run_mean + 2.0 * std * np.array([1, -1]), run_var, run_mean, run_var, eps)
    np.testing.assert_allclose(m["mean_shift"], [2.0, -2.0], rtol=1e-12)
    np.testing.assert_array_equal(m["log_var_ratio"], [0.0, 0.0])
    np.testing.assert_allclose(m["kl"], [2.0, 2.0], rtol=1e-12)  # ½·δ²/vr = ½·2²


def test_kl_against_hand_computed_value():
    # KL(N(1, 2) ‖ N(0, 1)) = ½[ln(1/2) + (2 + 1)/1 − 1] = ½(2 − ln 2)
    m = channel_metrics(np.array([1.0]), np.array([2.0]), np.array([0.0]), np.array([1.0]), 0.0)
    assert m["kl"][0] == pytest.approx(0.6534264097200273, rel=1e-15)
    assert m["log_var_ratio"][0] == pytest.approx(math.log(2.0), rel=1e-15)
    # with ε: vd = 0.5 + 0.5 = 1, vr = 3.5 + 0.5 = 4, δ = 2 → ½[ln 4 + (1 + 4)/4 − 1]
    m = channel_metrics(np.array([2.0]), np.array([0.5]), np.array([0.0]), np.array([3.5]), 0.5)
    assert m["kl"][0] == pytest.approx(0.5 * (math.log(4.0) + 0.25), rel=1e-15)
    assert m["mean_shift"][0] == pytest.approx(1.0, rel=1e-15)


def test_kl_matches_torch_gaussian_kl_in_float64():
    rng = np.random.default_rng(1)
    md, mr = rng.normal(0, 2, 50), rng.normal(0, 2, 50)
    vd, vr, eps = rng.uniform(0.01, 5, 50), rng.uniform(0.01, 5, 50), 1e-5
    m = channel_metrics(md, vd, mr, vr, eps)
    p = torch.distributions.Normal(torch.from_numpy(md), torch.from_numpy(np.sqrt(vd + eps)))
    q = torch.distributions.Normal(torch.from_numpy(mr), torch.from_numpy(np.sqrt(vr + eps)))
    np.testing.assert_allclose(m["kl"], torch.distributions.kl_divergence(p, q).numpy(), rtol=1e-12)


def test_nearly_equal_and_extreme_variances_stay_accurate():
    # u = 1e-6: KL = ½(u − ln(1 + u)) = u²/4 − u³/6 + …; naive ln-ratio arithmetic cancels here.
    u = 1e-6
    m = channel_metrics(np.zeros(1), np.array([1.0 + u]), np.zeros(1), np.ones(1), 0.0)
    assert m["kl"][0] == pytest.approx(u * u / 4 - u**3 / 6, rel=1e-6)
    # vd/vr = 1e-20: ln ratio −46.05…, not ln(0)
    m = channel_metrics(np.zeros(1), np.array([1e-20]), np.zeros(1), np.ones(1), 0.0)
    assert m["log_var_ratio"][0] == pytest.approx(math.log(1e-20), rel=1e-12)
    assert m["kl"][0] == pytest.approx(0.5 * (1e-20 - 1 - math.log(1e-20)), rel=1e-12)


def test_non_finite_running_stats_give_inf_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = channel_metrics(
            np.zeros(4),
            np.ones(4),
            np.array([np.nan, 0.0, np.inf, 0.0]),
            np.array([1.0, np.inf, 1.0, -1.0]),  # channel 3: var + eps < 0
            eps=1e-5,
        )
    for key in ("mean_shift", "log_var_ratio", "kl"):
        np.testing.assert_array_equal(m[key], np.full(4, np.inf))
    layer = summarize_layer("bn", m)
    assert layer.over and layer.share_over == 1.0 and layer.score == np.inf


def test_summarize_layer_score_and_share():
    # 20 channels, threshold 0.1, max_share 0.1 → up to 2 channels may exceed; score = 3rd largest
    kl = np.full(20, 0.01)
    kl[[4, 9]] = [5.0, 0.7]
    metrics = {"mean_shift": -np.sqrt(2 * kl), "log_var_ratio": np.zeros(20), "kl": kl}
    layer = summarize_layer("layer1.bn", metrics, Thresholds(kl=0.1, max_share=0.1))
    assert layer.channels == 20 and layer.worst_channel == 4
    assert layer.share_over == 0.1 and layer.score == 0.01 and layer.over is False
    assert layer.max_kl == 5.0 and layer.median_kl == 0.01
    assert layer.max_abs_mean_shift == pytest.approx(math.sqrt(10.0), rel=1e-15)
    kl[0] = 0.2  # a third channel over: now more than 10%
    layer = summarize_layer("layer1.bn", metrics, Thresholds(kl=0.1, max_share=0.1))
    assert layer.share_over == 0.15 and layer.score == 0.2 and layer.over is True
    with pytest.raises(ValueError):
        Thresholds(max_share=1.0)
    with pytest.raises(ValueError, match="non-empty"):
        summarize_layer(
            "x", {"mean_shift": np.zeros(0), "log_var_ratio": np.zeros(0), "kl": kl[:0]}
        )


def _layer(name: str, over: bool) -> LayerMismatch:
    kl = 1.0 if over else 0.0
    return LayerMismatch(name, 4, 0, 0, 0, 0, kl, kl, 0, float(over), kl, over)


def test_first_diverging_picks_first_over_in_graph_order():
    layers = [_layer("bn1", False), _layer("bn2", True), _layer("bn3", True)]
    assert first_diverging(layers) == "bn2"
    assert first_diverging([_layer("bn1", False)]) is None
    assert first_diverging([]) is None


def test_end_to_end_from_moments_flags_the_shifted_layer():
    rng = np.random.default_rng(5)
    results = []
    for name, shift in (("bn1", 0.0), ("bn2", 1.0), ("bn3", 1.0)):
        x = rng.normal(0.0, 1.0, size=(64, 8, 6, 6))
        x[:, :4] += shift  # half the channels move by one running std
        mom = Moments.from_batch(x[:32]) + Moments.from_batch(x[32:])
        metrics = channel_metrics(mom.mean, mom.var(), np.zeros(8), np.ones(8), 1e-5)
        results.append(summarize_layer(name, metrics))
    assert [r.over for r in results] == [False, True, True]
    assert first_diverging(results) == "bn2"
    assert results[1].share_over == 0.5


def test_output_divergence():
    ref = [np.array([[3.0, 0.0], [0.0, 4.0]]), np.array([1.0, 2.0])]
    cand = [np.array([[3.0, 0.0], [5.0, 4.0]]), np.array([1.0, 2.0])]
    d = output_divergence(ref, cand)
    assert d["rel_l2"] == pytest.approx(5.0 / math.sqrt(30.0), rel=1e-15)
    assert d["outputs"] == [1.0, 0.0]
    assert d["top1_agreement"] == 0.5
    assert output_divergence([np.ones(3)], [np.ones(3)])["top1_agreement"] is None
    assert output_divergence([np.zeros(2)], [np.ones(2)])["rel_l2"] == math.inf
    with pytest.raises(ValueError, match="shape"):
        output_divergence([np.zeros(2)], [np.zeros(3)])
