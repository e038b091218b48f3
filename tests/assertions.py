"""Comparisons shared by the tests."""

from __future__ import annotations

import torch


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN == NaN, -0.0 != 0.0; complex compared as real pairs)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() or a.is_complex():
        a, b = (torch.view_as_real(t) if t.is_complex() else t for t in (a, b))
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
    return torch.equal(a, b)
