r"""The L-BFGS search direction: the inverse-Hessian approximation applied to a vector.

:math:`H_k v`, with :math:`H_k^0 = \gamma_k I`, is computed in one of two ways, decided by the
state (:func:`torchlbfgs.init`'s ``direction``, fixed for the state's life):

* **Compact representation** (Byrd, Nocedal & Schnabel 1994, eq. 3.1; Nocedal & Wright
  eq. 7.24), when the memory keeps the products :math:`S^\top Y`, :math:`Y^\top Y`
  (:mod:`torchlbfgs.history`): with the pairs in chronological order, :math:`R` the upper
  triangle of :math:`S^\top Y` and :math:`D` its diagonal,

  .. math::
      H_k v = \gamma v + S p - \gamma Y r, \quad r = R^{-1} S^\top v, \quad
      p = R^{-\top}\big((D + \gamma Y^\top Y) r - \gamma Y^\top v\big).

  Two matrix-vector products over the buffers, two more back, and ``m x m`` triangular
  solves: a fixed number of kernels whatever ``m``. The ring buffer is never reordered; only
  the small matrices are permuted into chronological order. Empty slots get a unit diagonal
  in :math:`R` and zeros elsewhere, so they contribute nothing.
* **Two-loop recursion** (Nocedal & Wright, Algorithm 7.4) otherwise: ``4m`` vector
  operations, newest pair to oldest and back, rounded exactly as ``torch.optim.LBFGS`` does.

On the CPU the two-loop recursion is the faster of the two wherever we measured
(``bench/direction_cost.py``, tables in ``bench/README.md``: alone at ``n`` from 1e2 to 1e5,
and vmapped or compiled over 1024 problems), because keeping the products costs two more
passes over the buffers per pair; so it is the default. The compact form trades ``4m``
kernels for a fixed number, which should pay where each kernel launch is expensive (GPUs,
small ``n``); run the benchmark with ``--device cuda`` before choosing it there. The
:class:`torchlbfgs.LBFGS` adapter always uses the two-loop recursion, for bit-for-bit parity
with ``torch.optim.LBFGS``.

For the two-loop recursion, empty slots have :math:`\rho = 0` and contribute nothing, so the
loop can run over all ``m`` slots and its shape never depends on how many pairs are stored.
Where reading the ring's head and count on the host is free (see
:mod:`torchlbfgs.line_searches.loop`), the loop runs over the stored pairs only (as views;
under ``vmap``, over as many rows as the fullest problem of the batch uses): the same result,
bit for bit, without the wasted work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch._C._functorch import is_functorch_wrapped_tensor

from torchlbfgs.history import History, add_buffer_rows, buffer_dot, buffer_rows, has_products
from torchlbfgs.line_searches.loop import batch_view, exits_early
from torchlbfgs.options import require_choice
from torchlbfgs.scalars import TENSORS, Scalars
from torchlbfgs.sharding import LOCAL, Reductions
from torchlbfgs.state import LBFGSState

__all__ = [
    "DIRECTIONS",
    "Direction",
    "compact_form",
    "inv_hessian_product",
    "newest_first_order",
    "slots_newest_first",
    "stored_slots",
    "two_loop_recursion",
    "uses_compact_form",
]

Direction = Literal["two_loop", "compact"]
DIRECTIONS: tuple[Direction, ...] = ("two_loop", "compact")


def uses_compact_form(direction: Direction) -> bool:
    """Whether a state for ``direction`` keeps the pairs' products (the compact representation)."""
    require_choice("direction", direction, DIRECTIONS)
    return direction == "compact"


def newest_first_order(head: torch.Tensor, history_size: int) -> torch.Tensor:
    """Slot indices of the ring buffer from the newest pair to the oldest."""
    offsets = torch.arange(1, history_size + 1, device=head.device)
    return torch.remainder(head - offsets, history_size)


def slots_newest_first(head: int, n_pairs: int, history_size: int) -> list[int]:
    """The ring's slots that hold pairs, newest first, from its head and count read on the host."""
    return [(head - 1 - k) % history_size for k in range(n_pairs)]


def stored_slots(history: History, early_exit: bool | None) -> list[int] | None:
    """Slots holding pairs, newest first, when the host may read them; else ``None``."""
    if not exits_early(early_exit, history.head) or is_functorch_wrapped_tensor(history.head):
        return None
    head, n_pairs = torch.stack((history.head, history.n_pairs)).tolist()  # sync-ok: exits_early
    return slots_newest_first(head, n_pairs, history.s_history.shape[0])


