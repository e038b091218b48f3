"""``torchlbfgs.minimize`` and ``torchlbfgs.batched_minimize``: batches of *different* problems
against each problem solved alone, against SciPy's L-BFGS-B and closed forms; stopped problems
frozen while the others run; failures isolated; ``max_iter``; the progress callback; the early
exit; pytree params; and ``minimize`` against ``init``/``update`` run by hand.

Batched and unbatched runs of one problem are the same algorithm on the same function, but
batched kernels (``bmm`` for ``A @ x``, batched dot products) round differently from unbatched
ones, so a batch matches its problems alone to a tolerance: 1e-10 in float64 and 1e-5 in
float32 (relative to ``1 + max|expected|``). The integer fields (``n_iter``, ``n_evals``,
``status``) match exactly provided no decision is taken within rounding of its threshold. The
fragile place is the floating-point floor: once the decrease a step can make, about
``|g|^2 / (2 lambda)``, falls to the rounding of ``f`` (``eps |f|``), whether the line search
still finds a lower value is decided by the last bits of ``f``, and two roundings of one problem
stop an iteration apart (``LINE_SEARCH_FAILED`` on one side, ``GRADIENT_TOLERANCE`` on the
other), with params that differ by up to the last step. The tolerances of each family and
precision are therefore chosen well above that floor, and the comparison asserts that every
problem stopped on ``GRADIENT_TOLERANCE``, so a change of that premise fails loudly rather than
as a count mismatch (the stopping |g| of these runs is at least 4% below ``tolerance_grad``
and the one before it at least 7% above, far outside rounding):

* SPD quadratics are written as ``0.5 |R x - c|^2`` (``A = R'R``, ``c = R^{-T} b``): the same
  function as ``problems.spd_quadratic`` up to a constant, with ``f* = 0`` so that ``f`` stays
  accurate relative to the decrease and ``tolerance_grad = 1e-10`` is reached even at
  condition 1e4. In the form ``0.5 x'Ax - b'x`` (``f* ~ -1``) the floor is at
  ``|g| ~ sqrt(2 eps |f*| lambda) ~ 1e-8``, where those runs indeed end with
  ``LINE_SEARCH_FAILED`` and their batched and unbatched runs part.
* Logistic regressions (mean loss, ``f* ~ 0.5``, ``lambda <~ 1``) have the floor at
  ``|g| ~ 1e-8`` in float64 and ``~ 2e-4`` in float32: ``tolerance_grad`` is ``1e-7`` and
  ``1e-3``.
* Rosenbrock has ``f* = 0``; its batched function is elementwise, so batches match bitwise.

The comparison with SciPy uses ``tolerance_grad = 1e-10`` and ``tolerance_change = 0`` for every
family, so the logistic regressions do reach the floor (some end with ``LINE_SEARCH_FAILED``);
there the solution accuracy (1e-6 relative) is asserted with the documented set of stop reasons.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import optree
import pytest
import torch
from assertions import bitwise_equal
from problems import Problem, logistic_regression, rosenbrock, spd_quadratic
from scipy.optimize import minimize as scipy_minimize

import torchlbfgs
from torchlbfgs import LBFGSState, Progress, Result, StopReason
from torchlbfgs.bounds import Bounds
from torchlbfgs.line_searches.loop import batch_view
from torchlbfgs.objective import flat_objective
from torchlbfgs.pytree import ravel_pytree
from torchlbfgs.rounds import Settings, advance, start

Tensor = torch.Tensor
PyTree = Any

DTYPES = (torch.float64, torch.float32)
ALONE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
MAX_ITER = 300  # the slowest problem below (condition 1e4) needs ~80 iterations
# (tolerance_grad, tolerance_change) per family and dtype; see the module docstring.
TOLERANCES = {
    ("quadratic", torch.float64): (1e-10, 0.0),
    ("logistic", torch.float64): (1e-7, 0.0),
    ("rosenbrock", torch.float64): (1e-10, 0.0),
    ("quadratic", torch.float32): (1e-4, 0.0),
    ("logistic", torch.float32): (1e-3, 0.0),
    ("rosenbrock", torch.float32): (1e-4, 0.0),
}
# For SciPy: tight for every family. With tolerance_change = 0 the value-change test cannot hold
# (|df| < 0), DIRECTIONAL_DERIVATIVE_TOLERANCE needs g'd > 0 (excluded for the positive-definite
# L-BFGS matrix and g != 0), and NON_FINITE / MAX_EVALS have no cause here; what remains is
# convergence, a line search that finds no lower value at the floor (PRECISION_LIMIT), or a step
# that no longer changes x.
TIGHT = (1e-10, 0.0)
TIGHT_STATUSES = {StopReason.GRADIENT_TOLERANCE, StopReason.PRECISION_LIMIT, StopReason.STEP_TOLERANCE}
SCIPY_AGREEMENT = 1e-6


# --------------------------------------------------------------------------------------------
# Helpers


def assert_close(actual: Tensor, expected: Tensor, tolerance: float, what: str) -> None:
    """Floating tensors to ``tolerance * (1 + max|expected|)``; others exactly."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: {actual} != {expected}"
        return
    error = (actual - expected).abs().max().item()
    bound = tolerance * (1.0 + expected.abs().max().item())
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g}"


def lane(tree: PyTree, i: int) -> PyTree:
    return optree.tree_map(lambda leaf: leaf[i], tree)


def assert_result_matches(
    actual: Result, expected: Result, tolerance: float, what: str, *, grad_lipschitz: float = 1.0
) -> None:
    """Every field: floats to ``tolerance``, integer and boolean fields exactly.

    ``grad_norm`` is a gradient, taken at params that agree to ``tolerance``: gradients at two
    points differ by up to ``L |x - x'|_inf`` with ``L`` the max-norm of the Hessian
    (``grad_lipschitz``), so its tolerance is ``tolerance * max(1, L)``.
    """
    for name in Result._fields:
        actual_leaves = optree.tree_leaves(getattr(actual, name))
        expected_leaves = optree.tree_leaves(getattr(expected, name))
        assert len(actual_leaves) == len(expected_leaves), f"{what}: {name} structure"
        bound = tolerance * max(1.0, grad_lipschitz) if name == "grad_norm" else tolerance
        for a, e in zip(actual_leaves, expected_leaves, strict=True):
            assert_close(a, e, bound, f"{what}: {name}")


def hessian_max_norm(fun: Callable[[Tensor], Tensor], x: Tensor) -> float:
    """``|H(x)|_inf``, the largest absolute row sum of the Hessian at ``x`` (float64)."""
    hessian = torch.func.jacrev(torch.func.grad(fun))(x.double())
    return float(hessian.abs().sum(-1).max())


