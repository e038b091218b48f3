"""What every line search provides, so that one driver can run any of them.

A line search is a state machine over tensors: ``start`` it from an origin, read the next
trial step with ``trial``, evaluate ``fun`` there, hand the result to ``digest``, and repeat
until ``trial`` reports it is no longer running; ``outcome`` then gives the result. Nothing
branches on tensor values, so a batch of searches under ``vmap`` advances together, each
search stopping on its own.

Two drivers use this protocol: :func:`run_search` runs one whole search (what
:func:`torchlbfgs.update` and :func:`torchlbfgs.line_search` do), and the evaluation rounds of
:mod:`torchlbfgs.rounds` feed every problem of a batch one evaluation at a time, so that a
problem whose search is over starts its next iteration while others are still searching.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import torch

from torchlbfgs.line_searches.loop import run_masked_loop, trial_point
from torchlbfgs.line_searches.result import FlatLineSearchResult
from torchlbfgs.objective import FlatObjective
from torchlbfgs.sharding import Reductions, local_reductions

if TYPE_CHECKING:
    from torchlbfgs.bounds import Bounds

__all__ = [
    "NO_BUDGET", "SearchLimits", "SearchMethod", "SearchOrigin", "evaluation_budget", "no_step_limit",
    "run_search", "step_limit",
]  # fmt: skip

Search = TypeVar("Search")

NO_BUDGET = 2**62
"""The evaluation budget that stands for "no cap" (an int64 no counter reaches)."""


class SearchOrigin(NamedTuple):
    """The point a search starts from and its direction, fixed for the whole search.

    Attributes:
        direction: ``(n,)`` - the search direction :math:`d`.
        value: ``()`` - :math:`f(x)`.
        grad: ``(n,)`` - :math:`\\nabla f(x)`.
        max_step: ``()`` - the largest step the search may try (the feasible segment of a
            bounded problem, :func:`torchlbfgs.bounds.max_step`); ``None`` or an empty tensor
            (:func:`no_step_limit`): no limit.
    """

    direction: torch.Tensor
    value: torch.Tensor
    grad: torch.Tensor
    max_step: torch.Tensor | None = None


class SearchMethod(Protocol[Search]):
    """A line search as a state machine with one evaluation per step."""

    @property
    def max_trials(self) -> int:
        """No search evaluates ``fun`` more often than this."""
        ...

    def start(
        self, origin: SearchOrigin, step_size: torch.Tensor, active: torch.Tensor, budget: torch.Tensor
    ) -> Search:
        """A search from ``origin`` with first trial ``step_size``; inactive searches (and
        those with ``budget <= 0`` evaluations left) start finished."""
        ...

    def trial(self, search: Search) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t, running)``: the step to evaluate next, and whether the search still runs."""
        ...

    def digest(
        self, search: Search, origin: SearchOrigin, f_new: torch.Tensor, g_new: torch.Tensor
    ) -> Search:
        """Take in ``f_new`` and ``g_new``, the value and gradient at the trial point (ignored
        by finished searches, which stay unchanged)."""
        ...

    def outcome(self, search: Search) -> FlatLineSearchResult:
        """The result so far (final once the search stops running)."""
        ...


@dataclass(frozen=True, kw_only=True)
class SearchLimits:
    """The limits every search with trials shares (a base of the search dataclasses).

    Attributes:
        tolerance_change: the search stops once its step interval times ``max|d|`` is below this.
        max_ls: iteration limit: at most ``max_ls + 1`` evaluations (torch's ``max_ls``).
        reductions: the inner products and max-norms of the vectors
            (:mod:`torchlbfgs.sharding`; across processes for sharded parameters).
    """

    tolerance_change: float = 1e-9
    max_ls: int = 25
    reductions: Reductions = field(default_factory=local_reductions)

    @property
    def max_trials(self) -> int:
        """No search evaluates ``fun`` more often than this."""
        return self.max_ls + 1


def no_step_limit(like: torch.Tensor) -> torch.Tensor:
    """The ``max_step`` of a search without a limit as a tensor: one with no elements. States
    hold it instead of ``None``, since ``torch.func.vmap`` returns only tensors; built from
    ``like`` so that it batches like the rest."""
    return torch.zeros_like(like).reshape(-1)[:0]


def step_limit(max_step: Any) -> Any:
    """``max_step`` if it limits a search, ``None`` if not (``None`` or :func:`no_step_limit`).
    A static decision: it reads a shape, never a value."""
    if isinstance(max_step, torch.Tensor) and max_step.dim() > 0 and max_step.shape[-1] == 0:
        return None
    return max_step


def evaluation_budget(max_evals: int | torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``max_evals`` as an int64 tensor shaped like ``like``; ``None`` becomes :data:`NO_BUDGET`.

    Built from ``like`` so that under ``vmap`` it is batched like the rest of a search's state.
    """
    budget = NO_BUDGET if max_evals is None else max_evals
    return torch.zeros_like(like, dtype=torch.int64) + budget


def run_search(
    method: SearchMethod[Search],
    objective: FlatObjective,
    x: torch.Tensor,
    origin: SearchOrigin,
    step_size: torch.Tensor,
    *,
    active: torch.Tensor,
    max_evals: int | torch.Tensor | None,
    early_exit: bool | None,
    bounds: Bounds | None = None,
) -> FlatLineSearchResult:
    """Run one whole search from ``x`` with at most ``max_evals`` evaluations (trial points
    projected onto ``bounds``, if given)."""
    search = method.start(origin, step_size, active, evaluation_budget(max_evals, origin.value))

    def step(search: Search) -> Search:
        t, running = method.trial(search)
        value, grad = objective(trial_point(x, origin.direction, t, running, bounds))
        return method.digest(search, origin, value, grad)

    max_steps = method.max_trials
    if isinstance(max_evals, int):
        max_steps = min(max_steps, max(max_evals, 0))
    end = run_masked_loop(step, search, lambda s: ~method.trial(s)[1], max_steps, early_exit)
    return method.outcome(end)
