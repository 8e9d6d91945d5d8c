"""Where a channel axis goes through a layout op (reshape-like or transpose).

A BN after ``Linear → Reshape`` is a per-channel ``s·z + t`` on the reshaped tensor; it folds
into the producer only if every element of its channel ``c`` was channel ``c`` of the
producer's output (one to one, same index). These functions prove that from the shapes alone;
dims may be symbolic (names), and anything not provable gives None.

Reshape, Flatten, Squeeze and Unsqueeze keep the row-major order of the elements. Write the
input as ``(A, C, B)`` around the channel axis (``A``, ``B`` the products of the dims before
and after it) and the output as ``(A', C, B')``; element ``(a, c, β)`` has flat index
``(a·C + c)·B + β``, the output reads it as ``(a'·C + c')·B' + β'``. When ``B' = B`` the
decomposition is unique, so ``c' = c``: the channel survives exactly when the products after
it agree. Transpose moves input axis ``perm[j]`` to output axis ``j``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

__all__ = ["axis_through_reshape", "axis_through_transpose", "dims_product"]

Dim = int | str | None


def dims_product(dims: Sequence[Dim]) -> tuple[int, Counter[str]] | None:
    """The product of ``dims`` as ``(known integer factor, multiset of symbolic names)``;
    None when a dim is unknown. Two products are provably equal when both parts agree."""
    n, names = 1, Counter()
    for d in dims:
        if d is None or (isinstance(d, int) and d < 0):
            return None
        if isinstance(d, int):
            n *= d
        else:
            names[d] += 1
    return n, names


def axis_through_reshape(in_dims: Sequence[Dim], axis: int, out_dims: Sequence[Dim]) -> int | None:
    """The output axis that holds input ``axis`` of a row-major reshape (``in_dims`` to
    ``out_dims``) one to one, or None when that is not provable. ``in_dims[axis]`` must be a
    known size C; the output axis has size C and the same product of dims after it."""
    if not 0 <= axis < len(in_dims):
        return None
    c = in_dims[axis]
    after = dims_product(in_dims[axis + 1 :])
    if not isinstance(c, int) or after is None:
        return None
    found = [
        j for j, d in enumerate(out_dims) if d == c and dims_product(out_dims[j + 1 :]) == after
    ]
    return found[0] if len(found) == 1 else None


def axis_through_transpose(perm: Sequence[int], axis: int) -> int | None:
    """The output axis of a Transpose with ``perm`` that holds input ``axis``, or None."""
    rank = len(perm)
    if sorted(p % rank for p in perm) != list(range(rank)) or not 0 <= axis < rank:
        return None
    return [p % rank for p in perm].index(axis)
