r"""The L-BFGS-B search direction: generalized Cauchy point, then subspace minimization.

Byrd, Lu, Nocedal & Zhu (1995), "A limited memory algorithm for bound constrained
optimization", with the projection step of Morales & Nocedal (2011). At :math:`x` with
gradient :math:`g`, the quadratic model :math:`m(z) = g^\top (z - x) + \tfrac12 (z - x)^\top
B (z - x)` uses the L-BFGS Hessian approximation in compact form (Byrd, Nocedal & Schnabel
1994, Theorem 2.3)

.. math::
    B = \theta I - W M W^\top, \quad W = [Y \;\; \theta S], \quad
    M = \begin{bmatrix} -D & L^\top \\ L & \theta S^\top S \end{bmatrix}^{-1},

:math:`\theta = y^\top y / s^\top y` of the newest pair, :math:`D` the diagonal of
:math:`S^\top Y` and :math:`L` its part where the :math:`s` is newer than the :math:`y`.

1. **Generalized Cauchy point** (sec. 4): the first local minimizer of :math:`m` along the
   projected steepest-descent path :math:`x(t) = P(x - t g)`, piecewise linear with a
   breakpoint where each variable reaches its bound. ``lbfgsb.f`` walks the breakpoints one by
   one; here the model's slope :math:`f'_j` and curvature :math:`f''_j` on every segment come
   from cumulative sums over the sorted breakpoints (eqs. 4.4-4.9 summed in closed form), and
   the first segment holding a minimizer is found by a mask: a fixed number of kernels, no
   data-dependent loop.
2. **Subspace minimization** (sec. 5.1, direct primal method): with the variables at a bound
   at the Cauchy point held there, minimize :math:`m` over the others (the free set
   :math:`F`) by the Sherman-Morrison-Woodbury form of :math:`(Z^\top B Z)^{-1}`, a
   ``2m x 2m`` solve. The free set is a mask, never a gather, so shapes never depend on it.
3. **Back into the box**: the minimizer is projected onto the box, and if that no longer
   gives a descent direction, moved back along the subspace step to the box instead
   (Morales & Nocedal 2011).

The direction is :math:`d = \bar x - x`, with :math:`\bar x` feasible, so steps up to 1 (and up to
:func:`~torchlbfgs.bounds.max_step`) stay in the box.

Cost per iteration: a sort of the ``n`` breakpoints, ``O(m^2 n)`` arithmetic (the pairs'
products and :math:`M p_j` on every segment) with ``(2m, n + 1)`` temporaries, and three ``m x m``
Cholesky factorizations (one for :math:`M`, in :func:`compact_hessian`, two for the subspace
system, where an LU factorization of the whole ``2m x 2m`` matrix took twice their time).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn.functional import pad

from torchlbfgs.bounds import Bounds, project
from torchlbfgs.history import History, add_buffer_rows, buffer_dot

__all__ = [
    "CauchyPoint",
    "CompactHessian",
    "bounded_direction",
    "cauchy_point",
    "compact_hessian",
    "subspace_step",
]


class CompactHessian(NamedTuple):
    r""":math:`B = \theta I - W M W^\top`, kept as :math:`W^\top`, :math:`M` and :math:`M^{-1}`.

    Attributes:
        theta: ``()`` - :math:`\theta`.
        w_rows: ``(2m, n)`` - :math:`W^\top`: the ``y`` rows, then the ``theta s`` rows, in
            slot order; zero rows for empty slots.
        middle: ``(2m, 2m)`` - :math:`M^{-1}`, with a unit diagonal entry for each empty slot
            (which then contributes nothing).
        m_matrix: ``(2m, 2m)`` - :math:`M` itself, from the block inverse of ``middle``
            (:func:`compact_hessian`).
        factored: ``()`` bool - the ``m x m`` Cholesky factorization behind :math:`M` worked
            (false only for a memory too ill-conditioned to be positive definite in floating
            point; :func:`bounded_direction` then falls back to the projected gradient).
    """

    theta: torch.Tensor
    w_rows: torch.Tensor
    middle: torch.Tensor
    m_matrix: torch.Tensor
    factored: torch.Tensor

    def times(self, vector: torch.Tensor) -> torch.Tensor:
        """:math:`B v`."""
        # Matrix-vector products as elementwise products and sums (buffer_dot): a BLAS
        # matrix-vector product rounds differently batched (one matrix-matrix kernel) and
        # alone, and a problem in a batch must take the steps it takes alone.
        inner = (self.m_matrix * buffer_dot(self.w_rows, vector)).sum(-1)
        return add_buffer_rows(self.theta * vector, self.w_rows, -inner)


def _solve_saddle(matrix: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(matrix^-1 rhs, solved)`` for the subspace system
    :math:`\begin{bmatrix} -C & E^\top \\ E & F \end{bmatrix}`, ``2m x 2m`` with :math:`C`
    and :math:`F + E C^{-1} E^\top` positive definite, by block elimination with two ``m x m``
    Cholesky factorizations (L-BFGS-B's ``formk``, its :math:`LEL^\top` factorization):
    :math:`C = L_1 L_1^\top`, :math:`G = L_1^{-1} E^\top`, :math:`F + G^\top G = L_2 L_2^\top`.
    ``solved`` is false where a factorization met a pivot that is not positive."""
    m = matrix.shape[-1] // 2
    r1, r2 = rhs[..., :m, :], rhs[..., m:, :]
    l1, first = torch.linalg.cholesky_ex(-matrix[..., :m, :m])
    g, h = _solve_lower(l1, matrix[..., :m, m:]), _solve_lower(l1, r1)  # L1^-1 E', L1^-1 r1
    # -C u1 + E' u2 = r1 and E u1 + F u2 = r2 give (F + E C^-1 E') u2 = r2 + E C^-1 r1, where
    # E C^-1 E' = G'G and E C^-1 r1 = G'h; then u1 = C^-1 (E' u2 - r1) = L1^-T (G u2 - h).
    l2, second = torch.linalg.cholesky_ex(matrix[..., m:, m:] + g.mT @ g)
    u2 = torch.cholesky_solve(r2 + g.mT @ h, l2)
    u1 = _solve_lower(l1, g @ u2 - h, transposed=True)
    return torch.stack((u1, u2), -3).reshape(rhs.shape), (first == 0) & (second == 0)


