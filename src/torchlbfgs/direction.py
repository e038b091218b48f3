r"""The L-BFGS search direction: the inverse-Hessian approximation applied to a vector.

:math:`H_k v` is computed by the two-loop recursion (Nocedal & Wright, Algorithm 7.4) over
the pairs in the ring buffer, newest to oldest and back, with :math:`H_k^0 = \gamma_k I`.
Empty slots have :math:`\rho = 0` and contribute nothing, so the loop always runs over all
``m`` slots and its shape never depends on how many pairs are stored.
"""

from __future__ import annotations

import torch

from torchlbfgs.history import History
from torchlbfgs.state import LBFGSState

__all__ = ["inv_hessian_product", "newest_first_order"]


def newest_first_order(head: torch.Tensor, history_size: int) -> torch.Tensor:
    """Slot indices of the ring buffer from the newest pair to the oldest."""
    offsets = torch.arange(1, history_size + 1, device=head.device)
    return torch.remainder(head - offsets, history_size)


def _two_loop(history: History, vector: torch.Tensor) -> torch.Tensor:
    m = history.s_history.shape[0]
    order = newest_first_order(history.head, m)
    s = history.s_history[order]
    y = history.y_history[order]
    rho = history.rho[order]
    alpha = []
    q = vector
    for i in range(m):  # newest to oldest
        a = torch.dot(s[i], q) * rho[i]
        q = torch.addcmul(q, y[i], -a)  # q - a y, rounded once as torch.optim.LBFGS does
        alpha.append(a)
    r = q * history.gamma
    for i in reversed(range(m)):  # oldest to newest
        b = torch.dot(y[i], r) * rho[i]
        r = torch.addcmul(r, s[i], alpha[i] - b)
    return r


def inv_hessian_product(state: LBFGSState | History, vector: torch.Tensor) -> torch.Tensor:
    r"""Apply the L-BFGS inverse-Hessian approximation :math:`H_k` to a flat vector.

    :math:`H_k` is the matrix defined by the BFGS updates (N&W eq. 7.19) of
    :math:`H_k^0 = \gamma_k I` with the stored pairs, oldest first; it is never formed.
    The L-BFGS direction is ``-inv_hessian_product(state, state.grad)``.

    Args:
        state: an :class:`~torchlbfgs.LBFGSState` (or its history part).
        vector: a tensor of shape ``(n,)``, the flattened parameter shape.

    Returns:
        :math:`H_k v`, shape ``(n,)``.

    Example:
        >>> import torch, torchlbfgs
        >>> state = torchlbfgs.init(lambda x: (x ** 2).sum(), torch.ones(3, dtype=torch.float64))
        >>> torchlbfgs.inv_hessian_product(state, state.grad)  # empty history: H_0 = I
        tensor([2., 2., 2.], dtype=torch.float64)
    """
    state_history = state.history if isinstance(state, LBFGSState) else state
    n = state_history.s_history.shape[-1]
    if vector.shape != (n,):
        raise ValueError(f"vector has shape {tuple(vector.shape)}; expected ({n},), the flattened params")
    return _two_loop(state_history, vector)
