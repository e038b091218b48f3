"""Run L-BFGS to convergence: ``minimize`` for one problem (or one per ``vmap`` lane) and
``batched_minimize`` for a batch of independent problems in one call.

Both loop over evaluation rounds (:mod:`torchlbfgs.rounds`): each round evaluates every running
problem once, so in a batch a problem that needs few line-search trials moves on to its next
iteration while another is still searching. Every problem keeps its own history, line search
and stopping decision, with the iterates a loop of :func:`torchlbfgs.update` would give it; a
problem that has stopped is frozen (its params, value and counters no longer change) while the
others continue. The loop ends once every problem has stopped; it checks that on the host only
where the read is free or, in ``batched_minimize``, every few rounds (see ``early_exit``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from torchlbfgs.history import CurvatureRule
from torchlbfgs.line_searches import LineSearch
from torchlbfgs.line_searches.loop import batch_view, exits_early
from torchlbfgs.objective import FlatObjective, flat_objective
from torchlbfgs.pytree import Unravel, ravel_pytree
from torchlbfgs.rounds import RoundState, Settings, advance, max_rounds, start
from torchlbfgs.state import StopReason

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
    """What a ``callback`` of :func:`minimize` receives every ``callback_every`` rounds.

    A round evaluates every running problem once (see :mod:`torchlbfgs.rounds`), so problems
    are at different iterations after the same number of rounds; ``n_iter`` says where each
    one is. Under ``vmap`` (and in :func:`batched_minimize`) the tensors hold the whole batch
    (leading batch dimension), read beneath the vmap wrapper, so one callback sees every
    problem. Nothing here has been moved to the host: printing a value syncs, keeping a
    reference does not.

    Attributes:
        rounds: evaluation rounds so far (a Python int).
        value: current values.
        grad_norm: current ``max|g|``.
        status: current stop-reason codes (0 while running).
        n_iter: iterations completed so far.
        n_evals: evaluations so far, those of the line search under way included.
    """

    rounds: int
    value: torch.Tensor
    grad_norm: torch.Tensor
    status: torch.Tensor
    n_iter: torch.Tensor
    n_evals: torch.Tensor


def print_progress(progress: Progress) -> None:
    """A ready-made ``callback``: one line with the number of running problems and the values.

    Example:
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
    print(f"round {progress.rounds:5d}: {running}/{status.numel()} running, {summary}")


def _progress(rounds: int, state: RoundState, settings: Settings) -> Progress:
    lbfgs = state.lbfgs
    searching = settings.search.outcome(state.search).n_evals  # the current search's, so far
    return Progress(
        rounds=rounds,
        value=batch_view(lbfgs.value),
        grad_norm=batch_view(lbfgs.grad.abs().amax(-1)),
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
) -> RoundState:
    """Apply ``advance_all`` until every problem has stopped, reading the stop flags on the host
    every ``check_every`` rounds (never if ``None``: then all :func:`max_rounds` rounds run)."""
    for rounds in range(1, max_rounds(settings) + 1):
        checking = check_every is not None and (rounds - 1) % check_every == 0
        if checking and bool(batch_view(state.lbfgs.stopped).all()):  # sync-ok: where early_exit allows
            break
        state = advance_all(state)
        if callback is not None and rounds % callback_every == 0:
            callback(_progress(rounds, state, settings))
    return state


def _result(state: RoundState, unravel: Unravel) -> Result:
    lbfgs = state.lbfgs
    return Result(
        params=unravel(state.x),
        value=lbfgs.value,
        grad_norm=lbfgs.grad.abs().amax(),
        n_iter=lbfgs.iteration,
        n_evals=lbfgs.n_evals,
        converged=lbfgs.converged,
        status=lbfgs.status,
    )


def _map_leaves(function: Callable[[torch.Tensor], torch.Tensor], tree: Any) -> Any:
    if isinstance(tree, tuple):
        return type(tree)(*(_map_leaves(function, leaf) for leaf in tree))
    return function(tree)


def _check_callback_every(callback_every: int) -> None:
    if not isinstance(callback_every, int) or isinstance(callback_every, bool) or callback_every < 1:
        raise ValueError(f"callback_every must be a positive int, got {callback_every!r}")


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
    _check_callback_every(callback_every)
    settings = Settings(
        max_iter=max_iter, tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
        history_size=history_size, line_search=line_search, learning_rate=learning_rate,
        curvature_rule=curvature_rule, c1=c1, c2=c2, max_ls=max_ls, max_evals=max_evals,
        early_exit=early_exit,
    )  # fmt: skip
    x, unravel = ravel_pytree(params0)
    objective = flat_objective(fun, unravel, value_and_grad=value_and_grad)
    state = start(objective, x, settings)
    check_every = 1 if exits_early(early_exit, state.lbfgs.status) else None
    state = _run_rounds(
        lambda s: advance(objective, s, settings), state, settings, check_every, callback, callback_every
    )
    return _result(state, unravel)


