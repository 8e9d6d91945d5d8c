"""Batch-norm folding: a BN as a per-channel affine, absorbed by the layer before or after it.

Inference-mode BN is ``BN(x) = γ·(x − μ)/√(σ² + ε) + β = s·x + t`` with ``s = γ/√(σ² + ε)``,
``t = β − μ·s``. Folding into the producer P (``y = BN(P(x))``) scales P's output channels by
``s`` and maps its bias to ``s·b + t``. Folding into the consumer C (``y = C(BN(x))``) scales C's
input channels by ``s`` and adds ``Σ W·t`` to its bias; that is exact only when C sees every input
position through every kernel tap (no zero padding), which the caller must check.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from bncheck.numerics._util import _f64, _vec

FoldOp = Literal["conv", "conv_transpose", "linear", "gemm_t", "matmul"]
_FOLD_OPS = ("conv", "conv_transpose", "linear", "gemm_t", "matmul")


def bn_scale_shift(
    mean: np.ndarray,
    var: np.ndarray,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel scale and shift of an inference-mode BN: ``BN(x) = s·x + t``.

    ``s = γ/√(σ² + ε)``, ``t = β − μ·s``, with γ = 1 and β = 0 when None. Computed in float64.
    Channels with ``σ² + ε ≤ 0`` or non-finite statistics yield inf/nan rather than an error, so
    the caller can name the broken channels.
    """
    mu = _f64(mean)
    if mu.ndim != 1:
        raise ValueError(f"BN mean must be 1-D, got shape {mu.shape}")
    c = mu.shape[0]
    v = _vec("BN var", var, c)
    g = np.ones(c) if gamma is None else _vec("BN weight (gamma)", gamma, c)
    b = np.zeros(c) if beta is None else _vec("BN bias (beta)", beta, c)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = g / np.sqrt(v + float(eps))
    t = b - mu * s
    return s, t


def bn_as_affine(
    mean: np.ndarray,
    var: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float,
) -> tuple[np.ndarray, np.ndarray]:
    """A BN with no foldable neighbour, as the affine ``y = s·x + t`` (a Mul and an Add).

    Same formula as :func:`bn_scale_shift`: ``s = γ/√(σ² + ε)``, ``t = β − μ·s``.
    """
    return bn_scale_shift(mean, var, gamma, beta, eps)


def _bcast(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _check_op(op: str, w: np.ndarray, groups: int) -> None:
    if op not in _FOLD_OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(_FOLD_OPS)}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if op in ("conv", "conv_transpose"):
        if w.ndim < 3:
            raise ValueError(f"{op} weight must have >= 3 dims, got shape {w.shape}")
    else:
        if groups != 1:
            raise ValueError(f"{op} has no groups, got groups={groups}")
        if w.ndim != 2:
            raise ValueError(f"{op} weight must be 2-D, got shape {w.shape}")


def _divisible(what: str, n: int, groups: int) -> None:
    if n % groups:
        raise ValueError(f"{what} ({n}) is not divisible by groups ({groups})")


