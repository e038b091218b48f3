"""``batched_minimize``: a batch of independent problems in one vectorised solve.

The batch advances in evaluation rounds (:mod:`torchlbfgs.rounds`), each one
``torch.func.vmap`` of :func:`~torchlbfgs.rounds.advance` over the problems, optionally
``torch.compile``-d once and reused. Between rounds the driver checks on the host which
problems still run, and once at most half of the current batch does, it goes on with those
alone (*compaction*): their states and data are gathered into a smaller batch, and the stopped
problems' results are set aside. The work of a solve is then close to the sum of the
evaluations the problems need, rather than the batch size times those of the most expensive
problem. Each problem's iterates are those it would have alone. Compiled on the CPU, the
rounds between two such actions of the host run in one call of the compiled graph, as a
``while_loop`` that applies the same rule on the device
(:func:`~torchlbfgs.compaction.steps_until_shrink`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from torchlbfgs.batched_implicit import BatchedAdjoint
from torchlbfgs.bounds import Bounds, BoundsLike, leaf_bounds
from torchlbfgs.compaction import (
    active_batch,
    call_with_counts,
    map_leaves,
    should_shrink,
    steps_until_shrink,
)
from torchlbfgs.compiled import CompiledStep
from torchlbfgs.implicit import ImplicitDiff, join_solution, solve_inputs
from torchlbfgs.line_searches.loop import stop_check_interval
from torchlbfgs.minimize import (
    Progress,
    Result,
    differentiable_result,
    progress_of,
    result_of,
)
from torchlbfgs.objective import FlatObjective, flat_objective
from torchlbfgs.options import reject_unknown_options, require_count
from torchlbfgs.progress import ProgressBar, progress_wanted
from torchlbfgs.pytree import Unravel, ravel_pytree
from torchlbfgs.rounds import RoundState, Settings, advance, max_rounds, start_unevaluated
from torchlbfgs.sharded_batch import batch_sharding
from torchlbfgs.state import StopReason

__all__ = ["batched_minimize"]

# batched_minimize's own keywords and those it passes on (the options of `minimize`)
SETTINGS_NAMES = (
    *(field.name for field in dataclasses.fields(Settings) if field.name != "reductions"),
    "in_dims", "compile", "callback", "callback_every", "value_and_grad", "progress", "bounds",
    "implicit_diff",
)  # fmt: skip

PyTree = Any


def _batched_bounds(bounds: BoundsLike, params0: PyTree, dim: Any) -> Bounds | None:
    """Per-problem flat bounds ``(B, n)``, each side broadcast against the batched params."""
    if bounds is None:
        return None
    if not isinstance(dim, int):
        raise ValueError(f"bounds need params0 batched along one dimension (an int in in_dims), got {dim!r}")
    per_leaf = leaf_bounds(bounds, params0)
    size = per_leaf[0][1].shape[dim]

    def rows(sides: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([side.movedim(dim, 0).reshape(size, -1) for side in sides], 1)

    return Bounds(rows([low for _, low, _ in per_leaf]), rows([high for _, _, high in per_leaf]))


def batched_minimize(
    fun: Callable[..., Any],
    params0: PyTree,
    *args: Any,
    in_dims: int | tuple[Any, ...] = 0,
    compile: bool | Mapping[str, Any] = False,
    callback: Callable[[Progress], None] | None = None,
    callback_every: int = 10,
    value_and_grad: bool = False,
    progress: bool | None = None,
    bounds: BoundsLike = None,
    implicit_diff: bool | ImplicitDiff = False,
    **options: Any,
) -> Result:
    """Solve a batch of independent problems ``fun(params, *args)`` in one vectorised run.

    Problem ``i`` minimises ``fun(params, *args_i)`` from ``params0_i``, with the iterates
    :func:`~torchlbfgs.minimize` would give it alone. The solve runs in evaluation rounds,
    each evaluating every running problem once; see the module docstring for how stopped
    problems leave the batch. The host reads the stop flags every round on the CPU and
    every 16 rounds elsewhere (one sync each); never with ``early_exit=False``, which also
    keeps the batch whole.

    Args:
        fun: ``fun(params, *args) -> scalar tensor`` for *one* problem (or ``(value, grad)``
            with ``value_and_grad``).
        params0: the starting points, batched along the dimension given by ``in_dims``.
        *args: per-problem data (batched) or shared data (``None`` in ``in_dims``).
        in_dims: as in ``torch.func.vmap``, for ``(params0, *args)``; an int applies to all.
        compile: ``True`` to ``torch.compile`` the vmapped round (``fullgraph=True``, the
            batch dimension marked dynamic so that the shrinking batch needs no
            recompilation; kept for later solves with the same ``fun``, in a cache of that
            function's own: :mod:`torchlbfgs.compiled`), or a dict of further
            ``torch.compile`` keyword arguments (e.g. ``{"backend": "aot_eager"}``). On the
            CPU the graph runs the rounds between two compactions (or callbacks) in one call,
            as a ``while_loop``; elsewhere one round per call.
            ``{"dynamic": False}`` compiles for the whole batch with static shapes and keeps it
            whole (stopped problems stay in it, frozen): the compile takes a fifth to a third
            less time, but every round evaluates every problem, which pays only where all
            problems need about as many evaluations (e.g. a fixed step and ``max_iter``
            iterations). With ``implicit_diff``, the backward's
            conjugate-gradient iteration is compiled the same way.
        callback: as in :func:`~torchlbfgs.minimize`; it sees the whole batch.
        callback_every: as in :func:`~torchlbfgs.minimize`.
        value_and_grad: as in :func:`~torchlbfgs.minimize`.
        progress: show a progress bar on stderr (rounds, problems still running, their lowest
            and highest value; :mod:`torchlbfgs.progress`), and a line when ``compile`` starts
            compiling the round and when it is done, with its duration. ``None`` (default):
            when stderr is a terminal.
        bounds: ``(lower, upper)`` box constraints, solved by L-BFGS-B (see
            :func:`torchlbfgs.update`). Each side broadcasts against the *batched* params:
            a float or a tensor of one problem's shape is shared by every problem, a tensor
            with the batch dimension gives each problem its own (``-inf``/``inf``/``None``:
            unbounded). ``params0`` must then be batched along one dimension (an int in
            ``in_dims``).
        implicit_diff: as in :func:`~torchlbfgs.minimize`: every problem's params (and value)
            differentiable with respect to ``args`` and the tensors ``fun`` closes over, by
            implicit differentiation; the backward pass solves all problems' linear systems in
            one batched conjugate-gradient run, which the problems leave as they converge
            (:mod:`torchlbfgs.batched_implicit`).
        **options: the other options of :func:`~torchlbfgs.minimize` (``max_iter``,
            tolerances, ``line_search``, ...).

    Returns:
        a :class:`~torchlbfgs.Result` whose fields have a leading batch dimension.

    Examples:
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
    require_count("callback_every", callback_every, 1)
    reject_unknown_options("torchlbfgs.batched_minimize", options, SETTINGS_NAMES)
    settings = Settings(**options)
    implicit = ImplicitDiff.of(implicit_diff, value_and_grad=value_and_grad)
    dims = (in_dims,) * (1 + len(args)) if isinstance(in_dims, int) else tuple(in_dims)
    if len(dims) != 1 + len(args):
        raise ValueError(
            f"in_dims has {len(dims)} entries but there are {1 + len(args)} inputs "
            f"(params0 and {len(args)} args)"
        )
    spread = batch_sharding(params0, args, dims)
    if spread is not None:  # each rank solves its rows as a batch of its own
        if implicit is not None:
            raise ValueError(
                "batched_minimize: implicit_diff over a batch sharded across processes is not supported"
            )
        local_params0, local_args, local_bounds = spread.local(params0, args, bounds)
        local: Result = batched_minimize(
            fun, local_params0, *local_args, in_dims=in_dims, compile=compile, callback=callback,
            callback_every=callback_every, value_and_grad=value_and_grad, progress=progress,
            bounds=local_bounds, **options,
        )  # fmt: skip
        sharded: Result = spread.sharded(local)
        return sharded
    box = _batched_bounds(bounds, params0, dims[0])  # with autodiff, for implicit_diff
    with solve_inputs(implicit, (params0, args, box)) as (params0_, data, box_):
        state, unravel = _solve(
            fun, params0_, data, box_, dims=dims, settings=settings, compile=compile, callback=callback,
            callback_every=callback_every, value_and_grad=value_and_grad, progress=progress,
        )  # fmt: skip
    result: Result = torch.func.vmap(lambda s: result_of(s, unravel))(state)
    if implicit is None:
        return result

    value_dims = (0, None, *dims[1:])
    adjoint = BatchedAdjoint(
        fun, template=unravel(state.x[0]), data=data, dims=dims[1:], options=implicit,
        bounded=box is not None, compile=compile,
    )  # fmt: skip

    def gradient_and_value(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        one = torch.func.grad_and_value(adjoint.value_of_one)
        return torch.func.vmap(one, in_dims=value_dims)(x, adjoint.template, *args)

    solution, value = join_solution(gradient_and_value, state.x, state.lbfgs.history, box, adjoint)
    params = torch.func.vmap(unravel)(solution)
    return differentiable_result(result, params, value)


def _solve(
    fun: Callable[..., Any],
    params0: PyTree,
    args: tuple[Any, ...],
    box: Bounds | None,
    *,
    dims: tuple[Any, ...],
    settings: Settings,
    compile: bool | Mapping[str, Any],
    callback: Callable[[Progress], None] | None,
    callback_every: int,
    value_and_grad: bool,
    progress: bool | None,
) -> tuple[RoundState, Unravel]:
    """The rounds of :func:`batched_minimize`: every problem's final state, and the layout of one
    problem's params."""
    structure: list[Unravel] = []

    def objective(data: tuple[Any, ...], unravel: Unravel) -> FlatObjective:
        return flat_objective(lambda p: fun(p, *data), unravel, value_and_grad=value_and_grad)

    def start_one(params: PyTree, box: Bounds | None, *data: Any) -> RoundState:
        # `data` (unused: the first round evaluates) sizes the batch where `params0` is shared.
        x, unravel = ravel_pytree(params)
        structure.append(unravel)
        return start_unevaluated(x, settings, box)

    # Distinct, contiguous leaves, as a round returns them: vmap returns a leaf that does not
    # depend on the batch as a stride-0 expansion, and the start shares some leaves (the first
    # trial step is the proposal's); a compiled round would guard on both and compile again.
    state = map_leaves(
        lambda leaf: leaf.clone(memory_format=torch.contiguous_format),
        torch.func.vmap(start_one, in_dims=(dims[0], None if box is None else 0, *dims[1:]))(
            params0, box, *args
        ),
    )
    unravel = structure[-1]
    # The round rebuilds `unravel` from a template (one problem's params) rather than closing
    # over it, so that under torch.compile the pytree structure is traced, not a foreign object.
    template = unravel(state.x[0].clone())

    def advance_one(state: RoundState, template: PyTree, *data: Any) -> RoundState:
        return advance(objective(data, ravel_pytree(template)[1]), state, settings, unevaluated_starts=True)

    advance_batch = torch.func.vmap(advance_one, in_dims=(0, None, *dims[1:]))
    check_every = stop_check_interval(settings.early_exit, state.lbfgs.status)
    active = active_batch(state, args, dims[1:], compile)
    rounds_to = _Rounds(advance_batch, fun, compile, check_every, shrinkable=active.can_shrink)
    total = 1 + max_rounds(settings)  # the first round evaluates the start
    bar = ProgressBar(enabled=progress_wanted(progress), total=total, label="batched_minimize")
    pace = _BarPace(bar.enabled)
    done = 0  # rounds run
    try:
        while done < total:
            if check_every is not None and done % check_every == 0:
                running = _running(active.state)
                keep = running.nonzero().squeeze(1)  # sync-ok: as often as early_exit allows
                running_count = keep.numel()
                if running_count == 0:
                    break
                if bar.enabled:  # sync-ok: the bar reads the running problems' values
                    # (none before the first round, which evaluates the starts)
                    values = active.state.lbfgs.value[keep] if done > 0 else None
                    bar.update(rounds=done, running=running_count, values=values)
                if should_shrink(running_count, running.numel()) and active.can_shrink:
                    active.shrink(keep)
            if done == 0 and rounds_to.compiled:
                with bar.compiling("one round (vmapped advance)", announce=rounds_to.first_compile):
                    active.state, done = rounds_to(active.state, template, active.args, done, 1)
            else:
                # where the host acts next: a callback, the bar, or the end
                last = min(total, pace.next(done), _next_multiple(done, callback_every, callback))
                before, started = done, pace.clock()
                active.state, done = rounds_to(active.state, template, active.args, done, last)
                pace.ran(done - before, started)
            if callback is not None and done % callback_every == 0:
                callback(progress_of(done, active.whole(), settings))
        if bar.enabled:  # sync-ok: the bar's last reading
            whole = active.whole()
            still = _running(whole)
            bar.update(rounds=done, running=int(still.sum()), values=whole.lbfgs.value)
    finally:
        bar.close()
    return active.whole(), unravel


def _running(state: RoundState) -> torch.Tensor:
    return state.lbfgs.status == StopReason.RUNNING.value


def _next_multiple(done: int, every: int, callback: object) -> int:
    """The next round after ``done`` at which ``callback`` is due (never without one)."""
    return sys.maxsize if callback is None else (done // every + 1) * every


class _Rounds:
    """How a solve runs its rounds: ``rounds(state, template, args, done, last)`` runs the
    rounds after ``done`` up to ``last`` at most, and returns the state and the rounds done.

    Eagerly, and compiled where the stop flags are not read every round (off the CPU, or
    ``early_exit=False``), it runs one round per call. Compiled where they are read every
    round, it runs the rounds until the host has something to do (the batch should shrink, all
    problems stopped, ``last``) as one ``while_loop`` in one call of the compiled graph
    (:func:`~torchlbfgs.compaction.steps_until_shrink`).
    """

    def __init__(
        self, advance_batch: Callable[..., RoundState], fun: Callable[..., Any],
        compile: bool | Mapping[str, Any], check_every: int | None, *, shrinkable: bool,
    ) -> None:  # fmt: skip
        self.compiled = compile is not False
        self.stretches = self.compiled and check_every == 1
        self.advance_batch = advance_batch
        self.first_compile = False  # whether the first call compiles (as far as can be told)
        if compile is not False:
            kind = "batched_minimize rounds" if self.stretches else "batched_minimize round"
            self.run = CompiledStep(kind, fun, {} if compile is True else compile, loops=self.stretches)
            self.first_compile = not self.run.compiled_before

        def stretch(
            state: RoundState, count: torch.Tensor, last: torch.Tensor, template: PyTree, *data: Any
        ) -> tuple[RoundState, torch.Tensor]:
            return steps_until_shrink(
                lambda state: advance_batch(state, template, *data), state, count, last, _running,
                shrinkable=shrinkable,
            )  # fmt: skip

        self.stretch = stretch

    def __call__(
        self, state: RoundState, template: PyTree, args: tuple[Any, ...], done: int, last: int
    ) -> tuple[RoundState, int]:
        if self.stretches:
            return call_with_counts(self.run, self.stretch, state, done, last, template, *args)
        if self.compiled:
            return self.run(self.advance_batch, state, template, *args), done + 1
        return self.advance_batch(state, template, *args), done + 1


class _BarPace:
    """Where a stretch of compiled rounds stops so that the progress bar moves: after about
    :data:`BAR_SECONDS`, judged by the pace of the rounds so far (without a bar: never)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.stride = enabled, 1

    def next(self, done: int) -> int:
        return done + self.stride if self.enabled else sys.maxsize

    def clock(self) -> float:
        return time.perf_counter() if self.enabled else 0.0  # no clock where Dynamo traces

    def ran(self, rounds: int, started: float) -> None:
        seconds = self.clock() - started
        if self.enabled and rounds > 0 and seconds > 0:  # at most twice as many rounds each time
            self.stride = max(1, min(int(BAR_SECONDS * rounds / seconds), 2 * self.stride))


BAR_SECONDS = 0.2
"""About how often the progress bar of a compiled solve moves (Inductor's loop runs the rounds
between two readings; the bar draws no more often than tqdm would anyway)."""
