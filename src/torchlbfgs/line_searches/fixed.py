"""No line search: take the step ``t`` as given (``line_search_fn=None`` in torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from torchlbfgs.line_searches.method import SearchOrigin
from torchlbfgs.line_searches.result import FlatLineSearchResult
from torchlbfgs.sharding import Reductions, local_reductions

__all__ = ["FixedStep"]


class _Search(NamedTuple):
    t: torch.Tensor
    running: torch.Tensor
    result: FlatLineSearchResult


@dataclass(frozen=True)
class FixedStep:
    """Evaluate once at ``x + t d`` and accept it; succeeds when value and gradient are finite.

    Inactive searches (or an exhausted budget) keep ``t = 0`` and count no evaluation.
    ``reductions``: see :class:`~torchlbfgs.line_searches.method.SearchLimits`.
    """

    reductions: Reductions = field(default_factory=local_reductions)

    @property
    def max_trials(self) -> int:
        return 1

    def start(
        self, origin: SearchOrigin, step_size: torch.Tensor, active: torch.Tensor, budget: torch.Tensor
    ) -> _Search:
        running = active & (budget > 0)
        idle = FlatLineSearchResult(
            step_size=torch.zeros_like(step_size),
            value=origin.value,
            grad=origin.grad,
            n_evals=torch.zeros_like(budget),
            success=torch.zeros_like(running),
        )
        return _Search(t=step_size, running=running, result=idle)

    def trial(self, search: _Search) -> tuple[torch.Tensor, torch.Tensor]:
        return search.t, search.running

    def digest(self, s: _Search, origin: SearchOrigin, f_new: torch.Tensor, g_new: torch.Tensor) -> _Search:
        finite = torch.isfinite(f_new) & self.reductions.all(torch.isfinite(g_new).all())
        running, idle = s.running, s.result
        taken = FlatLineSearchResult(
            step_size=torch.where(running, s.t, idle.step_size),
            value=torch.where(running, f_new, idle.value),
            grad=torch.where(running, g_new, idle.grad),
            n_evals=idle.n_evals + running.long(),
            success=idle.success | (running & finite),
        )
        return _Search(t=s.t, running=torch.zeros_like(running), result=taken)

    def outcome(self, search: _Search) -> FlatLineSearchResult:
        return search.result
