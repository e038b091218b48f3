r"""Backtracking line search on the Armijo (sufficient-decrease) condition.

Tries :math:`t_0, t_1, \dots` until :math:`f(x + t d) \le f(x) + c_1 t\, g^\top d`, each new
trial the safeguarded minimiser of the quadratic interpolant (Nocedal & Wright Algorithm 3.1
with eq. 3.58). A non-finite value counts as a failed test, so the search backs out of regions
where ``fun`` overflows or leaves its domain. It stops after ``max_ls + 1`` evaluations, when
its budget is used up, or when the step ``t max|d|`` falls below ``tolerance_change``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from torchlbfgs.line_searches.interpolation import quadratic_backtrack
from torchlbfgs.line_searches.method import SearchLimits, SearchOrigin
from torchlbfgs.line_searches.result import FlatLineSearchResult

__all__ = ["Backtracking"]


class _Search(NamedTuple):
    t: torch.Tensor
    done: torch.Tensor
    success: torch.Tensor
    n_evals: torch.Tensor
    result_t: torch.Tensor
    result_f: torch.Tensor
    result_g: torch.Tensor
    gtd: torch.Tensor  # g'd at the origin
    d_norm: torch.Tensor  # max|d|
    budget: torch.Tensor  # evaluations allowed


@dataclass(frozen=True)
class Backtracking(SearchLimits):
    """Armijo backtracking as a :class:`~torchlbfgs.line_searches.method.SearchMethod`."""

    c1: float = 1e-4

    def start(
        self, origin: SearchOrigin, step_size: torch.Tensor, active: torch.Tensor, budget: torch.Tensor
    ) -> _Search:
        return _Search(
            t=step_size,
            done=~(active & (budget > 0)),
            success=torch.zeros_like(active),
            n_evals=torch.zeros_like(budget),
            result_t=torch.zeros_like(origin.value),
            result_f=origin.value,
            result_g=origin.grad,
            gtd=self.reductions.dot(origin.grad, origin.direction),
            d_norm=self.reductions.max_abs(origin.direction),
            budget=budget,
        )

    def trial(self, search: _Search) -> tuple[torch.Tensor, torch.Tensor]:
        return search.t, ~search.done

    def digest(self, s: _Search, origin: SearchOrigin, f_new: torch.Tensor, g_new: torch.Tensor) -> _Search:
        running = ~s.done
        gtd_new = self.reductions.dot(g_new, origin.direction)
        finite = torch.isfinite(f_new) & torch.isfinite(gtd_new)
        accepted = running & finite & (f_new <= origin.value + self.c1 * s.t * s.gtd)
        n_evals = s.n_evals + running.long()
        t_next = quadratic_backtrack(s.t, origin.value, s.gtd, torch.where(finite, f_new, torch.inf))
        exhausted = (
            (n_evals >= self.max_ls + 1) | (t_next * s.d_norm < self.tolerance_change) | (n_evals >= s.budget)
        )
        return s._replace(
            t=torch.where(running & ~accepted, t_next, s.t),
            done=s.done | accepted | exhausted,
            success=s.success | accepted,
            n_evals=n_evals,
            result_t=torch.where(accepted, s.t, s.result_t),
            result_f=torch.where(accepted, f_new, s.result_f),
            result_g=torch.where(accepted, g_new, s.result_g),
        )

    def outcome(self, search: _Search) -> FlatLineSearchResult:
        return FlatLineSearchResult(
            search.result_t, search.result_f, search.result_g, search.n_evals, search.success
        )
