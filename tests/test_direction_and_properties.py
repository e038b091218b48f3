"""The L-BFGS direction against an explicitly built inverse Hessian, the curvature-pair memory, and
property tests (descent, line-search conditions, monotone values) on random convex quadratics.

References are built here from first principles, in float64, from the iterates ``update`` returns:
the library's ring buffer and its order helper are never read.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import Problem, rosenbrock, spd_quadratic, wood

import torchlbfgs
from torchlbfgs import StopReason
from torchlbfgs.history import History, push_curvature_pair

DTYPE = torch.float64
EPS = torch.finfo(DTYPE).eps
C1, C2 = 1e-4, 0.9  # update's and line_search's defaults, passed explicitly below
TORCH_CURVATURE_THRESHOLD = 1e-10  # the "absolute" rule, documented as torch's `ys > 1e-10`
COUNTERS = ("iteration", "n_evals", "status")
NOT_HISTORY = ("value", "grad", *COUNTERS)


def history_of(state: torchlbfgs.LBFGSState) -> dict[str, torch.Tensor]:
    """The memory fields of the state (whatever they are called), without value, grad and counters."""
    return {name: leaf for name, leaf in state._asdict().items() if name not in NOT_HISTORY}


def history_equal(a: torchlbfgs.LBFGSState, b: torchlbfgs.LBFGSState) -> bool:
    ha, hb = history_of(a), history_of(b)
    return ha.keys() == hb.keys() and all(torch.equal(ha[name], hb[name]) for name in ha)


def relative_rule_accepts(s: np.ndarray, y: np.ndarray, grad: np.ndarray) -> bool:
    """The documented default rule (L-BFGS-B's): s'y > eps * (-s'g_k)."""
    return float(s @ y) > EPS * float(-(s @ grad))


def reference_inv_hessian(pairs: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """H from N&W eq. 7.19, materialised: H0 = gamma I with gamma = s'y / y'y of the newest pair
    (eq. 7.20; 1 without pairs), then H <- V' H V + rho s s', V = I - rho y s', oldest pair first."""
    identity = np.eye(n)
    if not pairs:
        return identity
    newest_s, newest_y = pairs[-1]
    h = (newest_s @ newest_y) / (newest_y @ newest_y) * identity
    for s, y in pairs:
        rho = 1.0 / (y @ s)
        v = identity - rho * np.outer(y, s)
        h = v.T @ h @ v + rho * np.outer(s, s)
    return h


def assert_relative_close(actual: np.ndarray, expected: np.ndarray, rtol: float, what: str) -> None:
    error = float(np.linalg.norm(actual - expected))
    scale = float(np.linalg.norm(expected))
    assert error <= rtol * scale, f"{what}: |a - e| / |e| = {error / scale:.3e} > {rtol:g}"


# ---------------------------------------------------------------------------------------------
# inv_hessian_product against the materialised BFGS matrix
# ---------------------------------------------------------------------------------------------

HISTORY_SIZE = 3
DIRECTION_PROBLEM = Problem("rosenbrock6", rosenbrock, torch.tensor([-1.2, 1.0] * 3, dtype=DTYPE))


def run_recording(
    problem: Problem,
    n_updates: int,
    history_size: int,
    line_search: str = "strong_wolfe",
    direction: str = "two_loop",
) -> tuple[list[torch.Tensor], list[torchlbfgs.LBFGSState]]:
    """Iterates x_0..x_k and states 0..k of ``n_updates`` calls to update (tolerances off)."""
    x = problem.x0.clone()
    state = torchlbfgs.init(problem.fun, x, history_size=history_size, direction=direction)  # type: ignore[arg-type]
    xs, states = [x], [state]
    for _ in range(n_updates):
        x, state = torchlbfgs.update(
            problem.fun,
            x,
            state,
            line_search=line_search,
            tolerance_grad=0.0,
            tolerance_change=0.0,
            c1=C1,
            c2=C2,
        )
        assert int(state.status) == StopReason.RUNNING
        xs.append(x)
        states.append(state)
    return xs, states


def chronological_pairs(
    xs: list[torch.Tensor], states: list[torchlbfgs.LBFGSState]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """All accepted (s, y) pairs, oldest first, from consecutive iterates and their gradients."""
    pairs = []
    for k in range(len(xs) - 1):
        s = (xs[k + 1] - xs[k]).numpy()
        y = (states[k + 1].grad - states[k].grad).numpy()
        grad = states[k].grad.numpy()
        if np.any(s != 0) and relative_rule_accepts(s, y, grad):
            pairs.append((s, y))
    return pairs


@pytest.mark.parametrize(
    "n_updates",
    [
        pytest.param(0, id="empty-history"),
        pytest.param(1, id="one-pair"),
        pytest.param(2, id="partly-filled"),
        pytest.param(3, id="just-full"),
        pytest.param(4, id="wrapped-once"),
        pytest.param(5, id="wrapped-twice"),
        pytest.param(9, id="wrapped-many"),
    ],
)
@pytest.mark.parametrize("direction", ["compact", "two_loop"])
def test_inv_hessian_product_matches_materialised_bfgs_matrix(n_updates: int, direction: str) -> None:
    xs, states = run_recording(DIRECTION_PROBLEM, n_updates, HISTORY_SIZE, direction=direction)
    assert (states[-1].sy_products.shape == (HISTORY_SIZE,) * 2) == (direction == "compact")
    state = states[-1]
    n = xs[0].numel()
    all_pairs = chronological_pairs(xs, states)
    # Every step of this run is a strong-Wolfe step (s'y > 0): each one adds a pair, so the buffer
    # has wrapped exactly when n_updates > HISTORY_SIZE.
    assert len(all_pairs) == n_updates
    h = reference_inv_hessian(all_pairs[-HISTORY_SIZE:], n)
    assert np.allclose(h, h.T, rtol=0, atol=1e-12 * np.abs(h).max())
    assert np.linalg.eigvalsh((h + h.T) / 2).min() > 0

    generator = torch.Generator().manual_seed(n_updates)
    vectors = [state.grad, *torch.randn(4, n, generator=generator, dtype=DTYPE)]
    for i, vector in enumerate(vectors):
        product = torchlbfgs.inv_hessian_product(state, vector)
        assert product.dtype == DTYPE
        assert product.shape == (n,)
        expected = h @ vector.numpy()
        if n_updates == 0:
            assert torch.equal(product, vector)  # H = I exactly
        assert_relative_close(product.numpy(), expected, 1e-10, f"H v, vector {i}")


def test_update_steps_along_minus_h_g() -> None:
    """Each step x_{k+1} - x_k is a positive multiple of -H_k g_k, H_k rebuilt as above."""
    n_updates = 9
    xs, states = run_recording(DIRECTION_PROBLEM, n_updates, HISTORY_SIZE)
    n = xs[0].numel()
    for k in range(n_updates):
        pairs = chronological_pairs(xs[: k + 1], states[: k + 1])[-HISTORY_SIZE:]
        direction = -reference_inv_hessian(pairs, n) @ states[k].grad.numpy()
        step = (xs[k + 1] - xs[k]).numpy()
        t = float(step @ direction) / float(direction @ direction)
        assert t > 0
        assert_relative_close(step, t * direction, 1e-10, f"step {k} vs t * (-H g)")


# ---------------------------------------------------------------------------------------------
# The compact representation against the two-loop recursion on the same memory
# ---------------------------------------------------------------------------------------------


def empty_memory(history_size: int, n: int, products: bool) -> History:
    m = history_size if products else 0
    zeros = torch.zeros((), dtype=DTYPE)
    return History(
        torch.zeros(history_size, n, dtype=DTYPE), torch.zeros(history_size, n, dtype=DTYPE),
        torch.zeros(history_size, dtype=DTYPE), torch.ones((), dtype=DTYPE),
        torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64),
        zeros.expand(m, m).clone(), zeros.expand(m, m).clone(),
    )  # fmt: skip


@settings(max_examples=300, deadline=None, database=None)
@given(
    history_size=st.integers(1, 6),
    n=st.integers(1, 30),
    accepted=st.lists(st.booleans(), max_size=20),
    seed=st.integers(0, 2**31 - 1),
)
def test_compact_form_equals_two_loop(history_size: int, n: int, accepted: list[bool], seed: int) -> None:
    """Pairs pushed into two memories, one keeping products, some pairs skipped (as a failed
    curvature test skips them), the ring wrapping or not, or no pair at all: both ways of
    computing H v agree to 1e-10, and the incrementally kept products equal S'Y and Y'Y
    recomputed from the buffers wherever the compact form reads them."""
    generator = torch.Generator().manual_seed(seed)
    with_products, without = empty_memory(history_size, n, True), empty_memory(history_size, n, False)
    owned = empty_memory(history_size, n, True)  # written in place, as an owner of the state may
    for accept in accepted:
        s = torch.randn(n, generator=generator, dtype=DTYPE)
        y = s + 0.3 * torch.randn(n, generator=generator, dtype=DTYPE)  # y's > 0 with high odds
        ys = y @ s
        ok = torch.tensor(accept) & (ys > 0)
        with_products = push_curvature_pair(with_products, s, y, ys, ok)
        without = push_curvature_pair(without, s, y, ys, ok)
        owned = push_curvature_pair(owned, s, y, ys, ok, in_place=True)
    assert torch.equal(with_products.s_history, without.s_history)
    for name, leaf in with_products._asdict().items():
        assert torch.equal(leaf, getattr(owned, name)), name
    vector = torch.randn(n, generator=generator, dtype=DTYPE)
    compact = torchlbfgs.inv_hessian_product(with_products, vector)
    two_loop = torchlbfgs.inv_hessian_product(without, vector)
    assert_relative_close(compact.numpy(), two_loop.numpy(), 1e-10, "compact vs two-loop")
    if int(with_products.n_pairs) == 0:
        assert torch.equal(compact, vector)  # H = I

    m, head, count = history_size, int(with_products.head), int(with_products.n_pairs)
    slots = [(head - count + k) % m for k in range(count)]  # oldest first
    s_buf, y_buf = with_products.s_history, with_products.y_history
    for later, j in enumerate(slots):
        for i in slots[: later + 1]:  # s_i'y_j for i not newer than j: what R holds
            assert torch.isclose(with_products.sy_products[i, j], s_buf[i] @ y_buf[j], rtol=1e-12, atol=1e-12)
        for i in slots:
            assert torch.isclose(with_products.yy_products[i, j], y_buf[i] @ y_buf[j], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Rejected curvature pairs leave the memory untouched
# ---------------------------------------------------------------------------------------------


NEGATIVE_CURVATURE_RUNS = [
    # (problem, line search, updates): runs whose steps cross regions of negative curvature, which
    # neither Armijo backtracking nor a fixed step rules out (strong Wolfe would: s'y > 0).
    (Problem("wood", wood, torch.tensor([-3.0, -1.0, -3.0, -1.0], dtype=DTYPE)), "backtracking", 40),
    (DIRECTION_PROBLEM, None, 40),
]


@pytest.mark.parametrize("direction", ["compact", "two_loop"])
def test_pair_rejected_for_negative_curvature_leaves_history_unchanged(direction: str) -> None:
    rejected_with_full_history = 0
    for problem, line_search, n_updates in NEGATIVE_CURVATURE_RUNS:
        xs, states = run_recording(
            problem, n_updates, HISTORY_SIZE, line_search=line_search, direction=direction
        )
        accepted = 0
        for k in range(n_updates):
            where = f"{problem.name}/{line_search}, step {k}"
            s = (xs[k + 1] - xs[k]).numpy()
            y = (states[k + 1].grad - states[k].grad).numpy()
            assert np.any(s != 0), where
            ys, threshold = float(s @ y), EPS * float(-(s @ states[k].grad.numpy()))
            # Only clear-cut decisions: the library's s = t d differs from x_{k+1} - x_k by rounding.
            assert abs(ys - threshold) > 1e-8 * np.linalg.norm(s) * np.linalg.norm(y), where
            if ys > threshold:
                accepted += 1
                assert not history_equal(states[k + 1], states[k]), f"{where}: accepted pair not stored"
            else:
                assert ys < 0, where  # negative curvature along the step
                assert history_equal(states[k + 1], states[k]), f"{where}: rejected pair changed the memory"
                assert int(states[k + 1].iteration) == int(states[k].iteration) + 1, where  # step was taken
                rejected_with_full_history += accepted >= HISTORY_SIZE
            # With gaps in the accepted sequence the ring buffer still holds the last m accepted
            # pairs. (1e-9: s = x_{k+1} - x_k differs from the stored t d by rounding, amplified
            # by the conditioning of H late in these runs.)
            pairs = chronological_pairs(xs[: k + 2], states[: k + 2])[-HISTORY_SIZE:]
            expected = reference_inv_hessian(pairs, s.size) @ states[k + 1].grad.numpy()
            product = torchlbfgs.inv_hessian_product(states[k + 1], states[k + 1].grad).numpy()
            assert_relative_close(product, expected, 1e-9, f"{where}: H g")
    assert rejected_with_full_history >= 1, "these runs no longer exercise a rejection with a full memory"


def test_absolute_rule_rejects_tiny_curvature_that_relative_rule_keeps() -> None:
    """f scaled by 1e-12: s'y ~ 1e-12 s'As is below torch's absolute threshold 1e-10, while the
    scale-free relative rule keeps the pair."""
    quadratic = spd_quadratic(5, 10.0, seed=3)
    scale = 1e-12

    def fun(x: torch.Tensor) -> torch.Tensor:
        return scale * quadratic.fun(x)

    x0 = torch.randn(5, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    problem = Problem("tiny quadratic", fun, x0)
    xs, states = run_recording(problem, 2, HISTORY_SIZE)  # two pairs stored under the relative rule
    assert len(chronological_pairs(xs, states)) == 2
    x, state = xs[-1], states[-1]
    options = {"tolerance_grad": 0.0, "tolerance_change": 0.0, "c1": C1, "c2": C2}
    x_abs, state_abs = torchlbfgs.update(fun, x, state, curvature_rule="absolute", **options)
    x_rel, state_rel = torchlbfgs.update(fun, x, state, curvature_rule="relative", **options)
    # The rule only decides about memory: both take the same step.
    assert torch.equal(x_abs, x_rel)
    assert not torch.equal(x_abs, x)
    s = (x_abs - x).numpy()
    y = (state_abs.grad - state.grad).numpy()
    assert 0 < float(s @ y) <= TORCH_CURVATURE_THRESHOLD
    assert relative_rule_accepts(s, y, state.grad.numpy())
    assert history_equal(state_abs, state)
    assert not history_equal(state_rel, state)
    assert torch.equal(state_abs.grad, state_rel.grad)
    assert int(state_abs.status) == int(state_rel.status) == StopReason.RUNNING


# ---------------------------------------------------------------------------------------------
# Property tests on random convex quadratics f = x'Ax/2 - b'x, A SPD, n in 2..12, cond <= 1e4
# ---------------------------------------------------------------------------------------------

MAX_UPDATES = 30
TOLERANCE_GRAD = 1e-10
# tolerance_change > 0 so that runs stop once f stalls at its rounding floor (see the stall bug in
# test_reference_solutions.py); it is far below every decrease these checks look at.
TOLERANCE_CHANGE = 1e-14
# Sized for ~10 s of this file on 2 cores: update loops ~30-45 ms an example, single searches ~5 ms.
UPDATE_LOOP_SETTINGS = settings(max_examples=60, deadline=None, database=None)
SEARCH_SETTINGS = settings(max_examples=250, deadline=None, database=None)


@st.composite
def quadratics(draw: st.DrawFn) -> Problem:
    n = draw(st.integers(min_value=2, max_value=12))
    condition = 10.0 ** draw(st.floats(min_value=0.0, max_value=4.0))
    seed = draw(st.integers(min_value=0, max_value=2**31 - 1))
    problem = spd_quadratic(n, condition, seed=seed)
    start_scale = 10.0 ** draw(st.floats(min_value=-1.0, max_value=1.0))
    x0 = start_scale * torch.randn(n, generator=torch.Generator().manual_seed(seed + 1), dtype=DTYPE)
    return Problem(problem.name, problem.fun, x0, problem.solution)


def value_and_grad(
    fun: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> tuple[float, torch.Tensor]:
    grad, value = torch.func.grad_and_value(fun)(x)
    return float(value), grad


def hessian_norm(problem: Problem) -> float:
    """|A|_2 of the quadratic (its Hessian is constant)."""
    hessian = torch.func.jacrev(torch.func.grad(problem.fun))(problem.x0)
    return float(torch.linalg.matrix_norm(hessian, ord=2))


def assert_point_close(actual: torch.Tensor, x: torch.Tensor, t: float, d: torch.Tensor) -> None:
    """``actual`` is x + t d up to its rounding (the library may use a fused multiply-add)."""
    expected = x + t * d
    rounding = 2 * EPS * (x.abs() + abs(t) * d.abs())
    assert bool(((actual - expected).abs() <= rounding).all()), "the new point is not x + t d"


def point_rounding(x: torch.Tensor, t: float, d: torch.Tensor) -> float:
    """Bound on |p - (x + t d)| for the point p the library evaluated (see assert_point_close)."""
    return float(torch.linalg.vector_norm(2 * EPS * (x.abs() + abs(t) * d.abs())))


def assert_evaluated_at(
    problem: Problem,
    point: torch.Tensor,
    value: torch.Tensor,
    grad: torch.Tensor,
    curvature: float,
    point_error: float = 0.0,
) -> None:
    """``value`` and ``grad`` are f and grad f at ``point`` (the library's own evaluation there),
    up to the rounding of f = x'Ax/2 - b'x and g = Ax - b, and up to ``point_error``, how far the
    library's evaluation point may be from ``point`` (a fused multiply-add rounds x + t d once).

    Standard dot-product error bounds, with |b| <= |A||x| + |g|: |df| <~ n eps (|A||x|^2 + |g||x|)
    and |dg| <~ n eps (|A||x| + |g|); a factor 16 covers the constants. Moving the point by e
    changes g by at most |A| e and f by at most (|g| + |A| e) e.
    """
    f, g = value_and_grad(problem.fun, point)
    n = point.numel()
    x_norm, g_norm = float(torch.linalg.vector_norm(point)), float(torch.linalg.vector_norm(g))
    moved_g = curvature * point_error
    f_tolerance = (
        16 * n * EPS * (curvature * x_norm**2 + g_norm * x_norm + abs(f)) + (g_norm + moved_g) * point_error
    )
    g_tolerance = 16 * n * EPS * (curvature * x_norm + g_norm) + moved_g
    assert abs(float(value) - f) <= f_tolerance, "reported value is not f at the point"
    assert float(torch.linalg.vector_norm(grad - g)) <= g_tolerance, "reported gradient is not grad f"


def assert_armijo(f0: float, gtd: float, t: float, f_new: float) -> None:
    # A few ulps for the rounding of the right-hand side f0 + c1 t g'd.
    assert f_new <= f0 + C1 * t * gtd + 4 * EPS * (abs(f0) + abs(C1 * t * gtd)), f"Armijo fails at t = {t}"


def assert_strong_wolfe(
    f0: float, gtd: float, t: float, f_new: float, g_new: torch.Tensor, d: torch.Tensor
) -> None:
    assert t > 0
    assert_armijo(f0, gtd, t, f_new)
    rounding = 4 * EPS * float(g_new.abs() @ d.abs())
    assert abs(float(g_new @ d)) <= C2 * abs(gtd) + rounding, f"curvature condition fails at t = {t}"


def assert_search_conditions(
    method: str, f0: float, gtd: float, result: torchlbfgs.LineSearchResult, d: torch.Tensor
) -> None:
    """The conditions checked on the search's own evaluation at its point (which
    assert_evaluated_at separately ties to f and grad f at x + t d)."""
    t = float(result.step_size)
    if method in ("strong_wolfe", "more_thuente"):
        assert_strong_wolfe(f0, gtd, t, float(result.value), result.grad, d)
    else:
        assert t > 0
        assert_armijo(f0, gtd, t, float(result.value))


def first_trial_step(state: torchlbfgs.LBFGSState) -> float:
    """update's documented first trial: min(1, 1/|g_0|_1) at iteration 0, then 1 (learning_rate 1)."""
    if int(state.iteration) == 0:
        return min(1.0, 1.0 / float(state.grad.abs().sum()))
    return 1.0


LINE_SEARCH_METHODS = st.sampled_from(["strong_wolfe", "more_thuente", "backtracking"])
HISTORY_SIZES = st.integers(min_value=1, max_value=10)


@UPDATE_LOOP_SETTINGS
@given(problem=quadratics(), line_search=LINE_SEARCH_METHODS, history_size=HISTORY_SIZES)
def test_direction_is_descent_and_value_never_increases(
    problem: Problem, line_search: str, history_size: int
) -> None:
    curvature = hessian_norm(problem)
    x = problem.x0.clone()
    state = torchlbfgs.init(problem.fun, x, history_size=history_size)
    for _ in range(MAX_UPDATES):
        if int(state.status) != StopReason.RUNNING:
            break
        grad = state.grad
        direction = -torchlbfgs.inv_hessian_product(state, grad)
        if float(grad.abs().max()) > TOLERANCE_GRAD:
            # (a) descent, and not only barely: H is positive definite, so -g'Hg < 0.
            assert float(grad @ direction) < 0, "L-BFGS direction is not a descent direction"
        new_x, new_state = torchlbfgs.update(
            problem.fun,
            x,
            state,
            line_search=line_search,
            tolerance_grad=TOLERANCE_GRAD,
            tolerance_change=TOLERANCE_CHANGE,
            c1=C1,
            c2=C2,
        )
        # (c) monotone: the state's value never increases, and it is f at the new params.
        assert float(new_state.value) <= float(state.value)
        assert_evaluated_at(problem, new_x, new_state.value, new_state.grad, curvature)
        if torch.equal(new_x, x):
            assert float(new_state.value) == float(state.value)
        x, state = new_x, new_state
    status = StopReason(int(state.status))
    assert status not in (StopReason.NON_FINITE, StopReason.MAX_EVALS)


@UPDATE_LOOP_SETTINGS
@given(problem=quadratics(), line_search=LINE_SEARCH_METHODS, history_size=HISTORY_SIZES)
def test_update_line_search_steps_satisfy_their_conditions(
    problem: Problem, line_search: str, history_size: int
) -> None:
    """(b) Re-run update's line search through line_search() with update's inputs: when it reports
    success, the strong Wolfe (or Armijo) conditions hold, and update took exactly that step."""
    curvature = hessian_norm(problem)
    x = problem.x0.clone()
    state = torchlbfgs.init(problem.fun, x, history_size=history_size)
    successes = 0
    for _ in range(MAX_UPDATES):
        if int(state.status) != StopReason.RUNNING or float(state.grad.abs().max()) <= TOLERANCE_GRAD:
            break
        f0, grad = float(state.value), state.grad
        direction = -torchlbfgs.inv_hessian_product(state, grad)
        gtd = float(grad @ direction)
        if gtd > -TOLERANCE_CHANGE:
            break  # update stops without searching
        result = torchlbfgs.line_search(
            problem.fun,
            x,
            direction,
            state.value,
            grad,
            method=line_search,
            step_size=first_trial_step(state),
            c1=C1,
            c2=C2,
            tolerance_change=TOLERANCE_CHANGE,
        )
        new_x, new_state = torchlbfgs.update(
            problem.fun,
            x,
            state,
            line_search=line_search,
            tolerance_grad=TOLERANCE_GRAD,
            tolerance_change=TOLERANCE_CHANGE,
            c1=C1,
            c2=C2,
        )
        t = float(result.step_size)
        if bool(result.success):
            successes += 1
            assert_search_conditions(line_search, f0, gtd, result, direction)
            assert_evaluated_at(
                problem,
                x + t * direction,
                result.value,
                result.grad,
                curvature,
                point_rounding(x, t, direction),
            )
            # update ran the same search and took exactly its step.
            assert_point_close(new_x, x, t, direction)
            assert float(new_state.value) == float(result.value)
        elif not torch.equal(new_x, x):
            # update also takes a failed search's point when it lowers f (documented torch choice).
            assert_point_close(new_x, x, t, direction)
            assert float(new_state.value) < f0
        x, state = new_x, new_state
    # Every search on a convex quadratic far from the rounding floor can succeed; the first one
    # always starts there, so the conditions were checked at least once.
    assert successes >= 1


@st.composite
def searches(draw: st.DrawFn) -> tuple[Problem, torch.Tensor]:
    """A quadratic and a random descent direction at its start: d = -P g with P random SPD."""
    problem = draw(quadratics())
    n = problem.x0.numel()
    seed = draw(st.integers(min_value=0, max_value=2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    root = torch.randn(n, n, generator=generator, dtype=DTYPE)
    precondition = root @ root.T + 0.1 * torch.eye(n, dtype=DTYPE)
    grad = torch.func.grad(problem.fun)(problem.x0)
    return problem, -precondition @ grad


@SEARCH_SETTINGS
@given(
    search=searches(),
    method=LINE_SEARCH_METHODS,
    log_step_ratio=st.floats(min_value=-3.0, max_value=3.0),
)
def test_line_search_function_satisfies_its_conditions(
    search: tuple[Problem, torch.Tensor], method: str, log_step_ratio: float
) -> None:
    problem, direction = search
    x = problem.x0
    f0, grad = value_and_grad(problem.fun, x)
    gtd = float(grad @ direction)
    assert gtd < 0
    # Exact minimiser along d of the quadratic: t* = -g'd / d'Ad, with d'Ad = d'(g(x + d) - g(x)).
    _, grad_at_unit_step = value_and_grad(problem.fun, x + direction)
    t_star = -gtd / float(direction @ (grad_at_unit_step - grad))
    first_step = t_star * 10.0**log_step_ratio
    result = torchlbfgs.line_search(
        problem.fun,
        x,
        direction,
        torch.tensor(f0, dtype=DTYPE),
        grad,
        method=method,
        step_size=first_step,
        c1=C1,
        c2=C2,
        tolerance_change=TOLERANCE_CHANGE,
    )
    t = float(result.step_size)
    # The 1-D function is a parabola: cubic (or quadratic) interpolation through two of its points
    # recovers t*, which satisfies strong Wolfe (g(t*)'d = 0 and, as c1 < 1/2, Armijo), and every
    # t <= 2 (1 - c1) t* satisfies Armijo; a first trial within a factor 1e3 of t* (extrapolation
    # grows the step up to 10x per iteration, backtracking shrinks it by at least 2x) leaves
    # max_ls = 25 ample room. So both searches must succeed here.
    assert bool(result.success), f"{method} failed from step {first_step:g} (t* = {t_star:g})"
    assert_search_conditions(method, f0, gtd, result, direction)
    # The reported value and gradient are those at x + t d.
    assert_evaluated_at(
        problem,
        x + t * direction,
        result.value,
        result.grad,
        hessian_norm(problem),
        point_rounding(x, t, direction),
    )
    assert int(result.n_evals) >= 1
