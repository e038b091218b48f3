"""Evaluation rounds: L-BFGS as a state machine that takes one evaluation per round.

:func:`torchlbfgs.update` runs a whole iteration, line search included. Under ``vmap`` that
puts a batch in lockstep: every problem waits until the slowest line search of the batch has
finished, and every round of that search evaluates the whole batch. Here the unit of work is
one evaluation instead. Each round (:func:`advance`) evaluates every running problem once,
feeds the value and gradient to that problem's line search, and a problem whose search has
just finished takes its step and starts its next iteration (direction, first trial) in the
same round, while the others go on searching. A batch therefore needs about as many rounds as
its most expensive problem needs evaluations, rather than the sum over iterations of the
longest search.

Per problem, the sequence of evaluations and decisions is exactly that of a loop of
:func:`torchlbfgs.update` (same functions: ``propose``, the line search's ``digest``,
``accept``), so iterates and counters are the same.

The functions are pure and branch-free on tensor values; :func:`torchlbfgs.minimize` and
:func:`torchlbfgs.batched_minimize` loop over :func:`advance`, and the latter can
``torch.compile`` one round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from torchlbfgs.bounds import Bounds, given_bounds, no_bounds, project
from torchlbfgs.direction import DIRECTIONS, Direction
from torchlbfgs.history import CURVATURE_RULES, CurvatureRule, History
from torchlbfgs.line_searches import LineSearch, check_line_search_options, search_method
from torchlbfgs.line_searches.loop import trial_point
from torchlbfgs.line_searches.method import SearchMethod, SearchOrigin, evaluation_budget
from torchlbfgs.objective import FlatObjective
from torchlbfgs.options import Tolerances, require_choice, require_count, require_step_options
from torchlbfgs.sharding import Reductions, local_reductions
from torchlbfgs.state import LBFGSState, StopReason
from torchlbfgs.update import Proposal, accept, initial_state, propose, starting_status

__all__ = ["RoundState", "Settings", "advance", "max_rounds", "start", "start_unevaluated"]


@dataclass(frozen=True)
class Settings:
    """The options of a solve (see :func:`torchlbfgs.minimize`), validated; and the reductions
    of the flat vectors (:mod:`torchlbfgs.sharding`: across processes for sharded parameters),
    which are no option but follow from the parameters."""

    max_iter: int = 100
    tolerance_grad: float = 1e-7
    tolerance_change: float | None = None
    tolerance_value: float | None = None
    history_size: int = 10
    direction: Direction = "two_loop"
    line_search: LineSearch = "strong_wolfe"
    learning_rate: float = 1.0
    curvature_rule: CurvatureRule = "relative"
    c1: float = 1e-4
    c2: float = 0.9
    max_ls: int = 25
    max_evals: int | None = None
    early_exit: bool | None = None
    reductions: Reductions = field(default_factory=local_reductions)

    def __post_init__(self) -> None:
        require_count("max_iter", self.max_iter, 0)
        require_count("max_ls", self.max_ls, 0)
        require_count("history_size", self.history_size, 1)
        if self.max_evals is not None:
            require_count("max_evals", self.max_evals, 0)
        check_line_search_options(self.line_search, self.c1, self.c2, self.max_ls)
        require_step_options(
            self.learning_rate, self.tolerance_grad, self.tolerance_change, self.tolerance_value
        )
        require_choice("direction", self.direction, DIRECTIONS)
        require_choice("curvature_rule", self.curvature_rule, CURVATURE_RULES)

    @property
    def tolerances(self) -> Tolerances:
        return Tolerances.of(self.tolerance_change, self.tolerance_value)

    @property
    def search(self) -> SearchMethod[Any]:
        return search_method(
            self.line_search, c1=self.c1, c2=self.c2,
            tolerance_change=self.tolerances.search, max_ls=self.max_ls, reductions=self.reductions,
        )  # fmt: skip


class RoundState(NamedTuple):
    """Where one problem stands between rounds (every leaf batches under ``vmap``).

    Attributes:
        x: ``(n,)`` - the current iterate, flat.
        lbfgs: the :class:`~torchlbfgs.LBFGSState` at ``x``; its status is ``MAX_ITERATIONS``
            once ``max_iter`` iterations are done.
        proposal: the current iteration's direction and first step (see
            :func:`torchlbfgs.update.propose`).
        search: the current iteration's line-search state machine.
        bounds: the problem's box constraints (flat); empty vectors
            (:func:`~torchlbfgs.bounds.no_bounds`) without bounds.
        trial: ``(n,)`` - the point the next round evaluates: the search's trial point
            (:func:`~torchlbfgs.line_searches.loop.trial_point`), or ``x`` once the problem
            has stopped. A round computes it for the next one rather than where it evaluates:
            compiled, the evaluation then reads it from memory, whereas Inductor inlines
            ``x + t d`` into the evaluation's loops and recomputes it for every row of a
            matrix product (7-13% of a logistic regression's evaluation at B = 1024,
            ``bench/README.md``).
    """

    x: torch.Tensor
    lbfgs: LBFGSState
    proposal: Proposal
    search: Any
    bounds: Bounds
    trial: torch.Tensor


def max_rounds(settings: Settings) -> int:
    """Rounds after which every problem has stopped: each iteration takes at least one round and
    at most one per line-search trial, and a search that the evaluation budget stops before
    its first trial ends the problem in that round."""
    rounds = settings.max_iter * settings.search.max_trials
    return rounds if settings.max_evals is None else min(rounds, settings.max_evals)


def _begin_iteration(
    x: torch.Tensor, lbfgs: LBFGSState, settings: Settings, bounds: Bounds | None
) -> tuple[LBFGSState, Proposal, Any]:
    """Direction and first trial of the next iteration at ``x`` (nothing for stopped problems):
    the state, the proposal and the search, started."""
    running = lbfgs.status == StopReason.RUNNING.value
    out_of_iterations = running & (lbfgs.iteration >= settings.max_iter)
    lbfgs = lbfgs._replace(
        status=torch.where(out_of_iterations, StopReason.MAX_ITERATIONS.value, lbfgs.status)
    )
    proposal = propose(
        lbfgs, learning_rate=settings.learning_rate, tolerance_grad=settings.tolerance_grad,
        tolerance_change=settings.tolerances.change, early_exit=settings.early_exit, x=x, bounds=bounds,
        reductions=settings.reductions,
    )  # fmt: skip
    # An iteration that stops before its line search (small gradient, no descent) ends here, as
    # `accept` would end it after an empty search, without spending a round.
    no_search = ~proposal.searching
    lbfgs = lbfgs._replace(
        status=torch.where(no_search, proposal.status, lbfgs.status),
        iteration=lbfgs.iteration + (no_search & proposal.attempted).long(),
    )
    budget = evaluation_budget(
        None if settings.max_evals is None else settings.max_evals - lbfgs.n_evals, lbfgs.value
    )
    origin = SearchOrigin(proposal.direction, lbfgs.value, lbfgs.grad, proposal.max_step)
    return lbfgs, proposal, settings.search.start(origin, proposal.step_size, proposal.searching, budget)


def _round_state(
    x: torch.Tensor, lbfgs: LBFGSState, proposal: Proposal, search: Any, box: Bounds, settings: Settings
) -> RoundState:
    """The state between rounds, with the point the next round evaluates."""
    t, running = settings.search.trial(search)
    trial = trial_point(x, proposal.direction, t, running, given_bounds(box))
    return RoundState(x=x, lbfgs=lbfgs, proposal=proposal, search=search, bounds=box, trial=trial)


def start(
    objective: FlatObjective, x: torch.Tensor, settings: Settings, bounds: Bounds | None = None
) -> RoundState:
    """Evaluate at ``x`` (the one evaluation of ``init``; projected onto ``bounds`` first, if
    given) and plan the first iteration."""
    if bounds is not None:
        x = project(x, bounds)
    value, grad = objective(x)
    lbfgs = initial_state(
        value.to(x.dtype), grad, history_size=settings.history_size, direction=settings.direction,
        bounds=bounds, reductions=settings.reductions,
    )  # fmt: skip
    box = no_bounds(x) if bounds is None else bounds
    return _round_state(x, *_begin_iteration(x, lbfgs, settings, bounds), box, settings)


def start_unevaluated(x: torch.Tensor, settings: Settings, bounds: Bounds | None = None) -> RoundState:
    """The state at ``x`` (projected onto ``bounds``, if given) before its first evaluation,
    which the first round makes: :func:`advance` then plans the first iteration exactly as
    :func:`start` would have. A compiled solve thus evaluates its start with its compiled round
    rather than eagerly (an eager evaluation of the whole batch cost 5% of a compiled solve
    of ``bench/batched.py``'s problems). Until then the value is NaN and no evaluation is
    counted. Its rounds are ``advance(..., unevaluated_starts=True)``.

    Examples:
        >>> import optree, torch
        >>> settings = Settings()
        >>> def objective(x):
        ...     return (x**2).sum(), 2 * x
        >>> planned = start_unevaluated(torch.tensor([1.0, -2.0]), settings)
        >>> int(planned.lbfgs.n_evals), bool(planned.lbfgs.value.isnan())
        (0, True)
        >>> first = advance(objective, planned, settings, unevaluated_starts=True)
        >>> direct = start(objective, torch.tensor([1.0, -2.0]), settings)
        >>> all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(first), optree.tree_leaves(direct)))
        True
    """
    if bounds is not None:
        x = project(x, bounds)
    zeros = torch.zeros_like(x)
    lbfgs = initial_state(
        zeros.sum(), zeros, history_size=settings.history_size, direction=settings.direction,
        reductions=settings.reductions,
    )  # fmt: skip
    # The proposal and search are placeholders of the right layout; the first round replaces them.
    _, proposal, search = _begin_iteration(x, lbfgs, settings, bounds)
    unevaluated = lbfgs._replace(
        value=torch.full_like(lbfgs.value, float("nan")), n_evals=torch.zeros_like(lbfgs.n_evals)
    )
    box = no_bounds(x) if bounds is None else bounds
    return RoundState(x=x, lbfgs=unevaluated, proposal=proposal, search=search, bounds=box, trial=x)


def advance(
    objective: FlatObjective, state: RoundState, settings: Settings, *, unevaluated_starts: bool = False
) -> RoundState:
    """One round: evaluate each running problem at its trial point and move it on.

    Problems that have stopped are evaluated at their own point (in a batch everybody is
    evaluated) and left bitwise unchanged. With ``unevaluated_starts`` (rounds that began at
    :func:`start_unevaluated`), a problem not yet evaluated is evaluated at its start and begins
    its first iteration; rounds that began at :func:`start` spare those selections.
    """
    method = settings.search
    x, lbfgs, proposal, bounds = state.x, state.lbfgs, state.proposal, given_bounds(state.bounds)
    origin = SearchOrigin(proposal.direction, lbfgs.value, lbfgs.grad, proposal.max_step)
    value, grad = objective(state.trial)
    value = value.to(x.dtype)
    search = method.digest(state.search, origin, value, grad)

    search_over = (lbfgs.status == StopReason.RUNNING.value) & ~method.trial(search)[1]
    starting = lbfgs.n_evals == 0 if unevaluated_starts else None
    if starting is not None:
        search_over = search_over & ~starting
    new_x, new_lbfgs = accept(
        x, lbfgs, proposal, method.outcome(search), line_search=settings.line_search,
        tolerance_grad=settings.tolerance_grad, tolerance_change=settings.tolerances.change,
        tolerance_value=settings.tolerances.value, curvature_rule=settings.curvature_rule,
        max_evals=settings.max_evals, active=search_over, bounds=bounds, reductions=settings.reductions,
    )  # fmt: skip
    new_x = torch.where(search_over, new_x, x)
    begin = search_over
    if starting is not None:
        # A start evaluated now takes the state `start` gives it; its memory, the empty one,
        # is what `accept` (inactive there) returns.
        started = lbfgs._replace(
            value=value, grad=grad, n_evals=torch.ones_like(lbfgs.n_evals),
            status=starting_status(value, grad, bounds, settings.reductions),
        )  # fmt: skip
        new_lbfgs = _select_outside_memory(~starting, new_lbfgs, started)
        begin = search_over | starting
    next_lbfgs, next_proposal, next_search = _begin_iteration(new_x, new_lbfgs, settings, bounds)
    # `accept` changed the memory only where the search is over (`active`), and a start has
    # the empty one: the memory's leaves are taken as they are, without a selection over the
    # (m, n) buffers.
    return _round_state(
        new_x,
        _select_outside_memory(begin, next_lbfgs, lbfgs),
        _select(begin, next_proposal, proposal),
        _select(begin, next_search, search),
        state.bounds,
        settings,
    )


def _select_outside_memory(mask: torch.Tensor, new: LBFGSState, old: LBFGSState) -> LBFGSState:
    """``new`` where ``mask`` else ``old``, but the memory's leaves taken from ``new`` as they
    are (the caller knows they differ only where ``mask`` holds)."""
    return LBFGSState(*(
        after if name in _MEMORY else torch.where(mask, after, before)
        for name, after, before in zip(LBFGSState._fields, new, old, strict=True)
    ))  # fmt: skip


_MEMORY = frozenset(History._fields)


def _select(mask: torch.Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``mask`` else ``old``, leaf by leaf, for (nested) NamedTuples of tensors."""
    if isinstance(new, tuple):
        return type(new)(*(_select(mask, a, b) for a, b in zip(new, old, strict=True)))
    return torch.where(mask, new, old)