def fold_into_producer(
    weight: np.ndarray,
    bias: np.ndarray | None,
    scale: np.ndarray,
    shift: np.ndarray,
    *,
    op: FoldOp,
    groups: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``y = s·P(x) + t`` (a BN after producer P) into P's weights: ``y = P'(x)``.

    Output channel ``o`` of P is scaled: ``W'[o-slice] = s[o]·W[o-slice]``, ``b' = s·b + t``
    (``b = 0`` when None). Where output channel ``o`` lives in the weight, per ``op``:

    - ``"conv"``: weight ``[Cout, Cin/g, *k]``, axis 0.
    - ``"conv_transpose"``: weight ``[Cin, Cout/g, *k]``; rows ``g·(Cin/g) … (g+1)·(Cin/g) − 1``
      form group g, and output channel ``o = g·(Cout/g) + j`` is column ``j`` (axis 1) of
      group g's rows, so ``W'[g·(Cin/g) + i, j] = s[g·(Cout/g) + j]·W[g·(Cin/g) + i, j]``.
    - ``"linear"`` (torch Linear, ONNX Gemm transB=1): weight ``[out, in]``, axis 0.
    - ``"gemm_t"`` (Gemm transB=0) and ``"matmul"``: weight ``[in, out]``, axis 1.

    Exact in float64 for any stride, padding, dilation and groups. Returns float64 arrays.
    """
    w = _f64(weight)
    _check_op(op, w, groups)
    if op == "conv":
        cout = w.shape[0]
        _divisible("conv output channels", cout, groups)
    elif op == "conv_transpose":
        _divisible("conv_transpose input channels", w.shape[0], groups)
        cout = w.shape[1] * groups
    elif op == "linear":
        cout = w.shape[0]
    else:
        cout = w.shape[1]
    s = _vec("BN scale", scale, cout)
    t = _vec("BN shift", shift, cout)
    b = np.zeros(cout) if bias is None else _vec(f"{op} bias", bias, cout)

    if op in ("conv", "linear"):
        w2 = w * _bcast(s, w.ndim, 0)
    elif op in ("gemm_t", "matmul"):
        w2 = w * s[None, :]
    else:
        cin = w.shape[0]
        per_out = w.shape[1]
        grouped = w.reshape(groups, cin // groups, per_out, *w.shape[2:])
        s_g = s.reshape(groups, 1, per_out, *([1] * (w.ndim - 2)))
        w2 = (grouped * s_g).reshape(w.shape)
    return w2, s * b + t


def fold_into_consumer(
    weight: np.ndarray,
    bias: np.ndarray | None,
    scale: np.ndarray,
    shift: np.ndarray,
    *,
    op: FoldOp,
    groups: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``y = C(s·x + t)`` (a BN before consumer C) into C's weights: ``y = C'(x)``.

    C's *input* channel ``i`` is scaled by ``s[i]``; the shift becomes a bias term
    ``b'[o] = b[o] + Σ_{i, taps} W[o, i, taps]·t[i]`` (``b = 0`` when None). Per ``op``:

    - ``"conv"``: weight ``[Cout, Cin/g, *k]``; output channels ``g·(Cout/g) …`` read input
      channels ``i = g·(Cin/g) + k`` through column ``k`` (axis 1), so
      ``W'[o, k] = s[g·(Cin/g) + k]·W[o, k]`` and
      ``b'[o] = b[o] + Σ_{k, taps} W[o, k, taps]·t[g·(Cin/g) + k]``.
      **Exact only when the conv does not zero-pad, or t = 0**: a zero-padded border output
      sees fewer real inputs, so it receives only part of ``Σ W·t`` (padding with the BN's own
      output is not the same as padding its input with zeros). Padding modes that copy input
      values (reflect, replicate, circular) commute with a per-channel affine and stay exact.
      The caller decides; this function does not know the padding.
    - ``"conv_transpose"``: weight ``[Cin, Cout/g, *k]``, input channel on axis 0. Only
      ``t = 0`` is supported (ValueError otherwise): a transposed conv scatters each input over
      the kernel, so border outputs receive fewer taps than interior ones and no single bias
      can stand in for ``t``.
    - ``"linear"``: weight ``[out, in]``, ``W' = W·diag(s)``, ``b' = b + W·t``.
    - ``"gemm_t"`` / ``"matmul"``: weight ``[in, out]``, ``W' = diag(s)·W``, ``b' = b + tᵀ·W``.

    Returns float64 arrays.
    """
    w = _f64(weight)
    _check_op(op, w, groups)
    if op == "conv":
        cout = w.shape[0]
        _divisible("conv output channels", cout, groups)
        cin = w.shape[1] * groups
    elif op == "conv_transpose":
        cin = w.shape[0]
        _divisible("conv_transpose input channels", cin, groups)
        cout = w.shape[1] * groups
    elif op == "linear":
        cout, cin = w.shape
    else:
        cin, cout = w.shape
    s = _vec("BN scale", scale, cin)
    t = _vec("BN shift", shift, cin)
    b = np.zeros(cout) if bias is None else _vec(f"{op} bias", bias, cout)

    if op == "conv":
        per_in = w.shape[1]
        kdims = w.shape[2:]
        grouped = w.reshape(groups, cout // groups, per_in, *kdims)
        s_g = s.reshape(groups, 1, per_in, *([1] * len(kdims)))
        t_g = t.reshape(groups, 1, per_in, *([1] * len(kdims)))
        w2 = (grouped * s_g).reshape(w.shape)
        extra = (grouped * t_g).reshape(cout, -1).sum(axis=1)
        return w2, b + extra
    if op == "conv_transpose":
        if np.any(t != 0):
            raise ValueError(
                "cannot fold a BN with a non-zero shift into a following ConvTranspose: border "
                "outputs receive fewer kernel taps than interior ones, so no bias equals the shift"
            )
        return w * _bcast(s, w.ndim, 0), b.copy()
    if op == "linear":
        return w * s[None, :], b + w @ t
    return w * s[:, None], b + t @ w
