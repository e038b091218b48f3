r"""Strong-Wolfe line search with cubic interpolation, decision for decision as torch's.

Finds a step :math:`t` along a descent direction :math:`d` with

.. math::
    f(x + t d) \le f(x) + c_1 t\, g^\top d, \qquad |g(x + t d)^\top d| \le -c_2\, g^\top d

(Nocedal & Wright, Algorithms 3.5 and 3.6). The bracketing and zoom rules, constants, the
safeguards on interpolated steps and the iteration limit ``max_ls`` are those of
``torch.optim.lbfgs._strong_wolfe``, so on finite data it evaluates the same points and
returns the same step. It is written as a state machine doing one evaluation per step, so
that it is branch-free on tensor values; two things differ from torch, both only where torch
misbehaves:

* ``max_evals`` caps the evaluations (torch's search ignores the optimizer's ``max_eval``);
  when it binds, the search stops as torch's does when ``max_ls`` binds.
* a non-finite value or directional derivative counts as a failed sufficient-decrease test,
  and interpolation through non-finite data falls back to bisection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from torchlbfgs.line_searches.interpolation import cubic_minimizer
from torchlbfgs.line_searches.method import SearchLimits, SearchOrigin
from torchlbfgs.line_searches.result import FlatLineSearchResult
from torchlbfgs.norms import max_abs

__all__ = ["StrongWolfe"]

_BRACKET, _ZOOM, _DONE = 0, 1, 2


class _Search(NamedTuple):
    t: torch.Tensor  # trial step to evaluate next
    t_prev: torch.Tensor  # previous trial of the bracketing phase, with its data
    f_prev: torch.Tensor
    g_prev: torch.Tensor
    gtd_prev: torch.Tensor
    bracket_t: torch.Tensor  # (2,) the two ends of the zoom interval, in torch's slot order
    bracket_f: torch.Tensor  # (2,)
    bracket_gtd: torch.Tensor  # (2,)
    bracket_g: torch.Tensor  # (2, n)
    low_is_first: torch.Tensor  # the lower-value end is slot 0 (torch's `low_pos == 0`)
    insufficient_progress: torch.Tensor
    phase: torch.Tensor  # _BRACKET, _ZOOM or _DONE
    n_evals: torch.Tensor
    wolfe: torch.Tensor  # both strong-Wolfe conditions hold at the result
    result_t: torch.Tensor
    result_f: torch.Tensor
    result_g: torch.Tensor
    gtd: torch.Tensor  # g'd at the origin
    d_norm: torch.Tensor  # max|d|
    budget: torch.Tensor  # evaluations allowed


def _pick(first: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    """``pair[0]`` where ``first`` else ``pair[1]`` (leading dimension of size 2)."""
    return torch.where(first, pair[0], pair[1])


def _set_slot(
    pair: torch.Tensor, slot_is_first: torch.Tensor, write: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """``pair`` with ``pair[slot] = value`` where ``write``; slot 0 if ``slot_is_first``."""
    return torch.stack(
        (
            torch.where(write & slot_is_first, value, pair[0]),
            torch.where(write & ~slot_is_first, value, pair[1]),
        )
    )


@dataclass(frozen=True)
class StrongWolfe(SearchLimits):
    """Strong-Wolfe search as a :class:`~torchlbfgs.line_searches.method.SearchMethod`; see
    the module docstring, and :func:`torchlbfgs.line_search` for the constants."""

    c1: float = 1e-4
    c2: float = 0.9

    def start(
        self, origin: SearchOrigin, step_size: torch.Tensor, active: torch.Tensor, budget: torch.Tensor
    ) -> _Search:
        value, grad, direction = origin.value, origin.grad, origin.direction
        gtd = torch.dot(grad, direction)
        zero = torch.zeros_like(value)
        false = torch.zeros_like(active)
        return _Search(
            t=step_size,
            t_prev=zero,
            f_prev=value,
            g_prev=grad,
            gtd_prev=gtd,
            bracket_t=torch.stack((zero, zero)),
            bracket_f=torch.stack((value, value)),
            bracket_gtd=torch.stack((gtd, gtd)),
            bracket_g=torch.stack((grad, grad)),
            low_is_first=~false,
            insufficient_progress=false,
            phase=torch.where(active & (budget > 0), _BRACKET, _DONE),
            n_evals=torch.zeros_like(budget),
            wolfe=false,
            result_t=zero,
            result_f=value,
            result_g=grad,
            gtd=gtd,
            d_norm=max_abs(direction),
            budget=budget,
        )

    def trial(self, search: _Search) -> tuple[torch.Tensor, torch.Tensor]:
        return search.t, search.phase != _DONE

    def digest(self, s: _Search, origin: SearchOrigin, f_new: torch.Tensor, g_new: torch.Tensor) -> _Search:
        c1, c2, max_ls, tolerance_change = self.c1, self.c2, self.max_ls, self.tolerance_change
        start_value, start_grad, gtd, d_norm = origin.value, origin.grad, s.gtd, s.d_norm
        zero = torch.zeros_like(start_value)
        running = s.phase != _DONE
        gtd_new = torch.dot(g_new, origin.direction)
        f_new = torch.where(torch.isfinite(f_new) & torch.isfinite(gtd_new), f_new, torch.inf)
        n_evals = s.n_evals + running.long()
        ls_iter = n_evals - 1  # torch's counter: evaluations after the first

        # Bracketing phase (N&W Algorithm 3.5).
        in_bracketing = running & (s.phase == _BRACKET)
        out_of_iterations = ls_iter >= max_ls  # torch then stops without testing this point
        testing = in_bracketing & ~out_of_iterations
        armijo_fails = (f_new > start_value + c1 * s.t * gtd) | ((ls_iter > 1) & (f_new >= s.f_prev))
        wolfe_now = testing & ~armijo_fails & (gtd_new.abs() <= -c2 * gtd)
        enter_zoom = testing & ~wolfe_now & (armijo_fails | (gtd_new >= 0))
        extrapolate = testing & ~wolfe_now & ~enter_zoom
        gave_up_bracketing = in_bracketing & out_of_iterations
        t_extrapolated = cubic_minimizer(
            s.t_prev, s.f_prev, s.gtd_prev, s.t, f_new, gtd_new,
            lower=s.t + 0.01 * (s.t - s.t_prev), upper=s.t * 10,
        )  # fmt: skip

        # Zoom phase (N&W Algorithm 3.6), updating the bracket with the point just evaluated.
        in_zoom = running & (s.phase == _ZOOM)
        f_low = _pick(s.low_is_first, s.bracket_f)
        zoom_shrinks_high = in_zoom & ((f_new > start_value + c1 * s.t * gtd) | (f_new >= f_low))
        zoom_new_low = in_zoom & ~zoom_shrinks_high
        wolfe_in_zoom = zoom_new_low & (gtd_new.abs() <= -c2 * gtd)
        t_low, t_high = _pick(s.low_is_first, s.bracket_t), _pick(~s.low_is_first, s.bracket_t)
        high_takes_low = zoom_new_low & ~wolfe_in_zoom & (gtd_new * (t_high - t_low) >= 0)

        bracket = []
        for ends, new, prev in (
            (s.bracket_t, s.t, s.t_prev),
            (s.bracket_f, f_new, s.f_prev),
            (s.bracket_gtd, gtd_new, s.gtd_prev),
            (s.bracket_g, g_new, s.g_prev),
        ):
            low_end = _pick(s.low_is_first, ends)
            ends = _set_slot(ends, ~s.low_is_first, zoom_shrinks_high, new)
            ends = _set_slot(ends, ~s.low_is_first, high_takes_low, low_end)
            ends = _set_slot(ends, s.low_is_first, zoom_new_low, new)
            bracket.append(torch.where(enter_zoom, torch.stack((prev, new)), ends))
        bracket_t, bracket_f, bracket_gtd, bracket_g = bracket
        reorder = enter_zoom | zoom_shrinks_high
        low_is_first = torch.where(reorder, bracket_f[0] <= bracket_f[1], s.low_is_first)

        # Next zoom trial: cubic step inside the bracket, kept away from its ends.
        zooming = enter_zoom | (zoom_new_low & ~wolfe_in_zoom) | zoom_shrinks_high
        interval_too_small = (bracket_t[1] - bracket_t[0]).abs() * d_norm < tolerance_change
        zoom_stops = zooming & ((ls_iter >= max_ls) | interval_too_small)
        zoom_continues = zooming & ~zoom_stops
        t_zoom = cubic_minimizer(
            bracket_t[0], bracket_f[0], bracket_gtd[0], bracket_t[1], bracket_f[1], bracket_gtd[1]
        )
        t_max, t_min = torch.maximum(bracket_t[0], bracket_t[1]), torch.minimum(bracket_t[0], bracket_t[1])
        margin = 0.1 * (t_max - t_min)
        near_end = torch.minimum(t_max - t_zoom, t_zoom - t_min) < margin
        move_in = near_end & (s.insufficient_progress | (t_zoom >= t_max) | (t_zoom <= t_min))
        moved = torch.where((t_zoom - t_max).abs() < (t_zoom - t_min).abs(), t_max - margin, t_min + margin)
        t_zoom = torch.where(move_in, moved, t_zoom)
        insufficient_progress = torch.where(zoom_continues, near_end & ~move_in, s.insufficient_progress)

        # Outcome of this step.
        low = [_pick(low_is_first, ends) for ends in (bracket_t, bracket_f, bracket_g)]
        out_of_budget = n_evals >= s.budget
        keeps_going = (extrapolate | zoom_continues) & ~(running & out_of_budget)
        budget_stop_extrapolating = extrapolate & ~keeps_going
        # torch's exit when max_ls binds while bracketing: bracket [0, t], keep the lower end.
        last_beats_start = f_new < start_value
        take_new = wolfe_now | ((gave_up_bracketing | budget_stop_extrapolating) & last_beats_start)
        take_start = (gave_up_bracketing | budget_stop_extrapolating) & ~last_beats_start
        take_low = (zooming | wolfe_in_zoom) & ~keeps_going
        result = [s.result_t, s.result_f, s.result_g]
        for condition, chosen in (
            (take_low, low),
            (take_start, (zero, start_value, start_grad)),
            (take_new, (s.t, f_new, g_new)),
        ):
            result = [torch.where(condition, new, old) for new, old in zip(chosen, result, strict=True)]
        phase = torch.where(
            running & ~keeps_going, _DONE, torch.where(zoom_continues | enter_zoom, _ZOOM, s.phase)
        )
        return _Search(
            t=torch.where(extrapolate, t_extrapolated, torch.where(zoom_continues, t_zoom, s.t)),
            t_prev=torch.where(extrapolate, s.t, s.t_prev),
            f_prev=torch.where(extrapolate, f_new, s.f_prev),
            g_prev=torch.where(extrapolate, g_new, s.g_prev),
            gtd_prev=torch.where(extrapolate, gtd_new, s.gtd_prev),
            bracket_t=bracket_t,
            bracket_f=bracket_f,
            bracket_gtd=bracket_gtd,
            bracket_g=bracket_g,
            low_is_first=low_is_first,
            insufficient_progress=insufficient_progress,
            phase=phase,
            n_evals=n_evals,
            wolfe=s.wolfe | wolfe_now | wolfe_in_zoom,
            result_t=result[0],
            result_f=result[1],
            result_g=result[2],
            gtd=s.gtd,
            d_norm=s.d_norm,
            budget=s.budget,
        )

    def outcome(self, search: _Search) -> FlatLineSearchResult:
        return FlatLineSearchResult(
            step_size=search.result_t,
            value=search.result_f,
            grad=search.result_g,
            n_evals=search.n_evals,
            success=search.wolfe,
        )
