r"""The L-BFGS search direction: the inverse-Hessian approximation applied to a vector.

:math:`H_k v` is computed by the two-loop recursion (Nocedal & Wright, Algorithm 7.4) over
the pairs in the ring buffer, newest to oldest and back, with :math:`H_k^0 = \gamma_k I`.
Empty slots have :math:`\rho = 0` and contribute nothing, so the loop can run over all ``m``
slots and its shape never depends on how many pairs are stored. Where reading the ring's
head and count on the host is free (see :mod:`torchlbfgs.line_searches.loop`), the loop runs
over the stored pairs only (as views; under ``vmap``, over as many rows as the fullest
problem of the batch uses): the same result, bit for bit, without the wasted work.
"""

from __future__ import annotations

import torch
from torch._C._functorch import is_functorch_wrapped_tensor

from torchlbfgs.history import History
from torchlbfgs.line_searches.loop import batch_view, exits_early
from torchlbfgs.state import LBFGSState

__all__ = ["inv_hessian_product", "newest_first_order", "stored_slots"]


def newest_first_order(head: torch.Tensor, history_size: int) -> torch.Tensor:
    """Slot indices of the ring buffer from the newest pair to the oldest."""
    offsets = torch.arange(1, history_size + 1, device=head.device)
    return torch.remainder(head - offsets, history_size)


def stored_slots(history: History, early_exit: bool | None) -> list[int] | None:
    """Slots holding pairs, newest first, when the host may read them; else ``None``."""
    if not exits_early(early_exit, history.head) or is_functorch_wrapped_tensor(history.head):
        return None
    m = history.s_history.shape[0]
    head, n_pairs = torch.stack((history.head, history.n_pairs)).tolist()  # sync-ok: exits_early
    return [(head - 1 - k) % m for k in range(n_pairs)]


def _rows_in_use(history: History, early_exit: bool | None) -> int:
    """How many newest-first rows can hold a pair in any problem of the batch (``m`` unless
    the host may read the counts)."""
    m = history.s_history.shape[-2]
    if not exits_early(early_exit, history.n_pairs):
        return m
    return int(batch_view(history.n_pairs).max())  # sync-ok: exits_early


def _two_loop(
    history: History, vector: torch.Tensor, slots: list[int] | None, rows_in_use: int
) -> torch.Tensor:
    if slots is None:  # per-problem heads (vmap) or no host reads: gather newest-first rows
        order = newest_first_order(history.head, history.s_history.shape[0])[:rows_in_use]
        s, y, rho = history.s_history[order], history.y_history[order], history.rho[order]
        rows = list(range(len(order)))
    else:
        s, y, rho, rows = history.s_history, history.y_history, history.rho, slots
    # One working vector updated in place where that is allowed (eagerly, outside torch.func
    # transforms; compiled graphs reuse buffers themselves): a fresh length-n tensor per update
    # costs an allocation, and for large n the page faults cost more than the arithmetic.
    in_place = not torch.compiler.is_compiling() and not is_functorch_wrapped_tensor(vector)
    alpha = []
    q = vector.clone() if in_place else vector
    for i in rows:  # newest to oldest
        a = torch.dot(s[i], q) * rho[i]
        # q - a y, rounded once as torch.optim.LBFGS does
        q = q.addcmul_(y[i], -a) if in_place else torch.addcmul(q, y[i], -a)
        alpha.append(a)
    r = q.mul_(history.gamma) if in_place else q * history.gamma
    for i, a in zip(reversed(rows), reversed(alpha), strict=True):  # oldest to newest
        b = torch.dot(y[i], r) * rho[i]
        r = r.addcmul_(s[i], a - b) if in_place else torch.addcmul(r, s[i], a - b)
    return r


def inv_hessian_product(
    state: LBFGSState | History, vector: torch.Tensor, *, early_exit: bool | None = None
) -> torch.Tensor:
    r"""Apply the L-BFGS inverse-Hessian approximation :math:`H_k` to a flat vector.

    :math:`H_k` is the matrix defined by the BFGS updates (N&W eq. 7.19) of
    :math:`H_k^0 = \gamma_k I` with the stored pairs, oldest first; it is never formed.
    The L-BFGS direction is ``-inv_hessian_product(state, state.grad)``.

    Args:
        state: an :class:`~torchlbfgs.LBFGSState` (or its history part).
        vector: a tensor of shape ``(n,)``, the flattened parameter shape.
        early_exit: skip empty slots by reading the ring's count on the host; ``None`` does
            so only where that read is free (see :mod:`torchlbfgs.line_searches.loop`).

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
    slots = stored_slots(state_history, early_exit)
    rows_in_use = len(slots) if slots is not None else _rows_in_use(state_history, early_exit)
    return _two_loop(state_history, vector, slots, rows_in_use)
