"""numerics.reparam against a float64 direct convolution: the sum of the branches equals the
one merged convolution to float64 rounding (|Δ| ≤ 1e-12·max|ref|: only the order of a few
dozen products changes)."""

from __future__ import annotations

import numpy as np
import pytest

from bncheck.numerics.reparam import embed_kernel, identity_kernel, merge_branches, tap_offset

RNG = np.random.default_rng(3)


def conv2d(x, w, b, *, stride, pads, dilation, groups):
    """Direct float64 grouped 2-D convolution (NCHW), pads = (top, left, bottom, right)."""
    n, c, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    xp = np.zeros((n, c, h + pads[0] + pads[2], wd + pads[1] + pads[3]))
    xp[:, :, pads[0] : pads[0] + h, pads[1] : pads[1] + wd] = x
    ho = (xp.shape[2] - dilation * (kh - 1) - 1) // stride + 1
    wo = (xp.shape[3] - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, cout, ho, wo))
    per_out = cout // groups
    for o in range(cout):
        g = o // per_out
        xs = xp[:, g * cin_g : (g + 1) * cin_g]
        for i in range(kh):
            for j in range(kw):
                patch = xs[
                    :,
                    :,
                    i * dilation : i * dilation + stride * (ho - 1) + 1 : stride,
                    j * dilation : j * dilation + stride * (wo - 1) + 1 : stride,
                ]
                out[:, o] += np.einsum("nchw,c->nhw", patch, w[o, :, i, j])
        out[:, o] += 0 if b is None else b[o]
    return out


@pytest.mark.parametrize(
    ("groups", "stride", "dilation"), [(1, 1, 1), (2, 1, 2), (4, 1, 1), (1, 2, 1)]
)
def test_branches_sum_to_the_merged_conv(groups, stride, dilation):
    c = 4
    x = RNG.normal(size=(2, c, 9, 9))
    big = (5, 3)
    pb = [dilation * 2, dilation * 1]  # "same" padding for the big kernel
    branches = [
        ((5, 3), (pb[0], pb[1], pb[0], pb[1])),
        ((3, 3), (dilation, dilation) * 2),
        ((1, 1), (0, 0, 0, 0)),
    ]
    ref = 0
    convs = []
    for k, pads in branches:
        w = RNG.normal(size=(c, c // groups, *k))
        b = RNG.normal(size=c)
        ref = ref + conv2d(x, w, b, stride=stride, pads=pads, dilation=dilation, groups=groups)
        offs = tuple(
            tap_offset(big[a], k[a], (pb[a], pb[a]), (pads[a], pads[a + 2]), dilation)
            for a in range(2)
        )
        assert None not in offs
        convs.append((w, b, offs))
    idents = []
    centre = None
    if stride == 1:
        s, t = RNG.normal(size=c), RNG.normal(size=c)
        ref = ref + s[None, :, None, None] * x + t[None, :, None, None]
        idents.append((s, t))
        centre = (pb[0] // dilation, pb[1] // dilation)
    w_m, b_m = merge_branches(convs, idents, kernel=big, groups=groups, centre=centre)
    pads_m = (pb[0], pb[1], pb[0], pb[1])
    got = conv2d(x, w_m, b_m, stride=stride, pads=pads_m, dilation=dilation, groups=groups)
    assert got.shape == ref.shape
    assert np.max(np.abs(got - ref)) <= 1e-12 * np.max(np.abs(ref))


def test_tap_offset_conditions():
    assert tap_offset(3, 1, (1, 1), (0, 0), 1) == 1
    assert tap_offset(3, 1, (2, 2), (0, 0), 2) == 1  # dilated: offset in taps
    assert tap_offset(3, 1, (1, 1), (1, 1), 1) is None  # 1×1 padded like the 3×3: shifted
    assert tap_offset(3, 1, (1, 1), (0, 1), 1) is None  # end padding does not match
    assert tap_offset(3, 3, (1, 1), (1, 1), 1) == 0
    assert tap_offset(3, 1, (1, 1), (0, 0), 2) is None  # 1 pad at dilation 2: between taps


def test_identity_and_embed_kernels():
    w = identity_kernel(np.array([2.0, 3.0, 4.0, 5.0]), 2, (3, 3), (1, 1))
    assert w.shape == (4, 2, 3, 3) and w.sum() == 14
    assert w[0, 0, 1, 1] == 2 and w[1, 1, 1, 1] == 3 and w[2, 0, 1, 1] == 4 and w[3, 1, 1, 1] == 5
    e = embed_kernel(np.ones((2, 1, 1, 1)), (3, 3), (1, 1))
    assert e.sum() == 2 and e[0, 0, 1, 1] == 1
    with pytest.raises(ValueError, match="does not fit"):
        embed_kernel(np.ones((2, 1, 3, 3)), (3, 3), (1, 0))
