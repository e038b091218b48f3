"""Safeguarded polynomial interpolation of a 1-D function along the search direction."""

from __future__ import annotations

from typing import Any

import torch

from torchlbfgs.scalars import TENSORS, Scalars

__all__ = ["cubic_minimizer", "quadratic_backtrack"]


def cubic_minimizer(
    t1: Any,
    f1: Any,
    g1: Any,
    t2: Any,
    f2: Any,
    g2: Any,
    lower: Any = None,
    upper: Any = None,
    *,
    ops: Scalars = TENSORS,
) -> Any:
    r"""Minimiser of the cubic through :math:`(t_i, f_i, f'_i)`, clamped to ``[lower, upper]``.

    Nocedal & Wright eq. 3.59, written as ``torch.optim.lbfgs._cubic_interpolate`` does (same
    operation order, so the same floating-point result). Bounds default to the interval
    between ``t1`` and ``t2``. Where the cubic has no minimiser (negative discriminant) or the
    data are not finite, or where torch would divide by zero, the midpoint of the bounds is
    returned. The scalars are 0-d tensors or, with ``ops=NUMBERS``, Python floats
    (:mod:`torchlbfgs.scalars`).
    """
    if lower is None or upper is None:
        lower, upper = ops.minimum(t1, t2), ops.maximum(t1, t2)
    # Degenerate inputs (t1 == t2, no real root, zero denominators) take the midpoint. The
    # divisions below use safe denominators there, so that the branch not taken stays finite
    # and reverse-mode gradients through torch.where are not poisoned by 0 * NaN.
    distinct = t1 != t2
    d1 = g1 + g2 - ops.divide(3 * (f1 - f2), _nonzero(t1 - t2, distinct, ops))
    d2_square = ops.square(d1) - g1 * g2
    has_root = d2_square > 0
    d2 = ops.where(has_root, ops.sqrt(ops.where(has_root, d2_square, 1.0)), 0 * d2_square)
    denominator_2 = g2 - g1 + 2 * d2
    denominator_1 = g1 - g2 + 2 * d2
    from_t2 = t2 - (t2 - t1) * ((g2 + d2 - d1) / _nonzero(denominator_2, denominator_2 != 0, ops))
    from_t1 = t1 - (t1 - t2) * ((g1 + d2 - d1) / _nonzero(denominator_1, denominator_1 != 0, ops))
    minimiser = ops.where(t1 <= t2, from_t2, from_t1)
    clamped = ops.minimum(ops.maximum(minimiser, lower), upper)
    denominator = ops.where(t1 <= t2, denominator_2, denominator_1)
    usable = ops.both(ops.both(d2_square >= 0, denominator != 0), ops.both(distinct, ops.isfinite(clamped)))
    return ops.where(usable, clamped, (lower + upper) / 2)


def _nonzero(denominator: Any, valid: Any, ops: Scalars = TENSORS) -> Any:
    """``denominator`` where ``valid``, 1 elsewhere (the result there is discarded)."""
    return ops.where(valid, denominator, 1.0)


def quadratic_backtrack(
    t: torch.Tensor, f0: torch.Tensor, gtd0: torch.Tensor, f_t: torch.Tensor
) -> torch.Tensor:
    r"""Next trial step after an Armijo failure at ``t``: the minimiser of the quadratic through
    :math:`f(0), f'(0), f(t)` (N&W eq. 3.58), safeguarded to ``[0.1 t, 0.5 t]``; ``0.5 t`` when
    :math:`f(t)` is not finite."""
    curvature = f_t - f0 - gtd0 * t
    convex = curvature > 0
    minimiser = -gtd0 * t * t / (2 * _nonzero(curvature, convex))
    safe = torch.clamp(minimiser, min=0.1 * t, max=0.5 * t)
    return torch.where(torch.isfinite(safe) & convex, safe, 0.5 * t)
