r"""Backtracking line search on the Armijo (sufficient-decrease) condition.

Tries :math:`t_0, t_1, \dots` until :math:`f(x + t d) \le f(x) + c_1 t\, g^\top d`, each new
trial the safeguarded minimiser of the quadratic interpolant (Nocedal & Wright Algorithm 3.1
with eq. 3.58). A non-finite value counts as a failed test, so the search backs out of regions
where ``fun`` overflows or leaves its domain.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from torchlbfgs.line_searches.interpolation import quadratic_backtrack
from torchlbfgs.line_searches.loop import run_masked_loop, trial_point
from torchlbfgs.line_searches.result import FlatLineSearchResult
from torchlbfgs.objective import FlatObjective

__all__ = ["backtracking"]


class _Search(NamedTuple):
    t: torch.Tensor
    done: torch.Tensor
    success: torch.Tensor
    n_evals: torch.Tensor
    result_t: torch.Tensor
    result_f: torch.Tensor
    result_g: torch.Tensor


def backtracking(
    objective: FlatObjective,
    x: torch.Tensor,
    direction: torch.Tensor,
    value: torch.Tensor,
    grad: torch.Tensor,
    gtd: torch.Tensor,
    step_size: torch.Tensor,
    *,
    active: torch.Tensor,
    max_evals: int | torch.Tensor | None = None,
    c1: float = 1e-4,
    tolerance_change: float = 1e-9,
    max_ls: int = 25,
    early_exit: bool | None = None,
) -> FlatLineSearchResult:
    """Armijo backtracking on flat vectors; stops after ``max_ls + 1`` evaluations, when
    ``max_evals`` is used up, or when the step ``t max|d|`` falls below ``tolerance_change``."""
    d_norm = direction.abs().amax()
    budget_open = active if max_evals is None else active & (torch.as_tensor(max_evals) > 0)
    start = _Search(
        t=step_size,
        done=~budget_open,
        success=torch.zeros_like(active),
        n_evals=torch.zeros((), dtype=torch.int64, device=value.device),
        result_t=torch.zeros_like(value),
        result_f=value,
        result_g=grad,
    )

    def step(s: _Search) -> _Search:
        running = ~s.done
        f_new, g_new = objective(trial_point(x, direction, s.t, running))
        gtd_new = torch.dot(g_new, direction)
        finite = torch.isfinite(f_new) & torch.isfinite(gtd_new)
        accepted = running & finite & (f_new <= value + c1 * s.t * gtd)
        n_evals = s.n_evals + running.long()
        t_next = quadratic_backtrack(s.t, value, gtd, torch.where(finite, f_new, torch.inf))
        exhausted = (n_evals >= max_ls + 1) | (t_next * d_norm < tolerance_change)
        if max_evals is not None:
            exhausted = exhausted | (n_evals >= torch.as_tensor(max_evals))
        return _Search(
            t=torch.where(running & ~accepted, t_next, s.t),
            done=s.done | accepted | exhausted,
            success=s.success | accepted,
            n_evals=n_evals,
            result_t=torch.where(accepted, s.t, s.result_t),
            result_f=torch.where(accepted, f_new, s.result_f),
            result_g=torch.where(accepted, g_new, s.result_g),
        )

    max_steps = max_ls + 1
    if isinstance(max_evals, int):
        max_steps = min(max_steps, max(max_evals, 0))
    end = run_masked_loop(step, start, lambda s: s.done, max_steps, early_exit)
    return FlatLineSearchResult(end.result_t, end.result_f, end.result_g, end.n_evals, end.success)
