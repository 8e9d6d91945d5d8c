"""Structural reparameterisation: parallel convolution branches summed into one convolution.

RepVGG, MobileOne and FastViT train a block as a sum of branches on the same input ``x``::

    y = Σᵢ Convᵢ(x) + Σⱼ (sⱼ·x + tⱼ)

where every ``Convᵢ`` shares stride, dilation and groups (its BN already folded in), and the
``sⱼ·x + tⱼ`` are identity branches (an inference-mode BN on ``x``, or ``x`` itself with
``s = 1, t = 0``). Convolution is linear in its kernel, so the sum is one convolution whose
kernel is the sum of the branch kernels, each placed at the tap where its window lines up:

- a ``k``-tap kernel with begin padding ``p`` beside a ``K``-tap kernel with begin padding ``P``
  (same dilation ``d``) reads input ``i·stride − p + d·j`` at its tap ``j``; the big kernel reads
  the same input at tap ``j + (P − p)/d``. So the small kernel sits at offset ``(P − p)/d``,
  which must be a whole number in ``[0, K − k]``, and the end padding must match too:
  ``P_end − p_end = d·(K − k − offset)`` (then both give the same output size);
- an identity branch is a kernel with a single 1 per output channel ``o``, at input channel
  ``o mod (C/g)`` of its group and at the tap ``P/d`` that reads input position ``i`` (stride 1,
  output size equal to the input size), scaled by ``s[o]``; its bias is ``t``.

The merged kernel is ``W = Σ embed(Wᵢ) + diag(s)·I``, the bias ``b = Σ bᵢ + Σ tⱼ``, exact in
float64: each output is the same sum of products, only regrouped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bncheck.numerics._util import _f64, _vec

__all__ = ["embed_kernel", "identity_kernel", "merge_branches", "tap_offset"]


def tap_offset(
    big: int, small: int, pads_big: tuple[int, int], pads_small: tuple[int, int], dilation: int
) -> int | None:
    """Tap offset of a ``small``-tap kernel inside a ``big``-tap one along one spatial axis,
    so both read the same inputs (see the module docstring), or None when no offset does.

    ``pads_*`` are ``(begin, end)`` zero paddings; ``dilation ≥ 1`` is shared.
    """
    diff = pads_big[0] - pads_small[0]
    if diff < 0 or diff % dilation:
        return None
    off = diff // dilation
    if off + small > big:
        return None
    if pads_big[1] - pads_small[1] != dilation * (big - small - off):
        return None
    return off


def embed_kernel(weight: np.ndarray, kernel: Sequence[int], offsets: Sequence[int]) -> np.ndarray:
    """``weight`` ``[Cout, Cin/g, *k]`` zero-padded to ``[Cout, Cin/g, *kernel]``, its taps
    starting at ``offsets`` (one per spatial axis). Returns float64."""
    w = _f64(weight)
    if len(kernel) != w.ndim - 2 or len(offsets) != w.ndim - 2:
        raise ValueError(f"kernel {tuple(kernel)} does not match weight shape {w.shape}")
    out = np.zeros((*w.shape[:2], *kernel))
    where = [slice(None), slice(None)]
    for off, k, big in zip(offsets, w.shape[2:], kernel, strict=True):
        if off < 0 or off + k > big:
            raise ValueError(f"a {k}-tap kernel at offset {off} does not fit in {big} taps")
        where.append(slice(off, off + k))
    out[tuple(where)] = w
    return out


def identity_kernel(
    scale: np.ndarray, groups: int, kernel: Sequence[int], centre: Sequence[int]
) -> np.ndarray:
    """The kernel ``[C, C/g, *kernel]`` of ``y = s·x`` per channel: ``W[o, o mod (C/g), *centre]
    = s[o]``, zero elsewhere, for a grouped convolution with ``groups`` groups. Float64."""
    s = _f64(scale)
    if s.ndim != 1:
        raise ValueError(f"identity scale must be 1-D, got shape {s.shape}")
    c = s.shape[0]
    if groups < 1 or c % groups:
        raise ValueError(f"channels ({c}) are not divisible by groups ({groups})")
    per_group = c // groups
    if any(not 0 <= m < k for m, k in zip(centre, kernel, strict=True)):
        raise ValueError(f"centre {tuple(centre)} lies outside kernel {tuple(kernel)}")
    w = np.zeros((c, per_group, *kernel))
    o = np.arange(c)
    w[(o, o % per_group, *(np.full(c, m) for m in centre))] = s
    return w


def merge_branches(
    convs: Sequence[tuple[np.ndarray, np.ndarray | None, Sequence[int]]],
    identities: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    kernel: Sequence[int],
    groups: int,
    centre: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One convolution equal to the sum of parallel branches on the same input.

    ``convs``: ``(weight [Cout, Cin/g, *k], bias or None, tap offsets)`` per convolution branch;
    ``identities``: ``(s, t)`` per identity branch ``s·x + t`` (needs ``Cin = Cout``, stride 1
    and ``centre``, the tap that reads the output position). Returns the float64 kernel
    ``Σ embed(Wᵢ) + Σ identity(sⱼ)`` of shape ``[Cout, Cin/g, *kernel]`` and bias
    ``Σ bᵢ + Σ tⱼ``.
    """
    if not convs and not identities:
        raise ValueError("no branches to merge")
    cout = int(convs[0][0].shape[0]) if convs else len(identities[0][0])
    cin_g = int(convs[0][0].shape[1]) if convs else cout // groups
    w = np.zeros((cout, cin_g, *kernel))
    b = np.zeros(cout)
    for weight, bias, offsets in convs:
        w += embed_kernel(weight, kernel, offsets)
        if bias is not None:
            b += _vec("branch bias", bias, cout)
    for s, t in identities:
        if centre is None:
            raise ValueError("an identity branch needs the centre tap")
        w += identity_kernel(_vec("identity scale", s, cout), groups, kernel, centre)
        b += _vec("identity shift", t, cout)
    return w, b
