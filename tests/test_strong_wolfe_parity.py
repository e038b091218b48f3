"""The strong-Wolfe search makes torch.optim.LBFGS's decisions: same step, same evaluations.

The reference is ``torch.optim.lbfgs._strong_wolfe`` itself, driven on the same function,
start, direction and first step, in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy
import pytest
import torch
from problems import beale, powell_singular, rosenbrock, spd_quadratic, wood
from torch.optim.lbfgs import _strong_wolfe

import torchlbfgs

Tensor = torch.Tensor


def torch_reference(
    fun: Callable[[Tensor], Tensor], x: Tensor, d: Tensor, t0: float, max_ls: int
) -> tuple[float, Tensor, float, int]:
    def directional_evaluate(x0: Tensor, t: float, direction: Tensor) -> tuple[float, Tensor]:
        point = x0.clone().add_(direction, alpha=float(t))  # as LBFGS._directional_evaluate
        return float(fun(point)), torch.func.grad(fun)(point)

    f = float(fun(x))
    g = torch.func.grad(fun)(x)
    f_new, g_new, t, n_evals = _strong_wolfe(directional_evaluate, x, t0, d, f, g, g.dot(d), max_ls=max_ls)
    return float(f_new), g_new, float(t), int(n_evals)


def one_d(fun: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return lambda x: fun(x[0])


ONE_D = {
    # phi(t) along d = +1 from x = 0; each has phi'(0) < 0.
    "quartic": one_d(lambda t: (t - 2.0) ** 4 - 3.0 * t),
    "wiggly": one_d(lambda t: -t / (t**2 + 2.0) + 0.05 * torch.sin(8.0 * t)),
    "log_barrier": one_d(lambda t: -torch.log1p(t) + 0.01 * t**3),
    "steep_exp": one_d(lambda t: torch.exp(3.0 * t) - 20.0 * t),
    "flat_then_wall": one_d(lambda t: -t + 1e-3 * torch.exp(4.0 * t)),
}

STEPS = [1e-3, 0.05, 0.3, 1.0, 4.0, 40.0]


def compare(fun: Callable[[Tensor], Tensor], x: Tensor, d: Tensor, t0: float, max_ls: int = 25) -> int:
    f_ref, g_ref, t_ref, evals_ref = torch_reference(fun, x, d, t0, max_ls)
    g = torch.func.grad(fun)(x)
    result = torchlbfgs.line_search(fun, x, d, fun(x), g, step_size=t0, max_ls=max_ls)
    assert int(result.n_evals) == evals_ref
    assert float(result.step_size) == pytest.approx(t_ref, rel=1e-12, abs=1e-300)
    assert float(result.value) == pytest.approx(f_ref, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(result.grad, g_ref, rtol=1e-10, atol=1e-12)
    return evals_ref


@pytest.mark.parametrize("name", sorted(ONE_D))
@pytest.mark.parametrize("t0", STEPS)
def test_one_dimensional_cases_match_torch(name: str, t0: float) -> None:
    x = torch.zeros(1, dtype=torch.float64)
    compare(ONE_D[name], x, torch.ones(1, dtype=torch.float64), t0)


def _random_descent_directions(fun: Callable[[Tensor], Tensor], n: int, seed: int, count: int):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        x = torch.randn(n, generator=generator, dtype=torch.float64)
        g = torch.func.grad(fun)(x)
        d = -g + 0.7 * g.norm() * torch.randn(n, generator=generator, dtype=torch.float64) / math.sqrt(n)
        if torch.dot(g, d) < 0:
            yield x, d


N_D = {
    "rosenbrock10": (rosenbrock, 10),
    "beale": (beale, 2),
    "wood": (wood, 4),
    "powell_singular": (powell_singular, 8),
    "quadratic_cond1e4": (spd_quadratic(20, 1e4, seed=3).fun, 20),
}


@pytest.mark.parametrize(("seed", "name"), list(enumerate(sorted(N_D))))
def test_n_dimensional_cases_match_torch(seed: int, name: str) -> None:
    fun, n = N_D[name]
    evaluation_counts = set()
    for x, d in _random_descent_directions(fun, n, seed=seed, count=4):
        for t0 in STEPS:
            evaluation_counts.add(compare(fun, x, d, t0))
    # Every problem takes the search past its first trial point.
    assert max(evaluation_counts) >= 2


@pytest.mark.parametrize("max_ls", [0, 1, 2, 3])
def test_iteration_limit_matches_torch(max_ls: int) -> None:
    fun, n = N_D["rosenbrock10"]
    for x, d in _random_descent_directions(fun, n, seed=11, count=3):
        for t0 in (1e-4, 1.0, 40.0):
            compare(fun, x, d, t0, max_ls=max_ls)


def test_evaluation_budget_is_honoured() -> None:
    """torch's search can use max_ls + 1 = 26 evaluations whatever the optimizer's budget."""
    fun = ONE_D["wiggly"]
    x, d = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    _, _, _, unlimited = torch_reference(fun, x, d, 40.0, 25)
    assert unlimited > 3
    g = torch.func.grad(fun)(x)
    for budget in range(1, unlimited):
        result = torchlbfgs.line_search(fun, x, d, fun(x), g, step_size=40.0, max_evals=budget)
        assert int(result.n_evals) == budget
        assert float(result.value) <= float(fun(x))
        assert float(fun(x + result.step_size * d)) == pytest.approx(float(result.value), rel=1e-12)


def host_search(fun: Callable[[Tensor], Tensor], x: Tensor, d: Tensor, t0: float, max_ls: int = 25):
    """The same search with its decisions on host numbers, as the drop-in runs it: values as
    Python floats, what torch holds as tensors (directional derivatives) as numpy scalars."""
    from torchlbfgs.line_searches.method import NO_BUDGET
    from torchlbfgs.line_searches.strong_wolfe import StrongWolfe

    def evaluate(t: float) -> tuple[float, Tensor, float]:
        point = x.clone().add_(d, alpha=float(t))
        grad = torch.func.grad(fun)(point)
        return float(fun(point)), grad, numpy.float64(grad.dot(d).item())

    g = torch.func.grad(fun)(x)
    search = StrongWolfe(max_ls=max_ls)
    return search.search_on_host(
        evaluate,
        float(fun(x)),
        g,
        numpy.float64(g.dot(d).item()),
        numpy.float64(d.abs().max().item()),
        t0,
        NO_BUDGET,
    )


@pytest.mark.parametrize("name", sorted(ONE_D))
@pytest.mark.parametrize("t0", STEPS)
def test_host_decided_search_is_torchs_search_bit_for_bit(name: str, t0: float) -> None:
    """One decision logic, two kinds of scalars: on host numbers the search evaluates torch's
    points and returns torch's step, value and gradient exactly (float64)."""
    fun, x, d = ONE_D[name], torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    f_ref, g_ref, t_ref, evals_ref = torch_reference(fun, x, d, t0, 25)
    found = host_search(fun, x, d, t0)
    assert found.n_evals == evals_ref
    assert float(found.step_size) == t_ref
    assert float(found.value) == f_ref
    assert torch.equal(found.grad, g_ref)