def _rows_in_use(history: History, early_exit: bool | None) -> int:
    """How many newest-first rows can hold a pair in any problem of the batch (``m`` unless
    the host may read the counts)."""
    m = history.s_history.shape[-2]
    if not exits_early(early_exit, history.n_pairs):
        return m
    return int(batch_view(history.n_pairs).max())  # sync-ok: exits_early


def _two_loop(
    history: History, vector: torch.Tensor, slots: list[int] | None, rows_in_use: int, ops: Scalars,
    overwrite: bool,
) -> torch.Tensor:  # fmt: skip
    if slots is None:  # per-problem heads (vmap) or no host reads: gather newest-first rows
        order = newest_first_order(history.head, history.s_history.shape[0])[:rows_in_use]
        s, y, rho = (
            buffer_rows(buffer, order) for buffer in (history.s_history, history.y_history, history.rho)
        )
        rows = list(range(len(order)))
    else:
        s, y, rho, rows = history.s_history, history.y_history, history.rho, slots
    return two_loop_recursion(
        s.unbind(0), y.unbind(0), ops.values(rho), history.gamma, vector, rows, ops=ops, overwrite=overwrite
    )


def two_loop_recursion(
    s_rows: Sequence[torch.Tensor], y_rows: Sequence[torch.Tensor], rho: Sequence[Any], gamma: Any,
    vector: torch.Tensor, rows: Sequence[int], *, ops: Scalars = TENSORS, overwrite: bool = False,
) -> torch.Tensor:  # fmt: skip
    """:math:`H v` by the two-loop recursion over the pairs ``rows`` (newest first) of the
    memory given as its rows (``s_rows[i]``, ``y_rows[i]``, ``rho[i]`` scalars of kind ``ops``),
    rounded as ``torch.optim.LBFGS`` rounds it. :func:`inv_hessian_product` calls it; a caller
    that keeps the rows between calls (the :class:`torchlbfgs.LBFGS` adapter) calls it directly.

    Examples:
        >>> import torch
        >>> s, y = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])  # rho = 1 / s'y
        >>> two_loop_recursion([s], [y], [0.5], 0.5, y.clone(), [0])  # the secant equation: H y = s
        tensor([1., 0.])
    """
    # One working vector updated in place where that is allowed (eagerly, outside torch.func
    # transforms; compiled graphs reuse buffers themselves): a fresh length-n tensor per update
    # costs an allocation, and for large n the page faults cost more than the arithmetic.
    in_place = (
        not torch.compiler.is_compiling()
        and not is_functorch_wrapped_tensor(vector)
        and not _autograd_records(vector, *s_rows, *y_rows)  # in-place would clobber saved tensors
    )
    alpha = []
    q = vector if overwrite or not in_place else vector.clone()
    for i in rows:  # newest to oldest
        a = ops.scaled_dot(s_rows[i], q, rho[i])
        q = ops.sub_scaled(q, y_rows[i], a, in_place=in_place)  # rounded once, as torch's
        alpha.append(a)
    r = q.mul_(gamma) if in_place else q * gamma
    for i, a in zip(reversed(rows), reversed(alpha), strict=True):  # oldest to newest
        b = ops.scaled_dot(y_rows[i], r, rho[i])
        r = ops.add_scaled(r, s_rows[i], a - b, in_place=in_place)
    return r


