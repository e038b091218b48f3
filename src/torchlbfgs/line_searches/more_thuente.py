r"""Moré–Thuente line search: the safeguarded interval method of MINPACK-2's ``dcsrch``.

J. J. Moré and D. J. Thuente, "Line search algorithms with guaranteed sufficient decrease",
ACM TOMS 20(3), 1994 (below "MT"); the search L-BFGS-B uses. It looks for a step :math:`t`
with the strong Wolfe conditions

.. math::
    f(x + t d) \le f(x) + c_1 t\, g^\top d, \qquad |g(x + t d)^\top d| \le c_2 |g^\top d|

keeping an interval :math:`[t_x, t_y]` (``stx``, ``sty``; ``stx`` the best step so far) that,
once ``brackt`` is set, contains such a step. Each trial updates the interval and proposes the
next step by one of MT's four cases (section 4), safeguarded by extrapolation bounds
(``xtrapl = 1.1``, ``xtrapu = 4``) while nothing is bracketed and by bisection when the
interval does not shrink by 0.66 over two trials. Until a step with :math:`\psi(t) \le 0`
and :math:`f'(t) \ge 0` is found ("stage 1") the cases use the auxiliary function
:math:`\psi(t) = f(t) - f(0) - c_1 t f'(0)` in place of :math:`f` (MT section 3).

It is written as a state machine doing one evaluation per step, branch-free on tensor values:
all four cases are computed and one is selected. Where it differs from ``dcsrch``:

* a non-finite value or directional derivative counts as a higher value (MT's case 1, which
  brackets) and the next trial bisects towards ``stx``; an interpolation that comes out
  non-finite or divides by zero falls back to bisection (or, in case 2, to the secant step),
  and a cubic's discriminant that rounding makes negative counts as 0 (``dcsrch`` goes on
  with a NaN step);
* where ``dcsrch`` would evaluate ``stx`` a second time to end the search (the "rounding
  errors" and ``xtol`` warnings), the search stops without that evaluation and returns
  ``stx``; it also stops once the bracket times ``max|d|`` is below ``tolerance_change``;
* it stops after ``max_ls + 1`` evaluations or when the evaluation budget is spent, and then,
  as after a warning, returns ``stx``: the best step by the search's own measure, whose value
  is below :math:`f(x)` unless it is the origin (``t = 0``);
* a first step outside ``[stpmin, stpmax]`` is clamped into it; a search along a direction
  that is not a descent direction, or from a first step that is not positive and finite,
  starts finished (``dcsrch`` reports an error).

``success`` means the strong Wolfe conditions hold at the returned step, as for
:class:`~torchlbfgs.line_searches.strong_wolfe.StrongWolfe`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from torchlbfgs.line_searches.method import SearchLimits, SearchOrigin, no_step_limit, step_limit
from torchlbfgs.line_searches.result import FlatLineSearchResult

__all__ = ["MoreThuente"]

XTRAPL, XTRAPU = 1.1, 4.0  # extrapolation bounds while nothing is bracketed (MT section 4)
SHRINK = 0.66  # the bracket must shrink by this factor over two trials, else bisect


class _Search(NamedTuple):
    t: torch.Tensor  # trial step to evaluate next
    stx: torch.Tensor  # best step so far, with the value and derivative dcsrch keeps for it
    fx: torch.Tensor
    gx: torch.Tensor
    sty: torch.Tensor  # the other end of the interval
    fy: torch.Tensor
    gy: torch.Tensor
    stmin: torch.Tensor  # the range the next step is kept in
    stmax: torch.Tensor
    width: torch.Tensor  # the bracket's width now and one trial earlier
    width1: torch.Tensor
    brackt: torch.Tensor  # a minimiser is bracketed by [stx, sty]
    stage2: torch.Tensor  # a step with psi <= 0 and f' >= 0 has been seen
    done: torch.Tensor
    success: torch.Tensor  # the strong Wolfe conditions hold at the result
    n_evals: torch.Tensor
    result_t: torch.Tensor  # stx with its true value and full gradient (or the Wolfe point)
    result_f: torch.Tensor
    result_g: torch.Tensor
    gtd: torch.Tensor  # g'd at the origin
    d_norm: torch.Tensor  # max|d|
    budget: torch.Tensor  # evaluations allowed
    stpmax: torch.Tensor  # a per-problem stpmax (a bounded problem's), or no_step_limit: the method's


def _nonzero(denominator: torch.Tensor) -> torch.Tensor:
    """``denominator``, with zeros replaced by 1 (callers discard the result there)."""
    return torch.where(denominator != 0, denominator, torch.ones_like(denominator))


def _scaled_root(theta: torch.Tensor, da: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    r""":math:`\sqrt{\max(0, \theta^2 - d_a d_b)}`, computed as ``s * sqrt((theta/s)^2 - ...)``
    with ``s = max(|theta|, |d_a|, |d_b|)`` so that the squares cannot overflow."""
    s = torch.maximum(torch.maximum(theta.abs(), da.abs()), db.abs())
    safe = _nonzero(s)
    ratio = theta / safe
    square = ratio * ratio - (da / safe) * (db / safe)
    return s * torch.sqrt(torch.clamp(square, min=0))


class _Step(NamedTuple):
    stx: torch.Tensor
    fx: torch.Tensor
    gx: torch.Tensor
    sty: torch.Tensor
    fy: torch.Tensor
    gy: torch.Tensor
    t: torch.Tensor  # the next trial step
    brackt: torch.Tensor
    moved: torch.Tensor  # stx moved to the trial step


def _interval_step(
    stx: torch.Tensor,
    fx: torch.Tensor,
    dx: torch.Tensor,
    sty: torch.Tensor,
    fy: torch.Tensor,
    dy: torch.Tensor,
    stp: torch.Tensor,
    fp: torch.Tensor,
    dp: torch.Tensor,
    brackt: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
) -> _Step:
    """MT's interval update and safeguarded step (``dcstep``), every case computed.

    ``(stx, fx, dx)`` is the best step, ``(sty, fy, dy)`` the other end, ``(stp, fp, dp)`` the
    step just evaluated; ``dx`` has the sign opposite to ``stp - stx``. ``[lower, upper]``
    bounds the step while nothing is bracketed.
    """
    opposite_signs = torch.sign(dp) * torch.sign(dx) < 0
    higher = fp > fx  # case 1
    case2 = ~higher & opposite_signs
    case3 = ~higher & ~opposite_signs & (dp.abs() < dx.abs())

    # The cubic interpolating (stx, fx, dx) and (stp, fp, dp): its minimiser, written from the
    # end it is measured from, is end + r (other - end) with r = p / q below (MT section 4).
    theta = 3 * (fx - fp) / _nonzero(stp - stx) + dx + dp
    root = _scaled_root(theta, dx, dp)
    secant = stp + (dp / _nonzero(dp - dx)) * (stx - stp)  # root of the interpolated derivative

    # Case 1: higher value, so a minimiser lies in between. The cubic step if it is closer to
    # stx than the quadratic step (through fx, dx, fp), else the mean of the two.
    gamma = torch.where(stp < stx, -root, root)
    p = (gamma - dx) + theta
    q = ((gamma - dx) + gamma) + dp
    cubic = stx + (p / _nonzero(q)) * (stp - stx)
    quadratic = stx + ((dx / _nonzero((fx - fp) / _nonzero(stp - stx) + dx)) / 2) * (stp - stx)
    step1 = torch.where(
        (cubic - stx).abs() <= (quadratic - stx).abs(), cubic, cubic + (quadratic - cubic) / 2
    )
    # A non-finite fp (or q = 0) leaves no usable model: bisect.
    usable = torch.isfinite(step1) & (q != 0)
    step1 = torch.where(usable, step1, stx + 0.5 * (stp - stx))

    # Case 2: lower value, derivatives of opposite sign: bracketed. The cubic step if it is
    # farther from stp than the secant step, else the secant step.
    gamma = torch.where(stp > stx, -root, root)
    p = (gamma - dp) + theta
    q = ((gamma - dp) + gamma) + dx
    cubic = stp + (p / _nonzero(q)) * (stx - stp)
    cubic_ok = torch.isfinite(cubic) & (q != 0)
    step2 = torch.where(cubic_ok & ((cubic - stp).abs() > (secant - stp).abs()), cubic, secant)

    # Case 3: lower value, same signs, |f'| decreases. The cubic step only if the cubic tends
    # to infinity in the direction of the step and its minimiser lies beyond stp (r < 0);
    # otherwise the bound in that direction. Bracketed: the step closer to stp, at most 0.66
    # of the way to sty; else the farther one, within [lower, upper]. gamma and p are case 2's.
    q = (gamma + (dx - dp)) + gamma
    r = p / _nonzero(q)
    cubic_ok = (r < 0) & (gamma != 0) & (q != 0)
    cubic = torch.where(cubic_ok, stp + r * (stx - stp), torch.where(stp > stx, upper, lower))
    closer = torch.where((cubic - stp).abs() < (secant - stp).abs(), cubic, secant)
    limit = stp + SHRINK * (sty - stp)
    closer = torch.where(stp > stx, torch.minimum(limit, closer), torch.maximum(limit, closer))
    farther = torch.where((cubic - stp).abs() > (secant - stp).abs(), cubic, secant)
    farther = torch.minimum(torch.maximum(farther, lower), upper)
    step3 = torch.where(brackt, closer, farther)

    # Case 4: lower value, same signs, |f'| does not decrease. Bracketed: the minimiser of the
    # cubic through (stp, fp, dp) and (sty, fy, dy), or the midpoint if it is not usable (fy
    # can be infinite); otherwise the bound in the direction of the step.
    theta = 3 * (fp - fy) / _nonzero(sty - stp) + dy + dp
    root = _scaled_root(theta, dy, dp)
    gamma = torch.where(stp > sty, -root, root)
    p = (gamma - dp) + theta
    q = ((gamma - dp) + gamma) + dy
    cubic = stp + (p / _nonzero(q)) * (sty - stp)
    cubic_ok = torch.isfinite(cubic) & (q != 0) & (sty != stp)
    cubic = torch.where(cubic_ok, cubic, stp + 0.5 * (sty - stp))
    step4 = torch.where(brackt, cubic, torch.where(stp > stx, upper, lower))

    t = torch.where(higher, step1, torch.where(case2, step2, torch.where(case3, step3, step4)))
    # The new interval: a higher value replaces sty; otherwise stp becomes stx, and in case 2
    # the old stx becomes sty.
    moved = ~higher

    def new_x(at_stp: torch.Tensor, at_x: torch.Tensor) -> torch.Tensor:
        return torch.where(moved, at_stp, at_x)

    def new_y(at_stp: torch.Tensor, at_x: torch.Tensor, at_y: torch.Tensor) -> torch.Tensor:
        return torch.where(higher, at_stp, torch.where(case2, at_x, at_y))

    return _Step(
        stx=new_x(stp, stx), fx=new_x(fp, fx), gx=new_x(dp, dx),
        sty=new_y(stp, stx, sty), fy=new_y(fp, fx, fy), gy=new_y(dp, dx, dy),
        t=t, brackt=brackt | higher | case2, moved=moved,
    )  # fmt: skip


@dataclass(frozen=True)
class MoreThuente(SearchLimits):
    """Moré–Thuente search as a :class:`~torchlbfgs.line_searches.method.SearchMethod`; see the
    module docstring.

    Attributes:
        c1, c2: the sufficient-decrease and curvature constants (``dcsrch``'s ftol, gtol).
        xtol: stop when the bracket is shorter than ``xtol`` times its upper end (0.1, as
            scipy's L-BFGS-B).
        stpmin, stpmax: bounds on the step.
        tolerance_change: stop when the bracket times ``max|d|`` is below this.
        max_ls: at most ``max_ls + 1`` evaluations.

    Examples:
        >>> import torch, torchlbfgs
        >>> fun = lambda x: ((x - 3.0) ** 2).sum()
        >>> x = torch.zeros(2, dtype=torch.float64)
        >>> g = torch.func.grad(fun)(x)
        >>> found = torchlbfgs.line_search(fun, x, -g, fun(x), g, method="more_thuente")
        >>> bool(found.success), round(float(found.step_size), 6), int(found.n_evals)
        (True, 0.49995, 2)
    """

    c1: float = 1e-4
    c2: float = 0.9
    xtol: float = 0.1
    stpmin: float = 0.0
    stpmax: float = 1e10

    def start(
        self, origin: SearchOrigin, step_size: torch.Tensor, active: torch.Tensor, budget: torch.Tensor
    ) -> _Search:
        value, grad = origin.value, origin.grad
        gtd = self.reductions.dot(grad, origin.direction)
        limit = step_limit(origin.max_step)
        stpmax = None if limit is None else torch.clamp(limit, max=self.stpmax)
        t = torch.clamp(step_size, min=self.stpmin, max=self.stpmax)
        if stpmax is not None:
            t = torch.minimum(t, stpmax)
        startable = active & (budget > 0) & (gtd < 0) & (t > 0) & torch.isfinite(t)
        zero = torch.zeros_like(value)
        false = torch.zeros_like(active)
        width = zero + (self.stpmax - self.stpmin) if stpmax is None else stpmax - self.stpmin
        return _Search(
            t=t,
            stx=zero,
            fx=value,
            gx=gtd,
            sty=zero,
            fy=value,
            gy=gtd,
            stmin=zero,
            stmax=t + XTRAPU * t,
            width=width,
            width1=width / 0.5,
            brackt=false,
            stage2=false,
            done=~startable,
            success=false,
            n_evals=torch.zeros_like(budget),
            result_t=zero,
            result_f=value,
            result_g=grad,
            gtd=gtd,
            d_norm=self.reductions.max_abs(origin.direction),
            budget=budget,
            stpmax=no_step_limit(value) if stpmax is None else stpmax,
        )

    def trial(self, search: _Search) -> tuple[torch.Tensor, torch.Tensor]:
        return search.t, ~search.done

    def digest(self, s: _Search, origin: SearchOrigin, f_new: torch.Tensor, g_new: torch.Tensor) -> _Search:
        running = ~s.done
        stp, ginit = s.t, s.gtd
        gtd_new = self.reductions.dot(g_new, origin.direction)
        finite = torch.isfinite(f_new) & torch.isfinite(gtd_new)
        f = torch.where(finite, f_new, torch.inf)
        g = torch.where(finite, gtd_new, torch.zeros_like(gtd_new))
        n_evals = s.n_evals + running.long()

        # Tests on the step just evaluated (dcsrch's order: stage, warnings, convergence).
        gtest = self.c1 * ginit
        ftest = origin.value + stp * gtest
        sufficient = f <= ftest
        stage2 = s.stage2 | (sufficient & (g >= 0))
        converged = sufficient & (g.abs() <= self.c2 * -ginit)
        limit = step_limit(s.stpmax)
        stpmax = self.stpmax if limit is None else limit
        at_stpmax = (stp == stpmax) & sufficient & (g <= gtest)
        at_stpmin = (stp == self.stpmin) & (~sufficient | (g >= gtest))
        out_of_trials = (n_evals >= self.max_trials) | (n_evals >= s.budget)

        # In stage 1, a lower value without sufficient decrease: the cases work on psi, whose
        # values and derivatives are f - t gtest and f' - gtest (MT section 3); the interval's
        # values are shifted back afterwards.
        modified = ~stage2 & (f <= s.fx) & ~sufficient

        def shift(value: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.where(modified, value - t * gtest, value)

        def shift_grad(slope: torch.Tensor) -> torch.Tensor:
            return torch.where(modified, slope - gtest, slope)

        step = _interval_step(
            s.stx, shift(s.fx, s.stx), shift_grad(s.gx), s.sty, shift(s.fy, s.sty), shift_grad(s.gy),
            stp, shift(f, stp), shift_grad(g), s.brackt, s.stmin, s.stmax,
        )  # fmt: skip

        def unshift(value: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.where(modified, value + t * gtest, value)

        def unshift_grad(slope: torch.Tensor) -> torch.Tensor:
            return torch.where(modified, slope + gtest, slope)

        stx, sty, brackt = step.stx, step.sty, step.brackt
        fx, fy = unshift(step.fx, stx), unshift(step.fy, sty)
        gx, gy = unshift_grad(step.gx), unshift_grad(step.gy)

        # Bisect when the bracket has not shrunk by SHRINK over the last two trials.
        span = (sty - stx).abs()
        t = torch.where(brackt & (span >= SHRINK * s.width1), stx + 0.5 * (sty - stx), step.t)
        width1 = torch.where(brackt, s.width, s.width1)
        width = torch.where(brackt, span, s.width)
        stmin = torch.where(brackt, torch.minimum(stx, sty), t + XTRAPL * (t - stx))
        stmax = torch.where(brackt, torch.maximum(stx, sty), t + XTRAPU * (t - stx))
        t = torch.clamp(t, min=self.stpmin, max=self.stpmax)
        if limit is not None:
            t = torch.minimum(t, limit)
        # No further progress possible: dcsrch would evaluate stx again and stop; stop now.
        stalled = brackt & ((t <= stmin) | (t >= stmax) | (stmax - stmin <= self.xtol * stmax))
        stalled = stalled | (brackt & (span * s.d_norm < self.tolerance_change)) | ~torch.isfinite(t)

        stops = converged | at_stpmax | at_stpmin | out_of_trials | stalled
        moved = step.moved
        new = _Search(
            t=t,
            stx=stx,
            fx=fx,
            gx=gx,
            sty=sty,
            fy=fy,
            gy=gy,
            stmin=stmin,
            stmax=stmax,
            width=width,
            width1=width1,
            brackt=brackt,
            stage2=stage2,
            done=stops,
            success=converged,
            n_evals=n_evals,
            result_t=torch.where(converged | moved, stp, s.result_t),
            result_f=torch.where(converged | moved, f_new, s.result_f),
            result_g=torch.where(converged | moved, g_new, s.result_g),
            gtd=s.gtd,
            d_norm=s.d_norm,
            budget=s.budget,
            stpmax=s.stpmax,
        )
        # A finished search stays exactly as it was.
        return _Search(*(torch.where(running, updated, old) for updated, old in zip(new, s, strict=True)))

    def outcome(self, search: _Search) -> FlatLineSearchResult:
        return FlatLineSearchResult(
            step_size=search.result_t,
            value=search.result_f,
            grad=search.result_g,
            n_evals=search.n_evals,
            success=search.success,
        )
