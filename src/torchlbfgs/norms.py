"""The max-norm used by the stopping rules, in one pass and without a temporary."""

from __future__ import annotations

import torch

__all__ = ["max_abs"]


def max_abs(vector: torch.Tensor) -> torch.Tensor:
    """``vector.abs().amax()`` (NaN if any entry is NaN), without allocating ``abs(vector)``.

    Examples:
        >>> import torch
        >>> max_abs(torch.tensor([1.0, -3.0, 2.0]))
        tensor(3.)
    """
    low, high = torch.aminmax(vector)
    return torch.maximum(high, -low)
