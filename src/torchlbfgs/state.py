"""The immutable L-BFGS state and its stop-reason codes.

Every leaf is a tensor whose shape and dtype depend only on ``history_size`` and the number of
parameters ``n``, never on data: this is what lets ``torch.func.vmap`` batch the state and
``torch.compile`` trace ``update`` once.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch

from torchlbfgs.history import History

__all__ = ["CONVERGED", "FAILED", "LBFGSState", "StopReason", "status_message"]


class StopReason(enum.IntEnum):
    """Why a problem stopped; stored in :attr:`LBFGSState.status` as an integer tensor.

    ``RUNNING`` means the problem is still being optimized. Codes 1-4 and 9 are convergence (a
    tolerance was met, or the precision of ``f`` allows no further decrease), 5-6 and 10 are
    failures, 7-8 are exhausted budgets.

    Examples:
        >>> import torch, torchlbfgs
        >>> from torchlbfgs import StopReason
        >>> result = torchlbfgs.minimize(lambda x: (x ** 2).sum(), torch.ones(2), max_iter=0)
        >>> StopReason(int(result.status)).name
        'MAX_ITERATIONS'
    """

    RUNNING = 0
    GRADIENT_TOLERANCE = 1
    """``max|g| <= tolerance_grad``: first-order optimality reached."""
    VALUE_CHANGE_TOLERANCE = 2
    """``|f_{k+1} - f_k| < tolerance_change``, or the relative decrease
    ``(f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1) <= tolerance_value`` (L-BFGS-B's ``ftol``)."""
    STEP_TOLERANCE = 3
    """``max|t_k d_k| <= tolerance_change``, or the step no longer changes ``x`` at all."""
    DIRECTIONAL_DERIVATIVE_TOLERANCE = 4
    """``g'd > -tolerance_change``: no descent left along the L-BFGS direction."""
    LINE_SEARCH_FAILED = 5
    """The line search found no point with a lower value; the params were left unchanged."""
    NON_FINITE = 6
    """The value or gradient at the current or accepted point is NaN or infinite."""
    MAX_EVALS = 7
    """The evaluation budget ``max_evals`` was used up."""
    MAX_ITERATIONS = 8
    """:func:`torchlbfgs.minimize` ran ``max_iter`` iterations without meeting a tolerance."""
    PRECISION_LIMIT = 9
    """The line search found no lower value where none can be told apart at ``f``'s precision:
    the decrease the direction promises, :math:`-g^\\top d`, is within
    :data:`~torchlbfgs.stopping.PRECISION_FACTOR` rounding units of :math:`|f|`. The gradient
    is as small as ``f``'s rounding lets it be found (typical of float32); the params are
    left at the last point, as with ``LINE_SEARCH_FAILED``."""
    INVALID_BOUNDS = 10
    """Some lower bound exceeds its upper bound (or is NaN): no point is feasible. Reported where
    raising is not possible (under ``vmap`` or ``torch.compile``); elsewhere a ``ValueError``."""


CONVERGED = frozenset({
    StopReason.GRADIENT_TOLERANCE, StopReason.VALUE_CHANGE_TOLERANCE, StopReason.STEP_TOLERANCE,
    StopReason.DIRECTIONAL_DERIVATIVE_TOLERANCE, StopReason.PRECISION_LIMIT,
})  # fmt: skip
"""The reasons that mean a convergence tolerance was met."""
FAILED = frozenset({StopReason.LINE_SEARCH_FAILED, StopReason.NON_FINITE, StopReason.INVALID_BOUNDS})
"""The reasons that mean the problem could not go on."""


def _is_one_of(status: torch.Tensor, reasons: frozenset[StopReason]) -> torch.Tensor:
    found = torch.zeros_like(status, dtype=torch.bool)
    for reason in sorted(reasons):
        found = found | (status == reason.value)
    return found


_MESSAGES = {
    StopReason.RUNNING: "running: no stopping criterion met yet",
    StopReason.GRADIENT_TOLERANCE: "converged: max|gradient| <= tolerance_grad",
    StopReason.VALUE_CHANGE_TOLERANCE: "converged: change in value < tolerance_change (or tolerance_value)",
    StopReason.STEP_TOLERANCE: "converged: max|step| <= tolerance_change",
    StopReason.DIRECTIONAL_DERIVATIVE_TOLERANCE: (
        "converged: directional derivative > -tolerance_change (no descent left)"
    ),
    StopReason.LINE_SEARCH_FAILED: "failed: line search found no decrease",
    StopReason.NON_FINITE: "failed: value or gradient is NaN or infinite",
    StopReason.MAX_EVALS: "stopped: evaluation budget max_evals used up",
    StopReason.MAX_ITERATIONS: "stopped: max_iter iterations reached",
    StopReason.PRECISION_LIMIT: "converged: no decrease possible at the precision of the value",
    StopReason.INVALID_BOUNDS: "failed: some lower bound exceeds its upper bound",
}


def status_message(code: int | torch.Tensor) -> str:
    """Human-readable text for a stop-reason code.

    Args:
        code: a :class:`StopReason`, an int, or a one-element integer tensor.

    Returns:
        one line of text; ``ValueError`` for an unknown code.

    Examples:
        >>> from torchlbfgs import StopReason, status_message
        >>> status_message(StopReason.GRADIENT_TOLERANCE)
        'converged: max|gradient| <= tolerance_grad'
    """
    if isinstance(code, torch.Tensor):
        if code.numel() != 1:
            raise ValueError(f"status_message takes one code, got a tensor of shape {tuple(code.shape)}")
        code = int(code.item())  # sync-ok: text needs the value, on the host by definition
    try:
        return _MESSAGES[StopReason(code)]
    except ValueError:
        raise ValueError(
            f"unknown stop-reason code {code}; known codes are 0..{len(_MESSAGES) - 1}"
        ) from None


class LBFGSState(NamedTuple):
    r"""State of L-BFGS at iterate :math:`x_k` (a pytree; every leaf a tensor).

    The curvature pairs :math:`(s_i, y_i) = (x_{i+1} - x_i,\ \nabla f_{i+1} - \nabla f_i)` live
    in fixed-size ring buffers: slot ``(head - 1) % m`` holds the newest pair, and the ``n_pairs``
    slots before it (cyclically) the older ones. Empty or never-written slots have ``rho = 0``
    and so contribute nothing to the two-loop recursion.

    Attributes:
        value: ``()`` - :math:`f(x_k)`.
        grad: ``(n,)`` - :math:`\nabla f(x_k)`, flattened like the params.
        s_history: ``(m, n)`` - ring buffer of steps :math:`s_i`.
        y_history: ``(m, n)`` - ring buffer of gradient changes :math:`y_i`.
        rho: ``(m,)`` - curvature weights :math:`\rho_i = 1 / (y_i^\top s_i)`; 0 in empty slots.
        gamma: ``()`` - scaling of the initial inverse Hessian :math:`H_k^0 = \gamma_k I`,
            :math:`\gamma_k = s^\top y / y^\top y` of the newest accepted pair
            (Nocedal & Wright eq. 7.20); 1 before any pair.
        head: ``()`` int64 - ring-buffer slot the next accepted pair is written to.
        n_pairs: ``()`` int64 - number of valid pairs, at most ``m``.
        sy_products: ``(m, m)`` - :math:`s_i^\top y_j` in slot order, for the compact
            representation (valid where pair ``i`` is not newer than pair ``j``); ``(0, 0)``
            when the state uses the two-loop recursion (see :mod:`torchlbfgs.direction`).
        yy_products: ``(m, m)`` - :math:`y_i^\top y_j` in slot order; ``(0, 0)`` likewise.
        iteration: ``()`` int64 - number of iterations attempted: ``update`` calls that got past
            the gradient test (torch's ``n_iter``), whether or not their line search succeeded.
        n_evals: ``()`` int64 - number of evaluations of ``fun`` (value and gradient) so far.
        status: ``()`` int64 - a :class:`StopReason` code; 0 while running.

    Examples:
        >>> import torch, torchlbfgs
        >>> fun = lambda x: ((x - 1.0) ** 2).sum()
        >>> x = torch.zeros(4, dtype=torch.float64)
        >>> state = torchlbfgs.init(fun, x, history_size=3)
        >>> x, state = torchlbfgs.update(fun, x, state)
        >>> state.s_history.shape, int(state.n_pairs), int(state.head), int(state.n_evals)
        (torch.Size([3, 4]), 1, 1, 2)
    """

    value: torch.Tensor
    grad: torch.Tensor
    s_history: torch.Tensor
    y_history: torch.Tensor
    rho: torch.Tensor
    gamma: torch.Tensor
    head: torch.Tensor
    n_pairs: torch.Tensor
    sy_products: torch.Tensor
    yy_products: torch.Tensor
    iteration: torch.Tensor
    n_evals: torch.Tensor
    status: torch.Tensor

    @property
    def history_size(self) -> int:
        """``m``, the number of curvature pairs the state can hold."""
        return self.s_history.shape[-2]

    @property
    def history(self) -> History:
        """The memory fields (ring buffers, weights, scaling, head, count, products) as a
        :class:`History`."""
        return History(
            self.s_history, self.y_history, self.rho, self.gamma, self.head, self.n_pairs,
            self.sy_products, self.yy_products,
        )  # fmt: skip

    @property
    def stopped(self) -> torch.Tensor:
        """Boolean tensor: the problem has converged or failed, and ``update`` is a no-op."""
        return self.status != StopReason.RUNNING.value

    @property
    def converged(self) -> torch.Tensor:
        """Boolean tensor: a convergence tolerance was met (a reason in :data:`CONVERGED`)."""
        return _is_one_of(self.status, CONVERGED)

    @property
    def failed(self) -> torch.Tensor:
        """Boolean tensor: the line search failed or a non-finite value was met (:data:`FAILED`)."""
        return _is_one_of(self.status, FAILED)
