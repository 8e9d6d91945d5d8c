"""Pure numpy math behind folding, recalibration and verification.

Every function works in float64 and returns float64; callers cast back to the model's dtype
(``cast_checked`` reports what overflowed). Both backends call these functions, so the math is
tested once, against float64 references, in ``tests/test_numerics.py``. Nothing here imports a
framework (torch, onnx, onnxruntime) or a UI library.

- :mod:`~bncheck.numerics.fold`: BN as ``s·x + t``; folding into the producer or the consumer.
- :mod:`~bncheck.numerics.moments`: :class:`Moments`, float64 with Chan's parallel merge.
- :mod:`~bncheck.numerics.verify`: tolerances per dtype, checked casts, output comparison.
"""

from __future__ import annotations

from bncheck.numerics.fold import (
    FoldOp,
    bn_as_affine,
    bn_scale_shift,
    fold_into_consumer,
    fold_into_producer,
)
from bncheck.numerics.moments import Moments
from bncheck.numerics.verify import (
    TOLERANCES,
    Tolerance,
    cast_checked,
    tolerance_for,
    top1_agreement,
    verify_close,
)

__all__ = [
    "TOLERANCES",
    "FoldOp",
    "Moments",
    "Tolerance",
    "bn_as_affine",
    "bn_scale_shift",
    "cast_checked",
    "fold_into_consumer",
    "fold_into_producer",
    "tolerance_for",
    "top1_agreement",
    "verify_close",
]
