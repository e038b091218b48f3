"""Box constraints (L-BFGS-B) in the functional API: against scipy's L-BFGS-B and closed forms,
feasibility of everything evaluated, the Cauchy point and subspace step against dense algebra,
and vmap/compile."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchlbfgs
from torchlbfgs.bounded_direction import _solve_saddle, cauchy_point, compact_hessian, subspace_step
from torchlbfgs.bounds import Bounds, max_step, projected_gradient
from torchlbfgs.line_searches.loop import trial_point

DT = torch.float64
LINE_SEARCHES = ["strong_wolfe", "more_thuente", "backtracking"]
TIGHT = {"tolerance_grad": 1e-10, "tolerance_change": 0.0, "max_iter": 3000}


def scipy_lbfgsb(fun, x0, lower, upper):
    """scipy's L-BFGS-B on a torch function, run to its limits of precision."""

    def value_and_grad(v):
        x = torch.tensor(v, dtype=DT)
        value, grad = torch.func.grad_and_value(fun)(x)[::-1]
        return float(value), grad.numpy()

    bounds = scipy.optimize.Bounds(lower.numpy(), upper.numpy())
    found = scipy.optimize.minimize(
        value_and_grad, x0.numpy(), jac=True, method="L-BFGS-B", bounds=bounds,
        options={"ftol": 0.0, "gtol": 1e-11, "maxiter": 10_000, "maxfun": 100_000},
    )  # fmt: skip
    return torch.tensor(found.x, dtype=DT)


def assert_same_solution(ours, reference, lower, upper):
    scale = torch.clamp(reference.abs(), min=1.0)
    assert ((ours - reference).abs() / scale).max() <= 1e-6
    active = (ours == lower) | (ours == upper)
    reference_active = (reference == lower) | (reference == upper)
    assert torch.equal(active, reference_active)
    assert active.any(), "the problem should have active bounds"