def assert_results_bitwise(actual: Result, expected: Result, what: str) -> None:
    for name in Result._fields:
        actual_leaves = optree.tree_leaves(getattr(actual, name))
        expected_leaves = optree.tree_leaves(getattr(expected, name))
        assert len(actual_leaves) == len(expected_leaves), f"{what}: {name} structure"
        for a, e in zip(actual_leaves, expected_leaves, strict=True):
            assert bitwise_equal(a, e), f"{what}: {name} differs: {a} vs {e}"


def _captured(problem: Problem, *names: str) -> tuple[Any, ...]:
    """The data tensors a ``problems.py`` objective closes over."""
    nonlocals = inspect.getclosurevars(problem.fun).nonlocals
    return tuple(nonlocals[name] for name in names)


class CountingFun:
    """Counts calls; under ``vmap`` one call evaluates the whole batch and counts once."""

    def __init__(self, fun: Callable[..., Tensor]) -> None:
        self.fun = fun
        self.calls = 0

    def __call__(self, *args: Any) -> Tensor:
        self.calls += 1
        return self.fun(*args)


# --------------------------------------------------------------------------------------------
# Batches of different problems of one family


@dataclass(frozen=True)
class Batch:
    """Problem ``i`` minimises ``fun(x, *args_i)`` from ``x0_i``; ``in_dims`` as in ``vmap``
    for ``(x0, *args)`` (``None``: shared by every problem)."""

    fun: Callable[..., Tensor]
    x0: Tensor
    args: tuple[Tensor, ...]
    in_dims: tuple[int | None, ...]
    size: int
    solutions: Tensor | None = None  # closed-form minimisers (float64), where there are

    def start(self, i: int) -> Tensor:
        return self.x0 if self.in_dims[0] is None else self.x0[i]

    def data(self, i: int) -> tuple[Tensor, ...]:
        return tuple(a if d is None else a[i] for a, d in zip(self.args, self.in_dims[1:], strict=True))

    def problem(self, i: int) -> Callable[[Tensor], Tensor]:
        data = self.data(i)
        return lambda x: self.fun(x, *data)

    def subset(self, keep: list[int]) -> Batch:
        def take(t: Tensor, d: int | None) -> Tensor:
            return t if d is None else t[keep]

        x0 = take(self.x0, self.in_dims[0])
        args = tuple(take(a, d) for a, d in zip(self.args, self.in_dims[1:], strict=True))
        solutions = None if self.solutions is None else self.solutions[keep]
        return replace(self, x0=x0, args=args, size=len(keep), solutions=solutions)

    def batched(self, **options: Any) -> Result:
        return torchlbfgs.batched_minimize(self.fun, self.x0, *self.args, in_dims=self.in_dims, **options)

    def vmapped(self, **options: Any) -> Result:
        """``torch.func.vmap(minimize)`` written out, without ``batched_minimize``."""

        def one(x0: Tensor, *data: Tensor) -> Result:
            return torchlbfgs.minimize(lambda x: self.fun(x, *data), x0, **options)

        return torch.func.vmap(one, in_dims=self.in_dims)(self.x0, *self.args)

    def alone(self, i: int, **options: Any) -> Result:
        return torchlbfgs.minimize(self.problem(i), self.start(i), **options)


def least_squares_quadratic(x: Tensor, r: Tensor, c: Tensor) -> Tensor:
    residual = r @ x - c
    return 0.5 * (residual @ residual)


QUADRATIC_DIMENSION = 8
QUADRATIC_CONDITIONS = {torch.float64: (1.0, 1e2, 1e4), torch.float32: (1.0, 10.0, 1e2)}


def quadratic_batch(dtype: torch.dtype) -> tuple[Batch, list[Problem]]:
    """``problems.spd_quadratic`` of very different conditioning, as ``0.5 |R x - c|^2``."""
    problems = [
        spd_quadratic(QUADRATIC_DIMENSION, condition, seed=i)
        for i, condition in enumerate(QUADRATIC_CONDITIONS[dtype])
    ]
    a = torch.stack([_captured(p, "a")[0] for p in problems])
    b = torch.stack([_captured(p, "b")[0] for p in problems])
    lower = torch.linalg.cholesky(a)
    c = torch.linalg.solve_triangular(lower, b.unsqueeze(-1), upper=False).squeeze(-1)
    x0 = torch.stack([p.x0 for p in problems]).to(dtype)
    solutions = torch.stack([p.solution for p in problems if p.solution is not None])
    batch = Batch(
        least_squares_quadratic, x0, (lower.mT.to(dtype), c.to(dtype)), (0, 0, 0), len(problems), solutions
    )
    return batch, problems


def logistic(w: Tensor, features: Tensor, labels: Tensor, lam: Tensor) -> Tensor:
    logits = features @ w
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels) + 0.5 * lam * (w @ w)


LOGISTIC_LAMBDAS = (1.0, 0.1, 1e-2, 1e-3)  # well conditioned and quick ... weakly regularised


def logistic_batch(dtype: torch.dtype) -> tuple[Batch, list[Problem]]:
    """Logistic regressions on different data, all from one shared start (``in_dims`` None)."""
    problems = [
        logistic_regression(60, 5, lam, seed=i, dtype=dtype) for i, lam in enumerate(LOGISTIC_LAMBDAS)
    ]
    captured = [_captured(p, "features", "labels", "lam") for p in problems]
    features = torch.stack([c[0] for c in captured])
    labels = torch.stack([c[1] for c in captured])
    lam = torch.tensor([c[2] for c in captured], dtype=dtype)
    shared_start = problems[0].x0
    assert all(torch.equal(p.x0, shared_start) for p in problems)
    batch = Batch(logistic, shared_start, (features, labels, lam), (None, 0, 0, 0), len(problems))
    return batch, problems


# The MGH standard start, the minimiser itself (stops before its first iteration), near it, and
# two other starts.
ROSENBROCK_STARTS = ((-1.2, 1.0), (1.0, 1.0), (0.8, 0.8), (2.0, -1.0), (-1.5, 2.5))


def rosenbrock_batch(dtype: torch.dtype) -> tuple[Batch, list[Problem]]:
    """``problems.rosenbrock`` itself, batched by the starting point only."""
    starts = torch.tensor(ROSENBROCK_STARTS, dtype=dtype)
    solution = torch.ones(2, dtype=torch.float64)
    problems = [Problem("rosenbrock2", rosenbrock, start, solution) for start in starts]
    batch = Batch(rosenbrock, starts, (), (0,), len(problems), solution.expand(len(problems), 2))
    return batch, problems


FAMILIES = {"quadratic": quadratic_batch, "logistic": logistic_batch, "rosenbrock": rosenbrock_batch}


def options_for(
    family: str, dtype: torch.dtype, tolerances: tuple[float, float] | None = None
) -> dict[str, Any]:
    tolerance_grad, tolerance_change = tolerances or TOLERANCES[family, dtype]
    return {"tolerance_grad": tolerance_grad, "tolerance_change": tolerance_change, "max_iter": MAX_ITER}


