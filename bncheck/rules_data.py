"""Data-mismatch rules (``BN4xx``): findings from ``check``'s figures, never from the model alone.

Each rule is one small function whose docstring is what ``bncheck explain CODE`` prints (first
line the summary). Layer rules see one :class:`~bncheck.mismatch.LayerMismatch` and the run's
:class:`DataEvidence`; model rules see the evidence only. Severities:

- ``BN401`` (error): the **first** layer in graph order whose input statistics diverge from its
  running statistics. Later layers see its shifted output, so it is where a fix starts.
- ``BN404`` (warning): a later layer that diverges too. Usually inherited from the first one, so
  it is not an error of its own; it can be an independent second cause, which rerunning
  ``check`` after fixing the first will show.
- ``BN402`` (warning): the model's outputs in inference mode are far from the outputs it gives
  when every BN uses the current batch's statistics. Batch statistics carry sampling noise
  (about ``1/√(batch·H·W)`` per channel), so small batches raise this figure on healthy data:
  the threshold is generous and the severity a warning. Top-1 agreement is judged only when
  the outputs are class scores (``task = "classify"``); an embedding or a feature map has no
  classes, and the argmax of one says nothing.
- ``BN403`` (info): the data was synthetic, so none of the figures says much about real data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bncheck.errors import InputError
from bncheck.layers import Finding, Severity
from bncheck.mismatch import LayerMismatch, Thresholds
from bncheck.rules import Rule, is_selected
from bncheck.wording import plural

# Defaults for the output-level rule. On the sample ResNet with its own calibration data the
# inference-mode vs batch-statistics relative L2 is 0.15 at batch 32 and 0.38 at batch 8 (pure
# batch noise, top-1 agreement ≥ 97%): 0.5 stays clear of that noise.
OUTPUT_REL_L2 = 0.5
TOP1_AGREEMENT = 0.9

# Defaults for the recalibration guard (BN405/BN406). Accuracy is judged in percentage points:
# one point is the smallest fall worth stopping a write for. Without labels, the outputs' own
# change is all there is: on the sample ResNet, recalibrating on half of its calibration data
# moves them by a relative L2 of 0.07; a shift that recalibration repairs, 0.13–0.75; data of
# one class (accuracy 100% → 28%), 0.97. 0.25 flags the large changes a person should confirm.
ACCURACY_DROP = 1.0
OUTPUT_CHANGE = 0.25

# Keys accepted in the ``[tool.bncheck.thresholds]`` table (underscores work as well).
CHECK_THRESHOLD_KEYS = ("kl", "max-share", "output-rel-l2", "top1-agreement")
RECALIBRATE_THRESHOLD_KEYS = ("accuracy-drop", "output-change")
THRESHOLD_KEYS = CHECK_THRESHOLD_KEYS + RECALIBRATE_THRESHOLD_KEYS


def _threshold_numbers(values: Mapping[str, Any] | None, source: str) -> dict[str, float]:
    """``{key: number}`` from a ``[tool.bncheck.thresholds]``-style table, keys normalized to
    dashes; InputError naming ``source`` and the key for an unknown key or a non-number."""
    got: dict[str, float] = {}
    for raw, value in (values or {}).items():
        key = str(raw).replace("_", "-")
        if key not in THRESHOLD_KEYS:
            raise InputError(
                f"{source}: unknown threshold {raw!r} (known: {', '.join(THRESHOLD_KEYS)})"
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(f"{source}: threshold {raw!r} must be a number, not {value!r}")
        got[key] = float(value)
    return got


@dataclass(frozen=True)
class CheckThresholds:
    """Every threshold ``check`` applies.

    ``layer``: when a channel and a layer count as diverging (:class:`~bncheck.mismatch.Thresholds`:
    ``kl`` nats per channel, ``max_share`` of channels). ``output_rel_l2``: BN402 fires when the
    outputs' relative L2 distance ``‖y_inference − y_batchstats‖₂/‖y_inference‖₂`` exceeds it.
    ``top1_agreement``: BN402 also fires when a classifier's top-1 agreement between the two
    modes falls below it (judged only with ``task = "classify"``: outputs that are class scores).
    """

    layer: Thresholds = field(default_factory=Thresholds)
    output_rel_l2: float = OUTPUT_REL_L2
    top1_agreement: float = TOP1_AGREEMENT

    def __post_init__(self) -> None:
        if not (self.output_rel_l2 > 0 and math.isfinite(self.output_rel_l2)):
            raise ValueError(f"output-rel-l2 must be a positive number, got {self.output_rel_l2}")
        if not 0 <= self.top1_agreement <= 1:
            raise ValueError(f"top1-agreement must be in [0, 1], got {self.top1_agreement}")

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any] | None, *, source: str = "thresholds"
    ) -> CheckThresholds:
        """Build from a ``{key: number}`` table (``THRESHOLD_KEYS``); missing keys keep defaults.

        Raises InputError naming ``source`` and the key for an unknown key, a non-number or an
        out-of-range value.
        """
        got = _threshold_numbers(values, source)
        default = cls()
        try:
            return cls(
                layer=Thresholds(
                    kl=got.get("kl", default.layer.kl),
                    max_share=got.get("max-share", default.layer.max_share),
                ),
                output_rel_l2=got.get("output-rel-l2", default.output_rel_l2),
                top1_agreement=got.get("top1-agreement", default.top1_agreement),
            )
        except ValueError as exc:
            raise InputError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, float]:
        return {
            "kl": self.layer.kl,
            "max_share": self.layer.max_share,
            "output_rel_l2": self.output_rel_l2,
            "top1_agreement": self.top1_agreement,
        }


@dataclass(frozen=True)
class DataEvidence:
    """What the data rules judge: measured layers in graph order and the output figures.

    ``first`` is the first layer that is ``over`` (:func:`bncheck.mismatch.first_diverging`);
    ``output_rel_l2`` / ``top1_agreement`` are None when not measured (no batch of ≥ 2 samples;
    for top-1, outputs that are not class scores). ``names`` maps a layer's name to the module
    path the exporter recorded, the name messages use where there is one.
    """

    layers: tuple[LayerMismatch, ...]
    thresholds: CheckThresholds
    first: str | None
    output_rel_l2: float | None
    top1_agreement: float | None
    synthetic: bool
    samples: int
    names: Mapping[str, str | None] = field(default_factory=dict)

    def label(self, name: str) -> str:
        """The name a person knows the layer by: its module path, else its name."""
        return self.names.get(name) or name


@dataclass(frozen=True)
class DataRule(Rule):
    """A BN4xx rule: a :class:`bncheck.rules.Rule` whose check reads the data's evidence, per
    layer or once per model."""

    check: Callable[[LayerMismatch | None, DataEvidence], str | None]  # type: ignore[assignment]
    per_layer: bool


DATA_RULES: dict[str, DataRule] = {}


def _rule(code: str, name: str, severity: Severity, hint: str, *, per_layer: bool):
    def register(fn: Callable) -> Callable:
        DATA_RULES[code] = DataRule(code, name, severity, hint, fn, per_layer)
        return fn

    return register


def _layer_figures(layer: LayerMismatch, th: Thresholds) -> str:
    over = round(layer.share_over * layer.channels)
    return (
        f"{over} of {plural(layer.channels, 'channel')} over KL {th.kl:g} "
        f"(score {layer.score:.3g} nats; "
        f"median |mean shift| {layer.median_abs_mean_shift:.3g} running std, max "
        f"{layer.max_abs_mean_shift:.3g}; median |log var ratio| "
        f"{layer.median_abs_log_var_ratio:.3g}; worst channel {layer.worst_channel})"
    )


@_rule(
    "BN401",
    "first-diverging-layer",
    Severity.ERROR,
    "recalibrate on data like this (`bncheck recalibrate MODEL --data D -o OUT`), or check the "
    "data's preprocessing (scale, mean/std, channel order) against training",
    per_layer=True,
)
def first_diverging_layer(layer: LayerMismatch | None, ev: DataEvidence) -> str | None:
    """First BN layer whose input statistics on the data diverge from its running statistics.

    Per channel, the data's mean and variance at the layer's input (model in inference mode)
    are compared with the stored running statistics by the Gaussian KL divergence; the layer
    diverges when more than ``max-share`` of its channels exceed ``kl`` nats (both set in
    ``[tool.bncheck.thresholds]``). Only the first such layer in graph order is reported as an
    error: every later layer sees its shifted output, so their mismatch is largely inherited.
    At the stem this usually means the data is preprocessed differently from training; deeper
    in, that the running statistics were estimated on other data, or were damaged.
    """
    if layer is None or not layer.over or layer.name != ev.first:
        return None
    return (
        f"first diverging layer: {_layer_figures(layer, ev.thresholds.layer)}; later layers "
        "inherit its shift"
    )


@_rule(
    "BN402",
    "output-divergence",
    Severity.WARNING,
    "recalibrate on representative data; if it persists, the model is sensitive to BN "
    "statistics here (check the first diverging layer)",
    per_layer=False,
)
def output_divergence(layer: LayerMismatch | None, ev: DataEvidence) -> str | None:
    """Inference-mode outputs are far from the outputs with the data's own BN statistics.

    Every batch runs twice: in inference mode (BN uses running statistics) and with every BN
    normalizing by the batch's own statistics. The figure is the relative L2 distance
    ``‖y_inference − y_batch‖₂ / ‖y_inference‖₂`` over all outputs and samples; for a
    classifier (``task = "classify"`` in ``[tool.bncheck]``, or ``--task classify``) also the
    share of samples whose top-1 class agrees. Top-1 is not judged otherwise: an embedding or a
    feature map has no classes. Batch statistics carry sampling noise, so small batches raise
    the distance even on data the model was calibrated on; the thresholds (``output-rel-l2``,
    ``top1-agreement``) are set well above that noise.
    """
    th = ev.thresholds
    parts = []
    rel = ev.output_rel_l2
    if rel is not None and math.isnan(rel):
        parts.append("relative L2 is NaN: the outputs hold NaN")
    elif rel is not None and rel > th.output_rel_l2:
        parts.append(f"relative L2 {rel:.3g} > {th.output_rel_l2:g}")
    if ev.top1_agreement is not None and ev.top1_agreement < th.top1_agreement:
        parts.append(f"top-1 agreement {ev.top1_agreement:.1%} < {th.top1_agreement:.0%}")
    if not parts:
        return None
    return (
        "outputs with running statistics differ from those with the data's batch statistics: "
        + "; ".join(parts)
        + f" over {plural(ev.samples, 'sample')}"
    )


@_rule(
    "BN403",
    "synthetic-data",
    Severity.INFO,
    "pass real data with --data (a few hundred samples of what the model sees in production)",
    per_layer=False,
)
def synthetic_data(layer: LayerMismatch | None, ev: DataEvidence) -> str | None:
    """The check ran on synthetic N(0, 1) input: its figures say little about real data.

    Random noise is nothing like images, audio or features after real preprocessing, so large
    mismatches are expected and small ones prove nothing. Useful only to exercise the pipeline.
    """
    if not ev.synthetic:
        return None
    return "synthetic N(0, 1) input: mismatch figures do not describe real data"


@_rule(
    "BN404",
    "downstream-divergence",
    Severity.WARNING,
    "fix the first diverging layer (BN401) and run check again; what remains is independent",
    per_layer=True,
)
def downstream_divergence(layer: LayerMismatch | None, ev: DataEvidence) -> str | None:
    """A BN layer after the first diverging one whose input statistics diverge too.

    Its input comes (directly or not) from the first diverging layer's shifted output, so its
    mismatch is most likely inherited and disappears once that layer is fixed. A warning, not
    an error, so one cause is not counted many times.
    """
    if layer is None or not layer.over or ev.first is None or layer.name == ev.first:
        return None
    return (
        f"diverges downstream of {ev.label(ev.first)} (likely inherited): "
        f"{_layer_figures(layer, ev.thresholds.layer)}"
    )


def run_data_rules(
    evidence: DataEvidence,
    *,
    select: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None,
) -> list[Finding]:
    """Apply every selected BN4xx rule: model rules first (by code), then layers in graph order."""
    findings: list[Finding] = []
    for code, rule in sorted(DATA_RULES.items()):
        if rule.per_layer or not is_selected(code, select, ignore):
            continue
        msg = rule.check(None, evidence)
        if msg:
            findings.append(Finding(code, rule.severity, None, msg, rule.hint))
    for layer in evidence.layers:
        for code, rule in sorted(DATA_RULES.items()):
            if not rule.per_layer or not is_selected(code, select, ignore):
                continue
            msg = rule.check(layer, evidence)
            if msg:
                findings.append(Finding(code, rule.severity, layer.name, msg, rule.hint))
    return findings


# --- BN405/BN406: the recalibration guard ---------------------------------------------------


@dataclass(frozen=True)
class RecalibrateThresholds:
    """When ``recalibrate`` judges its own result worse.

    ``accuracy_drop``: BN405 fires when labelled top-1 accuracy on the data falls by more than
    this many percentage points. ``output_change``: without labels, BN406 fires when the
    outputs' relative L2 change ``‖y_new − y_old‖₂ / ‖y_old‖₂`` on the data exceeds it.
    """

    accuracy_drop: float = ACCURACY_DROP
    output_change: float = OUTPUT_CHANGE

    def __post_init__(self) -> None:
        if not (0 <= self.accuracy_drop <= 100):
            raise ValueError(f"accuracy-drop must be in [0, 100] points, got {self.accuracy_drop}")
        if not (self.output_change > 0 and math.isfinite(self.output_change)):
            raise ValueError(f"output-change must be a positive number, got {self.output_change}")

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any] | None, *, source: str = "thresholds"
    ) -> RecalibrateThresholds:
        """Build from a ``[tool.bncheck.thresholds]`` table; ``check``'s keys are accepted and
        ignored, missing keys keep defaults; InputError naming ``source`` for a bad entry."""
        got = _threshold_numbers(values, source)
        try:
            return cls(
                accuracy_drop=got.get("accuracy-drop", ACCURACY_DROP),
                output_change=got.get("output-change", OUTPUT_CHANGE),
            )
        except ValueError as exc:
            raise InputError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, float]:
        return {"accuracy_drop": self.accuracy_drop, "output_change": self.output_change}


@dataclass(frozen=True)
class RecalibrationEvidence:
    """The old model against the recalibrated one on the same data, both in inference mode.

    ``accuracy_*`` are top-1 fractions (None without labels); ``output_change`` the relative L2
    ``√Σ‖y_new − y_old‖² / √Σ‖y_old‖²`` over every output and sample (None when not measured).
    """

    accuracy_before: float | None
    accuracy_after: float | None
    output_change: float | None
    samples: int
    thresholds: RecalibrateThresholds


RECALIBRATE_RULES: dict[str, Rule] = {}


def _recalibrate_rule(code: str, name: str, severity: Severity, hint: str):
    def register(fn: Callable[[RecalibrationEvidence], str | None]) -> Callable:
        RECALIBRATE_RULES[code] = Rule(code, name, severity, hint, fn)  # type: ignore[arg-type]
        return fn

    return register


@_recalibrate_rule(
    "BN405",
    "recalibration-lowers-accuracy",
    Severity.ERROR,
    "recalibrate on data that represents what the model sees in use (every class, the real "
    "preprocessing, ideally hundreds of samples); --force writes the model anyway",
)
def recalibration_lowers_accuracy(ev: RecalibrationEvidence) -> str | None:
    """Recalibration lowered the labelled accuracy on the data: nothing is written.

    With ``--labels``, ``recalibrate`` measures top-1 accuracy on the data with the old and the
    new statistics (BN in inference mode). When it falls by more than ``accuracy-drop``
    percentage points (``[tool.bncheck.thresholds]``, default 1), the new statistics are worse
    than the old ones on this very data, which happens when the data does not represent what
    the model sees in use: a few samples, one class, other preprocessing. The model is not
    written and the command exits 1; ``--force`` writes it and keeps the finding. ``optimize``
    applies the same guard to its recalibration step.
    """
    before, after = ev.accuracy_before, ev.accuracy_after
    if before is None or after is None:
        return None
    drop = (before - after) * 100
    # A fall of exactly the threshold (0.90 → 0.89 at 1 point) must not pass it by rounding.
    if not drop > ev.thresholds.accuracy_drop + 1e-9:
        return None
    return (
        f"accuracy on the data fell from {before:.1%} to {after:.1%} ({drop:.1f} points > "
        f"{ev.thresholds.accuracy_drop:g}) over {ev.samples} samples"
    )


@_recalibrate_rule(
    "BN406",
    "recalibration-changes-outputs",
    Severity.WARNING,
    "measure accuracy before and after with --labels (a labelled sample of the same data); "
    "if the data represents use, a large change is the correction you wanted",
)
def recalibration_changes_outputs(ev: RecalibrationEvidence) -> str | None:
    """Without labels, recalibration changed the model's outputs on the data a lot.

    ``recalibrate`` runs the old and the new model in inference mode on the same data and
    measures ``‖y_new − y_old‖₂ / ‖y_old‖₂`` over every output and sample. Without labels it
    cannot tell a repair (statistics estimated on other data, or damaged, now fit this data)
    from harm (data that does not represent use: a few samples, one class): both move the
    outputs. Above ``output-change`` (``[tool.bncheck.thresholds]``, default 0.25) it says so,
    as a warning; the model is written. Judged only when accuracy was not measured.
    """
    if ev.accuracy_before is not None or ev.output_change is None:
        return None
    change = ev.output_change
    if not (math.isnan(change) or change > ev.thresholds.output_change):
        return None
    return (
        f"outputs on the data changed by a relative L2 of {change:.3g} (> "
        f"{ev.thresholds.output_change:g}) over {ev.samples} samples: a repair if the data "
        "represents use, harm if it does not; without labels bncheck cannot tell which"
    )


def run_recalibrate_rules(evidence: RecalibrationEvidence) -> list[Finding]:
    """Apply BN405 and BN406 to a recalibration's evidence, by code."""
    findings = []
    for code, rule in sorted(RECALIBRATE_RULES.items()):
        msg = rule.check(evidence)  # type: ignore[call-arg, arg-type]
        if msg:
            findings.append(Finding(code, rule.severity, None, msg, rule.hint))
    return findings
