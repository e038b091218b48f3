"""No line search: take the step ``t`` as given (``line_search_fn=None`` in torch)."""

from __future__ import annotations

import torch

from torchlbfgs.line_searches.loop import run_masked_loop, trial_point
from torchlbfgs.line_searches.result import FlatLineSearchResult
from torchlbfgs.objective import FlatObjective

__all__ = ["fixed_step"]


def fixed_step(
    objective: FlatObjective,
    x: torch.Tensor,
    direction: torch.Tensor,
    value: torch.Tensor,
    grad: torch.Tensor,
    step_size: torch.Tensor,
    *,
    active: torch.Tensor,
    max_evals: int | torch.Tensor | None = None,
    early_exit: bool | None = None,
) -> FlatLineSearchResult:
    """Evaluate once at ``x + t d`` and accept it; succeeds when value and gradient are finite.

    Inactive problems (or an exhausted ``max_evals``) keep ``t = 0`` and count no evaluation.
    """
    if max_evals is not None:
        active = active & (torch.as_tensor(max_evals) > 0)
    idle = FlatLineSearchResult(
        step_size=torch.zeros_like(step_size),
        value=value,
        grad=grad,
        n_evals=torch.zeros((), dtype=torch.int64, device=value.device),
        success=torch.zeros_like(active),
    )

    def evaluate(_: FlatLineSearchResult) -> FlatLineSearchResult:
        f_new, g_new = objective(trial_point(x, direction, step_size, active))
        finite = torch.isfinite(f_new) & torch.isfinite(g_new).all()
        return FlatLineSearchResult(
            step_size=torch.where(active, step_size, idle.step_size),
            value=torch.where(active, f_new, value),
            grad=torch.where(active, g_new, grad),
            n_evals=active.long(),
            success=active & finite,
        )

    return run_masked_loop(evaluate, idle, lambda _: ~active, 1, early_exit)
