"""Run L-BFGS to convergence: ``minimize`` for one problem (or one per ``vmap`` lane) and
``batched_minimize`` for a batch of independent problems in one call.

Both are loops of :func:`torchlbfgs.update`, so every problem keeps its own history, line
search and stopping decision; a problem that has stopped is frozen (its params, value and
evaluation count no longer change) while the others continue. The loop ends after
``max_iter`` iterations, or earlier once every problem has stopped where reading that on the
host is free (see :mod:`torchlbfgs.line_searches.loop`); the results are the same either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from torchlbfgs.history import CurvatureRule
from torchlbfgs.line_searches import LineSearch
from torchlbfgs.line_searches.loop import batch_view, exits_early
from torchlbfgs.state import LBFGSState, StopReason
from torchlbfgs.update import init, update

__all__ = ["Progress", "Result", "batched_minimize", "minimize", "print_progress"]

PyTree = Any


class Result(NamedTuple):
    """Outcome of :func:`minimize` (every field batches under ``vmap``).

    Attributes:
        params: the last iterate, shaped like ``params0``.
        value: ``()`` - :math:`f` at ``params``.
        grad_norm: ``()`` - :math:`\\max_i |\\nabla f_i|` at ``params`` (the norm that
            ``tolerance_grad`` is tested against).
        n_iter: ``()`` int64 - iterations taken.
        n_evals: ``()`` int64 - evaluations of ``fun`` (value and gradient together).
        converged: ``()`` bool - a convergence tolerance was met.
        status: ``()`` int64 - a :class:`~torchlbfgs.StopReason` code; ``MAX_ITERATIONS`` if
            the problem was still running after ``max_iter`` iterations. Turn it into text
            with :func:`~torchlbfgs.status_message`.
    """

    params: PyTree
    value: torch.Tensor
    grad_norm: torch.Tensor
    n_iter: torch.Tensor
    n_evals: torch.Tensor
    converged: torch.Tensor
    status: torch.Tensor


class Progress(NamedTuple):
    """What a ``callback`` of :func:`minimize` receives every ``callback_every`` iterations.

    Under ``vmap`` the tensors hold the whole batch (leading batch dimension), read beneath
    the vmap wrapper, so one callback sees every problem. Nothing here has been moved to the
    host: printing a value syncs, keeping a reference does not.

    Attributes:
        iteration: loop iterations so far (a Python int).
        value: current values.
        grad_norm: current ``max|g|``.
        status: current stop-reason codes (0 while running).
        n_evals: evaluations so far.
    """

    iteration: int
    value: torch.Tensor
    grad_norm: torch.Tensor
    status: torch.Tensor
    n_evals: torch.Tensor


def print_progress(progress: Progress) -> None:
    """A ready-made ``callback``: one line with the number of running problems and the values.

    Example:
        >>> import torch, torchlbfgs
        >>> result = torchlbfgs.minimize(
        ...     lambda x: ((x - 1) ** 4).sum(), torch.zeros(3), callback=torchlbfgs.print_progress,
        ...     callback_every=5, max_iter=10)  # doctest: +ELLIPSIS
        iteration     5: 1/1 running, value min ... max ..., max|g| max ...
        iteration    10: 1/1 running, value min ... max ..., max|g| max ...
    """
    status = progress.status.reshape(-1)
    running = int((status == StopReason.RUNNING.value).sum())
    values = progress.value.reshape(-1)
    grad_norms = progress.grad_norm.reshape(-1)
    finite = torch.isfinite(values) & torch.isfinite(grad_norms)  # failed problems may hold NaN
    if bool(finite.any()):
        values, grad_norms = values[finite], grad_norms[finite]
        summary = (
            f"value min {float(values.min()):.3e} max {float(values.max()):.3e}, "
            f"max|g| max {float(grad_norms.max()):.3e}"
        )
    else:
        summary = "no finite values"
    print(f"iteration {progress.iteration:5d}: {running}/{status.numel()} running, {summary}")


def _progress(iteration: int, state: LBFGSState) -> Progress:
    return Progress(
        iteration=iteration,
        value=batch_view(state.value),
        grad_norm=batch_view(state.grad.abs().amax()),
        status=batch_view(state.status),
        n_evals=batch_view(state.n_evals),
    )


def minimize(
    fun: Callable[..., Any],
    params0: PyTree,
    *,
    max_iter: int = 100,
    tolerance_grad: float = 1e-7,
    tolerance_change: float = 1e-9,
    history_size: int = 10,
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
) -> Result:
    """Minimise ``fun`` from ``params0`` with L-BFGS; works as is under ``torch.func.vmap``.

    Args:
        fun: ``fun(params) -> scalar tensor`` (or ``(value, grad)`` with ``value_and_grad``).
        params0: the starting point, any pytree of floating tensors of one dtype.
        max_iter: at most this many iterations.
        tolerance_grad, tolerance_change, history_size, line_search, learning_rate,
            curvature_rule, c1, c2, max_ls, max_evals, value_and_grad, early_exit:
            as in :func:`torchlbfgs.init` and :func:`torchlbfgs.update`.
        callback: called as ``callback(progress)`` with a :class:`Progress` every
            ``callback_every`` iterations (and never in between, so it costs no host sync
            on the other iterations).
        callback_every: see ``callback``.

    Returns:
        a :class:`Result`.

    Example:
        >>> import torch, torchlbfgs
        >>> from functools import partial
        >>> def loss(w, X, y):
        ...     return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y) + 1e-2 * w @ w
        >>> Xs = torch.randn(100, 50, 3, dtype=torch.float64)
        >>> ys = torch.randint(0, 2, (100, 50)).double()
        >>> w0 = torch.zeros(3, dtype=torch.float64)
        >>> solve = lambda X, y: torchlbfgs.minimize(partial(loss, X=X, y=y), w0)
        >>> result = torch.func.vmap(solve)(Xs, ys)   # 100 problems, each with its own L-BFGS
        >>> result.params.shape, bool(result.converged.all())
        (torch.Size([100, 3]), True)
        >>> alone = solve(Xs[7], ys[7])               # the same as solving problem 7 by itself
        >>> torch.allclose(alone.params, result.params[7]), bool(alone.n_evals == result.n_evals[7])
        (True, True)
    """
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative int, got {max_iter!r}")
    if not isinstance(callback_every, int) or isinstance(callback_every, bool) or callback_every < 1:
        raise ValueError(f"callback_every must be a positive int, got {callback_every!r}")
    state = init(fun, params0, history_size=history_size, value_and_grad=value_and_grad)
    params = params0
    stop_early = exits_early(early_exit, state.status)
    for iteration in range(1, max_iter + 1):
        params, state = update(
            fun, params, state, line_search=line_search, learning_rate=learning_rate,
            tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
            curvature_rule=curvature_rule, c1=c1, c2=c2, max_ls=max_ls, max_evals=max_evals,
            value_and_grad=value_and_grad, early_exit=early_exit,
        )  # fmt: skip
        if callback is not None and iteration % callback_every == 0:
            callback(_progress(iteration, state))
        if stop_early and bool(batch_view(state.stopped).all()):  # sync-ok: where exits_early allows it
            break
    running = state.status == StopReason.RUNNING.value
    status = torch.where(
        running, torch.full_like(state.status, StopReason.MAX_ITERATIONS.value), state.status
    )
    return Result(
        params=params,
        value=state.value,
        grad_norm=state.grad.abs().amax(),
        n_iter=state.iteration,
        n_evals=state.n_evals,
        converged=state.converged,
        status=status,
    )


def batched_minimize(
    fun: Callable[..., Any],
    params0: PyTree,
    *args: Any,
    in_dims: int | tuple[Any, ...] = 0,
    **options: Any,
) -> Result:
    """Solve a batch of independent problems ``fun(params, *args)`` in one vectorised run.

    This is ``torch.func.vmap`` of :func:`minimize` over ``params0`` and ``args``:
    problem ``i`` minimises ``fun(params, *args_i)`` from ``params0_i``.

    Args:
        fun: ``fun(params, *args) -> scalar tensor`` for *one* problem.
        params0: the starting points, batched along the dimension given by ``in_dims``.
        *args: per-problem data (batched) or shared data (``None`` in ``in_dims``).
        in_dims: as in ``torch.func.vmap``, for ``(params0, *args)``; an int applies to all.
        **options: passed to :func:`minimize` (``max_iter``, tolerances, ``callback``, ...).

    Returns:
        a :class:`Result` whose fields have a leading batch dimension.

    Example:
        >>> import torch, torchlbfgs
        >>> def loss(theta, t, y):  # fit y = a exp(-b t) for one signal
        ...     return ((theta[0] * torch.exp(-theta[1] * t) - y) ** 2).mean()
        >>> t = torch.linspace(0, 3, 40, dtype=torch.float64)
        >>> truth = torch.rand(500, 2, dtype=torch.float64) + 0.5
        >>> signals = truth[:, :1] * torch.exp(-truth[:, 1:] * t)
        >>> start = torch.ones(500, 2, dtype=torch.float64)
        >>> result = torchlbfgs.batched_minimize(loss, start, t, signals, in_dims=(0, None, 0),
        ...                                      tolerance_grad=1e-12, tolerance_change=0.0)
        >>> torch.allclose(result.params, truth, atol=1e-5)
        True
    """
    return torch.func.vmap(
        lambda params, *data: minimize(lambda p: fun(p, *data), params, **options), in_dims=in_dims
    )(params0, *args)