def _solve_lower(lower: torch.Tensor, rhs: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """``L^-1 rhs`` (``L^-T rhs`` if ``transposed``) for a lower-triangular ``L``."""
    solved: torch.Tensor = torch.linalg.solve_triangular(
        lower.mT if transposed else lower, rhs, upper=transposed
    )
    return solved


def _blocks(top_left: torch.Tensor, top_right: torch.Tensor, bottom_left: torch.Tensor,
            bottom_right: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The ``2m x 2m`` matrix of four ``m x m`` blocks (stacked: torch.cat under a compiled vmap
    fixes the batch size)."""
    m = top_left.shape[-1]
    top = torch.stack((top_left, top_right), -2).reshape(m, 2 * m)
    bottom = torch.stack((bottom_left, bottom_right), -2).reshape(m, 2 * m)
    return torch.stack((top, bottom), -3).reshape(2 * m, 2 * m)


def compact_hessian(history: History) -> CompactHessian:
    r"""The compact form of :math:`B = H^{-1}` for the pairs in ``history`` (any slot order).

    :math:`M` is the block inverse of :math:`M^{-1} = [[-D, L^\top], [L, \theta S^\top S]]`
    through the ``m x m`` Schur complement :math:`J = \theta S^\top S + L D^{-1} L^\top`,
    positive definite (L-BFGS-B's ``formt``), by a Cholesky factorization:

    .. math::
        M = \begin{bmatrix} -D^{-1} + D^{-1} L^\top J^{-1} L D^{-1} & D^{-1} L^\top J^{-1} \\
            J^{-1} L D^{-1} & J^{-1} \end{bmatrix}.

    (An ``m x m`` Cholesky costs a fraction of a ``2m x 2m`` factorization, and :math:`M` once
    formed turns every later product into a matrix multiplication.)
    """
    m = history.s_history.shape[-2]
    valid = history.rho != 0
    s = history.s_history * valid.unsqueeze(-1)
    y = history.y_history * valid.unsqueeze(-1)
    theta = torch.reciprocal(history.gamma)
    sy = s @ y.mT  # sy[i, j] = s_i'y_j
    ss = s @ s.mT
    age = torch.remainder(history.head - 1 - torch.arange(m, device=history.head.device), m)  # 0: newest
    s_newer = age.unsqueeze(-1) < age.unsqueeze(0)
    lower = torch.where(s_newer, sy, torch.zeros_like(sy))  # L: s_i'y_j with pair i newer than j
    # Diagonals by masking with the identity (diag_embed under a compiled vmap fixes the batch
    # size). Empty slots get unit entries: their rows of W are zero, so they change nothing.
    eye = torch.eye(m, dtype=sy.dtype, device=sy.device)
    empty = eye * (~valid).to(sy.dtype).unsqueeze(-1)
    d = torch.where(valid, (sy * eye).sum(-1), 1.0)  # D, s_i'y_i
    middle = _blocks(-d.unsqueeze(-1) * eye, lower.mT, lower, theta * ss + empty)
    d_inv_lower_t = lower.mT / d.unsqueeze(-1)  # D^-1 L'
    schur = theta * ss + lower @ d_inv_lower_t + empty  # J
    cholesky_factor, info = torch.linalg.cholesky_ex(schur)
    j_inv = torch.cholesky_inverse(cholesky_factor)
    top_right = d_inv_lower_t @ j_inv
    m_matrix = _blocks(top_right @ d_inv_lower_t.mT - eye / d.unsqueeze(-1), top_right, top_right.mT, j_inv)
    w_rows = torch.stack((y, theta * s), -3).reshape(2 * m, y.shape[-1])
    return CompactHessian(theta, w_rows, middle, m_matrix, info == 0)


class CauchyPoint(NamedTuple):
    """The generalized Cauchy point :math:`x^c = P(x - t^* g)`.

    Attributes:
        point: ``(n,)`` - :math:`x^c`.
        step: ``()`` - :math:`t^*`.
        free: ``(n,)`` bool - the variables not held at a bound at :math:`x^c` (the free set
            of the subspace minimization).
    """

    point: torch.Tensor
    step: torch.Tensor
    free: torch.Tensor


def _breakpoints(x: torch.Tensor, grad: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """:math:`t_i`, where :math:`x_i - t g_i` reaches its bound (eq. 4.1); ``inf`` if never."""
    to_bound = torch.where(grad < 0, x - bounds.upper, torch.where(grad > 0, x - bounds.lower, torch.inf))
    t = torch.where(grad != 0, to_bound / grad, torch.inf)
    return torch.clamp(torch.nan_to_num(t, nan=torch.inf), min=0.0)


def _suffix_sums(values: torch.Tensor) -> torch.Tensor:
    """``out[..., j] = values[..., j:].sum(-1)``."""
    return torch.flip(torch.cumsum(torch.flip(values, (-1,)), -1), (-1,))


def cauchy_point(x: torch.Tensor, grad: torch.Tensor, bounds: Bounds, hessian: CompactHessian) -> CauchyPoint:
    r"""The first local minimizer of the quadratic model along :math:`P(x - t g)`.

    On the segment :math:`[t_j, t_{j+1}]` between consecutive breakpoints, with the variables
    whose breakpoint is at most :math:`t_j` held, the model's derivative along the path is
    :math:`f'_j + (t - t_j) f''_j` with

    .. math::
        f'_j = -G_j + \theta t_j G_j - c_j^\top M p_j, \qquad f''_j = \theta G_j - p_j^\top M p_j,

    :math:`G_j = \sum_{i\ \mathrm{free}} g_i^2`, :math:`p_j = W^\top d_j` and
    :math:`c_j = W^\top (x(t_j) - x)` (eqs. 4.4-4.9, each summed over the sorted breakpoints).
    :math:`t^*` is :math:`t_j` on the first segment whose :math:`f'_j \ge 0`, or
    :math:`t_j - f'_j / f''_j` on the first whose minimizer lies inside it.
    """
    theta, w_rows = hessian.theta, hessian.w_rows
    t_break = _breakpoints(x, grad, bounds)
    moving = t_break > 0  # a variable at a bound that the gradient pushes out never moves
    g = torch.where(moving, grad, torch.zeros_like(grad))
    # The segments' ends straight from one sort of [0, t, inf] (0 <= t, and a stable sort keeps
    # the added ends outermost): segment j = 0..n runs from grid[j] to grid[j + 1], and both
    # are slices of the sort's output. Re-gathered through `order`, or padded, a compiled round
    # would recompute them in every expression that reads them (padding with a masked load).
    grid, grid_order = torch.sort(pad(pad(t_break, (1, 0)), (0, 1), value=torch.inf), stable=True)
    t_sorted, order = grid[1:-1], grid_order[1:-1] - 1
    finite = torch.isfinite(t_sorted)
    g2_sorted = (g * g)[order]
    # The segment tables hold one column per segment, (2m, n + 1): every table, the products
    # with M included, then shares one layout (rows of some and columns of others made a
    # compiled round gather and transpose them element by element).
    b_sorted = (w_rows * g)[:, order]  # (2m, n): column i is g_i w_i, in breakpoint order
    # Quantities at the start of segment j = 0..n, where the first j variables are held: sums
    # over the free ones as suffix sums (no cancellation), over the held ones as prefix sums.
    # (Padding rather than torch.cat, which fixes the batch size under a compiled vmap.)
    free_g2 = pad(_suffix_sums(g2_sorted), (0, 1))  # G_j
    p = -pad(_suffix_sums(b_sorted), (0, 1))  # column j: p_j = W'd_j
    held_tb = torch.where(finite, t_sorted * b_sorted, 0.0)
    tb_held = pad(torch.cumsum(held_tb, -1), (1, 0))
    starts, ends = grid[:-1], grid[1:]  # t_j, t_{j+1}
    starts_finite = torch.isfinite(starts)
    safe_starts = torch.where(starts_finite, starts, torch.zeros_like(starts))
    m_p = hessian.m_matrix @ p  # M p_j, every segment at once
    p_m_p = (p * m_p).sum(-2)
    # c_j = W'(x(t_j) - x) = -tb_held_j + t_j p_j, so c_j'M p_j = -tb_held_j'M p_j + t_j p_j'M p_j:
    # with t_j taken out of the sum over rows, a compiled round does not recompute the segment
    # starts (and p_j, from its suffix sums) once per row of the tables.
    c_m_p = -(tb_held * m_p).sum(-2) + safe_starts * p_m_p
    slope = -free_g2 + theta * safe_starts * free_g2 - c_m_p
    curvature = theta * free_g2 - p_m_p
    length = ends - starts
    inside = (curvature > 0) & (-slope < length * curvature)
    holds = starts_finite & ((slope >= 0) | inside)
    holds = holds | (torch.arange(holds.shape[-1], device=holds.device) == holds.shape[-1] - 1)  # fallback
    # The first segment that holds, as a mask (its cumulative count is 1 there for the first
    # time): indexing by a 0-d tensor is data-dependent to torch.compile, a gather under a
    # compiled vmap fixes the batch size, and an argmax got fused with the segment arithmetic
    # into one slow kernel.
    count = torch.cumsum(holds.to(torch.int32), -1)
    chosen = holds & (count == 1)
    t_j, slope_j, curvature_j = (
        torch.where(chosen, values, 0.0).sum(-1) for values in (starts, slope, curvature)
    )
    minimizer = torch.where(curvature_j > 0, -slope_j / torch.where(curvature_j > 0, curvature_j, 1.0), 0.0)
    step = torch.where(slope_j >= 0, t_j, t_j + torch.clamp(minimizer, min=0.0))
    step = torch.where(torch.isfinite(step), step, torch.zeros_like(step))
    point = project(x - step * grad, bounds)
    free = (t_break > step) & (bounds.lower < bounds.upper)
    return CauchyPoint(point, step, free)


def subspace_step(
    x: torch.Tensor, grad: torch.Tensor, cauchy: CauchyPoint, hessian: CompactHessian
) -> torch.Tensor:
    r"""The Newton step of the model on the free variables from :math:`x^c` (sec. 5.1).

    :math:`d = -(Z^\top B Z)^{-1} r` with the reduced gradient
    :math:`r = Z^\top (g + B (x^c - x))` and, by Sherman-Morrison-Woodbury,

    .. math::
        (Z^\top B Z)^{-1} = \tfrac1\theta I + \tfrac1{\theta^2} Z^\top W
            \big(M^{-1} - \tfrac1\theta W^\top Z Z^\top W\big)^{-1} W^\top Z.

    Zero on the variables held at a bound.
    """
    theta, w_rows, free = hessian.theta, hessian.w_rows, cauchy.free
    zero = torch.zeros_like(grad)
    model_grad = grad + hessian.times(cauchy.point - x)
    r = torch.where(free, model_grad, zero)
    w_free = torch.where(free, w_rows, zero)
    reduced = hessian.middle - (w_free @ w_free.mT) / theta
    v, solved = _solve_saddle(reduced, buffer_dot(w_rows, r).unsqueeze(-1))
    v = torch.where(solved, v.squeeze(-1), torch.nan)  # a failed solve: the direction is not finite
    return -r / theta - torch.where(free, add_buffer_rows(zero, w_rows, v), zero) / theta**2


def bounded_direction(x: torch.Tensor, grad: torch.Tensor, history: History, bounds: Bounds) -> torch.Tensor:
    """The L-BFGS-B direction :math:`d = \\bar x - x` at a feasible ``x`` (module docstring).

    Examples:
        >>> import torch, torchlbfgs
        >>> from torchlbfgs.bounds import Bounds
        >>> from torchlbfgs.bounded_direction import bounded_direction
        >>> x = torch.tensor([0.0, 0.5], dtype=torch.float64)
        >>> state = torchlbfgs.init(lambda x: ((x - 2) ** 2).sum(), x)  # g = (-4, -3)
        >>> box = Bounds(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
        >>> bounded_direction(x, state.grad, state.history, box)
        tensor([1.0000, 0.5000], dtype=torch.float64)
    """
    hessian = compact_hessian(history)
    cauchy = cauchy_point(x, grad, bounds, hessian)
    step = subspace_step(x, grad, cauchy, hessian)
    newton = cauchy.point + step
    projected = project(newton, bounds)
    # Morales & Nocedal (2011): keep the projection if it still descends, else stop the
    # subspace step at the box (the largest fraction of it that stays feasible).
    descends = torch.dot(grad, projected - x) < 0
    room = torch.where(
        step > 0, bounds.upper - cauchy.point, torch.where(step < 0, bounds.lower - cauchy.point, torch.inf)
    )
    fraction = torch.clamp(torch.where(step != 0, room / step, torch.inf).amin(-1), min=0.0, max=1.0)
    backtracked = project(cauchy.point + fraction * step, bounds)
    direction = torch.where(descends, projected, backtracked) - x
    # A memory too ill-conditioned to factor: the projected steepest-descent step instead.
    usable = hessian.factored & torch.isfinite(direction).all()
    return torch.where(usable, direction, project(x - grad, bounds) - x)