def _autograd_records(*tensors: torch.Tensor) -> bool:
    """Whether autograd records operations on ``tensors`` (unrolled differentiation)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def compact_form(
    history: History, vector: torch.Tensor, buffer_products: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """:math:`H v` by the compact representation; ``buffer_products``: ``(S v, Y v)`` over the
    buffers' slots if already computed (over processes, :mod:`torchlbfgs.sharding`)."""
    m = history.s_history.shape[-2]
    positions = torch.arange(m, device=history.head.device)
    chronological = torch.remainder(history.head + positions, m)  # oldest slot first
    to_slots = torch.remainder(positions - history.head, m)  # slot i sits at position to_slots[i]
    valid = positions >= m - history.n_pairs
    both_valid = valid.unsqueeze(-1) & valid.unsqueeze(0)
    zero = torch.zeros((), dtype=vector.dtype, device=vector.device)

    def in_time_order(products: torch.Tensor) -> torch.Tensor:
        return torch.where(both_valid, products[chronological][:, chronological], zero)

    sy, yy = in_time_order(history.sy_products), in_time_order(history.yy_products)
    if buffer_products is None:
        buffer_products = buffer_dot(history.s_history, vector), buffer_dot(history.y_history, vector)
    s_dot_v = torch.where(valid, buffer_products[0][chronological], zero)
    y_dot_v = torch.where(valid, buffer_products[1][chronological], zero)
    gamma = history.gamma
    unit_where_empty = torch.diag_embed(torch.where(valid, zero, torch.ones_like(zero)))
    r_matrix = torch.triu(sy) + unit_where_empty  # R, upper triangular; identity rows for empty slots
    r = torch.linalg.solve_triangular(r_matrix, s_dot_v.unsqueeze(-1), upper=True)
    rhs = (
        torch.diagonal(sy).unsqueeze(-1) * r
        + gamma * buffer_dot(yy, r.squeeze(-1)).unsqueeze(-1)
        - gamma * y_dot_v.unsqueeze(-1)
    )
    p = torch.linalg.solve_triangular(r_matrix.mT, rhs, upper=False)
    p_slots, r_slots = p.squeeze(-1)[to_slots], r.squeeze(-1)[to_slots]
    out = add_buffer_rows(gamma * vector, history.s_history, p_slots)
    return add_buffer_rows(out, history.y_history, -gamma * r_slots)


def inv_hessian_product(
    state: LBFGSState | History,
    vector: torch.Tensor,
    *,
    early_exit: bool | None = None,
    slots: Sequence[int] | None = None,
    ops: Scalars = TENSORS,
    overwrite: bool = False,
    reductions: Reductions = LOCAL,
) -> torch.Tensor:
    r"""Apply the L-BFGS inverse-Hessian approximation :math:`H_k` to a flat vector.

    :math:`H_k` is the matrix defined by the BFGS updates (N&W eq. 7.19) of
    :math:`H_k^0 = \gamma_k I` with the stored pairs, oldest first; it is never formed.
    The L-BFGS direction is ``-inv_hessian_product(state, state.grad)``. A state that keeps
    the pairs' products uses the compact representation, otherwise the two-loop recursion
    (see the module docstring).

    Args:
        state: an :class:`~torchlbfgs.LBFGSState` (or its history part).
        vector: a tensor of shape ``(n,)``, the flattened parameter shape.
        early_exit: skip empty slots by reading the ring's count on the host; ``None`` does
            so only where that read is free (see :mod:`torchlbfgs.line_searches.loop`).
        slots: the slots holding pairs, newest first, when the caller already knows them on
            the host (as :class:`torchlbfgs.LBFGS` does); then nothing is read. Only the
            two-loop recursion uses them.
        ops: the kind of the recursion's scalars (:mod:`torchlbfgs.scalars`): 0-d tensors
            (no host read), or host numbers (``NUMBERS``: each inner product read, as
            ``torch.optim.LBFGS`` reads them; fewer, cheaper kernels where a read costs
            nothing, on CPUs). The same result, bit for bit.
        overwrite: the two-loop recursion may work in ``vector`` itself (a temporary of the
            caller's, e.g. ``-g``) instead of a copy, where in-place updates are allowed.
        reductions: the inner products (:mod:`torchlbfgs.sharding`: across processes for a
            vector sharded over them).

    Returns:
        :math:`H_k v`, shape ``(n,)``.

    Examples:
        >>> import torch, torchlbfgs
        >>> state = torchlbfgs.init(lambda x: (x ** 2).sum(), torch.ones(3, dtype=torch.float64))
        >>> torchlbfgs.inv_hessian_product(state, state.grad)  # empty history: H_0 = I
        tensor([2., 2., 2.], dtype=torch.float64)
    """
    state_history = state.history if isinstance(state, LBFGSState) else state
    n = state_history.s_history.shape[-1]
    if vector.shape != (n,):
        raise ValueError(f"vector has shape {tuple(vector.shape)}; expected ({n},), the flattened params")
    if has_products(state_history):
        products = None
        if reductions.sharded:  # S v and Y v in one all-reduce
            both = reductions.inner([state_history.s_history, state_history.y_history], vector.unsqueeze(0))
            s_products, y_products = torch.split(both.squeeze(-1), state_history.s_history.shape[-2])
            products = (s_products, y_products)
        return compact_form(state_history, vector, products)
    slots = stored_slots(state_history, early_exit) if slots is None else list(slots)
    rows_in_use = len(slots) if slots is not None else _rows_in_use(state_history, early_exit)
    return _two_loop(state_history, vector, slots, rows_in_use, reductions.scalars(ops), overwrite)
