r"""The curvature-pair memory: which pairs are kept, and how they enter the ring buffers.

A pair :math:`(s, y)` is only useful if :math:`s^\top y > 0` (the secant equation then has a
positive-definite solution, Nocedal & Wright sec. 6.1). Two acceptance rules are offered:

* ``"absolute"``: :math:`s^\top y > 10^{-10}`, exactly ``torch.optim.LBFGS``'s rule.
* ``"relative"``: :math:`s^\top y > \epsilon\,(-s^\top g_k)`, with :math:`\epsilon` the machine
  epsilon of the dtype and :math:`g_k` the gradient where the step started. This is
  L-BFGS-B's rule (Byrd, Lu, Nocedal & Zhu 1995; ``dr <= epsmch*ddum`` in ``lbfgsb.f``); it is
  invariant to rescaling :math:`f`, which the absolute threshold is not.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

__all__ = ["CurvatureRule", "History", "accept_curvature_pair", "push_curvature_pair"]

CurvatureRule = Literal["relative", "absolute"]
CURVATURE_RULES: tuple[CurvatureRule, ...] = ("relative", "absolute")

TORCH_CURVATURE_THRESHOLD = 1e-10  # torch.optim.LBFGS: `if ys > 1e-10`


class History(NamedTuple):
    """The memory part of :class:`~torchlbfgs.LBFGSState` (same fields, same meaning)."""

    s_history: torch.Tensor
    y_history: torch.Tensor
    rho: torch.Tensor
    gamma: torch.Tensor
    head: torch.Tensor
    n_pairs: torch.Tensor


def accept_curvature_pair(
    s: torch.Tensor, y: torch.Tensor, grad: torch.Tensor, rule: CurvatureRule
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(s'y, accept)`` for the pair ``(s, y)`` of a step taken from gradient ``grad``."""
    ys = torch.dot(y, s)
    if rule == "absolute":
        return ys, ys > TORCH_CURVATURE_THRESHOLD
    if rule == "relative":
        eps = torch.finfo(s.dtype).eps
        return ys, ys > eps * -torch.dot(s, grad)
    raise ValueError(f"curvature_rule must be one of {CURVATURE_RULES}, got {rule!r}")


def push_curvature_pair(
    history: History,
    s: torch.Tensor,
    y: torch.Tensor,
    ys: torch.Tensor,
    accept: torch.Tensor,
    *,
    in_place: bool = False,
) -> History:
    r"""Write ``(s, y)`` into the slot ``head`` when ``accept`` is true; otherwise change nothing.

    When the buffer is full the oldest pair is overwritten, as ``torch.optim.LBFGS`` drops its
    oldest pair. The new scaling is :math:`\gamma = s^\top y / y^\top y` (N&W eq. 7.20).
    Out of place by default: the inputs are never modified, at the price of copying the
    ``(m, n)`` buffers. ``in_place=True`` writes the one row in the existing buffers instead
    (O(n)); only an owner of the state that no one else reads, such as the
    :class:`torchlbfgs.LBFGS` adapter, may ask for it. Both give the same values.
    """
    m = history.s_history.shape[0]
    one = torch.ones((), dtype=ys.dtype, device=ys.device)
    safe_ys = torch.where(accept, ys, one)  # keep 1/ys finite in the branch not taken
    if in_place:
        slot = history.head.reshape(1)
        for buffer, new in ((history.s_history, s), (history.y_history, y), (history.rho, 1.0 / safe_ys)):
            kept = buffer.index_select(0, slot).squeeze(0)
            buffer.index_copy_(0, slot, torch.where(accept, new, kept).unsqueeze(0))
        s_history, y_history, rho = history.s_history, history.y_history, history.rho
    else:
        write = (torch.arange(m, device=history.head.device) == history.head) & accept
        s_history = torch.where(write.unsqueeze(-1), s, history.s_history)
        y_history = torch.where(write.unsqueeze(-1), y, history.y_history)
        rho = torch.where(write, 1.0 / safe_ys, history.rho)
    return History(
        s_history=s_history,
        y_history=y_history,
        rho=rho,
        gamma=torch.where(accept, ys / torch.where(accept, torch.dot(y, y), one), history.gamma),
        head=torch.where(accept, (history.head + 1) % m, history.head),
        n_pairs=torch.where(accept, torch.clamp(history.n_pairs + 1, max=m), history.n_pairs),
    )
