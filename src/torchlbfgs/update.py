r"""``init`` and ``update``: L-BFGS as pure functions over :class:`~torchlbfgs.LBFGSState`.

One iteration (Nocedal & Wright, Algorithm 7.5):

1. direction :math:`d_k = -H_k g_k` by the compact representation or the two-loop recursion
   (:mod:`torchlbfgs.direction`);
2. a line search for :math:`t_k` along :math:`d_k`;
3. :math:`x_{k+1} = x_k + t_k d_k`, and the pair :math:`s_k = t_k d_k`,
   :math:`y_k = g_{k+1} - g_k` enters the memory if its curvature is acceptable.

The first trial step is ``learning_rate``, except on the very first iteration where it is
``min(1, 1/|g_0|_1) * learning_rate`` (torch's choice: the first direction is unscaled).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch._C._functorch import is_functorch_wrapped_tensor

from torchlbfgs.bounded_direction import bounded_direction
from torchlbfgs.bounds import (
    Bounds,
    BoundsLike,
    flat_bounds,
    infeasible,
    max_step,
    project,
    projected_gradient,
)
from torchlbfgs.direction import Direction, inv_hessian_product, uses_compact_form
from torchlbfgs.history import (
    CURVATURE_RULES,
    CurvatureRule,
    accept_curvature_pair,
    push_curvature_pair,
)
from torchlbfgs.line_searches import LineSearch, check_line_search_options, search_along
from torchlbfgs.line_searches.loop import exits_early
from torchlbfgs.line_searches.method import no_step_limit
from torchlbfgs.line_searches.result import FlatLineSearchResult
from torchlbfgs.norms import max_abs
from torchlbfgs.objective import flat_objective
from torchlbfgs.options import (
    Tolerances,
    checks_option_names,
    require_choice,
    require_count,
    require_step_options,
)
from torchlbfgs.pytree import ravel_pytree
from torchlbfgs.scalars import TENSORS
from torchlbfgs.sharding import LOCAL, Reductions
from torchlbfgs.state import LBFGSState, StopReason
from torchlbfgs.stopping import at_precision_limit, stop_reason

__all__ = ["Proposal", "accept", "init", "initial_state", "propose", "starting_status", "update"]

PyTree = Any


def _status(code: StopReason, like: torch.Tensor) -> torch.Tensor:
    return torch.full((), code.value, dtype=torch.int64, device=like.device)


@checks_option_names
def init(
    fun: Callable[..., Any],
    params: PyTree,
    *,
    history_size: int = 10,
    direction: Direction = "two_loop",
    value_and_grad: bool = False,
    check_finite: bool | None = None,
    bounds: BoundsLike = None,
) -> LBFGSState:
    """Evaluate ``fun`` and its gradient at ``params`` and return the initial state.

    Args:
        fun: ``fun(params) -> scalar tensor``; or, with ``value_and_grad=True``,
            ``fun(params) -> (value, grad)`` with ``grad`` shaped like ``params``.
        params: the starting point, any pytree of floating (or complex) tensors of one dtype.
        history_size: ``m``, the number of curvature pairs kept.
        direction: how :math:`H_k g_k` is computed: ``"two_loop"`` (the two-loop recursion,
            faster on CPUs) or ``"compact"`` (the compact representation; the state then
            keeps the ``(m, m)`` products of the pairs). Both give the same direction up to
            rounding (:mod:`torchlbfgs.direction`); the choice is part of the state.
        value_and_grad: see ``fun``.
        check_finite: raise ``ValueError`` when the value or gradient at ``params`` is NaN or
            infinite. ``None`` (default) checks where reading it is free: eager CPU tensors
            outside ``vmap`` and ``torch.compile``; ``True`` everywhere (a device sync on
            GPUs); ``False`` never.
        bounds: ``(lower, upper)`` box constraints for L-BFGS-B (see :func:`update`); ``fun``
            is then evaluated at ``params`` projected onto the box.

    Returns:
        an :class:`~torchlbfgs.LBFGSState` with an empty history. When the start is not finite
        and not checked (under ``vmap``, for instance), its status is ``NON_FINITE`` and
        ``update`` leaves it as it is.

    Examples:
        >>> import torch, torchlbfgs
        >>> state = torchlbfgs.init(lambda p: (p["w"] ** 2).sum(), {"w": torch.ones(3)})
        >>> state.value, state.grad, state.s_history.shape
        (tensor(3.), tensor([2., 2., 2.]), torch.Size([10, 3]))
    """
    require_count("history_size", history_size, 1)
    x, unravel = ravel_pytree(params)
    box = flat_bounds(bounds, params)
    if box is not None:
        x = project(x, box)
    value, grad = flat_objective(fun, unravel, value_and_grad=value_and_grad)(x)
    checks = check_finite if check_finite is not None else (
        exits_early(None, value) and not is_functorch_wrapped_tensor(value)
    )  # fmt: skip
    state = initial_state(
        value.to(x.dtype), grad, history_size=history_size, direction=direction, bounds=box,
        reductions=unravel.reductions,
    )  # fmt: skip
    # initial_state has already tested finiteness: its status is the one value to read
    if checks and bool(state.status == StopReason.NON_FINITE.value):  # sync-ok: check_finite
        what = "gradient" if bool(torch.isfinite(value)) else "value"  # sync-ok: the error path
        raise ValueError(
            f"init: the {what} of fun at params is not finite (NaN or Inf); start from a point "
            "where fun and its gradient are finite (or pass check_finite=False to get a state "
            "with status NON_FINITE instead)"
        )
    return state


def initial_state(
    value: torch.Tensor,
    grad: torch.Tensor,
    *,
    history_size: int,
    direction: Direction = "two_loop",
    bounds: Bounds | None = None,
    reductions: Reductions = LOCAL,
) -> LBFGSState:
    """The state at a point with value ``value`` and flat gradient ``grad`` (one evaluation
    counted, empty history); status ``INVALID_BOUNDS`` where ``bounds`` cross, ``NON_FINITE``
    where the point is not finite (on any process, with sharded ``reductions``). :func:`init`
    is this after evaluating ``fun``."""
    require_count("history_size", history_size, 1)
    products = history_size if uses_compact_form(direction) else 0
    status = starting_status(value, grad, bounds, reductions)
    # Every leaf is built from value/grad, so that under vmap each is a real batched tensor
    # (not a shared, stride-0 expansion): compile guards and in-place owners rely on it.
    return LBFGSState(
        value=value,
        grad=grad,
        s_history=torch.zeros_like(grad).expand(history_size, -1).contiguous(),
        y_history=torch.zeros_like(grad).expand(history_size, -1).contiguous(),
        rho=torch.zeros_like(value).expand(history_size).contiguous(),
        gamma=torch.ones_like(value),
        head=torch.zeros_like(value, dtype=torch.int64),
        n_pairs=torch.zeros_like(value, dtype=torch.int64),
        sy_products=torch.zeros_like(value).expand(products, products).contiguous(),
        yy_products=torch.zeros_like(value).expand(products, products).contiguous(),
        iteration=torch.zeros_like(value, dtype=torch.int64),
        n_evals=torch.ones_like(value, dtype=torch.int64),
        status=status,
    )


def starting_status(
    value: torch.Tensor, grad: torch.Tensor, bounds: Bounds | None = None, reductions: Reductions = LOCAL
) -> torch.Tensor:
    """The status at a solve's first point: ``RUNNING``, or ``NON_FINITE`` where its value or
    gradient is not finite, or ``INVALID_BOUNDS`` where ``bounds`` cross."""
    finite = torch.isfinite(value) & reductions.all(torch.isfinite(grad).all())
    status = torch.where(finite, _status(StopReason.RUNNING, grad), _status(StopReason.NON_FINITE, grad))
    if bounds is not None:
        status = torch.where(infeasible(bounds), StopReason.INVALID_BOUNDS.value, status)
    return status


def _check_state(state: LBFGSState, x: torch.Tensor) -> None:
    if not isinstance(state, LBFGSState):
        raise TypeError(f"state must be an LBFGSState (from torchlbfgs.init), got {type(state).__name__}")
    n = x.numel()
    if state.grad.shape != (n,):
        raise ValueError(
            f"state.grad has shape {tuple(state.grad.shape)} but params have {n} values; "
            "was the state made by init() for these params?"
        )
    if state.s_history.shape[-1] != n or state.y_history.shape != state.s_history.shape:
        raise ValueError(
            f"state history has shapes {tuple(state.s_history.shape)} / {tuple(state.y_history.shape)}; "
            f"expected (history_size, {n}) for both"
        )
    m = state.s_history.shape[-2]
    for name in ("sy_products", "yy_products"):
        shape = tuple(getattr(state, name).shape)
        if shape not in ((m, m), (0, 0)):
            raise ValueError(f"state.{name} has shape {shape}; expected ({m}, {m}) or (0, 0)")
    if state.grad.dtype != x.dtype:
        raise TypeError(f"state is {state.grad.dtype} but params are {x.dtype}")


class Proposal(NamedTuple):
    """An iteration's plan, made before its line search (see :func:`propose`).

    Attributes:
        direction: ``(n,)`` - :math:`d_k = -H_k g_k`.
        step_size: ``()`` - the first trial step of the line search.
        searching: ``()`` bool - the line search runs (the problem is running, the gradient
            is not yet small and :math:`d_k` is a descent direction).
        attempted: ``()`` bool - the iteration counts in ``iteration`` (it got past the
            gradient test, as torch's ``n_iter`` counts).
        status: ``()`` int64 - the stop reason if the iteration ends before its line search.
        max_step: ``()`` - the largest step that stays in the box (bounded problems; the line
            search tries nothing beyond it); without bounds, an empty tensor
            (:func:`~torchlbfgs.line_searches.method.no_step_limit`).
    """

    direction: torch.Tensor
    step_size: torch.Tensor
    slope: torch.Tensor
    searching: torch.Tensor
    attempted: torch.Tensor
    status: torch.Tensor
    max_step: torch.Tensor


def propose(
    state: LBFGSState,
    *,
    learning_rate: float,
    tolerance_grad: float,
    tolerance_change: float,
    early_exit: bool | None = None,
    x: torch.Tensor | None = None,
    bounds: Bounds | None = None,
    reductions: Reductions = LOCAL,
) -> Proposal:
    """Direction and first trial step from the current state (steps 1-2 of an iteration).

    ``early_exit`` is passed to :func:`~torchlbfgs.direction.inv_hessian_product`. With
    ``bounds``, the direction is L-BFGS-B's from the feasible point ``x``
    (:mod:`torchlbfgs.bounded_direction`), the gradient test is on the projected gradient, and
    the first trial is L-BFGS-B's (``lnsrlb``): :math:`\\min(1, 1/\\|d\\|_2)` on the first
    iteration unless every variable has both bounds, 1 after, times ``learning_rate``, and
    never beyond the box (nor beyond 1 on the first iteration). ``reductions`` take the inner
    products and norms (:mod:`torchlbfgs.sharding`).
    """
    grad = state.grad
    running = state.status == StopReason.RUNNING.value
    limit = None
    if bounds is None:
        direction = -inv_hessian_product(state, grad, early_exit=early_exit, reductions=reductions)
        grad_small = reductions.max_abs(grad) <= tolerance_grad
        first_step = torch.clamp(torch.reciprocal(reductions.abs_sum(grad)), max=1.0)
    else:
        if x is None:
            raise ValueError("propose: a bounded problem needs the current point x")
        direction = bounded_direction(x, grad, state.history, bounds)
        grad_small = max_abs(projected_gradient(x, grad, bounds)) <= tolerance_grad
        boxed = (torch.isfinite(bounds.lower) & torch.isfinite(bounds.upper)).all()
        first_step = torch.where(
            boxed, 1.0, torch.clamp(torch.reciprocal(torch.linalg.vector_norm(direction)), max=1.0)
        )
        feasible = max_step(x, direction, bounds)
        limit = torch.where(state.iteration == 0, torch.clamp(feasible, max=1.0), feasible)
    slope = reductions.dot(grad, direction)
    no_descent = slope > -tolerance_change
    step_size = torch.where(state.iteration == 0, first_step, torch.ones_like(first_step)) * learning_rate
    if limit is not None:
        step_size = torch.minimum(step_size, limit)
    status = torch.where(
        grad_small,
        _status(StopReason.GRADIENT_TOLERANCE, grad),
        torch.where(
            no_descent,
            _status(StopReason.DIRECTIONAL_DERIVATIVE_TOLERANCE, grad),
            _status(StopReason.RUNNING, grad),
        ),
    )
    return Proposal(
        direction=direction,
        step_size=step_size,
        slope=slope,
        searching=running & ~grad_small & ~no_descent,
        attempted=running & ~grad_small,
        status=torch.where(running, status, state.status),
        max_step=no_step_limit(state.value) if limit is None else limit,
    )


def accept(
    x: torch.Tensor,
    state: LBFGSState,
    proposal: Proposal,
    found: FlatLineSearchResult,
    *,
    line_search: LineSearch,
    tolerance_grad: float,
    tolerance_change: float,
    curvature_rule: CurvatureRule,
    max_evals: int | None = None,
    tolerance_value: float = 0.0,
    active: torch.Tensor | None = None,
    bounds: Bounds | None = None,
    reductions: Reductions = LOCAL,
) -> tuple[torch.Tensor, LBFGSState]:
    """Take the step the line search found, update the memory and decide whether to stop.

    The step is taken when it is finite and either meets the line search's conditions or
    lowers the value (``line_search=None`` always takes a finite step, as torch does);
    otherwise the problem stops with ``LINE_SEARCH_FAILED`` (``PRECISION_LIMIT`` where the
    direction promised no decrease visible at ``f``'s precision; ``NON_FINITE``) and stays put.
    A step that changed no coordinate of ``x`` (it fell below the spacing of floating-point
    numbers) stops with ``STEP_TOLERANCE``; ``torch.optim.LBFGS`` has no such test, and its
    schedule (:mod:`torchlbfgs.torch_schedule`) has none either. Returns the new flat params
    and state.

    ``active`` (optional) restricts where the memory may change: a caller that keeps the old
    state wherever ``active`` is false (the evaluation rounds, for problems still searching)
    then needs no selection of the ``(m, n)`` buffers, which are left bitwise as they were.

    With ``bounds`` the new point is projected onto the box (a no-op but for rounding: the
    search stays within the feasible segment), the pair's :math:`s` is the step actually taken,
    and the gradient test is on the projected gradient. ``reductions``: as in :func:`propose`.
    """
    value, grad, searching = state.value, state.grad, proposal.searching
    t, new_value, new_grad = found.step_size, found.value.to(x.dtype), found.grad
    finite = torch.isfinite(new_value) & reductions.all(torch.isfinite(new_grad).all())
    acceptable = found.success | (new_value < value) if line_search is not None else found.success
    taken = searching & finite & acceptable

    if bounds is None:
        moved = torch.addcmul(x, proposal.direction, t)
        step = t * proposal.direction
        new_grad_norm = reductions.max_abs(new_grad)
    else:
        moved = project(torch.addcmul(x, proposal.direction, t), bounds)
        step = moved - x
        new_grad_norm = max_abs(projected_gradient(moved, new_grad, bounds))
    y = new_grad - grad
    ops = reductions.scalars(TENSORS)
    ys, curvature_ok = accept_curvature_pair(step, y, grad, curvature_rule, ops, dot=reductions.dot)
    push = taken & curvature_ok
    history = push_curvature_pair(
        state.history, step, y, ys, push if active is None else push & active,
        buffer_dot=reductions.buffer_dot, dot=reductions.dot,
    )  # fmt: skip
    new_x = torch.where(taken, moved, x)
    stalled = reductions.all((new_x == x).all())
    n_evals = state.n_evals + found.n_evals
    out_of_evals = torch.zeros_like(taken) if max_evals is None else n_evals >= max_evals

    value_small = (new_value - value).abs() < tolerance_change
    if isinstance(tolerance_value, torch.Tensor) or tolerance_value > 0:  # an option, not a value
        # L-BFGS-B's relative test of the decrease (its `ftol`)
        scale = torch.maximum(torch.maximum(value.abs(), new_value.abs()), torch.ones_like(value))
        value_small = value_small | ((value - new_value <= tolerance_value * scale) & (tolerance_value > 0))
    failed = searching & ~taken
    status = stop_reason(
        TENSORS, proposal.status,
        non_finite=searching & ~finite & (found.n_evals > 0),
        search_failed_at_precision=failed & at_precision_limit(value, proposal.slope),
        failed_out_of_evals=failed & out_of_evals,
        search_failed=failed,
        grad_small=taken & (new_grad_norm <= tolerance_grad),
        step_small=taken & ((reductions.max_abs(step) <= tolerance_change) | stalled),
        value_small=taken & value_small,
        out_of_evals=taken & out_of_evals,
    )  # fmt: skip

    new_state = LBFGSState(
        value=torch.where(taken, new_value, value),
        grad=torch.where(taken, new_grad, grad),
        **history._asdict(),
        iteration=state.iteration + proposal.attempted.long(),
        n_evals=n_evals,
        status=status,
    )
    return new_x, new_state


@checks_option_names
def update(
    fun: Callable[..., Any],
    params: PyTree,
    state: LBFGSState,
    *,
    line_search: LineSearch = "strong_wolfe",
    learning_rate: float = 1.0,
    tolerance_grad: float = 1e-7,
    tolerance_change: float | None = None,
    tolerance_value: float | None = None,
    curvature_rule: CurvatureRule = "relative",
    c1: float = 1e-4,
    c2: float = 0.9,
    max_ls: int = 25,
    max_evals: int | None = None,
    value_and_grad: bool = False,
    early_exit: bool | None = None,
    bounds: BoundsLike = None,
) -> tuple[PyTree, LBFGSState]:
    """Take one L-BFGS iteration from ``params``; return the new params and state.

    Pure: neither ``params`` nor ``state`` is modified. Branch-free on tensor values, so
    ``torch.func.vmap(update)`` runs a batch of problems, each stopping on its own: once a
    problem's ``state.status`` is not ``RUNNING``, ``update`` returns its params and state
    unchanged.

    Args:
        fun: ``fun(params) -> scalar tensor`` (or ``(value, grad)`` with ``value_and_grad``).
        params: the current point; ``state`` must have been built for it by :func:`init`
            or a previous ``update``.
        state: the current :class:`~torchlbfgs.LBFGSState`.
        line_search: ``"strong_wolfe"``, ``"more_thuente"``, ``"backtracking"`` or ``None`` (fixed step).
        learning_rate: the first trial step of each line search (torch's ``lr``).
        tolerance_grad: converged when ``max|g| <= tolerance_grad``.
        tolerance_change: converged when the value changes by less than this, the step
            ``max|x_{k+1} - x_k|`` is at most this, or the directional derivative exceeds
            ``-tolerance_change`` (torch's absolute tests). Default: 1e-9, or 0 (off) when
            ``tolerance_value`` is given (:class:`~torchlbfgs.options.Tolerances`).
        tolerance_value: converged when the relative decrease
            ``(f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1)`` is at most this (L-BFGS-B's
            ``ftol``; scipy's default is 2.2e-9). Default: not tested.
        curvature_rule: ``"relative"`` (L-BFGS-B's scale-free test) or ``"absolute"``
            (torch's ``s'y > 1e-10``); see :mod:`torchlbfgs.history`.
        c1: the line search's sufficient-decrease constant.
        c2: the line search's curvature constant.
        max_ls: iteration limit of each line search (torch's ``max_ls``).
        max_evals: total budget of evaluations over the whole run (counted in
            ``state.n_evals``); the problem stops with ``MAX_EVALS`` when it is used up.
        value_and_grad: ``fun`` returns ``(value, grad)`` itself.
        early_exit: see :mod:`torchlbfgs.line_searches.loop`.
        bounds: ``(lower, upper)``: minimise subject to ``lower <= params <= upper`` by
            L-BFGS-B (:mod:`torchlbfgs.bounded_direction`; pass the same bounds to
            :func:`init`). Each side is a float, a tensor broadcastable to every leaf, ``None``
            (unbounded) or a pytree like ``params`` of those; ``-inf``/``inf`` mean unbounded.
            ``params`` outside the box are projected onto it. Every point ``fun`` sees and
            every iterate lies in the box, and ``tolerance_grad`` tests the projected
            gradient. ``None`` (default): no bounds, and no extra work.

    Returns:
        ``(new_params, new_state)``; ``new_params`` has the structure and dtypes of ``params``.

    Examples:
        >>> import torch, torchlbfgs
        >>> fun = lambda x: ((x - torch.arange(3.0, dtype=x.dtype)) ** 2).sum()
        >>> x = torch.zeros(3, dtype=torch.float64)
        >>> state = torchlbfgs.init(fun, x)
        >>> for _ in range(5):
        ...     x, state = torchlbfgs.update(fun, x, state)
        >>> torch.allclose(x, torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
        True
        >>> torchlbfgs.status_message(state.status)
        'converged: max|gradient| <= tolerance_grad'
    """
    check_line_search_options(line_search, c1, c2, max_ls)
    require_step_options(learning_rate, tolerance_grad, tolerance_change, tolerance_value)
    require_choice("curvature_rule", curvature_rule, CURVATURE_RULES)
    tolerances = Tolerances.of(tolerance_change, tolerance_value)
    x, unravel = ravel_pytree(params)
    _check_state(state, x)
    box = flat_bounds(bounds, params)
    reductions = unravel.reductions
    if box is not None:
        x = project(x, box)
    objective = flat_objective(fun, unravel, value_and_grad=value_and_grad)
    proposal = propose(
        state, learning_rate=learning_rate, tolerance_grad=tolerance_grad,
        tolerance_change=tolerances.change, early_exit=early_exit, x=x, bounds=box, reductions=reductions,
    )  # fmt: skip
    found = search_along(
        line_search, objective, x, proposal.direction, state.value, state.grad, proposal.step_size,
        active=proposal.searching, max_evals=None if max_evals is None else max_evals - state.n_evals,
        c1=c1, c2=c2, tolerance_change=tolerances.search, max_ls=max_ls, early_exit=early_exit,
        max_step=proposal.max_step, bounds=box, reductions=reductions,
    )  # fmt: skip
    new_x, new_state = accept(
        x, state, proposal, found, line_search=line_search, tolerance_grad=tolerance_grad,
        tolerance_change=tolerances.change, tolerance_value=tolerances.value, curvature_rule=curvature_rule,
        max_evals=max_evals, bounds=box, reductions=reductions,
    )  # fmt: skip
    return unravel(new_x), new_state
