"""Run L-BFGS to convergence: ``minimize`` for one problem (or one per ``vmap`` lane) and
``batched_minimize`` for a batch of independent problems in one call.

Both loop over evaluation rounds (:mod:`torchlbfgs.rounds`): each round evaluates every running
problem once, so in a batch a problem that needs few line-search trials moves on to its next
iteration while another is still searching. Every problem keeps its own history, line search
and stopping decision, with the iterates a loop of :func:`torchlbfgs.update` would give it; a
problem that has stopped is frozen (its params, value and counters no longer change) while the
others continue. The loop ends once every problem has stopped; it checks that on the host
every round where the read is free (eager CPU), every 16 rounds on other devices (one sync
each) and never under ``torch.compile`` or with ``early_exit=False`` (see
:func:`~torchlbfgs.line_searches.loop.stop_check_interval`). The rounds themselves make no
host reads on devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch._C._functorch import is_functorch_wrapped_tensor

from torchlbfgs.bounds import BoundsLike, active_count, flat_bounds, given_bounds, projected_gradient
from torchlbfgs.direction import Direction
from torchlbfgs.history import CurvatureRule
from torchlbfgs.implicit import ImplicitDiff, implicit_solution, solve_inputs
from torchlbfgs.line_searches import LineSearch
from torchlbfgs.line_searches.loop import batch_view, stop_check_interval
from torchlbfgs.objective import flat_objective
from torchlbfgs.options import checks_option_names, require_count
from torchlbfgs.progress import ProgressBar, progress_wanted
from torchlbfgs.pytree import Unravel, ravel_pytree
from torchlbfgs.rounds import RoundState, Settings, advance, max_rounds, start
from torchlbfgs.sharding import LOCAL, Reductions
from torchlbfgs.state import StopReason

__all__ = ["Progress", "Result", "minimize", "print_progress"]

PyTree = Any


class Result(NamedTuple):
    """Outcome of :func:`minimize` (every field batches under ``vmap``).

    Attributes:
        params: the last iterate, shaped like ``params0``.
        value: ``()`` - :math:`f` at ``params``.
        grad_norm: ``()`` - :math:`\\max_i |\\nabla f_i|` at ``params`` (the norm that
            ``tolerance_grad`` is tested against); with bounds, the max-norm of the projected
            gradient :math:`P(x - g) - x` (:mod:`torchlbfgs.bounds`).
        n_iter: ``()`` int64 - iterations taken.
        n_evals: ``()`` int64 - evaluations of ``fun`` (value and gradient together).
        converged: ``()`` bool - a convergence tolerance was met (or ``PRECISION_LIMIT``: no
            decrease can be seen at the precision of the value).
        status: ``()`` int64 - a :class:`~torchlbfgs.StopReason` code; ``MAX_ITERATIONS`` if
            the problem was still running after ``max_iter`` iterations. Turn it into text
            with :func:`~torchlbfgs.status_message`.
        n_active_bounds: ``()`` int64 - how many variables of ``params`` sit on a bound (0
            without bounds).

    With ``implicit_diff``, ``params`` and ``value`` are differentiable with respect to what
    ``fun`` depends on (:mod:`torchlbfgs.implicit`); the other fields never are.

    Examples:
        >>> import torch, torchlbfgs
        >>> result = torchlbfgs.minimize(lambda x: ((x - 3.0) ** 2).sum(), torch.zeros(2))
        >>> result.params, bool(result.converged), torchlbfgs.status_message(result.status)
        (tensor([3., 3.]), True, 'converged: max|gradient| <= tolerance_grad')
    """

    params: PyTree
    value: torch.Tensor
    grad_norm: torch.Tensor
    n_iter: torch.Tensor
    n_evals: torch.Tensor
    converged: torch.Tensor
    status: torch.Tensor
    n_active_bounds: torch.Tensor


class Progress(NamedTuple):
    """What a ``callback`` of :func:`minimize` receives every ``callback_every`` rounds.

    A round evaluates every running problem once (see :mod:`torchlbfgs.rounds`), so problems
    are at different iterations after the same number of rounds; ``n_iter`` says where each
    one is. Under ``vmap`` (and in :func:`batched_minimize`) the tensors hold the whole batch
    (leading batch dimension), read beneath the vmap wrapper, so one callback sees every
    problem. Nothing here has been moved to the host: printing a value syncs, keeping a
    reference does not.

    Attributes:
        rounds: evaluation rounds so far (a Python int). :func:`minimize` evaluates its
            starting point before its first round; :func:`batched_minimize`'s first round
            evaluates the starting points (compiled, with the other rounds).
        value: current values.
        grad_norm: current ``max|g|``.
        status: current stop-reason codes (0 while running).
        n_iter: iterations completed so far.
        n_evals: evaluations so far, those of the line search under way included.

    Examples:
        >>> import torch, torchlbfgs
        >>> seen = []
        >>> result = torchlbfgs.minimize(lambda x: ((x - 1) ** 2).sum(), torch.zeros(2),
        ...                              callback=seen.append, callback_every=1)
        >>> [(p.rounds, int(p.n_iter)) for p in seen]
        [(1, 1), (2, 2)]
    """

    rounds: int
    value: torch.Tensor
    grad_norm: torch.Tensor
    status: torch.Tensor
    n_iter: torch.Tensor
    n_evals: torch.Tensor


def print_progress(progress: Progress) -> None:
    """A ready-made ``callback``: one line with the number of running problems and the values.

    Args:
        progress: what :func:`minimize` hands its callback.

    Examples:
        >>> import torch, torchlbfgs
        >>> result = torchlbfgs.minimize(
        ...     lambda x: ((x - 1) ** 4).sum(), torch.zeros(3), callback=torchlbfgs.print_progress,
        ...     callback_every=5, max_iter=20)  # doctest: +ELLIPSIS
        round     5: 1/1 running, value min ... max ..., max|g| max ...
        round    10: 1/1 running, value min ... max ..., max|g| max ...
        round    15: 1/1 running, value min ... max ..., max|g| max ...
        round    20: 0/1 running, value min ... max ..., max|g| max ...
    """
    status = progress.status.reshape(-1)
    running = int((status == StopReason.RUNNING.value).sum())  # sync-ok: printing reads the values
    values = progress.value.reshape(-1)
    grad_norms = progress.grad_norm.reshape(-1)
    finite = torch.isfinite(values) & torch.isfinite(grad_norms)  # failed problems may hold NaN
    if bool(finite.any()):  # sync-ok: printing
        values, grad_norms = values[finite], grad_norms[finite]
        summary = (
            f"value min {float(values.min()):.3e} max {float(values.max()):.3e}, "
            f"max|g| max {float(grad_norms.max()):.3e}"
        )
    else:
        summary = "no finite values"
    print(f"round {progress.rounds:5d}: {running}/{status.numel()} running, {summary}")


def progress_of(rounds: int, state: RoundState, settings: Settings) -> Progress:
    lbfgs = state.lbfgs
    searching = settings.search.outcome(state.search).n_evals  # the current search's, so far
    return Progress(
        rounds=rounds,
        value=batch_view(lbfgs.value),
        grad_norm=batch_view(_grad_norm(state, settings.reductions)),
        status=batch_view(lbfgs.status),
        n_iter=batch_view(lbfgs.iteration),
        n_evals=batch_view(lbfgs.n_evals + searching),
    )


def _run_rounds(
    advance_all: Callable[[RoundState], RoundState],
    state: RoundState,
    settings: Settings,
    check_every: int | None,
    callback: Callable[[Progress], None] | None,
    callback_every: int,
    bar: ProgressBar,
) -> RoundState:
    """Apply ``advance_all`` until every problem has stopped, reading the stop flags on the host
    every ``check_every`` rounds (never if ``None``: then all :func:`max_rounds` rounds run),
    and showing ``bar`` there."""
    done = 0  # rounds run
    for rounds in range(1, max_rounds(settings) + 1):
        checking = check_every is not None and (rounds - 1) % check_every == 0
        if checking:
            stopped = batch_view(state.lbfgs.stopped)
            if bar.enabled:  # sync-ok: the bar reads what the stop check reads, and the values
                _show(bar, rounds - 1, stopped, state)
            if bool(stopped.all()):  # sync-ok: where early_exit allows
                break
        state, done = advance_all(state), rounds
        if callback is not None and rounds % callback_every == 0:
            callback(progress_of(rounds, state, settings))
    if bar.enabled:
        _show(bar, done, batch_view(state.lbfgs.stopped), state)
    return state


def _show(bar: ProgressBar, rounds: int, stopped: torch.Tensor, state: RoundState) -> None:
    running = int((~stopped).sum())  # sync-ok: only with a progress bar
    bar.update(rounds=rounds, running=running, values=batch_view(state.lbfgs.value))


def _grad_norm(state: RoundState, reductions: Reductions = LOCAL) -> torch.Tensor:
    """The max-norm ``tolerance_grad`` is tested against: of the gradient, or with bounds of
    the projected gradient."""
    grad, bounds = state.lbfgs.grad, given_bounds(state.bounds)
    if reductions.sharded:  # one problem, over processes
        return reductions.max_abs(grad)
    if bounds is not None:
        grad = projected_gradient(state.x, grad, bounds)
    return grad.abs().amax(-1)  # over the last dimension: progress_of reads a whole batch


def result_of(state: RoundState, unravel: Unravel) -> Result:
    lbfgs, bounds = state.lbfgs, given_bounds(state.bounds)
    return Result(
        params=unravel(state.x),
        value=lbfgs.value,
        grad_norm=_grad_norm(state, unravel.reductions),
        n_iter=lbfgs.iteration,
        n_evals=lbfgs.n_evals,
        converged=lbfgs.converged,
        status=lbfgs.status,
        n_active_bounds=(
            torch.zeros_like(lbfgs.n_evals) if bounds is None else active_count(state.x, bounds)
        ),
    )


@checks_option_names
def minimize(
    fun: Callable[..., Any],
    params0: PyTree,
    *args: Any,
    max_iter: int = 100,
    tolerance_grad: float = 1e-7,
    tolerance_change: float | None = None,
    tolerance_value: float | None = None,
    history_size: int = 10,
    direction: Direction = "two_loop",
    line_search: LineSearch = "strong_wolfe",
    learning_rate: float = 1.0,
    curvature_rule: CurvatureRule = "relative",
    c1: float = 1e-4,
    c2: float = 0.9,
    max_ls: int = 25,
    max_evals: int | None = None,
    value_and_grad: bool = False,
    early_exit: bool | None = None,
    callback: Callable[[Progress], None] | None = None,
    callback_every: int = 10,
    progress: bool | None = None,
    bounds: BoundsLike = None,
    implicit_diff: bool | ImplicitDiff = False,
) -> Result:
    """Minimise ``fun`` from ``params0`` with L-BFGS; works as is under ``torch.func.vmap``.

    Args:
        fun: ``fun(params, *args) -> scalar tensor`` (or ``(value, grad)`` with
            ``value_and_grad``).
        params0: the starting point, any pytree of floating tensors of one dtype.
        *args: the problem's data, passed on to ``fun`` (any pytrees).
        max_iter: at most this many iterations.
        tolerance_grad: as in :func:`torchlbfgs.update`.
        tolerance_change: as in :func:`torchlbfgs.update`.
        tolerance_value: as in :func:`torchlbfgs.update`.
        history_size: as in :func:`torchlbfgs.init`.
        direction: as in :func:`torchlbfgs.init`.
        line_search: as in :func:`torchlbfgs.update`.
        learning_rate: as in :func:`torchlbfgs.update`.
        curvature_rule: as in :func:`torchlbfgs.update`.
        c1: as in :func:`torchlbfgs.update`.
        c2: as in :func:`torchlbfgs.update`.
        max_ls: as in :func:`torchlbfgs.update`.
        max_evals: as in :func:`torchlbfgs.update`.
        value_and_grad: as in :func:`torchlbfgs.update`.
        early_exit: as in :func:`torchlbfgs.update`.
        callback: called as ``callback(progress)`` with a :class:`Progress` every
            ``callback_every`` evaluation rounds (and never in between, so it costs no host
            sync on the other rounds); a round evaluates each running problem once.
        callback_every: see ``callback``.
        progress: show a progress bar on stderr (rounds, whether the problem still runs, its
            value; :mod:`torchlbfgs.progress`): ``None`` (default) when stderr is a
            terminal. Never inside ``vmap`` or ``torch.compile``.
        bounds: ``(lower, upper)`` box constraints, solved by L-BFGS-B: as in
            :func:`torchlbfgs.update` (a start outside the box is projected onto it).
        implicit_diff: make ``Result.params`` (and ``Result.value``) differentiable as the
            exact minimiser, with respect to every tensor in ``args`` and every tensor ``fun``
            closes over, by implicit differentiation (:mod:`torchlbfgs.implicit`): with
            ``torch.autograd`` and with ``torch.func`` transforms, ``vmap`` included. The solve
            itself then runs without autodiff and stores nothing for the backward pass, which
            costs one linear solve with Hessian-vector products. ``True`` or a
            :class:`~torchlbfgs.ImplicitDiff` with the options of that solve. ``params0`` gets
            no gradient. Needs ``value_and_grad=False``.

    Returns:
        a :class:`Result`.

    Examples:
        >>> import torch, torchlbfgs
        >>> def loss(w, X, y):
        ...     return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y) + 1e-2 * w @ w
        >>> Xs = torch.randn(100, 50, 3, dtype=torch.float64)
        >>> ys = torch.randint(0, 2, (100, 50)).double()
        >>> w0 = torch.zeros(3, dtype=torch.float64)
        >>> solve = lambda X, y: torchlbfgs.minimize(loss, w0, X, y)  # fun(w0, X, y)
        >>> result = torch.func.vmap(solve)(Xs, ys)   # 100 problems, each with its own L-BFGS
        >>> result.params.shape, bool(result.converged.all())
        (torch.Size([100, 3]), True)
        >>> alone = solve(Xs[7], ys[7])               # the same as solving problem 7 by itself
        >>> torch.allclose(alone.params, result.params[7]), bool(alone.n_evals == result.n_evals[7])
        (True, True)
    """
    require_count("callback_every", callback_every, 1)
    settings = Settings(
        max_iter=max_iter, tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
        tolerance_value=tolerance_value,
        history_size=history_size, direction=direction, line_search=line_search, learning_rate=learning_rate,
        curvature_rule=curvature_rule, c1=c1, c2=c2, max_ls=max_ls, max_evals=max_evals,
        early_exit=early_exit,
    )  # fmt: skip
    implicit = ImplicitDiff.of(implicit_diff, value_and_grad=value_and_grad)
    x, unravel = ravel_pytree(params0)
    if unravel.reductions.sharded:
        if implicit is not None:
            raise ValueError(
                "minimize: implicit_diff is not supported with parameters sharded over processes (DTensor)"
            )
        settings = dataclasses.replace(settings, reductions=unravel.reductions)
    box = flat_bounds(bounds, params0)  # with autodiff, for implicit_diff
    with solve_inputs(implicit, (x, args, box)) as (x0, data, box0):
        objective = flat_objective(lambda p: fun(p, *data), unravel, value_and_grad=value_and_grad)
        state = start(objective, x0, settings, box0)
        check_every = stop_check_interval(early_exit, state.lbfgs.status)
        on_host = not torch.compiler.is_compiling() and not is_functorch_wrapped_tensor(state.lbfgs.value)
        shown = on_host and progress_wanted(progress)
        bar = ProgressBar(enabled=shown, total=max_rounds(settings), label="minimize")
        try:
            state = _run_rounds(
                lambda s: advance(objective, s, settings), state, settings, check_every, callback,
                callback_every, bar,
            )  # fmt: skip
        finally:
            bar.close()
    result = result_of(state, unravel)
    if implicit is None:
        return result
    solution, value = implicit_solution(
        lambda z: fun(unravel(z), *args), state.x, state.lbfgs.history, box, implicit
    )
    return differentiable_result(result, unravel(solution), value)


def differentiable_result(result: Result, params: PyTree, value: torch.Tensor) -> Result:
    """``result`` with the differentiable ``params`` of
    :func:`~torchlbfgs.implicit.implicit_solution` and its value's derivative (the value
    itself stays the solve's, bit for bit)."""
    return result._replace(params=params, value=result.value + (value - value.detach()))