def rosenbrock(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def _rosenbrock_case(n):
    upper = torch.where(torch.arange(n) % 2 == 0, 0.5, 2.0).to(DT)  # cuts off the minimum at 1
    return rosenbrock, torch.full((n,), -1.2, dtype=DT), torch.full((n,), -2.0, dtype=DT), upper


def _nnls_data(seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(30, 8, generator=generator, dtype=DT), torch.randn(30, generator=generator, dtype=DT)


def _logistic_case():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(200, 6, generator=generator, dtype=DT)
    truth = torch.tensor([3.0, -2.0, 0.2, 1.5, -0.1, 0.0], dtype=DT)
    labels = (torch.rand(200, generator=generator, dtype=DT) < torch.sigmoid(features @ truth)).to(DT)

    def loss(w):
        return torch.nn.functional.binary_cross_entropy_with_logits(features @ w, labels) + 1e-3 * (w @ w)

    return loss, torch.zeros(6, dtype=DT), torch.full((6,), -0.5, dtype=DT), torch.full((6,), 0.5, dtype=DT)


def _one_sided_case():
    target = torch.tensor([-1.0, 2.0, -3.0, 0.5, -0.2], dtype=DT)

    def loss(x):
        return ((x - target) ** 2 * torch.arange(1, 6, dtype=DT)).sum() + 0.1 * x.sum() ** 2 + (x**4).sum()

    lower = torch.tensor([0.0, -torch.inf, -1.0, -torch.inf, 0.1], dtype=DT)  # lower bounds only
    return loss, torch.ones(5, dtype=DT), lower, torch.full((5,), torch.inf, dtype=DT)


SCIPY_CASES = {
    "rosenbrock-2": lambda: _rosenbrock_case(2),
    "rosenbrock-25": lambda: _rosenbrock_case(25),
    "logistic-box": _logistic_case,
    "one-sided": _one_sided_case,
}


@pytest.mark.parametrize("line_search", LINE_SEARCHES)
@pytest.mark.parametrize("case", sorted(SCIPY_CASES))
def test_minimizers_agree_with_scipy_lbfgsb(case, line_search):
    fun, x0, lower, upper = SCIPY_CASES[case]()
    reference = scipy_lbfgsb(fun, x0, lower, upper)
    result = torchlbfgs.minimize(fun, x0, bounds=(lower, upper), line_search=line_search, **TIGHT)
    assert bool(result.converged), torchlbfgs.status_message(result.status)
    assert_same_solution(result.params, reference, lower, upper)
    assert int(result.n_active_bounds) == int(((reference == lower) | (reference == upper)).sum())
    assert float(result.grad_norm) <= 1e-6  # 1e-10, unless f's precision stopped it first


def _quadratic_with_known_solution(seed, n=12):
    """f = x'Ax/2 - b'x with b chosen so that a given x* meets the KKT conditions: zero
    gradient on the free variables, g >= 0 where x* is at its lower bound, g <= 0 at its upper."""
    generator = torch.Generator().manual_seed(seed)
    root = torch.randn(n, n, generator=generator, dtype=DT)
    hessian = root @ root.T + n * torch.eye(n, dtype=DT) * 0.2
    lower, upper = -torch.ones(n, dtype=DT), torch.ones(n, dtype=DT)
    solution = torch.rand(n, generator=generator, dtype=DT) * 1.6 - 0.8
    solution[:3], solution[3:5] = -1.0, 1.0  # five active, the rest strictly inside
    multipliers = torch.rand(n, generator=generator, dtype=DT) + 0.1
    grad_at_solution = torch.zeros(n, dtype=DT)
    grad_at_solution[:3], grad_at_solution[3:5] = multipliers[:3], -multipliers[3:5]
    linear = hessian @ solution - grad_at_solution

    def fun(x):
        return 0.5 * x @ hessian @ x - linear @ x

    return fun, solution, lower, upper


@pytest.mark.parametrize("line_search", LINE_SEARCHES)
@pytest.mark.parametrize("seed", [0, 1])
def test_bounded_quadratic_reaches_its_known_solution(seed, line_search):
    fun, solution, lower, upper = _quadratic_with_known_solution(seed)
    result = torchlbfgs.minimize(
        fun, torch.zeros_like(solution), bounds=(lower, upper), line_search=line_search, **TIGHT
    )
    assert bool(result.converged)
    assert_same_solution(result.params, solution, lower, upper)
    assert int(result.n_active_bounds) == 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_non_negative_least_squares_matches_scipy_nnls(seed):
    matrix, target = _nnls_data(seed)
    reference, _ = scipy.optimize.nnls(matrix.numpy(), target.numpy())
    reference = torch.tensor(reference, dtype=DT)
    result = torchlbfgs.minimize(
        lambda x: 0.5 * ((matrix @ x - target) ** 2).sum(),
        torch.ones(8, dtype=DT),
        bounds=(0.0, None),
        **TIGHT,
    )
    zero, inf = torch.zeros(8, dtype=DT), torch.full((8,), torch.inf, dtype=DT)
    assert_same_solution(result.params, reference, zero, inf)


def test_bounds_accept_floats_none_and_pytrees_per_leaf():
    params = {"rate": torch.full((3,), 5.0, dtype=DT), "offset": torch.zeros(2, dtype=DT)}

    def fun(p):
        return ((p["rate"] + 1.0) ** 2).sum() + ((p["offset"] - 3.0) ** 2).sum()

    result = torchlbfgs.minimize(
        fun, params, bounds=({"rate": 0.0, "offset": None}, {"rate": None, "offset": 2.0})
    )
    assert torch.equal(result.params["rate"], torch.zeros(3, dtype=DT))
    assert torch.equal(result.params["offset"], torch.full((2,), 2.0, dtype=DT))
    assert int(result.n_active_bounds) == 5


def test_a_start_outside_the_bounds_is_projected_onto_them():
    seen = []

    def fun(x):
        seen.append(x.detach().clone())
        return ((x - 0.25) ** 2).sum(), 2 * (x - 0.25)

    state = torchlbfgs.init(fun, torch.tensor([-3.0, 7.0], dtype=DT), value_and_grad=True, bounds=(0.0, 1.0))
    assert torch.equal(seen[0], torch.tensor([0.0, 1.0], dtype=DT))
    assert torch.equal(state.grad, 2 * (seen[0] - 0.25))
    _, state = torchlbfgs.update(
        fun, torch.tensor([-3.0, 7.0], dtype=DT), state, value_and_grad=True, bounds=(0.0, 1.0)
    )
    assert all(((p >= 0) & (p <= 1)).all() for p in seen)


def test_crossed_bounds_raise_naming_the_leaf():
    params = {"a": torch.zeros(2, dtype=DT), "b": torch.zeros(3, dtype=DT)}
    with pytest.raises(ValueError, match=r"params\['b'\], index \(1,\)"):
        torchlbfgs.minimize(lambda p: p["a"].sum() + p["b"].sum(), params,
                            bounds=({"a": 0.0, "b": torch.tensor([0.0, 2.0, 0.0])}, 1.0))  # fmt: skip
    with pytest.raises(ValueError, match="does not broadcast"):
        torchlbfgs.minimize(lambda x: x.sum(), torch.zeros(3, dtype=DT), bounds=(torch.zeros(2), 1.0))
    with pytest.raises(TypeError, match="pair"):
        torchlbfgs.minimize(lambda x: x.sum(), torch.zeros(3, dtype=DT), bounds=0.0)


def test_crossed_bounds_under_vmap_are_a_failed_status():
    lower = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=DT)  # problem 1 has lower > upper
    result = torch.func.vmap(
        lambda low: torchlbfgs.minimize(lambda x: ((x - 0.5) ** 2).sum(), torch.zeros(2, dtype=DT),
                                        bounds=(low, 1.0))
    )(lower)  # fmt: skip
    assert result.status.tolist() == [
        torchlbfgs.StopReason.GRADIENT_TOLERANCE,
        torchlbfgs.StopReason.INVALID_BOUNDS,
    ]
    assert not bool(result.converged[1])


def test_update_with_bounds_leaves_its_inputs_unchanged():
    fun, _, lower, upper = _quadratic_with_known_solution(0)
    x = torch.zeros(12, dtype=DT)
    state = torchlbfgs.init(fun, x, bounds=(lower, upper))
    for _ in range(3):
        x, state = torchlbfgs.update(fun, x, state, bounds=(lower, upper))
    before = [leaf.clone() for leaf in (x, lower, upper, *state)]
    torchlbfgs.update(fun, x, state, bounds=(lower, upper))
    for kept, now in zip(before, (x, lower, upper, *state), strict=True):
        assert torch.equal(kept, now)


# --- Feasibility: a property of every point evaluated and every iterate --------------------------


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 8),
    line_search=st.sampled_from([*LINE_SEARCHES, None]),
)
def test_every_point_evaluated_and_every_iterate_is_feasible(seed, n, line_search):
    generator = torch.Generator().manual_seed(seed)
    root = torch.randn(n, n, generator=generator, dtype=DT)
    hessian = root @ root.T + 0.1 * torch.eye(n, dtype=DT)
    linear = torch.randn(n, generator=generator, dtype=DT) * 5
    lower = torch.randn(n, generator=generator, dtype=DT)
    upper = lower + torch.rand(n, generator=generator, dtype=DT) * 2
    unbounded = torch.rand(n, generator=generator) < 0.25
    lower = torch.where(unbounded & (torch.rand(n, generator=generator) < 0.5), -torch.inf, lower)
    upper = torch.where(unbounded & (torch.rand(n, generator=generator) < 0.5), torch.inf, upper)
    seen = []

    def fun(x):
        seen.append(x.clone())
        return 0.5 * x @ hessian @ x - linear @ x, hessian @ x - linear

    def feasible(x):
        return bool(((x >= lower) & (x <= upper)).all())

    x = torch.randn(n, generator=generator, dtype=DT) * 3  # often outside: projected
    box = (lower, upper)
    state = torchlbfgs.init(fun, x, value_and_grad=True, bounds=box)
    for _ in range(30):
        x, state = torchlbfgs.update(fun, x, state, value_and_grad=True, bounds=box, line_search=line_search)
        assert feasible(x)
    assert all(feasible(point) for point in seen)
    seen.clear()
    result = torchlbfgs.minimize(fun, torch.randn(n, generator=generator, dtype=DT) * 3, value_and_grad=True,
                                 bounds=box, line_search=line_search)  # fmt: skip
    assert feasible(result.params)
    assert all(feasible(point) for point in seen)


