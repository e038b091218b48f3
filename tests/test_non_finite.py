"""Non-finite values: functions that are NaN or Inf outside a domain, and start points where
they are. A barrier f(x) = sum((x - 3)^2 - log(1.5 - x)) is finite only for x < 1.5; its
minimiser solves 2(x - 3) + 1/(1.5 - x) = 0, i.e. 2x^2 - 9x + 8 = 0: x* = (9 - sqrt(17)) / 4.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import torchlbfgs
from torchlbfgs import StopReason

X_STAR = (9 - math.sqrt(17)) / 4


def barrier(x: torch.Tensor) -> torch.Tensor:
    return ((x - 3.0) ** 2 - torch.log(1.5 - x)).sum()


def adapter(
    line_search_fn: str | None, lr: float = 1.0
) -> tuple[torch.nn.Parameter, torchlbfgs.LBFGS, object]:
    x = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    optimizer = torchlbfgs.LBFGS([x], lr=lr, max_iter=20, line_search_fn=line_search_fn,
                                 tolerance_grad=1e-10, tolerance_change=0.0)  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = barrier(x)
        loss.backward()
        return loss

    return x, optimizer, closure


def all_finite(state_dict: dict) -> bool:  # type: ignore[type-arg]
    leaves = state_dict["state"][0]
    return all(
        bool(torch.isfinite(v).all())
        for v in leaves.values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    )


@pytest.mark.parametrize("line_search", ["strong_wolfe", "more_thuente", "backtracking"])
def test_line_searches_recover_from_non_finite_trial_points(line_search: str) -> None:
    """The first trial steps leave the domain (f = NaN): every search shrinks back into it, and
    the run reaches x* with nothing non-finite in its state."""
    result = torchlbfgs.minimize(barrier, torch.zeros(3, dtype=torch.float64), line_search=line_search,
                                 tolerance_grad=1e-9, tolerance_change=0.0, learning_rate=10.0)  # fmt: skip
    assert bool(result.converged), torchlbfgs.status_message(result.status)
    torch.testing.assert_close(
        result.params, torch.full((3,), X_STAR, dtype=torch.float64), rtol=1e-8, atol=1e-8
    )


def test_fixed_step_into_nan_is_not_taken_by_update() -> None:
    x = torch.zeros(3, dtype=torch.float64)
    state = torchlbfgs.init(barrier, x)
    new_x, new_state = torchlbfgs.update(barrier, x, state, line_search=None, learning_rate=10.0)
    # g = -16/3 per coordinate, so the first step 10/|g|_1 * 16/3 lands at x = 10/3 > 1.5: NaN
    assert torch.equal(new_x, x)
    assert int(new_state.status) == StopReason.NON_FINITE
    assert all(bool(torch.isfinite(leaf).all()) for leaf in new_state if leaf.is_floating_point())


def test_adapter_strong_wolfe_recovers_where_torch_can_fail() -> None:
    x, optimizer, closure = adapter("strong_wolfe")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the search recovers
        for _ in range(5):
            optimizer.step(closure)
    torch.testing.assert_close(
        x.detach(), torch.full((3,), X_STAR, dtype=torch.float64), rtol=1e-8, atol=1e-8
    )
    assert all_finite(optimizer.state_dict())


def test_adapter_fixed_step_stays_at_the_last_finite_point_and_warns() -> None:
    """lr=1 with no line search overshoots out of the domain: torch.optim.LBFGS moves there
    (its loss becomes NaN); ours puts the params back, records NON_FINITE and warns."""
    x, optimizer, closure = adapter(None)
    for _ in range(3):
        with pytest.warns(RuntimeWarning, match="non-finite"):
            optimizer.step(closure)
        assert math.isfinite(float(barrier(x.detach())))
        state_dict = optimizer.state_dict()
        assert int(state_dict["state"][0]["status"]) == StopReason.NON_FINITE
        assert all_finite(state_dict)

    theirs = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    torch_optimizer = torch.optim.LBFGS([theirs], lr=1.0, max_iter=20)

    def torch_closure() -> torch.Tensor:
        torch_optimizer.zero_grad()
        loss = barrier(theirs)
        loss.backward()
        return loss

    for _ in range(3):
        torch_optimizer.step(torch_closure)
    assert not math.isfinite(float(barrier(theirs.detach())))


def test_adapter_refuses_a_non_finite_start_and_changes_nothing() -> None:
    x = torch.nn.Parameter(torch.tensor([0.0, 2.0], dtype=torch.float64))  # 2.0 is outside the domain
    optimizer = torchlbfgs.LBFGS([x], line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = barrier(x)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="non-finite loss or gradient"):
        optimizer.step(closure)
    assert torch.equal(x.detach(), torch.tensor([0.0, 2.0], dtype=torch.float64))
    assert optimizer.state_dict()["state"] == {}


# ---------------------------------------------------------------------------------------------
# Zero gradients, constant functions, flat regions, directions that do not descend


DEGENERATE = {
    "constant": lambda x: torch.zeros((), dtype=x.dtype) + 5.0 + 0.0 * x.sum(),
    "flat region": lambda x: torch.relu(x).sum(),  # zero value and gradient for x < 0
    "zero gradient at the start": lambda x: ((x + 1.0) ** 2).sum(),  # minimum at the start
}


@pytest.mark.parametrize("line_search", ["strong_wolfe", "more_thuente", "backtracking", None])
@pytest.mark.parametrize("name", sorted(DEGENERATE))
def test_zero_gradient_stops_cleanly(name: str, line_search: str | None) -> None:
    fun = DEGENERATE[name]
    x0 = -torch.ones(3, dtype=torch.float64)
    state = torchlbfgs.init(fun, x0)
    x, state = torchlbfgs.update(fun, x0, state, line_search=line_search, tolerance_grad=0.0)
    assert int(state.status) == StopReason.GRADIENT_TOLERANCE
    assert torch.equal(x, x0)
    assert all(bool(torch.isfinite(leaf).all()) for leaf in state if leaf.is_floating_point())

    param = torch.nn.Parameter(x0.clone())
    optimizer = torchlbfgs.LBFGS(
        [param], line_search_fn="strong_wolfe" if line_search else None, tolerance_grad=0.0
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = fun(param)
        loss.backward()
        return loss

    optimizer.step(closure)  # returns at once, as torch's does, without dividing by |g| = 0
    assert torch.equal(param.detach(), x0)


def test_ascent_direction_from_a_corrupted_history_stops_with_a_defined_reason() -> None:
    """A memory whose pair has negative curvature (as round-off could leave it) makes H
    indefinite: if the direction does not descend, update stops before searching."""
    fun = lambda x: (x**2).sum()  # noqa: E731
    x = torch.tensor([1.0, 0.0], dtype=torch.float64)
    state = torchlbfgs.init(fun, x, history_size=2)
    s = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y = torch.tensor([-100.0, -0.01], dtype=torch.float64)  # y's < 0: never accepted by the rules
    corrupted = state._replace(
        s_history=state.s_history.index_copy(0, torch.tensor([0]), s[None]),
        y_history=state.y_history.index_copy(0, torch.tensor([0]), y[None]),
        rho=state.rho.index_copy(0, torch.tensor([0]), (1.0 / (y @ s)).reshape(1)),
        gamma=(y @ s) / (y @ y),
        head=torch.tensor(1),
        n_pairs=torch.tensor(1),
    )
    direction = -torchlbfgs.inv_hessian_product(corrupted, corrupted.grad)
    assert float(corrupted.grad @ direction) > 0  # the premise: an ascent direction
    new_x, new_state = torchlbfgs.update(fun, x, corrupted)
    assert int(new_state.status) == StopReason.DIRECTIONAL_DERIVATIVE_TOLERANCE
    assert torch.equal(new_x, x)
    assert int(new_state.n_evals) == int(corrupted.n_evals)  # stopped before any evaluation


# ---------------------------------------------------------------------------------------------
# float32 on an ill-conditioned problem where torch's float32 L-BFGS produces NaN


def exponential_valley(x: torch.Tensor) -> torch.Tensor:
    """sum(exp(a x) - a x), a from 0.1 to 316: curvatures from 1e-2 to 1e5 at the minimum x = 0,
    and exp(a x) overflows float32 for a x > 88."""
    a = torch.logspace(-1, 2.5, x.numel(), dtype=x.dtype)
    return (torch.exp(a * x) - a * x).sum()


def run_float32(optimizer_class: type[torch.optim.Optimizer], line_search_fn: str | None):  # type: ignore[no-untyped-def]
    x = torch.nn.Parameter(torch.full((20,), -3.0))
    optimizer = optimizer_class([x], lr=1.0, max_iter=20, history_size=10, line_search_fn=line_search_fn)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = exponential_valley(x)
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(10):
            optimizer.step(closure)
    return x.detach(), optimizer


@pytest.mark.parametrize("line_search_fn", ["strong_wolfe", None], ids=str)
def test_float32_ill_conditioned_stays_finite_where_torch_goes_nan(line_search_fn: str | None) -> None:
    start = float(exponential_valley(torch.full((20,), -3.0)))
    theirs, _ = run_float32(torch.optim.LBFGS, line_search_fn)
    if bool(torch.isfinite(theirs).all()) and math.isfinite(float(exponential_valley(theirs))):
        pytest.skip("this torch version no longer produces NaN here")  # the premise, seen with torch 2.13
    ours, optimizer = run_float32(torchlbfgs.LBFGS, line_search_fn)
    assert bool(torch.isfinite(ours).all())
    assert float(exponential_valley(ours)) < start
    assert all_finite(optimizer.state_dict())
