"""What a line search returns, as data (so it batches under ``vmap``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

__all__ = ["FlatLineSearchResult", "LineSearchResult"]


class FlatLineSearchResult(NamedTuple):
    """Result of a line search on the flat vector (internal form of :class:`LineSearchResult`)."""

    step_size: torch.Tensor
    value: torch.Tensor
    grad: torch.Tensor
    n_evals: torch.Tensor
    success: torch.Tensor


class LineSearchResult(NamedTuple):
    """Result of :func:`torchlbfgs.line_search`.

    Attributes:
        step_size: ``()`` - the accepted step :math:`t`; the new point is ``params + t * direction``.
            0 when the search found no acceptable point.
        value: ``()`` - :math:`f` at the accepted point.
        grad: pytree like ``params`` - :math:`\\nabla f` at the accepted point.
        n_evals: ``()`` int64 - evaluations of ``fun`` the search counted.
        success: ``()`` bool - the search's conditions hold at the accepted point (strong Wolfe,
            Armijo, or, for the fixed step, a finite value and gradient).

    Examples:
        >>> import torch, torchlbfgs
        >>> fun = lambda p: ((p["x"] - 2.0) ** 2).sum()
        >>> params = {"x": torch.zeros(2, dtype=torch.float64)}
        >>> grad = torch.func.grad(fun)(params)
        >>> direction = {"x": -grad["x"]}
        >>> result = torchlbfgs.line_search(fun, params, direction, fun(params), grad, step_size=1.0)
        >>> float(result.step_size), result.grad["x"], bool(result.success)
        (0.5, tensor([0., 0.], dtype=torch.float64), True)
    """

    step_size: torch.Tensor
    value: torch.Tensor
    grad: Any
    n_evals: torch.Tensor
    success: torch.Tensor
