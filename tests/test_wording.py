"""Counts agree in number wherever bncheck prints them ("1 batch", "2 batches")."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bncheck.report import check as check_rep
from bncheck.report import recalibrate as recal_rep
from bncheck.wording import plural


@pytest.mark.parametrize(
    "n, word, text",
    [
        (1, "batch", "1 batch"),
        (2, "batch", "2 batches"),
        (0, "thread", "0 threads"),
        (1, "BN layer", "1 BN layer"),
        (3, "BN layer", "3 BN layers"),
        (2, "process", "2 processes"),
        (2, "index", "2 indexes"),
    ],
)
def test_plural(n, word, text):
    assert plural(n, word) == text


def test_plural_override():
    assert plural(2, "index", "indices") == "2 indices"
    assert plural(1, "index", "indices") == "1 index"


def test_one_later_layer_diverges():
    layer = SimpleNamespace(name="n1")
    result = SimpleNamespace(
        first_diverging="n0",
        over=[SimpleNamespace(name="n0"), layer],
        info=SimpleNamespace(bn_layers=[SimpleNamespace(name="n0", origin="stem.1")]),
    )
    line = check_rep.first_line(result)
    assert line.startswith("first diverging layer: stem.1 — ")
    assert line.endswith("; 1 later layer diverges too, largely inherited from it")


def test_recalibrate_summary_with_one_batch():
    r = SimpleNamespace(
        info=SimpleNamespace(path="m.onnx"),
        layers=[object()],
        mode="exact",
        samples=8,
        batches=1,
        batch_size=8,
        accuracy_before=None,
        output_change=None,
        batch_sizes=[(8, 1)],
        refused=False,
        output=None,
    )
    assert recal_rep.summary_line(r) == (
        "m.onnx: recalibrated 1 BN layer (exact) on 8 samples in 1 batch of 8"
    )
