"""The Moré–Thuente search makes MINPACK-2 ``dcsrch``'s decisions, and behaves as a search must.

The reference is scipy's port of ``dcsrch``/``dcstep`` (``scipy.optimize._dcsrch.DCSRCH``),
driven with the same constants, first step, values and directional derivatives. Both sides see
bit-identical data (the n-dimensional reference evaluates the point with the same torch
operations as the search), so the evaluated steps agree to the last bit in practice; the
comparison allows 1e-12 relative.

One deliberate difference (module docstring of ``more_thuente.py``): where ``dcsrch`` ends a
search by evaluating its best step ``stx`` a second time (the "rounding errors" and ``xtol``
warnings), ours stops without that evaluation and returns ``stx``.

One difference of platform: torch's CPU ``sqrt`` is not always correctly rounded (it can be one
ulp off numpy's), and the cubic steps cancel catastrophically when a trial overshoots by far
(``p = (gamma - dx) + theta`` with ``gamma ~ -theta``), which can turn that ulp into a 1e-11
relative difference of the next step. The reference therefore runs with torch's ``sqrt`` in
place of numpy's (``torch_sqrt_in_dcsrch``), so that both sides round every operation alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import scipy.optimize
import torch
from assertions import bitwise_equal
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from problems import powell_singular, rosenbrock, spd_quadratic, wood

import torchlbfgs
from torchlbfgs.line_searches import LINE_SEARCHES, search_method
from torchlbfgs.line_searches.loop import trial_point
from torchlbfgs.line_searches.method import SearchOrigin, evaluation_budget, run_search
from torchlbfgs.line_searches.more_thuente import MoreThuente
from torchlbfgs.line_searches.result import FlatLineSearchResult

try:
    from scipy.optimize._dcsrch import DCSRCH  # scipy >= 1.13: the Python port of MINPACK-2
except ImportError:  # pragma: no cover - older scipy
    DCSRCH = None

needs_dcsrch = pytest.mark.skipif(DCSRCH is None, reason="needs scipy.optimize._dcsrch (scipy >= 1.13)")

Tensor = torch.Tensor
DTYPE = torch.float64
EPS = torch.finfo(DTYPE).eps
# dcsrch's warnings that it ends by evaluating stx again; ours stops one evaluation earlier.
RE_EVALUATING_WARNINGS = ("WARNING: XTOL TEST SATISFIED", "WARNING: ROUNDING ERRORS PREVENT PROGRESS")

FIRST_STEPS = st.floats(min_value=-3.0, max_value=3.0).map(lambda e: 10.0**e)
Evaluate = Callable[[float], tuple[float, float]]  # t -> (phi(t), phi'(t))
FlatObjective = Callable[[Tensor], tuple[Tensor, Tensor]]


# --------------------------------------------------------------------------------- the drivers


def drive(
    method: MoreThuente,
    objective: FlatObjective,
    x: Tensor,
    d: Tensor,
    t0: float,
    budget: int | None = None,
) -> tuple[list[float], FlatLineSearchResult]:
    """Run one search with the protocol by hand, recording every trial step evaluated."""
    value, grad = objective(x)
    origin = SearchOrigin(d, value, grad)
    active = torch.ones((), dtype=torch.bool)
    search = method.start(origin, torch.tensor(t0, dtype=DTYPE), active, evaluation_budget(budget, value))
    steps = []
    for _ in range(method.max_trials):
        t, running = method.trial(search)
        if not bool(running):
            break
        steps.append(float(t))
        f, g = objective(trial_point(x, d, t, running))
        search = method.digest(search, origin, f, g)
    assert not bool(method.trial(search)[1]), "the search still runs after max_trials evaluations"
    return steps, method.outcome(search)


class _NumpyWithTorchSqrt:
    """numpy, except ``sqrt``, which is torch's (for scipy's dcsrch module)."""

    @staticmethod
    def sqrt(value: float) -> float:
        return float(torch.sqrt(torch.tensor(value, dtype=DTYPE)))

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


@pytest.fixture(autouse=True)
def torch_sqrt_in_dcsrch(monkeypatch: pytest.MonkeyPatch) -> None:
    if DCSRCH is not None:
        monkeypatch.setattr(scipy.optimize._dcsrch, "np", _NumpyWithTorchSqrt())


def dcsrch(
    evaluate: Evaluate, t0: float, f0: float, g0: float, method: MoreThuente
) -> tuple[list[float], float | None, str]:
    """scipy's dcsrch with ``method``'s constants: the steps it evaluates, its step and task."""
    assert DCSRCH is not None
    steps: list[float] = []
    last: dict[str, tuple[float, float]] = {}

    def phi(t: float) -> float:
        value, slope = evaluate(t)
        steps.append(t)
        last["point"] = (t, slope)
        return value

    def derphi(t: float) -> float:
        assert last["point"][0] == t  # dcsrch asks for phi'(t) right after phi(t)
        return last["point"][1]

    search = DCSRCH(phi, derphi, method.c1, method.c2, method.xtol, method.stpmin, method.stpmax)
    stp, _, _, task = search(t0, phi0=f0, derphi0=g0, maxiter=method.max_trials + 2)
    return steps, stp, task.decode()


def assert_same_decisions(
    steps: list[float], result: FlatLineSearchResult, reference: tuple[list[float], float | None, str]
) -> None:
    ref_steps, ref_stp, task = reference
    if task == "CONVERGENCE":
        assert ref_stp is not None
        expected, expected_step = ref_steps, ref_stp
        assert bool(result.success)
    elif task in RE_EVALUATING_WARNINGS:
        # dcsrch's last evaluation is at stx again (0 or an earlier step); ours returns stx.
        expected, expected_step = ref_steps[:-1], ref_steps[-1]
        assert expected_step == 0 or expected_step in expected
        assert not bool(result.success)
    elif task in ("WARNING: STP = STPMAX", "WARNING: STP = STPMIN"):
        # dcsrch returns the step at the bound; ours returns stx after taking that point in,
        # which is the bound itself when its value is the lowest.
        expected = ref_steps
        expected_step = float(result.step_size)
        assert expected_step in (0.0, *expected)
        assert not bool(result.success)
    else:
        pytest.fail(f"dcsrch ended with {task!r}, which this comparison does not cover")
    assert len(steps) == len(expected), f"{len(steps)} evaluations, dcsrch {len(expected)} ({task})"
    assert steps == pytest.approx(expected, rel=1e-12, abs=0)
    assert float(result.step_size) == pytest.approx(expected_step, rel=1e-12, abs=0)
    assert int(result.n_evals) == len(steps)


# ----------------------------------------------------- Moré & Thuente's six functions (section 6)


def _gamma(beta: float) -> float:
    return math.sqrt(1 + beta**2) - beta


def _paper_function(number: int) -> tuple[Evaluate, float, float]:
    """``t -> (phi(t), phi'(t))`` of function ``number`` with its (ftol, gtol) from the paper."""
    if number == 1:
        beta = 2.0
        return (lambda t: (-t / (t**2 + beta), (t**2 - beta) / (t**2 + beta) ** 2)), 1e-3, 1e-1
    if number == 2:
        beta = 0.004
        return (
            (lambda t: ((t + beta) ** 5 - 2 * (t + beta) ** 4, 5 * (t + beta) ** 4 - 8 * (t + beta) ** 3)),
            0.1,
            0.1,
        )
    if number == 3:
        beta, ell = 0.01, 39

        def phi3(t: float) -> tuple[float, float]:
            if t <= 1 - beta:
                value, slope = 1 - t, -1.0
            elif t >= 1 + beta:
                value, slope = t - 1, 1.0
            else:
                value, slope = (t - 1) ** 2 / (2 * beta) + beta / 2, (t - 1) / beta
            wave = 2 * (1 - beta) / (ell * math.pi) * math.sin(ell * math.pi * t / 2)
            return value + wave, slope + (1 - beta) * math.cos(ell * math.pi * t / 2)

        return phi3, 0.1, 0.1
    # Yanai, Ozawa & Kaneko's functions.
    beta1, beta2 = {4: (1e-3, 1e-3), 5: (1e-2, 1e-3), 6: (1e-3, 1e-2)}[number]
    g1, g2 = _gamma(beta1), _gamma(beta2)

    def yanai(t: float) -> tuple[float, float]:
        left, right = math.sqrt((1 - t) ** 2 + beta2**2), math.sqrt(t**2 + beta1**2)
        return g1 * left + g2 * right, g1 * (t - 1) / left + g2 * t / right

    return yanai, 1e-3, 1e-3


def _one_d_objective(evaluate: Evaluate) -> FlatObjective:
    """The search's view of ``phi`` on x in R^1 with d = 1, so that x + t d = t exactly."""

    def objective(x: Tensor) -> tuple[Tensor, Tensor]:
        value, slope = evaluate(float(x[0]))
        return torch.tensor(value, dtype=DTYPE), torch.tensor([slope], dtype=DTYPE)

    return objective


PAPER_STEPS = (1e-3, 1e-1, 1e1, 1e3)
# Evaluations per function and first step as dcsrch makes them; the same as the counts in
# Moré & Thuente's Tables 1-6.
PAPER_EVALUATIONS = {
    1: (6, 3, 1, 4), 2: (12, 8, 8, 11), 3: (12, 12, 10, 13),
    4: (4, 1, 3, 4), 5: (6, 3, 7, 8), 6: (13, 11, 8, 11),
}  # fmt: skip


@needs_dcsrch
@pytest.mark.parametrize("xtol", [1e-10, 0.1], ids=lambda x: f"xtol={x:g}")
@pytest.mark.parametrize("t0", PAPER_STEPS, ids=lambda t: f"t0={t:g}")
@pytest.mark.parametrize("number", range(1, 7), ids=lambda n: f"function{n}")
def test_paper_functions_match_dcsrch(number: int, t0: float, xtol: float) -> None:
    evaluate, ftol, gtol = _paper_function(number)
    method = MoreThuente(c1=ftol, c2=gtol, xtol=xtol, tolerance_change=0.0, max_ls=60)
    x, d = torch.zeros(1, dtype=DTYPE), torch.ones(1, dtype=DTYPE)
    steps, result = drive(method, _one_d_objective(evaluate), x, d, t0)
    f0, g0 = evaluate(0.0)
    reference = dcsrch(evaluate, t0, f0, g0, method)
    assert_same_decisions(steps, result, reference)
    if xtol == 1e-10:
        assert reference[2] == "CONVERGENCE"
        assert len(steps) == PAPER_EVALUATIONS[number][PAPER_STEPS.index(t0)]
    # The result's value and gradient are those at the returned step.
    value, slope = evaluate(float(result.step_size))
    assert float(result.value) == value
    assert float(result.grad[0]) == slope


EXTRA_ONE_D: dict[str, Evaluate] = {
    # Decreasing ever more slowly: psi = phi - ftol t phi'(0) turns positive while phi still
    # decreases, so stage 1's auxiliary function is used after stx has moved off 0.
    "slow_log": lambda t: (-math.log1p(t) + 1e-3 * t**2, -1 / (1 + t) + 2e-3 * t),
    "wiggly": lambda t: (-t / (t**2 + 2) + 0.05 * math.sin(8 * t),
                         (t**2 - 2) / (t**2 + 2) ** 2 + 0.4 * math.cos(8 * t)),
    "parabola": lambda t: ((t - 1) ** 2, 2 * (t - 1)),
    "quartic": lambda t: ((t - 2) ** 4 - 3 * t, 4 * (t - 2) ** 3 - 3),
    "steep_exp": lambda t: (math.exp(min(3 * t, 700.0)) - 20 * t, 3 * math.exp(min(3 * t, 700.0)) - 20),
}  # fmt: skip


@needs_dcsrch
@pytest.mark.parametrize("xtol", [1e-10, 0.1], ids=lambda x: f"xtol={x:g}")
# (ftol, gtol) with ftol < gtol, as MT assume (and check_line_search_options requires).
@pytest.mark.parametrize(
    "tolerances", [(1e-4, 0.01), (1e-4, 0.1), (1e-4, 0.9), (0.1, 0.5), (0.3, 0.9), (0.45, 0.5)], ids=str
)
@pytest.mark.parametrize("name", EXTRA_ONE_D)
def test_more_one_dimensional_functions_match_dcsrch(
    name: str, tolerances: tuple[float, float], xtol: float
) -> None:
    evaluate, (ftol, gtol) = EXTRA_ONE_D[name], tolerances
    method = MoreThuente(c1=ftol, c2=gtol, xtol=xtol, tolerance_change=0.0, max_ls=60)
    x, d = torch.zeros(1, dtype=DTYPE), torch.ones(1, dtype=DTYPE)
    f0, g0 = evaluate(0.0)
    for t0 in (1e-3, 0.05, 0.3, 1.0, 4.0, 40.0):
        steps, result = drive(method, _one_d_objective(evaluate), x, d, t0)
        assert_same_decisions(steps, result, dcsrch(evaluate, t0, f0, g0, method))


@needs_dcsrch
@pytest.mark.parametrize(
    ("name", "stpmin", "stpmax", "t0"),
    [
        ("near_zero", 0.05, 1e10, 1.0),  # the minimiser lies below stpmin, f(stpmin) > f(0)
        ("near_zero", 0.05, 1e10, 0.05),
        ("near_zero", 0.025, 1e10, 1.0),  # ... f(stpmin) < f(0) and f'(stpmin) > 0
        ("parabola", 0.0, 0.5, 0.1),  # ... and above stpmax
        ("parabola", 0.0, 0.5, 0.5),
        ("steep_exp", 0.0, 0.4, 1e-3),
        ("steep_exp", 0.2, 0.4, 0.3),
    ],
)
def test_step_bounds_match_dcsrch(name: str, stpmin: float, stpmax: float, t0: float) -> None:
    evaluate = EXTRA_ONE_D[name] if name in EXTRA_ONE_D else lambda t: ((t - 0.02) ** 2, 2 * (t - 0.02))
    method = MoreThuente(c2=0.1, stpmin=stpmin, stpmax=stpmax, xtol=1e-10, tolerance_change=0.0, max_ls=60)
    x, d = torch.zeros(1, dtype=DTYPE), torch.ones(1, dtype=DTYPE)
    f0, g0 = evaluate(0.0)
    reference = dcsrch(evaluate, t0, f0, g0, method)
    assert reference[2].startswith("WARNING: STP = STPM")
    steps, result = drive(method, _one_d_objective(evaluate), x, d, t0)
    assert_same_decisions(steps, result, reference)
    assert stpmin <= float(result.step_size) <= stpmax or float(result.step_size) == 0


@st.composite
def smooth_functions(draw: st.DrawFn) -> Evaluate:
    """phi(t) = q (t - m)^2 + sum_k a_k sin(w_k t + p_k): a parabola with ripples."""
    q = draw(st.floats(min_value=0.0, max_value=10.0))
    m = draw(st.floats(min_value=0.05, max_value=20.0))
    ripple = st.tuples(
        st.floats(min_value=-1.0, max_value=1.0),
        st.floats(min_value=0.1, max_value=40.0),
        st.floats(min_value=0.0, max_value=2 * math.pi),
    )
    waves = draw(st.lists(ripple, max_size=3))

    def evaluate(t: float) -> tuple[float, float]:
        value, slope = q * (t - m) ** 2, 2 * q * (t - m)
        for a, w, p in waves:
            value += a * math.sin(w * t + p)
            slope += a * w * math.cos(w * t + p)
        return value, slope

    return evaluate


@needs_dcsrch
@settings(max_examples=200, deadline=None, database=None)
@given(
    evaluate=smooth_functions(),
    ftol=st.floats(min_value=1e-4, max_value=0.45),
    gtol_fraction=st.floats(min_value=0.02, max_value=0.98),
    xtol=st.sampled_from([0.1, 1e-3, 1e-10]),
    bounds=st.sampled_from([(0.0, 1e10), (0.0, 1.5), (0.0, 20.0), (0.03, 1e10), (0.02, 2.0)]),
    t0=FIRST_STEPS,
)
def test_random_smooth_functions_match_dcsrch(
    evaluate: Evaluate, ftol: float, gtol_fraction: float, xtol: float, bounds: tuple[float, float], t0: float
) -> None:
    f0, g0 = evaluate(0.0)
    assume(g0 < -1e-6)
    stpmin, stpmax = bounds
    t0 = min(max(t0, stpmin), stpmax)  # dcsrch rejects a first step outside the bounds
    gtol = ftol + (1 - ftol) * gtol_fraction
    method = MoreThuente(
        c1=ftol, c2=gtol, xtol=xtol, stpmin=stpmin, stpmax=stpmax, tolerance_change=0.0, max_ls=60
    )
    reference = dcsrch(evaluate, t0, f0, g0, method)
    # dcsrch's "WARN": its step came out NaN (a cubic through a negative discriminant, which
    # ours clamps to 0); and searches longer than ours may run.
    assume(reference[2] != "WARN" and len(reference[0]) <= method.max_trials)
    steps, result = drive(method, _one_d_objective(evaluate), torch.zeros(1, dtype=DTYPE),
                          torch.ones(1, dtype=DTYPE), t0)  # fmt: skip
    assert_same_decisions(steps, result, reference)


# ------------------------------------------------------------------ n-dimensional, float64


def _objective(fun: Callable[[Tensor], Tensor]) -> FlatObjective:
    grad_and_value = torch.func.grad_and_value(fun)

    def objective(x: Tensor) -> tuple[Tensor, Tensor]:
        grad, value = grad_and_value(x)
        return value, grad

    return objective


def _along(objective: FlatObjective, x: Tensor, d: Tensor) -> Evaluate:
    """phi(t) = f(x + t d) and phi'(t) = grad f(x + t d)'d, computed exactly as the search does."""

    def evaluate(t: float) -> tuple[float, float]:
        value, grad = objective(torch.addcmul(x, d, torch.tensor(t, dtype=DTYPE)))
        return float(value), float(torch.dot(grad, d))

    return evaluate


def _descent_directions(fun: Callable[[Tensor], Tensor], n: int, seed: int, count: int):
    generator = torch.Generator().manual_seed(seed)
    found = 0
    while found < count:
        x = torch.randn(n, generator=generator, dtype=DTYPE)
        g = torch.func.grad(fun)(x)
        d = -g + 0.7 * g.norm() * torch.randn(n, generator=generator, dtype=DTYPE) / math.sqrt(n)
        if torch.dot(g, d) < 0:
            found += 1
            yield x, d


N_D = {
    "rosenbrock2": (rosenbrock, 2),
    "rosenbrock10": (rosenbrock, 10),
    "wood": (wood, 4),
    "powell_singular": (powell_singular, 8),
    "quadratic20": (spd_quadratic(20, 1e3, seed=5).fun, 20),
}
CONSTANTS = {
    "default": MoreThuente(tolerance_change=0.0, max_ls=60),
    "lbfgsb": MoreThuente(c1=1e-3, c2=0.9, xtol=0.1, tolerance_change=0.0, max_ls=60),
    "tight": MoreThuente(c1=1e-4, c2=0.1, xtol=1e-10, tolerance_change=0.0, max_ls=60),
}


@needs_dcsrch
@pytest.mark.parametrize("constants", CONSTANTS)
@pytest.mark.parametrize("name", N_D)
def test_n_dimensional_searches_match_dcsrch(name: str, constants: str) -> None:
    fun, n = N_D[name]
    method, objective = CONSTANTS[constants], _objective(fun)
    for k, (x, d) in enumerate(_descent_directions(fun, n, seed=n, count=4)):
        value, grad = objective(x)
        for t0 in (1e-3, 0.3, 1.0, 7.0, 1e3):
            steps, result = drive(method, objective, x, d, t0)
            reference = dcsrch(_along(objective, x, d), t0, float(value), float(grad @ d), method)
            try:
                assert_same_decisions(steps, result, reference)
            except AssertionError as error:
                raise AssertionError(f"{name}, direction {k}, t0={t0}: {error}") from error


def test_line_search_api_is_the_state_machine() -> None:
    """``line_search(method="more_thuente")`` runs the same search as the protocol by hand."""
    fun = rosenbrock
    x, d = next(_descent_directions(fun, 6, seed=2, count=1))
    value, grad = _objective(fun)(x)
    steps, by_hand = drive(MoreThuente(), _objective(fun), x, d, 2.0)
    result = torchlbfgs.line_search(fun, x, d, value, grad, method="more_thuente", step_size=2.0)
    assert int(result.n_evals) == len(steps) > 1
    for field in ("step_size", "value", "grad", "n_evals", "success"):
        assert bitwise_equal(getattr(result, field), getattr(by_hand, field)), field


# ------------------------------------------------------------------- strong Wolfe, properties


def assert_strong_wolfe(f0: float, gtd: float, result: Any, d: Tensor, c1: float, c2: float) -> None:
    t, value, grad = float(result.step_size), float(result.value), result.grad
    assert t > 0
    assert value <= f0 + c1 * t * gtd + 4 * EPS * (abs(f0) + abs(c1 * t * gtd)), f"Armijo fails at {t}"
    rounding = 4 * EPS * float(grad.abs() @ d.abs())
    assert abs(float(grad @ d)) <= c2 * abs(gtd) + rounding, f"curvature condition fails at {t}"


def assert_evaluated_at(fun: Callable[[Tensor], Tensor], x: Tensor, d: Tensor, result: Any) -> None:
    """The reported value and gradient are f and grad f at x + t d (the same evaluation)."""
    grad, value = torch.func.grad_and_value(fun)(torch.addcmul(x, d, result.step_size))
    assert bitwise_equal(result.value, value)
    assert bitwise_equal(result.grad, grad)


SEARCH_SETTINGS = settings(max_examples=75, deadline=None, database=None)  # ~7 s for the two tests


@SEARCH_SETTINGS
@given(
    n=st.integers(min_value=1, max_value=10),
    log_condition=st.floats(min_value=0.0, max_value=5.0),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    noise=st.floats(min_value=0.0, max_value=0.9),
    t0=FIRST_STEPS,
    constants=st.sampled_from([(1e-4, 0.9), (1e-3, 0.9), (1e-4, 0.1), (0.3, 0.5)]),
)
def test_strong_wolfe_holds_on_convex_quadratics(
    n: int, log_condition: float, seed: int, noise: float, t0: float, constants: tuple[float, float]
) -> None:
    problem = spd_quadratic(n, 10.0**log_condition, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = 10 * torch.randn(n, generator=generator, dtype=DTYPE)
    g = torch.func.grad(problem.fun)(x)
    d = -g + noise * g.norm() * torch.randn(n, generator=generator, dtype=DTYPE) / math.sqrt(n)
    gtd = float(g @ d)
    if not gtd < -1e-8 * float(g.norm() * d.norm()):
        return
    c1, c2 = constants
    f0 = problem.fun(x)
    result = torchlbfgs.line_search(
        problem.fun, x, d, f0, g, method="more_thuente", step_size=t0, c1=c1, c2=c2, max_ls=40
    )
    # On a quadratic the cubic steps are exact: a strong Wolfe step is always found.
    assert bool(result.success)
    assert_strong_wolfe(float(f0), gtd, result, d, c1, c2)
    assert_evaluated_at(problem.fun, x, d, result)


@SEARCH_SETTINGS
@given(
    n=st.integers(min_value=2, max_value=8),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    scale=st.floats(min_value=0.1, max_value=3.0),
    noise=st.floats(min_value=0.0, max_value=0.9),
    t0=FIRST_STEPS,
)
def test_strong_wolfe_holds_on_rosenbrock(n: int, seed: int, scale: float, noise: float, t0: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, generator=generator, dtype=DTYPE)
    g = torch.func.grad(rosenbrock)(x)
    d = -g + noise * g.norm() * torch.randn(n, generator=generator, dtype=DTYPE) / math.sqrt(n)
    gtd = float(g @ d)
    if not gtd < -1e-8 * float(g.norm() * d.norm()):
        return
    f0 = rosenbrock(x)
    # With the default xtol = 0.1 the search may stop on a short bracket (dcsrch's xtol
    # warning); a tiny xtol leaves the Wolfe test as the only way out on a smooth function.
    method = MoreThuente(xtol=1e-12, tolerance_change=0.0, max_ls=100)
    result = run_search(
        method, _objective(rosenbrock), x, SearchOrigin(d, f0, g), torch.tensor(t0, dtype=DTYPE),
        active=torch.ones((), dtype=torch.bool), max_evals=None, early_exit=True,
    )  # fmt: skip
    assert bool(result.success)
    assert_strong_wolfe(float(f0), gtd, result, d, method.c1, method.c2)
    assert_evaluated_at(rosenbrock, x, d, result)

    # With the defaults: strong Wolfe whenever it reports success, and never an increase.
    result = torchlbfgs.line_search(rosenbrock, x, d, f0, g, method="more_thuente", step_size=t0)
    if bool(result.success):
        assert_strong_wolfe(float(f0), gtd, result, d, 1e-4, 0.9)
    assert float(result.value) <= float(f0)
    assert int(result.n_evals) <= 26


# -------------------------------------------------------------------------------------- vmap


def _yanai(x: Tensor, beta1: Tensor, beta2: Tensor) -> Tensor:
    t = x[0]
    g1, g2 = torch.sqrt(1 + beta1**2) - beta1, torch.sqrt(1 + beta2**2) - beta2
    return g1 * torch.sqrt((1 - t) ** 2 + beta2**2) + g2 * torch.sqrt(t**2 + beta1**2)


def _search_yanai(
    beta1: Tensor, beta2: Tensor, t0: Tensor, budget: Tensor, active: Tensor, early_exit: bool
) -> FlatLineSearchResult:
    method = MoreThuente(c1=1e-3, c2=1e-3, xtol=1e-10, max_ls=14)
    objective = _objective(lambda x: _yanai(x, beta1, beta2))
    x, d = torch.zeros_like(t0).unsqueeze(0), torch.ones_like(t0).unsqueeze(0)
    value, grad = objective(x)
    return run_search(
        method, objective, x, SearchOrigin(d, value, grad), t0,
        active=active, max_evals=budget, early_exit=early_exit,
    )  # fmt: skip


def test_vmapped_searches_equal_each_search_alone() -> None:
    """A batch of searches that stop after 1 to 15 evaluations (one by its budget, one inactive)
    equals each search run alone, bitwise: the batch runs all 15 steps, so the searches that
    finished early were handed 14 more (masked) evaluations and stayed frozen."""
    betas = [(1e-3, 1e-3), (1e-2, 1e-3), (1e-3, 1e-2), (0.1, 0.1), (1e-3, 1e-2), (1e-2, 1e-3), (0.3, 1e-3)]
    beta1 = torch.tensor([b[0] for b in betas], dtype=DTYPE)
    beta2 = torch.tensor([b[1] for b in betas], dtype=DTYPE)
    t0 = torch.tensor([1e-3, 1e3, 1e-3, 0.5, 1e1, 1e3, 1e-1], dtype=DTYPE)
    budget = torch.tensor([99, 99, 99, 99, 4, 99, 99])
    active = torch.tensor([True, True, True, True, True, True, False])
    batched = torch.func.vmap(lambda *args: _search_yanai(*args, early_exit=False))(
        beta1, beta2, t0, budget, active
    )
    evaluations = set()
    for i in range(len(betas)):
        alone = _search_yanai(beta1[i], beta2[i], t0[i], budget[i], active[i], early_exit=True)
        for field in FlatLineSearchResult._fields:
            assert bitwise_equal(getattr(batched, field)[i], getattr(alone, field)), f"search {i}, {field}"
        evaluations.add(int(alone.n_evals))
    assert len(evaluations) >= 5, evaluations  # the searches really stop at different times
    assert int(batched.n_evals[4]) == 4
    assert int(batched.n_evals[6]) == 0
    assert bool(batched.success[:4].all())


def test_finished_search_is_frozen_by_later_digests() -> None:
    method = MoreThuente()
    fun = rosenbrock
    x, d = next(_descent_directions(fun, 4, seed=0, count=1))
    value, grad = _objective(fun)(x)
    origin = SearchOrigin(d, value, grad)
    search = method.start(
        origin, torch.tensor(1.0, dtype=DTYPE), torch.tensor(True), evaluation_budget(None, value)
    )
    while bool(method.trial(search)[1]):
        t, running = method.trial(search)
        search = method.digest(search, origin, *_objective(fun)(trial_point(x, d, t, running)))
    for f_new, g_new in (
        (torch.tensor(-1e300, dtype=DTYPE), -grad),
        (torch.tensor(math.nan), grad * math.nan),
    ):
        after = method.digest(search, origin, f_new.to(DTYPE), g_new)
        for field, before, now in zip(search._fields, search, after, strict=True):
            assert bitwise_equal(before, now), field


# -------------------------------------------------------------- budget, max_ls, odd starts


def _hard_search(max_ls: int = 60, max_evals: int | Tensor | None = None) -> FlatLineSearchResult:
    """Function 6 of the paper from t0 = 1e-3: dcsrch needs 13 evaluations."""
    calls = []
    objective = _objective(lambda x: _yanai(x, *_betas6()))

    def counted(x: Tensor) -> tuple[Tensor, Tensor]:
        calls.append(None)
        return objective(x)

    x, d = torch.zeros(1, dtype=DTYPE), torch.ones(1, dtype=DTYPE)
    value, grad = objective(x)
    method = MoreThuente(c1=1e-3, c2=1e-3, xtol=1e-10, max_ls=max_ls)
    result = run_search(
        method, counted, x, SearchOrigin(d, value, grad), torch.tensor(1e-3, dtype=DTYPE),
        active=torch.ones((), dtype=torch.bool), max_evals=max_evals, early_exit=True,
    )  # fmt: skip
    assert len(calls) == int(result.n_evals)
    return result


@pytest.mark.parametrize("max_ls", [0, 1, 2, 5, 12, 25])
def test_max_ls_caps_the_evaluations(max_ls: int) -> None:
    result = _hard_search(max_ls=max_ls)
    assert int(result.n_evals) == min(max_ls + 1, 13)
    assert bool(result.success) == (max_ls + 1 >= 13)
    # Out of trials it returns stx: a step with sufficient decrease, or the start.
    assert float(result.value) <= float(_yanai(torch.zeros(1, dtype=DTYPE), *_betas6()))


def test_tolerance_change_stops_on_a_short_bracket() -> None:
    """The bracket times max|d| below tolerance_change ends the search at stx."""
    full = _hard_search()
    for tolerance_change, d_scale in ((0.1, 1.0), (1.0, 10.0)):  # the bracket is 0.097 after 11
        objective = _objective(lambda x: _yanai(x, *_betas6()))
        x, d = torch.zeros(1, dtype=DTYPE), torch.full((1,), d_scale, dtype=DTYPE)
        value, _grad = objective(x)
        method = MoreThuente(c1=1e-3, c2=1e-3, xtol=1e-10, tolerance_change=tolerance_change, max_ls=60)
        steps, result = drive(method, objective, x, d, 1e-3 / d_scale)
        assert len(steps) < int(full.n_evals)
        assert not bool(result.success)
        assert float(result.value) < float(value)
        assert float(result.step_size) * d_scale in [t * d_scale for t in steps]


def _betas6() -> tuple[Tensor, Tensor]:
    return torch.tensor(1e-3, dtype=DTYPE), torch.tensor(1e-2, dtype=DTYPE)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
@pytest.mark.parametrize("max_evals", [0, 1, 3, 12, 13, 100])
def test_max_evals_caps_the_evaluations(max_evals: int, as_tensor: bool) -> None:
    budget: int | Tensor = torch.tensor(max_evals) if as_tensor else max_evals
    result = _hard_search(max_evals=budget)
    assert int(result.n_evals) == min(max_evals, 13)
    if max_evals == 0:
        assert float(result.step_size) == 0.0
        assert not bool(result.success)


def test_inactive_search_starts_finished() -> None:
    method = MoreThuente()
    value, grad = torch.tensor(1.0, dtype=DTYPE), torch.tensor([2.0, -1.0], dtype=DTYPE)
    d = -grad
    for active, budget, direction, t0 in (
        (False, None, d, 1.0),  # inactive
        (True, 0, d, 1.0),  # no budget
        (True, None, grad, 1.0),  # not a descent direction
        (True, None, d, 0.0),  # no step
        (True, None, d, math.nan),
    ):
        origin = SearchOrigin(direction, value, grad)
        search = method.start(
            origin, torch.tensor(t0, dtype=DTYPE), torch.tensor(active), evaluation_budget(budget, value)
        )
        assert not bool(method.trial(search)[1])
        result = method.outcome(search)
        assert float(result.step_size) == 0.0
        assert int(result.n_evals) == 0
        assert not bool(result.success)
        assert bitwise_equal(result.value, value)
        assert bitwise_equal(result.grad, grad)


def _wall(kind: str) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """A parabola with its minimum at t = 1 along d = 1, as ``(value, grad)``, whose value
    (``"inf"``, ``"nan"``) or only gradient (``"nan_gradient"``) is not finite beyond t = 3."""

    def fun(x: Tensor) -> tuple[Tensor, Tensor]:
        t = x[0]
        value, grad = (t - 1) ** 2, 2 * (t - 1)
        beyond = t > 3
        if kind == "inf":
            value = torch.where(beyond, torch.inf, value)
        elif kind == "nan":
            value = torch.where(beyond, torch.nan, value)
        grad = torch.where(beyond & (kind != "inf"), torch.nan, grad)
        return value, grad.unsqueeze(0)

    return fun


@pytest.mark.parametrize("kind", ["inf", "nan", "nan_gradient"])
@pytest.mark.parametrize("t0", [4.0, 1e3, 1e8])
def test_non_finite_values_shrink_the_step(kind: str, t0: float) -> None:
    fun = _wall(kind)
    x, d = torch.zeros(1, dtype=DTYPE), torch.ones(1, dtype=DTYPE)
    f0, g = fun(x)
    result = torchlbfgs.line_search(
        fun, x, d, f0, g, method="more_thuente", step_size=t0, max_ls=60, value_and_grad=True
    )
    assert bool(result.success), result
    assert 0 < float(result.step_size) < 3
    assert math.isfinite(float(result.value))
    assert bool(torch.isfinite(result.grad).all())
    assert_strong_wolfe(float(f0), float(g @ d), result, d, 1e-4, 0.9)


@pytest.mark.parametrize("t0", [0.1, 2.0, 1e3])
def test_no_wolfe_point_before_a_non_finite_wall(t0: float) -> None:
    """cos(t + 0.1) keeps falling until it stops being finite at t = 1.5: no step satisfies the
    curvature condition, and the search, interpolating towards a non-finite end of its bracket
    by bisection, ends at the last finite point."""

    def evaluate(t: float) -> tuple[float, float]:
        return (math.inf, math.nan) if t > 1.5 else (math.cos(t + 0.1), -math.sin(t + 0.1))

    method = MoreThuente(max_ls=40)
    steps, result = drive(
        method, _one_d_objective(evaluate), torch.zeros(1, dtype=DTYPE), torch.ones(1, dtype=DTYPE), t0
    )
    assert all(math.isfinite(t) for t in steps)
    assert len(steps) <= 14
    assert not bool(result.success)
    assert 1.45 <= float(result.step_size) <= 1.5
    assert float(result.value) == evaluate(float(result.step_size))[0] < evaluate(0.0)[0]


def test_registered_everywhere() -> None:
    assert "more_thuente" in LINE_SEARCHES
    method = search_method("more_thuente", c1=1e-3, c2=0.8, tolerance_change=1e-7, max_ls=9)
    assert method == MoreThuente(c1=1e-3, c2=0.8, tolerance_change=1e-7, max_ls=9)
    assert method.max_trials == 10
    with pytest.raises(ValueError, match="line_search must be one of"):
        torchlbfgs.minimize(rosenbrock, torch.zeros(2, dtype=DTYPE), line_search="more-thuente")  # type: ignore[arg-type]


# ------------------------------------------------------------------------- the whole solver


@pytest.mark.parametrize("n", [2, 10])
def test_minimize_reaches_scipy_lbfgsb_optimum_on_rosenbrock(n: int) -> None:
    x0 = torch.tensor([-1.2, 1.0] * (n // 2), dtype=DTYPE)
    result = torchlbfgs.minimize(
        rosenbrock, x0, line_search="more_thuente", max_iter=500, tolerance_grad=1e-10, tolerance_change=0.0
    )
    assert bool(result.converged), torchlbfgs.status_message(result.status)

    def value_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        grad, value = torch.func.grad_and_value(rosenbrock)(torch.from_numpy(x))
        return float(value), grad.numpy()

    reference = scipy.optimize.minimize(
        value_and_grad, x0.numpy(), jac=True, method="L-BFGS-B",
        options={"gtol": 1e-10, "ftol": 0.0, "maxiter": 1000, "maxcor": 10},
    )  # fmt: skip
    assert np.max(np.abs(reference.x - 1.0)) < 1e-6  # the anchor itself is at the optimum
    torch.testing.assert_close(result.params, torch.from_numpy(reference.x), rtol=0, atol=1e-6)
    assert float(result.value) < 1e-12


def test_minimize_under_vmap_and_update_loop_agree() -> None:
    """``minimize`` (evaluation rounds), a loop of ``update`` and ``vmap`` of ``minimize`` take
    the same steps with the new search."""
    starts = torch.tensor([[-1.2, 1.0], [2.0, 2.0], [0.5, -0.3]], dtype=DTYPE)
    options: dict[str, Any] = {"line_search": "more_thuente", "max_iter": 60}
    batched = torch.func.vmap(lambda x: torchlbfgs.minimize(rosenbrock, x, **options))(starts)
    for i, x0 in enumerate(starts):
        alone = torchlbfgs.minimize(rosenbrock, x0, **options)
        x, state = x0, torchlbfgs.init(rosenbrock, x0)
        for _ in range(options["max_iter"]):
            x, state = torchlbfgs.update(rosenbrock, x, state, line_search="more_thuente")
        assert bitwise_equal(alone.params, x)
        assert bitwise_equal(alone.n_evals, state.n_evals)
        torch.testing.assert_close(batched.params[i], alone.params, rtol=1e-10, atol=1e-12)
        assert bool(alone.converged)