@functools.cache
def make_batch(family: str, dtype: torch.dtype) -> tuple[Batch, list[Problem]]:
    return FAMILIES[family](dtype)


def per_iteration(records: list[Progress], field: str) -> Tensor:
    """``(iterations, B)``: problem i's ``field`` once it has completed k + 1 iterations.

    Progress is reported per round, and a problem's value and gradient change only in the
    round that completes one of its iterations, so the first round with ``n_iter >= k + 1``
    shows the state after iteration ``k + 1``.
    """
    n_iter = torch.stack([p.n_iter for p in records])  # (rounds, B)
    data = torch.stack([getattr(p, field) for p in records])
    rows = []
    for k in range(1, int(n_iter.max()) + 1):
        first_round = (n_iter >= k).long().argmax(0)  # rounds where the problem stopped earlier: 0
        rows.append(data.gather(0, first_round.unsqueeze(0)).squeeze(0))
    return torch.stack(rows)


@functools.cache
def solved_batch_with_history(family: str, dtype: torch.dtype, tight: bool = False) -> tuple[Result, Tensor]:
    """The batch's result and its ``max|g|`` after every iteration, ``(iterations, B)``."""
    batch, _ = make_batch(family, dtype)
    records: list[Progress] = []
    options = options_for(family, dtype, TIGHT if tight else None)
    result = batch.batched(**options, callback=records.append, callback_every=1)
    return result, per_iteration(records, "grad_norm")


def solved_batch(family: str, dtype: torch.dtype, tight: bool = False) -> Result:
    return solved_batch_with_history(family, dtype, tight)[0]


@functools.cache
def solved_alone(family: str, dtype: torch.dtype, i: int) -> Result:
    batch, _ = make_batch(family, dtype)
    return batch.alone(i, **options_for(family, dtype))


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_objectives_are_the_problems(family: str) -> None:
    """Each problem of a batch is its ``problems.py`` objective (quadratics: up to a constant)."""
    batch, problems = make_batch(family, torch.float64)
    generator = torch.Generator().manual_seed(0)
    for i, problem in enumerate(problems):
        x, y = torch.randn(2, batch.x0.shape[-1], generator=generator, dtype=torch.float64)
        ours, theirs = batch.problem(i), problem.fun
        torch.testing.assert_close(ours(x) - ours(y), theirs(x) - theirs(y), rtol=1e-12, atol=1e-12)
        assert torch.equal(batch.start(i), problem.x0)
    if family == "quadratic":  # ... and the constant makes the minimum 0
        assert batch.solutions is not None
        for i in range(batch.size):
            assert abs(batch.problem(i)(batch.solutions[i]).item()) < 1e-20


# --------------------------------------------------------------------------------------------
# 1. A batch against each problem alone, against closed forms and against SciPy


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_matches_each_problem_alone(family: str, dtype: torch.dtype) -> None:
    batch, _ = make_batch(family, dtype)
    batched = solved_batch(family, dtype)
    vmapped = batch.vmapped(**options_for(family, dtype))
    # batched_minimize is vmap(minimize): the same operations, the same bits.
    assert_results_bitwise(batched, vmapped, "batched_minimize vs vmap(minimize)")
    if family == "rosenbrock":  # literally vmap(minimize), the function passed unbatched
        literal = torch.func.vmap(torchlbfgs.minimize, in_dims=(None, 0))(
            rosenbrock, batch.x0, **options_for(family, dtype)
        )
        assert_results_bitwise(batched, literal, "batched_minimize vs vmap(minimize)(rosenbrock, x0)")

    n = batch.x0.shape[-1]
    assert batched.params.shape == (batch.size, n)
    for name in Result._fields[1:]:
        assert getattr(batched, name).shape == (batch.size,), name
    # The premise of exact integer agreement: every stop is a threshold decision above the floor,
    # taken with a margin far outside rounding (|g| 1% below tolerance_grad, 1% above before).
    assert batched.status.tolist() == [StopReason.GRADIENT_TOLERANCE] * batch.size
    assert bool(batched.converged.all())
    grad_norms = solved_batch_with_history(family, dtype)[1]
    tolerance_grad = TOLERANCES[family, dtype][0]
    for i, stop in enumerate(batched.n_iter.tolist()):
        if stop >= 1:
            assert grad_norms[stop - 1, i] <= 0.99 * tolerance_grad, (i, grad_norms[:stop, i])
        if stop >= 2:
            assert grad_norms[stop - 2, i] >= 1.01 * tolerance_grad, (i, grad_norms[:stop, i])
    # The batch really mixes fast and slow problems.
    assert int(batched.n_iter.max()) - int(batched.n_iter.min()) >= 5, batched.n_iter

    for i in range(batch.size):
        alone = solved_alone(family, dtype, i)
        double = tuple(a.double() for a in batch.data(i))
        lipschitz = hessian_max_norm(lambda x: batch.fun(x, *double), alone.params)  # noqa: B023
        assert_result_matches(
            lane(batched, i), alone, ALONE_TOLERANCE[dtype], f"{family} problem {i}", grad_lipschitz=lipschitz
        )
        if family == "rosenbrock":  # elementwise: no batched kernel, so no rounding difference
            assert_results_bitwise(lane(batched, i), alone, f"rosenbrock problem {i}")

    if dtype == torch.float64 and batch.solutions is not None:
        # Near x*, |x - x*|_2 <= |g|_2 / lambda_min <= sqrt(n) max|g| / lambda_min, with lambda_min
        # the smallest eigenvalue of the Hessian at x* (constant for the quadratics); the 0.99
        # covers its variation over the few 1e-11 around x* where the Rosenbrock runs end.
        for i in range(batch.size):
            hessian = torch.func.jacrev(torch.func.grad(batch.problem(i)))(batch.solutions[i])
            lambda_min = 0.99 * float(torch.linalg.eigvalsh(hessian)[0])
            bound = math.sqrt(n) * float(batched.grad_norm[i]) / lambda_min + 1e-13
            error = float((batched.params[i] - batch.solutions[i]).norm())
            assert error <= bound, f"problem {i}: |x - x*| = {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_compact_direction_batch_matches_alone_and_the_two_loop(family: str, dtype: torch.dtype) -> None:
    """The compact representation under vmap: each problem as if solved alone (bitwise where
    the function itself is elementwise), and the same optimum as the two-loop recursion."""
    batch, _ = make_batch(family, dtype)
    options = {**options_for(family, dtype), "direction": "compact"}
    compact = batch.batched(**options)
    assert bool(compact.converged.all()), compact.status
    for i in range(batch.size):
        alone = batch.alone(i, **options)
        assert_result_matches(lane(compact, i), alone, ALONE_TOLERANCE[dtype], f"{family} problem {i}")
        if family == "rosenbrock":
            assert_results_bitwise(lane(compact, i), alone, f"rosenbrock problem {i}")
    two_loop = solved_batch(family, dtype)
    if dtype == torch.float64:  # both stop at max|g| <= 1e-10 or 1e-7 near the same minimiser
        torch.testing.assert_close(compact.params, two_loop.params, rtol=1e-5, atol=1e-5)
    else:
        assert (compact.value - two_loop.value).abs().max() <= 1e-4 * (1 + two_loop.value.abs().max())