# --- The Cauchy point and the subspace step against dense algebra ---------------------------------


def _random_memory(n, m, iterations, seed):
    generator = torch.Generator().manual_seed(seed)
    root = torch.randn(n, n, generator=generator, dtype=DT)
    hessian = root @ root.T + 0.1 * n * torch.eye(n, dtype=DT)

    def fun(x):
        return 0.5 * x @ hessian @ x + 0.1 * (x**4).sum()

    x = torch.randn(n, generator=generator, dtype=DT)
    state = torchlbfgs.init(fun, x, history_size=m)
    for _ in range(iterations):
        x, state = torchlbfgs.update(fun, x, state)
    return state.history, generator


def _dense_cauchy_point(x, grad, lower, upper, hessian):
    """Nocedal-Wright's walk along the projected gradient path, segment by segment, with B dense."""
    breakpoints = []
    for i in range(len(x)):
        if grad[i] < 0:
            breakpoints.append(float((x[i] - upper[i]) / grad[i]))
        elif grad[i] > 0:
            breakpoints.append(float((x[i] - lower[i]) / grad[i]))
        else:
            breakpoints.append(np.inf)
    t_break = torch.tensor(breakpoints, dtype=DT)
    knots = [0.0, *sorted({t for t in breakpoints if np.isfinite(t) and t > 0}), np.inf]
    for start, end in itertools.pairwise(knots):
        d = torch.where(t_break > start, -grad, torch.zeros_like(grad))
        z = torch.clamp(x - start * grad, lower, upper) - x
        slope, curvature = grad @ d + z @ hessian @ d, d @ hessian @ d
        if slope >= 0:
            return start, t_break
        if curvature > 0 and -slope / curvature < end - start:
            return start - float(slope / curvature), t_break
    return knots[-2], t_break


