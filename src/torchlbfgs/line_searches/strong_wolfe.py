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

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from torchlbfgs.line_searches.interpolation import cubic_minimizer
from torchlbfgs.line_searches.method import SearchLimits, SearchOrigin, no_step_limit, step_limit
from torchlbfgs.line_searches.result import FlatLineSearchResult
from torchlbfgs.scalars import NUMBERS, TENSORS, Scalars, quiet_overflow

__all__ = ["HostSearchResult", "StrongWolfe"]

_BRACKET, _ZOOM, _DONE = 0, 1, 2


class _Search(NamedTuple):
    """The search between evaluations. Scalars are 0-d tensors (functional core) or Python
    numbers (the adapter's host-decided search); vectors are tensors, copied by ``torch.where``
    in the first case and held by reference in the second."""

    t: Any  # trial step to evaluate next
    t_prev: Any  # previous trial of the bracketing phase, with its data
    f_prev: Any
    g_prev: Any
    gtd_prev: Any
    bracket_t: Any  # the two ends of the zoom interval, in torch's slot order (ops.pair)
    bracket_f: Any
    bracket_gtd: Any
    bracket_g: Any
    low_is_first: Any  # the lower-value end is slot 0 (torch's `low_pos == 0`)
    insufficient_progress: Any
    phase: Any  # _BRACKET, _ZOOM or _DONE
    n_evals: Any
    wolfe: Any  # both strong-Wolfe conditions hold at the result
    result_t: Any
    result_f: Any
    result_g: Any
    gtd: Any  # g'd at the origin
    d_norm: Any  # max|d|
    budget: Any  # evaluations allowed
    max_step: Any = None  # no trial beyond it (a bounded problem's feasible segment); see step_limit


def _pick(ops: Scalars, first: Any, pair: Any) -> Any:
    """``pair[0]`` where ``first`` else ``pair[1]``."""
    return ops.where(first, pair[0], pair[1])


class HostSearchResult(NamedTuple):
    """What :meth:`StrongWolfe.search_on_host` found: host numbers, and the gradient the
    evaluation at ``step_size`` returned (the same tensor, not a copy)."""

    step_size: Any
    value: Any
    grad: torch.Tensor
    n_evals: int
    success: bool