def batched_minimize(
    fun: Callable[..., Any],
    params0: PyTree,
    *args: Any,
    in_dims: int | tuple[Any, ...] = 0,
    compile: bool | Mapping[str, Any] = False,
    callback: Callable[[Progress], None] | None = None,
    callback_every: int = 10,
    value_and_grad: bool = False,
    **options: Any,
) -> Result:
    """Solve a batch of independent problems ``fun(params, *args)`` in one vectorised run.

    Problem ``i`` minimises ``fun(params, *args_i)`` from ``params0_i``, with the result
    :func:`minimize` would give it alone. Each round is ``torch.func.vmap`` of one evaluation
    round over the batch (:mod:`torchlbfgs.rounds`); with ``compile`` that vmapped round is
    ``torch.compile``-d with ``fullgraph=True`` and reused for every round. The loop checks
    on the host whether every problem has stopped: every round on the CPU, every 16 rounds on
    other devices (one sync each), never with ``early_exit=False``.

    Args:
        fun: ``fun(params, *args) -> scalar tensor`` for *one* problem (or ``(value, grad)``
            with ``value_and_grad``).
        params0: the starting points, batched along the dimension given by ``in_dims``.
        *args: per-problem data (batched) or shared data (``None`` in ``in_dims``).
        in_dims: as in ``torch.func.vmap``, for ``(params0, *args)``; an int applies to all.
        compile: ``True`` to ``torch.compile`` the round, or a dict of ``torch.compile``
            keyword arguments (e.g. ``{"backend": "aot_eager"}``).
        callback, callback_every, value_and_grad: as in :func:`minimize`.
        **options: the other options of :func:`minimize` (``max_iter``, tolerances, ...).

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
    _check_callback_every(callback_every)
    settings = Settings(**options)
    dims = (in_dims,) * (1 + len(args)) if isinstance(in_dims, int) else tuple(in_dims)
    if len(dims) != 1 + len(args):
        raise ValueError(
            f"in_dims has {len(dims)} entries but there are {1 + len(args)} inputs "
            f"(params0 and {len(args)} args)"
        )
    structure: list[Unravel] = []

    def objective(data: tuple[Any, ...], unravel: Unravel) -> FlatObjective:
        return flat_objective(lambda p: fun(p, *data), unravel, value_and_grad=value_and_grad)

    def start_one(params: PyTree, *data: Any) -> RoundState:
        x, unravel = ravel_pytree(params)
        structure.append(unravel)
        return start(objective(data, unravel), x, settings)

    # Distinct, contiguous leaves, as a round returns them: vmap returns a leaf that does not
    # depend on the batch as a stride-0 expansion, and the start shares some leaves (the first
    # trial step is the proposal's); a compiled round would guard on both and compile again.
    state = _map_leaves(
        lambda leaf: leaf.clone(memory_format=torch.contiguous_format),
        torch.func.vmap(start_one, in_dims=dims)(params0, *args),
    )
    unravel = structure[-1]
    # The round rebuilds `unravel` from a template (one problem's params) rather than closing
    # over it, so that under torch.compile the pytree structure is traced, not a foreign object.
    template = unravel(state.x[0])

    def advance_one(state: RoundState, template: PyTree, *data: Any) -> RoundState:
        return advance(objective(data, ravel_pytree(template)[1]), state, settings)

    advance_batch = torch.func.vmap(advance_one, in_dims=(0, None, *dims[1:]))
    if compile is not False:
        compile_options = {} if compile is True else dict(compile)
        advance_batch = torch.compile(advance_batch, fullgraph=True, **compile_options)
    if exits_early(settings.early_exit, state.lbfgs.status):
        check_every: int | None = 1
    elif settings.early_exit is False or torch.compiler.is_compiling():
        check_every = None
    else:
        check_every = 16  # a device: one sync per 16 rounds
    state = _run_rounds(
        lambda s: advance_batch(s, template, *args), state, settings, check_every, callback, callback_every
    )
    return torch.func.vmap(lambda s: _result(s, unravel))(state)
