r"""The curvature-pair memory: which pairs are kept, and how they enter the ring buffers.

A pair :math:`(s, y)` is only useful if :math:`s^\top y > 0` (the secant equation then has a
positive-definite solution, Nocedal & Wright sec. 6.1). Two acceptance rules are offered:

* ``"absolute"``: :math:`s^\top y > 10^{-10}`, exactly ``torch.optim.LBFGS``'s rule.
* ``"relative"``: :math:`s^\top y > \epsilon\,(-s^\top g_k)`, with :math:`\epsilon` the machine
  epsilon of the dtype and :math:`g_k` the gradient where the step started. This is
  L-BFGS-B's rule (Byrd, Lu, Nocedal & Zhu 1995; ``dr <= epsmch*ddum`` in ``lbfgsb.f``); it is
  invariant to rescaling :math:`f`, which the absolute threshold is not.

For the compact representation (:mod:`torchlbfgs.direction`) the memory also keeps the inner
products :math:`s_i^\top y_j` and :math:`y_i^\top y_j` of the stored pairs, two ``(m, m)``
matrices in slot order. A new pair in slot :math:`h` changes one column of each, which costs
two matrix-vector products over the buffers, :math:`S y_h` and :math:`Y y_h` (Byrd, Nocedal &
Schnabel 1994, sec. 4), instead of recomputing :math:`S^\top Y` in :math:`O(m^2 n)`.
Only column :math:`h` of :math:`S^\top Y` is written: entries :math:`s_i^\top y_j` with
:math:`i` newer than :math:`j` are never read. A memory without products holds ``(0, 0)``
matrices (the two-loop recursion does not need them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch

from torchlbfgs.options import require_choice
from torchlbfgs.scalars import TENSORS, Scalars

__all__ = [
    "CurvatureRule",
    "History",
    "accept_curvature_pair",
    "add_buffer_rows",
    "buffer_dot",
    "buffer_rows",
    "has_products",
    "push_curvature_pair",
    "write_pair",
]

CurvatureRule = Literal["relative", "absolute"]
CURVATURE_RULES: tuple[CurvatureRule, ...] = ("relative", "absolute")

TORCH_CURVATURE_THRESHOLD = 1e-10  # torch.optim.LBFGS: `if ys > 1e-10`

# Up to this n, products with the (m, n) buffers are elementwise reductions, which round the
# same batched and alone (BLAS gemv and the batched gemm vmap turns it into do not): vmapped
# problems then equal each problem solved by itself. Above it, BLAS, without the (m, n) temporary.
ELEMENTWISE_PRODUCTS_MAX_N = 20_000


class History(NamedTuple):
    """The memory part of :class:`~torchlbfgs.LBFGSState` (same fields, same meaning)."""

    s_history: torch.Tensor
    y_history: torch.Tensor
    rho: torch.Tensor
    gamma: torch.Tensor
    head: torch.Tensor
    n_pairs: torch.Tensor
    sy_products: torch.Tensor
    yy_products: torch.Tensor


def buffer_dot(buffer: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``buffer @ vector`` for an ``(m, n)`` history buffer: the ``m`` inner products."""
    if buffer.shape[-1] > ELEMENTWISE_PRODUCTS_MAX_N:
        return torch.mv(buffer, vector)
    return (buffer * vector).sum(-1)