@dataclass(frozen=True)
class StrongWolfe(SearchLimits):
    """Strong-Wolfe search as a :class:`~torchlbfgs.line_searches.method.SearchMethod`; see
    the module docstring, and :func:`torchlbfgs.line_search` for the constants."""

    c1: float = 1e-4
    c2: float = 0.9

    def start(
        self, origin: SearchOrigin, step_size: torch.Tensor, active: torch.Tensor, budget: torch.Tensor
    ) -> _Search:
        gtd = self.reductions.dot(origin.grad, origin.direction)
        phase = torch.where(active & (budget > 0), _BRACKET, _DONE)
        return self._begin(
            TENSORS, origin.value, origin.grad, gtd, self.reductions.max_abs(origin.direction), step_size,
            phase, budget,
            zero=torch.zeros_like(origin.value), false=torch.zeros_like(active),
            no_evals=torch.zeros_like(budget),
            max_step=no_step_limit(origin.value) if step_limit(origin.max_step) is None else origin.max_step,
        )  # fmt: skip

    def trial(self, search: _Search) -> tuple[torch.Tensor, torch.Tensor]:
        return search.t, search.phase != _DONE

    def digest(self, s: _Search, origin: SearchOrigin, f_new: torch.Tensor, g_new: torch.Tensor) -> _Search:
        gtd_new = self.reductions.dot(g_new, origin.direction)
        return self._decide(TENSORS, s, origin.value, origin.grad, f_new, g_new, gtd_new)

    def outcome(self, search: _Search) -> FlatLineSearchResult:
        return FlatLineSearchResult(
            step_size=search.result_t,
            value=search.result_f,
            grad=search.result_g,
            n_evals=search.n_evals,
            success=search.wolfe,
        )

    def search_on_host(
        self,
        evaluate: Callable[[Any], tuple[Any, torch.Tensor, Any]],
        value: Any,
        grad: torch.Tensor,
        gtd: Any,
        d_norm: Any,
        step_size: Any,
        budget: int,
        max_step: Any = None,
    ) -> HostSearchResult:
        """The same search with its decisions taken on the host, as ``torch.optim.LBFGS`` takes them.

        ``evaluate(t)`` returns ``(f, g, g'd)`` at ``x + t d``; ``value``, ``grad`` and ``gtd``
        are those at the origin, ``d_norm`` is ``max|d|``, ``max_step`` caps the trials (``None``:
        no cap); the numbers are host numbers of the gradient's precision
        (:mod:`torchlbfgs.scalars`). Every decision is the one
        :meth:`digest` takes on tensors (one implementation, :meth:`_decide`); the gradients
        are kept by reference instead of copied into the search's state.
        """
        ops = NUMBERS
        phase = _BRACKET if budget > 0 else _DONE
        search = self._begin(
            ops,
            value,
            grad,
            gtd,
            d_norm,
            step_size,
            phase,
            budget,
            zero=0.0,
            false=False,
            no_evals=0,
            max_step=max_step,
        )
        with quiet_overflow():
            while search.phase != _DONE:
                f_new, g_new, gtd_new = evaluate(search.t)
                search = self._decide(ops, search, value, grad, f_new, g_new, gtd_new)
        s = search
        return HostSearchResult(s.result_t, s.result_f, s.result_g, s.n_evals, s.wolfe)

    @staticmethod
    def _begin(
        ops: Scalars, value: Any, grad: Any, gtd: Any, d_norm: Any, step_size: Any, phase: Any, budget: Any,
        *, zero: Any, false: Any, no_evals: Any, max_step: Any = None,
    ) -> _Search:  # fmt: skip
        return _Search(
            t=step_size,
            t_prev=zero,
            f_prev=value,
            g_prev=grad,
            gtd_prev=gtd,
            bracket_t=ops.pair(zero, zero),
            bracket_f=ops.pair(value, value),
            bracket_gtd=ops.pair(gtd, gtd),
            bracket_g=ops.pair(grad, grad),
            low_is_first=ops.negate(false),
            insufficient_progress=false,
            phase=phase,
            n_evals=no_evals,
            wolfe=false,
            result_t=zero,
            result_f=value,
            result_g=grad,
            gtd=gtd,
            d_norm=d_norm,
            budget=budget,
            max_step=max_step,
        )

    def _decide(
        self, ops: Scalars, s: _Search, start_value: Any, start_grad: Any,
        f_new: Any, g_new: Any, gtd_new: Any,
    ) -> _Search:  # fmt: skip
        """Take in ``f_new``, ``g_new`` and ``gtd_new = g_new'd`` at the trial step ``s.t``."""
        c1, c2, max_ls, tolerance_change = self.c1, self.c2, self.max_ls, self.tolerance_change
        gtd, d_norm = s.gtd, s.d_norm
        zero = torch.zeros_like(start_value) if ops is TENSORS else 0.0
        running = s.phase != _DONE
        f_new = ops.where(ops.both(ops.isfinite(f_new), ops.isfinite(gtd_new)), f_new, math.inf)
        n_evals = s.n_evals + running
        ls_iter = n_evals - 1  # torch's counter: evaluations after the first

        # The strong-Wolfe conditions at the new point (N&W eq. 3.7), which both phases test.
        decrease_fails = f_new > start_value + c1 * s.t * gtd
        curvature_holds = abs(gtd_new) <= -c2 * gtd

        # Bracketing phase (N&W Algorithm 3.5).
        in_bracketing = ops.both(running, s.phase == _BRACKET)
        out_of_iterations = ls_iter >= max_ls  # torch then stops without testing this point
        testing = ops.both(in_bracketing, ops.negate(out_of_iterations))
        armijo_fails = ops.either(decrease_fails, ops.both(ls_iter > 1, f_new >= s.f_prev))
        wolfe_now = ops.both(ops.both(testing, ops.negate(armijo_fails)), curvature_holds)
        if ops is NUMBERS and wolfe_now:  # decided on the host: nothing below changes this outcome
            found = {"result_t": s.t, "result_f": f_new, "result_g": g_new}
            return s._replace(n_evals=n_evals, phase=_DONE, wolfe=True, **found)
        not_wolfe = ops.both(testing, ops.negate(wolfe_now))
        enter_zoom = ops.both(not_wolfe, ops.either(armijo_fails, gtd_new >= 0))
        extrapolate = ops.both(not_wolfe, ops.negate(enter_zoom))
        at_cap, cap = None, step_limit(s.max_step)
        if cap is not None:
            # Sufficient decrease at the largest step allowed, still descending: take it
            # (MINPACK's dcsrch stops so at stpmax).
            at_cap = ops.both(extrapolate, s.t >= cap)
            extrapolate = ops.both(extrapolate, ops.negate(at_cap))
        gave_up_bracketing = ops.both(in_bracketing, out_of_iterations)

        # Zoom phase (N&W Algorithm 3.6), updating the bracket with the point just evaluated.
        in_zoom = ops.both(running, s.phase == _ZOOM)
        f_low = _pick(ops, s.low_is_first, s.bracket_f)
        zoom_shrinks_high = ops.both(in_zoom, ops.either(decrease_fails, f_new >= f_low))
        zoom_new_low = ops.both(in_zoom, ops.negate(zoom_shrinks_high))
        wolfe_in_zoom = ops.both(zoom_new_low, curvature_holds)
        t_low = _pick(ops, s.low_is_first, s.bracket_t)
        t_high = _pick(ops, ops.negate(s.low_is_first), s.bracket_t)
        high_takes_low = ops.both(
            ops.both(zoom_new_low, ops.negate(wolfe_in_zoom)), gtd_new * (t_high - t_low) >= 0
        )

        # The bracket's ends after this point: each keeps its value, takes the new point (the low
        # end when it is a new low, the high end when it shrinks the bracket) or, the high end,
        # the low end's (zoom_shrinks_high and high_takes_low never hold together); entering the
        # zoom makes the bracket (previous, new). Which end does what is decided once for the
        # four fields.
        low_first, high_first = s.low_is_first, ops.negate(s.low_is_first)
        takes_new = (
            ops.either(ops.both(low_first, zoom_new_low), ops.both(high_first, zoom_shrinks_high)),
            ops.either(ops.both(high_first, zoom_new_low), ops.both(low_first, zoom_shrinks_high)),
        )
        takes_other = (ops.both(high_first, high_takes_low), ops.both(low_first, high_takes_low))
        bracket = []
        for ends, new, prev in (
            (s.bracket_t, s.t, s.t_prev),
            (s.bracket_f, f_new, s.f_prev),
            (s.bracket_gtd, gtd_new, s.gtd_prev),
            (s.bracket_g, g_new, s.g_prev),
        ):
            updated = [
                ops.where(takes_new[k], new, ops.where(takes_other[k], ends[1 - k], ends[k])) for k in (0, 1)
            ]
            bracket.append(ops.where(enter_zoom, ops.pair(prev, new), ops.pair(*updated)))
        bracket_t, bracket_f, bracket_gtd, bracket_g = bracket
        reorder = ops.either(enter_zoom, zoom_shrinks_high)
        low_is_first = ops.where(reorder, bracket_f[0] <= bracket_f[1], s.low_is_first)

        # Next zoom trial: cubic step inside the bracket, kept away from its ends.
        zooming = ops.either(
            ops.either(enter_zoom, ops.both(zoom_new_low, ops.negate(wolfe_in_zoom))), zoom_shrinks_high
        )
        interval_too_small = abs(bracket_t[1] - bracket_t[0]) * d_norm < tolerance_change
        zoom_stops = ops.both(zooming, ops.either(ls_iter >= max_ls, interval_too_small))
        zoom_continues = ops.both(zooming, ops.negate(zoom_stops))
        t_max, t_min = ops.maximum(bracket_t[0], bracket_t[1]), ops.minimum(bracket_t[0], bracket_t[1])

        # One cubic step for both phases (they never interpolate in the same decision, and on
        # tensors both would be computed): extrapolation through the last two trials, bounded to
        # [t + 0.01 (t - t_prev), 10 t], or the zoom's through the bracket's ends, inside it.
        last_two = (s.t_prev, s.f_prev, s.gtd_prev, s.t, f_new, gtd_new)
        extrapolating = (*last_two, s.t + 0.01 * (s.t - s.t_prev), s.t * 10)
        bracket_ends = (bracket_t, bracket_f, bracket_gtd)
        zooming_through = (
            *(ends[0] for ends in bracket_ends),
            *(ends[1] for ends in bracket_ends),
            t_min,
            t_max,
        )
        cubic_data = [
            ops.where(extrapolate, a, b) for a, b in zip(extrapolating, zooming_through, strict=True)
        ]
        t_cubic = ops.when(
            ops.either(extrapolate, zooming), lambda: cubic_minimizer(*cubic_data, ops=ops), s.t
        )
        t_extrapolated = t_cubic if cap is None else ops.minimum(t_cubic, cap)
        t_zoom = t_cubic
        margin = 0.1 * (t_max - t_min)
        near_end = ops.minimum(t_max - t_zoom, t_zoom - t_min) < margin
        move_in = ops.both(
            near_end, ops.either(s.insufficient_progress, ops.either(t_zoom >= t_max, t_zoom <= t_min))
        )
        moved = ops.where(abs(t_zoom - t_max) < abs(t_zoom - t_min), t_max - margin, t_min + margin)
        t_zoom = ops.where(move_in, moved, t_zoom)
        insufficient_progress = ops.where(
            zoom_continues, ops.both(near_end, ops.negate(move_in)), s.insufficient_progress
        )

        # Outcome of this step.
        low = [_pick(ops, low_is_first, ends) for ends in (bracket_t, bracket_f, bracket_g)]
        out_of_budget = n_evals >= s.budget
        keeps_going = ops.both(
            ops.either(extrapolate, zoom_continues), ops.negate(ops.both(running, out_of_budget))
        )
        budget_stop_extrapolating = ops.both(extrapolate, ops.negate(keeps_going))
        # torch's exit when max_ls binds while bracketing: bracket [0, t], keep the lower end.
        last_beats_start = f_new < start_value
        gave_up = ops.either(gave_up_bracketing, budget_stop_extrapolating)
        take_new = ops.either(wolfe_now, ops.both(gave_up, last_beats_start))
        if at_cap is not None:
            take_new = ops.either(take_new, at_cap)
        take_start = ops.both(gave_up, ops.negate(last_beats_start))
        take_low = ops.both(ops.either(zooming, wolfe_in_zoom), ops.negate(keeps_going))
        result = [s.result_t, s.result_f, s.result_g]
        for condition, chosen in (
            (take_low, low),
            (take_start, (zero, start_value, start_grad)),
            (take_new, (s.t, f_new, g_new)),
        ):
            result = [ops.where(condition, new, old) for new, old in zip(chosen, result, strict=True)]
        phase = ops.where(
            ops.both(running, ops.negate(keeps_going)),
            _DONE,
            ops.where(ops.either(zoom_continues, enter_zoom), _ZOOM, s.phase),
        )
        return _Search(
            t=ops.where(extrapolate, t_extrapolated, ops.where(zoom_continues, t_zoom, s.t)),
            t_prev=ops.where(extrapolate, s.t, s.t_prev),
            f_prev=ops.where(extrapolate, f_new, s.f_prev),
            g_prev=ops.where(extrapolate, g_new, s.g_prev),
            gtd_prev=ops.where(extrapolate, gtd_new, s.gtd_prev),
            bracket_t=bracket_t,
            bracket_f=bracket_f,
            bracket_gtd=bracket_gtd,
            bracket_g=bracket_g,
            low_is_first=low_is_first,
            insufficient_progress=insufficient_progress,
            phase=phase,
            n_evals=n_evals,
            wolfe=ops.either(s.wolfe, ops.either(wolfe_now, wolfe_in_zoom)),
            result_t=result[0],
            result_f=result[1],
            result_g=result[2],
            gtd=s.gtd,
            d_norm=s.d_norm,
            budget=s.budget,
            max_step=s.max_step,
        )