@pytest.mark.parametrize(("n", "m", "iterations"), [(7, 3, 1), (7, 3, 2), (9, 3, 6), (12, 5, 4), (5, 4, 0)])
@pytest.mark.parametrize("seed", range(4))
def test_cauchy_point_and_subspace_step_equal_dense_computations(n, m, iterations, seed):
    history, generator = _random_memory(n, m, iterations, seed)
    dense_inverse = torch.stack(
        [torchlbfgs.inv_hessian_product(history, e) for e in torch.eye(n, dtype=DT)], 1
    )
    hessian = torch.linalg.inv(dense_inverse)  # B = H^-1, materialised
    compact = compact_hessian(history)
    formed = torch.stack([compact.times(e) for e in torch.eye(n, dtype=DT)], 1)
    torch.testing.assert_close(formed, hessian, rtol=1e-9, atol=1e-9)

    lower = torch.full((n,), -0.6, dtype=DT)
    upper = torch.full((n,), 0.7, dtype=DT)
    lower[0], upper[1], upper[2] = -torch.inf, torch.inf, lower[2]  # unbounded sides; a fixed variable
    x = torch.clamp(torch.rand(n, generator=generator, dtype=DT) * 1.6 - 0.8, lower, upper)
    grad = torch.randn(n, generator=generator, dtype=DT) * 2
    grad[2] = 0.0
    bounds = Bounds(lower, upper)

    cauchy = cauchy_point(x, grad, bounds, compact)
    step, t_break = _dense_cauchy_point(x, grad, lower, upper, hessian)
    torch.testing.assert_close(cauchy.step, torch.tensor(step, dtype=DT), rtol=1e-9, atol=1e-12)
    free = (t_break > step) & (lower < upper)
    assert torch.equal(cauchy.free, free)

    free_index = free.nonzero().squeeze(1)
    point = torch.clamp(x - step * grad, lower, upper)
    reduced_grad = (grad + hessian @ (point - x))[free_index]
    expected = torch.zeros(n, dtype=DT)
    expected[free_index] = -torch.linalg.solve(hessian[free_index][:, free_index], reduced_grad)
    torch.testing.assert_close(subspace_step(x, grad, cauchy, compact), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_the_subspace_system_is_solved_by_block_elimination_and_a_failure_is_reported(seed):
    """The 2m x 2m system [[-C, E'], [E, F]] (C and F + E C^-1 E' positive definite, as the
    subspace minimization's) by two m x m Choleskys equals a dense solve, for a batch as for one
    system; where a block is not definite the solve says so (and the direction becomes NaN,
    which bounded_direction replaces by the projected gradient step) instead of raising."""
    generator = torch.Generator().manual_seed(seed)
    m = 5
    a = torch.randn(3, m, m, generator=generator, dtype=DT)
    c = a @ a.mT + 0.1 * torch.eye(m, dtype=DT)
    e = torch.randn(3, m, m, generator=generator, dtype=DT)
    f_half = torch.randn(3, m, 2, generator=generator, dtype=DT)  # positive semidefinite, rank 2
    matrix = torch.cat((torch.cat((-c, e.mT), -1), torch.cat((e, f_half @ f_half.mT), -1)), -2)
    rhs = torch.randn(3, 2 * m, 1, generator=generator, dtype=DT)
    solved, ok = _solve_saddle(matrix, rhs)
    assert bool(ok.all())
    torch.testing.assert_close(solved, torch.linalg.solve(matrix, rhs), rtol=1e-10, atol=1e-12)
    alone, _ = _solve_saddle(matrix[1], rhs[1])
    torch.testing.assert_close(alone, solved[1], rtol=1e-13, atol=1e-15)
    indefinite = matrix.clone()
    indefinite[1, :m, :m] = c[1]  # -C not positive definite
    _, ok = _solve_saddle(indefinite, rhs)
    assert ok.tolist() == [True, False, True]


def test_rounding_never_takes_a_trial_point_out_of_the_box():
    # x + t d at the largest feasible step t rounds above the bound in a few percent of cases
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(10_000, generator=generator, dtype=DT)
    upper = x + 3 * torch.rand(10_000, generator=generator, dtype=DT)
    direction = 5 * torch.rand(10_000, generator=generator, dtype=DT)
    t = (upper - x) / direction
    assert bool((torch.addcmul(x, direction, t) > upper).any()), "no rounding case found"
    bounds = Bounds(torch.full_like(x, -torch.inf), upper)
    trial = trial_point(x, direction, t, torch.ones((), dtype=torch.bool), bounds)
    assert bool((trial <= upper).all())


def test_max_step_and_projected_gradient():
    bounds = Bounds(
        torch.tensor([0.0, -torch.inf, -1.0], dtype=DT), torch.tensor([1.0, 2.0, torch.inf], dtype=DT)
    )
    x = torch.tensor([0.5, 0.0, 0.0], dtype=DT)
    assert float(max_step(x, torch.tensor([1.0, 1.0, 0.0], dtype=DT), bounds)) == 0.5
    assert float(max_step(x, torch.tensor([0.0, -1.0, 0.0], dtype=DT), bounds)) == np.inf
    assert float(max_step(x, torch.tensor([0.0, 0.0, -4.0], dtype=DT), bounds)) == 0.25
    at_lower = torch.tensor([0.0, 0.0, 0.0], dtype=DT)
    grad = torch.tensor([3.0, -5.0, 2.0], dtype=DT)
    assert projected_gradient(at_lower, grad, bounds).tolist() == [0.0, 2.0, -1.0]


# --- Batches: vmap, batched_minimize and a compiled round -----------------------------------------


def _nnls_batch(size=24):
    generator = torch.Generator().manual_seed(11)
    matrices = torch.randn(size, 20, 6, generator=generator, dtype=DT)
    targets = torch.randn(size, 20, generator=generator, dtype=DT)
    targets[::3] = (
        matrices[::3] @ torch.rand(size, 6, generator=generator, dtype=DT)[::3].unsqueeze(-1)
    ).squeeze(-1)
    lower = -torch.rand(size, 6, generator=generator, dtype=DT)
    return matrices, targets, lower


def _least_squares(x, matrix, target):
    # elementwise, not matmul: a batched matmul rounds differently from an unbatched one
    return 0.5 * (((matrix * x).sum(-1) - target) ** 2).sum()


def _coupled_quartic(x, target, weight):
    return (weight * (x - target) ** 2).sum() + 0.1 * x.sum() ** 2 + 0.05 * (x**4).sum()


def test_a_batch_of_bounded_problems_equals_each_solved_alone():
    # Every problem converges on the gradient test (none stops at f's rounding limit, where the
    # last digits of a batched reduction could move the stopping point), and the loss reduces
    # over its last dimension only.
    generator = torch.Generator().manual_seed(5)
    size, n = 16, 6
    x0 = torch.rand(size, n, generator=generator, dtype=DT) * 2 - 1
    target = 2 * torch.randn(size, n, generator=generator, dtype=DT)
    weight = 1 + 2 * torch.rand(size, n, generator=generator, dtype=DT)
    cut = torch.rand(size, 1, generator=generator) < 0.5  # half the problems have no bound active
    lower = torch.where(cut, -1.0, -10.0).to(DT).expand(size, n)
    upper = torch.where(cut, 0.5, 10.0).to(DT).expand(size, n)
    options = {**TIGHT, "tolerance_grad": 1e-7}
    batched = torchlbfgs.batched_minimize(
        _coupled_quartic, x0, target, weight, bounds=(lower, upper), **options
    )
    vmapped = torch.func.vmap(lambda x, c, w, low, high: torchlbfgs.minimize(
        lambda v: _coupled_quartic(v, c, w), x, bounds=(low, high), **options
    ))(x0, target, weight, lower, upper)  # fmt: skip
    for i in range(size):
        alone = torchlbfgs.minimize(
            functools.partial(_coupled_quartic, target=target[i], weight=weight[i]), x0[i],
            bounds=(lower[i], upper[i]), **options,
        )  # fmt: skip
        assert int(alone.status) == torchlbfgs.StopReason.GRADIENT_TOLERANCE
        torch.testing.assert_close(batched.params[i], alone.params, rtol=0, atol=1e-10)
        torch.testing.assert_close(vmapped.params[i], alone.params, rtol=0, atol=1e-10)
        assert int(batched.n_active_bounds[i]) == int(alone.n_active_bounds)
    actives = set(batched.n_active_bounds.tolist())
    assert 0 in actives, "the batch should have problems without active bounds"
    assert len(actives) > 1, "and problems with"


def test_shared_and_per_problem_bounds_broadcast_against_the_batch():
    matrices, targets, _ = _nnls_batch(6)
    x0 = torch.ones(6, 6, dtype=DT)
    shared = torchlbfgs.batched_minimize(_least_squares, x0, matrices, targets, bounds=(torch.zeros(6), 1.0))
    per_problem = torchlbfgs.batched_minimize(_least_squares, x0, matrices, targets,
                                              bounds=(torch.zeros(6, 1), torch.ones(6, 6)))  # fmt: skip
    torch.testing.assert_close(shared.params, per_problem.params, rtol=0, atol=0)
    assert bool((shared.params >= 0).all() & (shared.params <= 1).all())


def test_a_compiled_bounded_round_equals_the_eager_one():
    matrices, targets, lower = _nnls_batch(8)
    x0 = torch.ones(8, 6, dtype=DT)
    options = {"bounds": (lower, 0.4), "tolerance_grad": 1e-10, "tolerance_change": 0.0, "max_iter": 50}
    eager = torchlbfgs.batched_minimize(_least_squares, x0, matrices, targets, **options)
    torch._dynamo.reset()
    compiled = torchlbfgs.batched_minimize(
        _least_squares, x0, matrices, targets, compile={"backend": "eager"}, **options
    )
    torch.testing.assert_close(compiled.params, eager.params, rtol=0, atol=1e-12)
    assert torch.equal(compiled.n_evals, eager.n_evals)


def test_a_bounded_update_compiles_whole_and_equals_the_eager_one():
    # Moré-Thuente: its per-problem stpmax (strong Wolfe's cap is in the compiled round below).
    # Dynamo alone (backend "eager"): graph breaks and data-dependent shapes are Dynamo's to find.
    line_search = "more_thuente"
    fun, _, lower, upper = _quadratic_with_known_solution(1, n=6)
    box = (lower, upper)
    x = torch.zeros(6, dtype=DT)
    state = torchlbfgs.init(fun, x, history_size=3, bounds=box)

    def step(x, state):
        return torchlbfgs.update(fun, x, state, bounds=box, line_search=line_search, max_ls=4)

    torch._dynamo.reset()
    compiled_step = torch.compile(step, fullgraph=True, backend="eager")
    eager_x, eager_state = x, state
    for _ in range(4):  # past the history's wrap
        x, state = compiled_step(x, state)
        eager_x, eager_state = step(eager_x, eager_state)
        torch.testing.assert_close(x, eager_x, rtol=1e-12, atol=1e-12)
        assert torch.equal(state.n_evals, eager_state.n_evals)
        assert torch.equal(state.status, eager_state.status)
