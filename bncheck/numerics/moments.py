"""Per-channel moments in float64, merged with Chan's parallel formula (recalibration, check)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from bncheck.numerics._util import _f64


@dataclass(frozen=True, eq=False)
class Moments:
    """Per-channel count, mean and sum of squared deviations (M2), all float64.

    ``var(ddof) = M2/(count − ddof)``. Built per batch by :meth:`from_batch` and combined with
    Chan's parallel formula (:meth:`merge`, ``a + b``), so any batching, order or number of
    processes gives the same result to rounding.
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    def __post_init__(self) -> None:
        mean, m2 = _f64(self.mean), _f64(self.m2)
        if mean.ndim != 1 or m2.shape != mean.shape:
            raise ValueError(f"Moments mean {mean.shape} and m2 {m2.shape} must be equal 1-D")
        if not np.isfinite(self.count) or int(self.count) != self.count or self.count < 0:
            raise ValueError(f"Moments count must be a non-negative integer, got {self.count}")
        object.__setattr__(self, "count", int(self.count))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "m2", m2)

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def empty(cls, channels: int) -> Moments:
        """No observations yet: count 0, mean 0, M2 0 (the identity of :meth:`merge`)."""
        return cls(0, np.zeros(channels), np.zeros(channels))

    @classmethod
    def from_batch(cls, x: np.ndarray, channel_axis: int = 1) -> Moments:
        """Moments of one batch, reducing every axis but ``channel_axis``, in float64.

        Shifted two-pass: with ``K_c`` the channel's first value, ``d = x − K``,
        ``mean = K + Σd/n``, ``M2 = Σ(d − Σd/n)²``, ``n`` = elements per channel. Never
        ``E[x²] − E[x]²``, which cancels catastrophically when the mean is large against the
        spread; the shift makes a constant channel give exactly its value and M2 = 0.
        """
        a = _f64(x)
        if a.ndim == 0:
            raise ValueError("Moments.from_batch needs an array with a channel axis")
        a = np.moveaxis(a, channel_axis, 0)
        c = a.shape[0]
        flat = a.reshape(c, -1)
        n = flat.shape[1]
        if n == 0:
            return cls.empty(c)
        k = flat[:, :1]
        d = flat - k
        mean_d = d.mean(axis=1, keepdims=True)
        d -= mean_d
        m2 = np.einsum("ij,ij->i", d, d)
        return cls(n, (k + mean_d)[:, 0], m2)

    def merge(self, other: Moments) -> Moments:
        """Chan et al.'s parallel combination of two disjoint sets of observations.

        ``n = na + nb``, ``δ = μb − μa``, ``μ = μa + δ·nb/n``, ``M2 = M2a + M2b + δ²·na·nb/n``.
        """
        if self.channels != other.channels:
            raise ValueError(
                f"cannot merge Moments of {self.channels} and {other.channels} channels"
            )
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * (other.count / n))
        return Moments(n, mean, m2)

    def __add__(self, other: Moments) -> Moments:
        return self.merge(other)

    @classmethod
    def merge_all(cls, items: Iterable[Moments], channels: int | None = None) -> Moments:
        """Merge any number of Moments; ``channels`` is needed only when ``items`` may be empty."""
        total = None if channels is None else cls.empty(channels)
        for m in items:
            total = m if total is None else total.merge(m)
        if total is None:
            raise ValueError("Moments.merge_all got no items and no channel count")
        return total

    def var(self, ddof: int = 0) -> np.ndarray:
        """``M2/(count − ddof)`` per channel; nan where ``count ≤ ddof``."""
        if self.count <= ddof:
            return np.full(self.channels, np.nan)
        return self.m2 / (self.count - ddof)

    def to_array(self) -> np.ndarray:
        """One flat float64 vector ``[count, mean_0 … mean_{C−1}, M2_0 … M2_{C−1}]``.

        What a distributed all-gather moves; count is exact as float64 up to 2⁵³.
        """
        return np.concatenate(([float(self.count)], self.mean, self.m2))

    @classmethod
    def from_array(cls, vec: np.ndarray) -> Moments:
        """Inverse of :meth:`to_array`."""
        v = _f64(vec)
        if v.ndim != 1 or v.size % 2 != 1:
            raise ValueError(f"Moments vector must be 1-D of odd length 1 + 2C, got {v.shape}")
        c = (v.size - 1) // 2
        return cls(v[0], v[1 : 1 + c].copy(), v[1 + c :].copy())