def _scipy_lbfgsb(fun: Callable[[Tensor], Tensor], x0: Tensor, gtol: float) -> np.ndarray:
    grad_and_value = torch.func.grad_and_value(fun)

    def fun_and_jac(x: np.ndarray) -> tuple[float, np.ndarray]:
        grad, value = grad_and_value(torch.from_numpy(x))
        return float(value), grad.numpy().astype(np.float64)

    result = scipy_minimize(
        fun_and_jac,
        x0.numpy().copy(),
        jac=True,
        method="L-BFGS-B",
        options={"maxcor": 10, "gtol": gtol, "ftol": 0.0, "maxiter": 10 * MAX_ITER, "maxfun": 50 * MAX_ITER},
    )
    return np.asarray(result.x)


def _assert_close_relative(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    scale = max(1.0, float(np.abs(expected).max()))
    error = float(np.abs(actual - expected).max())
    assert error <= SCIPY_AGREEMENT * scale, f"{what}: max error {error:.3e} > {SCIPY_AGREEMENT * scale:.3e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_matches_scipy_lbfgsb(family: str) -> None:
    batch, _ = make_batch(family, torch.float64)
    result = solved_batch(family, torch.float64, tight=True)
    statuses = {StopReason(int(code)) for code in result.status}
    assert statuses <= TIGHT_STATUSES, statuses
    for i in range(batch.size):
        reference = _scipy_lbfgsb(batch.problem(i), batch.start(i), gtol=TIGHT[0])
        _assert_close_relative(result.params[i].numpy(), reference, f"{family} problem {i} vs scipy")
        if batch.solutions is not None:
            solution = batch.solutions[i].numpy()
            _assert_close_relative(reference, solution, f"scipy on {family} problem {i} vs closed form")
            _assert_close_relative(result.params[i].numpy(), solution, f"{family} problem {i} vs closed form")


# --------------------------------------------------------------------------------------------
# 2. Problems stopping at very different iterations: stopped ones are frozen


def test_stopped_problems_are_frozen_while_the_others_run() -> None:
    batch, _ = make_batch("quadratic", torch.float64)
    options = options_for("quadratic", torch.float64)
    records: list[Progress] = []  # references only: Progress documents that keeping them is free
    calls = 0

    def counted(*args: Any) -> Tensor:
        nonlocal calls
        calls += 1  # under vmap, one call evaluates the whole batch
        return batch.fun(*args)

    result = torchlbfgs.batched_minimize(
        counted, batch.x0, *batch.args, **options, callback=records.append, callback_every=1
    )

    assert [p.rounds for p in records] == list(range(1, len(records) + 1))
    # A round evaluates every running problem once (the first round: at its start), and the
    # loop ends with the round in which the last problem stops: the batch is evaluated as often
    # as its most expensive problem, not once per line-search trial of the slowest search of
    # every iteration.
    assert len(records) == int(result.n_evals.max())
    assert calls == len(records)
    statuses = torch.stack([p.status for p in records])  # (rounds, B)
    values = torch.stack([p.value for p in records])
    n_evals = torch.stack([p.n_evals for p in records])
    assert statuses.shape == values.shape == n_evals.shape == (len(records), batch.size)
    assert bitwise_equal(values[-1], result.value)
    assert torch.equal(n_evals[-1], result.n_evals)

    stops = []
    for i in range(batch.size):
        stop = int((statuses[:, i] != StopReason.RUNNING).nonzero()[0])  # index of its last round
        stops.append(int(result.n_iter[i]))
        # While running, every round evaluates it exactly once.
        assert stop + 1 == int(result.n_evals[i])
        assert torch.equal(n_evals[: stop + 1, i], torch.arange(1, stop + 2))
        # Afterwards: frozen value, evaluation count and status, bitwise.
        for t in range(stop + 1, len(records)):
            assert bitwise_equal(values[t, i], values[stop, i]), (i, t)
            assert n_evals[t, i] == n_evals[stop, i]
            assert statuses[t, i] == result.status[i]
    assert len(set(stops)) == batch.size, stops
    assert max(stops) - min(stops) >= 30, stops

    # Params (which Progress does not carry): cutting the run short right at an early finisher's
    # stop, or a few iterations later, leaves its params bitwise what the full run returns, while
    # the problems still running at the cut end elsewhere.
    for i in sorted(range(batch.size), key=lambda j: stops[j])[:-1]:
        for max_iter in (stops[i], stops[i] + 5):
            cut = batch.batched(**{**options, "max_iter": max_iter})
            assert bitwise_equal(cut.params[i], result.params[i]), (i, max_iter)
            assert cut.n_evals[i] == result.n_evals[i]
            assert cut.status[i] == result.status[i]
            for j in range(batch.size):
                if stops[j] > max_iter:
                    assert cut.status[j] == StopReason.MAX_ITERATIONS
                    assert cut.n_iter[j] == max_iter
                    assert not torch.equal(cut.params[j], result.params[j])
        # ... and its counts are those of solving it alone.
        alone = solved_alone("quadratic", torch.float64, i)
        assert alone.n_iter == result.n_iter[i]
        assert alone.n_evals == result.n_evals[i]


def test_vmapped_update_freezes_params_of_stopped_problems() -> None:
    """Step by step: ``vmap(update)`` leaves a stopped problem's params bitwise unchanged."""
    batch, _ = make_batch("quadratic", torch.float64)
    options = options_for("quadratic", torch.float64)
    del options["max_iter"]

    def init_one(x: Tensor, r: Tensor, c: Tensor) -> LBFGSState:
        return torchlbfgs.init(lambda p: batch.fun(p, r, c), x)

    def update_one(x: Tensor, state: LBFGSState, r: Tensor, c: Tensor) -> tuple[Tensor, LBFGSState]:
        return torchlbfgs.update(lambda p: batch.fun(p, r, c), x, state, **options)

    updates = 40
    params, state = batch.x0, torch.func.vmap(init_one)(batch.x0, *batch.args)
    frozen: dict[int, tuple[Tensor, Tensor]] = {}
    checks = 0
    for _ in range(updates):
        params, state = torch.func.vmap(update_one)(params, state, *batch.args)
        for i in range(batch.size):
            if i in frozen:
                assert bitwise_equal(params[i], frozen[i][0])
                assert state.n_evals[i] == frozen[i][1]
                checks += 1
            elif state.status[i] != StopReason.RUNNING:
                frozen[i] = (params[i].clone(), state.n_evals[i].clone())
    # The same problems stopped as in minimize, at the same points, bit for bit (minimize is a
    # loop of these updates), and the slowest one is still running.
    solved = solved_batch("quadratic", torch.float64)
    assert set(frozen) == {i for i in range(batch.size) if int(solved.n_iter[i]) < updates}
    assert 0 < len(frozen) < batch.size
    assert checks >= 20
    for i in frozen:
        assert bitwise_equal(params[i], solved.params[i])
        assert state.n_evals[i] == solved.n_evals[i]
    for i in set(range(batch.size)) - set(frozen):
        assert state.status[i] == StopReason.RUNNING


# --------------------------------------------------------------------------------------------
# 3. A failing problem leaves the others bitwise unchanged


def walled_rosenbrock(x: Tensor, wall: Tensor) -> Tensor:
    """Rosenbrock, NaN beyond ``x[0] > wall`` (``wall = inf``: Rosenbrock itself, plus 0)."""
    nan = torch.full_like(x[0], float("nan"))
    return rosenbrock(x) + torch.where(x[0] > wall, nan, torch.zeros_like(nan))


def _failing_batch(case: str) -> tuple[Batch, int, StopReason]:
    """A float64 batch whose problem ``bad`` fails, and the stop reason it must report."""
    if case == "nan_data":
        batch, _ = make_batch("logistic", torch.float64)
        features = batch.args[0].clone()
        features[1, 7, 2] = float("nan")
        return replace(batch, args=(features, *batch.args[1:])), 1, StopReason.NON_FINITE
    starts = torch.tensor(ROSENBROCK_STARTS, dtype=torch.float64)
    if case == "overflowing_start":  # x^2 overflows: the value at the start is inf
        starts = torch.cat([starts[:2], torch.tensor([[1e200, 1.0]], dtype=torch.float64), starts[2:]])
        return Batch(rosenbrock, starts, (), (0,), len(starts)), 2, StopReason.NON_FINITE
    assert case == "nan_beyond_wall"  # finite at the start; NaN on the way to (1, 1), past x[0] = 0.5
    walls = torch.full((len(starts),), float("inf"), dtype=torch.float64)
    walls[0] = 0.5
    return Batch(walled_rosenbrock, starts, (walls,), (0, 0), len(starts)), 0, StopReason.LINE_SEARCH_FAILED


@pytest.mark.parametrize("case", ["nan_data", "overflowing_start", "nan_beyond_wall"])
def test_failing_problem_leaves_the_others_bitwise_unchanged(case: str) -> None:
    batch, bad, expected_status = _failing_batch(case)
    options = {"tolerance_grad": 1e-8, "tolerance_change": 0.0, "max_iter": MAX_ITER}
    result = batch.batched(**options)
    others = [i for i in range(batch.size) if i != bad]
    without = batch.subset(others).batched(**options)

    assert result.status[bad] == expected_status, torchlbfgs.status_message(result.status[bad])
    assert not bool(result.converged[bad])
    if expected_status == StopReason.NON_FINITE:  # at the start: init evaluates once, no iteration
        assert result.n_iter[bad] == 0
        assert result.n_evals[bad] == 1
        assert bitwise_equal(result.params[bad], batch.start(bad))
    else:  # stopped at its last finite point, short of the wall
        assert bool(torch.isfinite(result.params[bad]).all())
        assert bool(torch.isfinite(result.value[bad]))
        assert float(result.params[bad][0]) <= float(batch.args[0][bad])
        assert bitwise_equal(result.value[bad], batch.problem(bad)(result.params[bad]))
        assert result.n_iter[bad] >= 1

    assert bool(without.converged.all())
    for k, i in enumerate(others):
        assert_results_bitwise(lane(result, i), lane(without, k), f"{case}: problem {i}")


# --------------------------------------------------------------------------------------------
# 4. max_iter


def test_max_iter_stops_with_max_iterations() -> None:
    start = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    result = torchlbfgs.minimize(rosenbrock, start, max_iter=5)
    assert result.status == StopReason.MAX_ITERATIONS
    message = torchlbfgs.status_message(result.status)
    assert message == torchlbfgs.status_message(StopReason.MAX_ITERATIONS)
    assert "max_iter" in message
    assert message.startswith("stopped")
    assert not bool(result.converged)
    assert result.n_iter == 5
    assert result.n_evals >= 6  # init plus at least one evaluation per iteration

    # In a batch, only the problems still running at max_iter report it.
    batch, _ = make_batch("quadratic", torch.float64)
    full = solved_batch("quadratic", torch.float64)
    max_iter = 10
    cut = batch.batched(**{**options_for("quadratic", torch.float64), "max_iter": max_iter})
    for i in range(batch.size):
        if full.n_iter[i] <= max_iter:
            assert cut.status[i] == full.status[i]
            assert bool(cut.converged[i])
            assert cut.n_iter[i] == full.n_iter[i]
        else:
            assert cut.status[i] == StopReason.MAX_ITERATIONS
            assert not bool(cut.converged[i])
            assert cut.n_iter[i] == max_iter
    assert {int(s) for s in cut.status} == {StopReason.GRADIENT_TOLERANCE, StopReason.MAX_ITERATIONS}


def test_max_iter_zero_returns_the_start() -> None:
    start = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    result = torchlbfgs.minimize(rosenbrock, start, max_iter=0)
    assert bitwise_equal(result.params, start)
    assert bitwise_equal(result.value, rosenbrock(start))
    assert result.n_iter == 0
    assert result.n_evals == 1
    assert result.status == StopReason.MAX_ITERATIONS
    assert not bool(result.converged)


@pytest.mark.parametrize("max_iter", [0, 1, 20])
def test_batched_start_left_to_the_first_round_is_minimizes_evaluated_start(max_iter: int) -> None:
    """batched_minimize leaves the evaluation of its starting points to its first round (so that
    a compiled solve evaluates them compiled); what that round makes of each start is what
    minimize's evaluated start makes of it, bitwise: a start already optimal, one where the
    function is NaN, one projected onto its box, and ordinary ones (batched_minimize refuses
    crossed bounds before it starts)."""

    def fun(x: Tensor, c: Tensor) -> Tensor:
        return torch.sqrt(c[0]) * ((x - c[1:]) ** 2).sum()  # NaN where c[0] < 0

    dt = torch.float64
    c = torch.tensor([[1, 0.5, 0.5], [1, 0, 0], [-1, 1, 1], [1, 2, -1], [4, 3, 3], [1, -2, 2]], dtype=dt)
    x0 = torch.tensor([[0, 0], [0, 0], [0, 0], [0, 0], [5, 5], [0, 1]], dtype=dt)
    lower = torch.tensor([[-9, -9], [-9, -9], [-9, -9], [0.5, -9], [-9, -9], [-1, -9]], dtype=dt)
    upper = torch.tensor([[9, 9], [9, 9], [9, 9], [9, 9], [1, 9], [9, 9]], dtype=dt)  # 4: x0 outside
    options = {"max_iter": max_iter, "tolerance_grad": 1e-9, "tolerance_change": 0.0}
    batched = torchlbfgs.batched_minimize(fun, x0, c, bounds=(lower, upper), **options)

    def alone(x: Tensor, c: Tensor, low: Tensor, high: Tensor) -> Result:
        return torchlbfgs.minimize(fun, x, c, bounds=(low, high), **options)

    assert_results_bitwise(batched, torch.func.vmap(alone)(x0, c, lower, upper), "batched vs minimize")
    assert batched.status[2] == StopReason.NON_FINITE
    assert batched.n_evals[1:3].tolist() == [1, 1]
    assert bool(batched.params[4, 0] <= 1)  # projected onto its box
    if max_iter == 0:  # the iteration count is tested first
        assert batched.n_evals.tolist() == [1] * 6
        assert batched.status[[0, 1, 3, 4, 5]].tolist() == [StopReason.MAX_ITERATIONS] * 5
    else:
        assert batched.status[1] == StopReason.GRADIENT_TOLERANCE
        assert batched.n_iter[[0, 3, 4, 5]].min() >= 1


@pytest.mark.parametrize("max_iter", [-1, 2.0, None])
def test_invalid_max_iter(max_iter: Any) -> None:
    with pytest.raises(ValueError, match="max_iter"):
        torchlbfgs.minimize(rosenbrock, torch.zeros(2), max_iter=max_iter)


# --------------------------------------------------------------------------------------------
# 5. The progress callback


def test_callback_unbatched_every_k_rounds() -> None:
    start = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    records: list[Progress] = []
    result = torchlbfgs.minimize(rosenbrock, start, max_iter=10, callback=records.append, callback_every=3)
    assert result.status == StopReason.MAX_ITERATIONS  # it ran all 10 iterations
    rounds = int(result.n_evals) - 1  # one evaluation per round, after the starting point
    assert [p.rounds for p in records] == list(range(3, rounds + 1, 3))

    # Each Progress is the state of a loop of update after progress.n_iter iterations, partway
    # through the next line search.
    x, states = start, [torchlbfgs.init(rosenbrock, start)]
    for _ in range(10):
        x, state = torchlbfgs.update(rosenbrock, x, states[-1])
        states.append(state)
    for progress in records:
        assert isinstance(progress.rounds, int)
        for name in ("value", "grad_norm", "status", "n_iter", "n_evals"):
            assert getattr(progress, name).shape == (), name
        assert int(progress.n_evals) == progress.rounds + 1
        state = states[int(progress.n_iter)]
        assert bitwise_equal(progress.value, state.value)
        assert bitwise_equal(progress.grad_norm, state.grad.abs().amax())
        assert torch.equal(progress.status, state.status)
        assert state.n_evals <= progress.n_evals < states[int(progress.n_iter) + 1].n_evals


@pytest.mark.parametrize("how", ["batched_minimize", "vmap"])
def test_callback_sees_the_whole_batch(how: str, capsys: pytest.CaptureFixture[str]) -> None:
    batch, _ = make_batch("quadratic", torch.float64)
    every = 7
    records: list[Progress] = []

    def callback(progress: Progress) -> None:
        records.append(progress)
        torchlbfgs.print_progress(progress)

    options = {**options_for("quadratic", torch.float64), "callback": callback, "callback_every": every}
    result = batch.batched(**options) if how == "batched_minimize" else batch.vmapped(**options)
    without = batch.batched(**options_for("quadratic", torch.float64))
    assert_results_bitwise(result, without, "with callback vs without")

    # Evaluations before the first round: batched_minimize's first round evaluates the start,
    # minimize evaluates it before its rounds.
    before = 0 if how == "batched_minimize" else 1
    rounds = int(result.n_evals.max()) - before  # the loop ends with the last problem's stop
    assert [p.rounds for p in records] == list(range(every, rounds + 1, every))
    for progress in records:
        for name in ("value", "grad_norm", "status", "n_iter", "n_evals"):
            assert getattr(progress, name).shape == (batch.size,), name
        for i in range(batch.size):  # problem i's lane: one evaluation per round until it stops
            still_running = progress.rounds < result.n_evals[i] - before
            assert progress.status[i] == (StopReason.RUNNING if still_running else result.status[i])
            assert progress.n_evals[i] == min(progress.rounds + before, int(result.n_evals[i]))

    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(records)
    for line, progress in zip(lines, records, strict=True):
        match = re.match(r"round\s+(\d+): (\d+)/(\d+) running, value min (\S+) max (\S+),", line)
        assert match, line
        assert int(match[1]) == progress.rounds
        assert int(match[2]) == int((progress.status == StopReason.RUNNING).sum())
        assert int(match[3]) == batch.size
        assert float(match[4]) == pytest.approx(float(progress.value.min()), rel=1e-3)
        assert float(match[5]) == pytest.approx(float(progress.value.max()), rel=1e-3)
    # The running count falls as problems stop (their stops are rounds apart).
    running = [int((p.status == StopReason.RUNNING).sum()) for p in records]
    assert running == sorted(running, reverse=True), running
    assert len(set(running)) > 1, running


def test_print_progress_unbatched(capsys: pytest.CaptureFixture[str]) -> None:
    start = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    torchlbfgs.minimize(rosenbrock, start, max_iter=4, callback=torchlbfgs.print_progress, callback_every=2)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2
    assert [line.split(":")[0].split() for line in lines[:2]] == [["round", "2"], ["round", "4"]]
    assert all(" 1/1 running" in line for line in lines[:-1])


@pytest.mark.parametrize("every", [0, -3, 2.5, "5"])
def test_invalid_callback_every(every: Any) -> None:
    with pytest.raises(ValueError, match="callback_every"):
        torchlbfgs.minimize(rosenbrock, torch.zeros(2), callback=lambda progress: None, callback_every=every)


# --------------------------------------------------------------------------------------------
# 6. early_exit


def test_early_exit_changes_only_the_number_of_calls() -> None:
    batch, _ = make_batch("logistic", torch.float64)
    max_iter, max_ls = 20, 8
    options = {**options_for("logistic", torch.float64), "max_iter": max_iter, "max_ls": max_ls}
    runs: dict[bool | None, tuple[Result, int]] = {}
    for early_exit in (None, False):
        fun = CountingFun(batch.fun)
        result = torchlbfgs.batched_minimize(
            fun, batch.x0, *batch.args, in_dims=batch.in_dims, early_exit=early_exit, **options
        )
        runs[early_exit] = (result, fun.calls)
    (default, default_calls), (masked, masked_calls) = runs[None], runs[False]

    assert_results_bitwise(default, masked, "early_exit=None vs False")
    assert bool(default.converged.all())
    assert int(default.n_iter.max()) < max_iter
    # Without early exit: init, then every iteration runs its masked line search to the end.
    assert masked_calls == 1 + max_iter * (max_ls + 1)
    # With it: each batched call evaluates every problem once, so the busiest one bounds it below.
    assert int(default.n_evals.max()) <= default_calls < masked_calls

    # Unbatched on the CPU, the default calls fun exactly for the counted evaluations.
    fun = CountingFun(batch.problem(3))
    alone = torchlbfgs.minimize(fun, batch.start(3), **options)
    assert fun.calls == int(alone.n_evals)
    assert_result_matches(alone, lane(default, 3), ALONE_TOLERANCE[torch.float64], "alone vs batch")


# --------------------------------------------------------------------------------------------
# 7. pytree params


def linear_least_squares(params: dict[str, Tensor], inputs: Tensor, targets: Tensor) -> Tensor:
    predictions = inputs @ params["w"] + params["b"]
    return 0.5 * ((predictions - targets) ** 2).mean()


@pytest.mark.parametrize("shared_bias_start", [False, True])
def test_pytree_params_under_batched_minimize(shared_bias_start: bool) -> None:
    """Params ``{"w": (3, 2), "b": (2,)}``; targets exactly linear, so ``(w_true, b_true)`` is
    the minimiser (``f* = 0``)."""
    generator = torch.Generator().manual_seed(7)
    size, samples, features, outputs = 3, 20, 3, 2
    inputs = torch.randn(size, samples, features, generator=generator, dtype=torch.float64)
    w_true = torch.randn(size, features, outputs, generator=generator, dtype=torch.float64)
    b_true = torch.randn(size, outputs, generator=generator, dtype=torch.float64)
    targets = inputs @ w_true + b_true.unsqueeze(1)
    params0 = {"w": torch.zeros(size, features, outputs, dtype=torch.float64)}
    if shared_bias_start:
        params0["b"] = torch.full((outputs,), 0.5, dtype=torch.float64)
        in_dims: Any = ({"w": 0, "b": None}, 0, 0)
    else:
        params0["b"] = torch.zeros(size, outputs, dtype=torch.float64)
        in_dims = 0
    options = {"tolerance_grad": 1e-10, "tolerance_change": 0.0}

    result = torchlbfgs.batched_minimize(
        linear_least_squares, params0, inputs, targets, in_dims=in_dims, **options
    )
    assert set(result.params) == {"w", "b"}
    assert result.params["w"].shape == (size, features, outputs)
    assert result.params["b"].shape == (size, outputs)
    assert result.status.tolist() == [StopReason.GRADIENT_TOLERANCE] * size

    n_params = features * outputs + outputs
    for i in range(size):
        start = {"w": params0["w"][i], "b": params0["b"] if shared_bias_start else params0["b"][i]}
        alone = torchlbfgs.minimize(
            lambda p, i=i: linear_least_squares(p, inputs[i], targets[i]), start, **options
        )
        assert_result_matches(lane(result, i), alone, ALONE_TOLERANCE[torch.float64], f"problem {i}")
        # Each output column is an independent least-squares problem with Hessian
        # [X 1]'[X 1] / (samples * outputs): |theta - theta*| <= sqrt(n) max|g| / lambda_min.
        design = torch.cat([inputs[i], torch.ones(samples, 1, dtype=torch.float64)], dim=1)
        lambda_min = float(torch.linalg.eigvalsh(design.T @ design)[0]) / (samples * outputs)
        bound = math.sqrt(n_params) * float(result.grad_norm[i]) / lambda_min + 1e-12
        error = torch.cat([(result.params["w"][i] - w_true[i]).flatten(), result.params["b"][i] - b_true[i]])
        assert float(error.norm()) <= bound, (i, float(error.norm()), bound)


# --------------------------------------------------------------------------------------------
# 8. minimize is init + update in a loop


def _by_hand(fun: Callable[[PyTree], Tensor], params: PyTree, iterations: int, **options: Any) -> Result:
    state = torchlbfgs.init(fun, params)
    for _ in range(iterations):
        params, state = torchlbfgs.update(fun, params, state, **options)
    status = StopReason.MAX_ITERATIONS if state.status == StopReason.RUNNING else int(state.status)
    return Result(
        params=params,
        value=state.value,
        grad_norm=state.grad.abs().amax(),
        n_iter=state.iteration,
        n_evals=state.n_evals,
        converged=state.converged,
        status=torch.tensor(status),
        n_active_bounds=torch.tensor(0),
    )


BY_HAND_LOGISTIC = logistic_regression(40, 5, 0.1, seed=3)


def _pytree_logistic(params: dict[str, Tensor]) -> Tensor:
    w = torch.cat([params["head"], params["tail"].flatten()])
    return BY_HAND_LOGISTIC.fun(w)


@pytest.mark.parametrize("line_search", ["strong_wolfe", "more_thuente", "backtracking", None], ids=str)
@pytest.mark.parametrize(
    ("case", "max_iter"),
    [("rosenbrock", 12), ("logistic", 40), ("pytree", 40)],
)
def test_minimize_is_init_and_update_by_hand(case: str, max_iter: int, line_search: str | None) -> None:
    if case == "rosenbrock":
        fun: Callable[[Any], Tensor] = rosenbrock
        params0: PyTree = torch.tensor([-1.2, 1.0], dtype=torch.float64)
        # A fixed unit step diverges on Rosenbrock; a small one does not.
        learning_rate = 1e-3 if line_search is None else 1.0
    elif case == "logistic":
        fun, params0, learning_rate = BY_HAND_LOGISTIC.fun, BY_HAND_LOGISTIC.x0, 1.0
    else:
        fun, learning_rate = _pytree_logistic, 1.0
        params0 = {
            "head": torch.zeros(1, dtype=torch.float64),
            "tail": torch.zeros(2, 2, dtype=torch.float64),
        }
    options = {"line_search": line_search, "learning_rate": learning_rate}
    result = torchlbfgs.minimize(fun, params0, max_iter=max_iter, **options)
    expected = _by_hand(fun, params0, max_iter, **options)
    assert_results_bitwise(result, expected, f"{case}/{line_search}")
    if case != "rosenbrock":
        assert bool(result.converged), torchlbfgs.status_message(result.status)
    else:
        assert result.status == StopReason.MAX_ITERATIONS
        assert result.n_iter == max_iter


@pytest.mark.parametrize("line_search", ["strong_wolfe", "more_thuente", "backtracking", None], ids=str)
@pytest.mark.parametrize("max_evals", [1, 2, 9, 31, None], ids=lambda m: f"max_evals={m}")
@pytest.mark.parametrize("max_ls", [0, 2, 25], ids=lambda m: f"max_ls={m}")
def test_rounds_follow_update_with_budgets_and_wrapped_history(
    line_search: str | None, max_evals: int | None, max_ls: int
) -> None:
    """The evaluation rounds take the decisions of a loop of ``update`` in every corner: an
    evaluation budget that binds inside a line search or before it, a line-search limit of
    zero, a history that wraps, torch's curvature rule."""
    options: dict[str, Any] = {
        "line_search": line_search, "max_evals": max_evals, "max_ls": max_ls,
        "learning_rate": 1e-3 if line_search is None else 1.0, "curvature_rule": "absolute",
    }  # fmt: skip
    start = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    max_iter = 25
    result = torchlbfgs.minimize(rosenbrock, start, max_iter=max_iter, history_size=3, **options)
    state = torchlbfgs.init(rosenbrock, start, history_size=3)
    params = start
    for _ in range(max_iter):
        params, state = torchlbfgs.update(rosenbrock, params, state, **options)
    expected = Result(
        params=params,
        value=state.value,
        grad_norm=state.grad.abs().amax(),
        n_iter=state.iteration,
        n_evals=state.n_evals,
        converged=state.converged,
        status=torch.tensor(
            StopReason.MAX_ITERATIONS if state.status == StopReason.RUNNING else int(state.status)
        ),
        n_active_bounds=torch.tensor(0),
    )
    assert_results_bitwise(result, expected, str(options))
    if max_evals is not None:
        assert result.n_evals <= max_evals
        if max_evals < 31 and max_ls == 25:  # not enough for 25 iterations on Rosenbrock
            assert result.status == StopReason.MAX_EVALS


# --------------------------------------------------------------------------------------------
# 9. batched_minimize: stopped problems leave the batch


def _sizes_seen(fun: Callable[..., Tensor], sizes: list[int]) -> Callable[..., Tensor]:
    """``fun``, recording the batch size of every (vmapped) call."""

    def recording(x: Tensor, *data: Any) -> Tensor:
        sizes.append(batch_view(x).shape[0])  # the batch beneath the vmap and grad wrappers
        return fun(x, *data)

    return recording


def _many_quadratics(copies: int = 6) -> Batch:
    """The quadratic family, each problem from ``copies`` random starts of different scales (so
    the problems stop at many different rounds)."""
    batch, _ = make_batch("quadratic", torch.float64)
    generator = torch.Generator().manual_seed(11)
    size = batch.size * copies
    scales = torch.logspace(-2, 2, size, dtype=torch.float64).unsqueeze(1)
    x0 = torch.randn(size, batch.x0.shape[1], generator=generator, dtype=torch.float64) * scales
    args = tuple(arg.repeat(copies, *([1] * (arg.dim() - 1))) for arg in batch.args)
    assert batch.solutions is not None
    return replace(batch, x0=x0, args=args, size=size, solutions=batch.solutions.repeat(copies, 1))


def test_stopped_problems_leave_the_batch() -> None:
    """Once at most half of the batch runs, the rounds go on with the running problems alone:
    ``fun`` sees ever smaller batches, far fewer problem-evaluations are spent than by
    ``vmap(minimize)``, which keeps the whole batch to the end, and the results are bitwise
    the same."""
    batch = _many_quadratics()
    options = options_for("quadratic", torch.float64)
    sizes: list[int] = []
    result = torchlbfgs.batched_minimize(_sizes_seen(batch.fun, sizes), batch.x0, *batch.args, **options)
    kept: list[int] = []
    whole = replace(batch, fun=_sizes_seen(batch.fun, kept)).vmapped(**options)
    assert_results_bitwise(result, whole, "compacted vs vmap(minimize)")

    assert sizes[0] == batch.size
    assert sizes == sorted(sizes, reverse=True)
    assert 2 <= sizes[-1] <= batch.size // 2  # it never shrinks below two problems
    assert set(kept) == {batch.size}
    assert len(sizes) == len(kept)  # the same rounds
    # Halving at most: no more than twice the evaluations the problems count themselves.
    assert sum(sizes) <= 2 * int(result.n_evals.sum())
    assert sum(sizes) < 0.7 * sum(kept)


def test_shrinking_batch_with_data_along_other_dims_and_shared_data() -> None:
    """Per-problem data batched along dimension 1, a pytree argument and shared data (``None``
    in ``in_dims``) are gathered correctly when the batch shrinks."""
    batch = _many_quadratics()
    lower_t, c = batch.args
    scale = torch.tensor(2.0, dtype=torch.float64)

    def fun(x: Tensor, lower_t: Tensor, data: dict[str, Tensor], scale: Tensor) -> Tensor:
        return batch.fun(x, lower_t, data["c"]) * scale

    options = options_for("quadratic", torch.float64)
    sizes: list[int] = []
    result = torchlbfgs.batched_minimize(
        _sizes_seen(fun, sizes), batch.x0, lower_t.movedim(0, 1), {"c": c}, scale,
        in_dims=(0, 1, 0, None), **options,
    )  # fmt: skip
    assert sizes[-1] < batch.size // 2
    # Gathering the wrong rows of any argument would solve another problem: every problem
    # reaches its own closed-form minimiser (stopping near tolerance_grad; the starts are random,
    # so the stop may fall an iteration apart from a solve alone, hence no count comparison).
    assert batch.solutions is not None
    assert result.status.tolist() == [StopReason.GRADIENT_TOLERANCE] * batch.size
    torch.testing.assert_close(result.params, batch.solutions, rtol=0, atol=1e-5)
    for i in range(0, batch.size, 5):
        alone = torchlbfgs.minimize(
            lambda x, i=i: batch.fun(x, lower_t[i], c[i]) * scale, batch.x0[i], **options
        )
        torch.testing.assert_close(result.params[i], alone.params, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bounded", [False, True])
def test_each_round_evaluates_the_point_the_round_before_planned(bounded: bool) -> None:
    """A round's state carries the point the next round evaluates (so that a compiled round reads
    it from memory): the search's trial ``x + t d`` for a running problem, projected onto the
    box, ``x`` for a stopped one; the next round evaluates exactly that point."""
    x0 = torch.tensor([-1.2, 1.0, 0.5, -0.3], dtype=torch.float64)
    box = Bounds(torch.full_like(x0, -1.0), torch.full_like(x0, 0.9)) if bounded else None
    settings = Settings(max_iter=40, tolerance_grad=1e-9)
    evaluate = flat_objective(rosenbrock, ravel_pytree(x0)[1])
    seen: list[torch.Tensor] = []

    def recording(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(x.clone())
        return evaluate(x)

    state = start(recording, x0, settings, box)
    steps, stopped_rounds = set(), 0
    for _ in range(200):
        t, running = settings.search.trial(state.search)
        direction = state.proposal.direction
        planned = torch.where(running, state.x + t * direction, state.x)
        if box is not None:
            planned = torch.minimum(torch.maximum(planned, box.lower), box.upper)
        torch.testing.assert_close(state.trial, planned, rtol=1e-15, atol=1e-15)
        if bool(running):
            steps.add(float(t))
        else:
            stopped_rounds += 1
        before = state.trial
        state = advance(recording, state, settings)
        assert torch.equal(seen[-1], before)
        if stopped_rounds == 2:
            break
    assert stopped_rounds == 2, "the problem should stop within the rounds"
    assert len(steps - {1.0}) >= 2  # trials other than the unit step: the first one's, and the search's