def buffer_rows(buffer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``buffer[index]``: rows of an ``(m, n)`` history buffer (or entries of an ``(m,)`` one).

    Eagerly, rows are gathered as an embedding lookup: the same rows, bit for bit, but under
    ``vmap`` the batching rule of an embedding gathers whole rows (one ``index_select`` over the
    rows of the whole batch), whereas that of advanced indexing gathers element by element
    (``bench/README.md``). Compiled, Inductor generates the same gather for both, and the
    embedding's batching rule would fix the batch size (no dynamic batch dimension)."""
    if buffer.dim() == 2 and not torch.compiler.is_compiling():
        return torch.nn.functional.embedding(index, buffer)
    return buffer[index]


def add_buffer_rows(vector: torch.Tensor, buffer: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``vector + buffer.T @ weights`` for an ``(m, n)`` history buffer."""
    if buffer.shape[-1] > ELEMENTWISE_PRODUCTS_MAX_N:
        return torch.addmv(vector, buffer.mT, weights)
    return vector + (buffer * weights.unsqueeze(-1)).sum(-2)


def has_products(history: History) -> bool:
    """Whether the memory keeps the pairs' inner products (static: decided by their shape)."""
    return history.sy_products.shape[-1] != 0


def _with_row(
    buffer: torch.Tensor, slot: torch.Tensor, row: torch.Tensor, write: torch.Tensor, *, in_place: bool
) -> torch.Tensor:
    """``buffer`` with row ``slot`` (a 1-element index) set to ``row`` where ``write``: a copy,
    or ``buffer`` itself changed ``in_place``. Out of place, an ``index_put`` rather than a
    ``torch.where`` over the whole buffer: the same values, but under ``vmap`` it copies the
    batch's buffers and writes one row per problem instead of selecting every element
    (``bench/README.md``)."""
    update = torch.where(write, row, buffer_rows(buffer, slot).squeeze(0)).unsqueeze(0)
    return buffer.index_put_((slot,), update) if in_place else buffer.index_put((slot,), update)


def _with_new_column(products: torch.Tensor, column: torch.Tensor, slot: torch.Tensor, write: torch.Tensor,
                     *, symmetric: bool) -> torch.Tensor:  # fmt: skip
    """``products`` with column ``slot`` (and row, if ``symmetric``) set to ``column`` where ``write``."""
    in_slot = torch.arange(products.shape[-1], device=slot.device) == slot
    updated = torch.where(in_slot.unsqueeze(0) & write, column.unsqueeze(-1), products)
    if symmetric:
        updated = torch.where(in_slot.unsqueeze(-1) & write, column.unsqueeze(0), updated)
    return updated


def accept_curvature_pair(
    s: torch.Tensor, y: torch.Tensor, grad: torch.Tensor | None, rule: CurvatureRule, ops: Scalars = TENSORS,
    dot: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.dot,
) -> tuple[torch.Tensor, Any]:  # fmt: skip
    """Return ``(s'y, accept)`` for the pair ``(s, y)`` of a step taken from gradient ``grad``:
    ``s'y`` as a 0-d tensor, ``accept`` of the kind ``ops`` (a bool tensor, or a host bool
    decided on ``s'y`` read once). Only the ``"relative"`` rule reads ``grad``. ``dot``: the
    inner product (:mod:`torchlbfgs.sharding`'s for vectors sharded over processes)."""
    ys = dot(y, s)
    ys_scalar = ops.value(ys)
    if rule == "absolute":
        return ys, ys_scalar > TORCH_CURVATURE_THRESHOLD
    require_choice("curvature_rule", rule, CURVATURE_RULES)
    if grad is None:
        raise ValueError("accept_curvature_pair: the 'relative' rule needs the gradient the step was from")
    eps = torch.finfo(s.dtype).eps
    return ys, ys_scalar > eps * -ops.dot(s, grad)


def write_pair(
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor], s: torch.Tensor, y: torch.Tensor, ys: torch.Tensor,
    dot: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.dot,
) -> torch.Tensor:  # fmt: skip
    """An accepted pair written in place into one row of the memory, for an owner that tracks
    the ring's head and count on the host and keeps the buffers' rows as views (the
    :class:`torchlbfgs.LBFGS` adapter; ``rows``: the row of ``s_history``, ``y_history`` and
    ``rho``); return the new :math:`\\gamma`. Memories that keep inner products are written by
    :func:`push_curvature_pair`."""
    s_row, y_row, rho_row = rows
    s_row.copy_(s)
    y_row.copy_(y)
    torch.reciprocal(ys, out=rho_row)  # 1 / ys, as torch's `1.0 / ys` rounds it
    return ys / dot(y, y)


def push_curvature_pair(
    history: History,
    s: torch.Tensor,
    y: torch.Tensor,
    ys: torch.Tensor,
    accept: torch.Tensor,
    *,
    in_place: bool = False,
    buffer_dot: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = buffer_dot,
    dot: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.dot,
) -> History:
    r"""Write ``(s, y)`` into the slot ``head`` when ``accept`` is true; otherwise change nothing.

    When the buffer is full the oldest pair is overwritten, as ``torch.optim.LBFGS`` drops its
    oldest pair. The new scaling is :math:`\gamma = s^\top y / y^\top y` (N&W eq. 7.20).
    Out of place by default: the inputs are never modified, at the price of copying the
    ``(m, n)`` buffers. ``in_place=True`` writes the one row in the existing buffers instead
    (O(n)); only an owner of the state that no one else reads, such as the
    :class:`torchlbfgs.LBFGS` adapter, may ask for it. Both give the same values. When the
    memory keeps inner products, their new column is computed from the updated buffers (the
    small ``(m, m)`` matrices are always new tensors). An owner that decides on the host and
    tracks the ring there writes accepted pairs with :func:`write_pair` instead. ``buffer_dot``
    and ``dot``: the inner products (:mod:`torchlbfgs.sharding`'s for vectors sharded over
    processes).
    """
    m = history.s_history.shape[0]
    one = torch.ones((), dtype=ys.dtype, device=ys.device)
    safe_ys = torch.where(accept, ys, one)  # keep 1/ys finite in the branch not taken
    slot = history.head.reshape(1)
    s_history, y_history, rho = (
        _with_row(buffer, slot, new, accept, in_place=in_place)
        for buffer, new in ((history.s_history, s), (history.y_history, y), (history.rho, 1.0 / safe_ys))
    )
    sy_products, yy_products = history.sy_products, history.yy_products
    if has_products(history):
        # Column h: s_i'y_h for every slot i (the diagonal entry is exactly ys) and y_i'y_h.
        head = history.head
        s_dot_y = torch.where(torch.arange(m, device=head.device) == head, ys, buffer_dot(s_history, y))
        sy_products = _with_new_column(sy_products, s_dot_y, head, accept, symmetric=False)
        yy_products = _with_new_column(yy_products, buffer_dot(y_history, y), head, accept, symmetric=True)
    return History(
        s_history=s_history,
        y_history=y_history,
        rho=rho,
        gamma=torch.where(accept, ys / torch.where(accept, dot(y, y), one), history.gamma),
        head=torch.where(accept, (history.head + 1) % m, history.head),
        n_pairs=torch.where(accept, torch.clamp(history.n_pairs + 1, max=m), history.n_pairs),
        sy_products=sy_products,
        yy_products=yy_products,
    )
