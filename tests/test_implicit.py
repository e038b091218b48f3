"""Differentiating through a solve (``implicit_diff``): gradients of the solution against closed
forms, central finite differences of the whole solve and unrolled differentiation, through
``torch.autograd`` and the ``torch.func`` transforms; the backward's linear solve; memory."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters
from torch.func import grad, jacfwd, jacrev, vjp, vmap

import torchlbfgs
from torchlbfgs.implicit import conjugate_gradient
from torchlbfgs.pytree import ravel_pytree

F64 = torch.float64
TIGHT: dict[str, Any] = {"tolerance_grad": 1e-12, "tolerance_change": 0.0, "max_iter": 1000}
# A tolerance every problem of a batch reaches: problems that end at the precision limit of f
# instead wander there by rounding, so a batch and a loop would part by more than 1e-10.
REACHABLE: dict[str, Any] = {"tolerance_grad": 1e-8, "max_iter": 200}
SOLVERS = ("cg", "preconditioned_cg")


def assert_close(got: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Equal to ``rtol`` relative to the largest entry of ``expected``."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=0.0, atol=rtol * scale)


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- ridge regression: a closed form ----------------------------------------------------------


def ridge(w: torch.Tensor, lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * (w @ w)


def ridge_closed_form(lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """w*(lam, X, y) = (X'X + lam I)^-1 X'y."""
    eye = torch.eye(X.shape[-1], dtype=X.dtype)
    return torch.linalg.solve(X.mT @ X + lam * eye, X.mT @ y)


def ridge_data(seed: int = 0, n: int = 30, d: int = 6) -> tuple[torch.Tensor, ...]:
    g = make_generator(seed)
    X, y = torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    X_val, y_val = torch.randn(20, d, generator=g, dtype=F64), torch.randn(20, generator=g, dtype=F64)
    return X, y, X_val, y_val


@pytest.mark.parametrize("solver", SOLVERS)
def test_ridge_gradients_equal_the_closed_forms(solver: str) -> None:
    """d(validation loss at w*)/d(lam, X, y) by autograd and by torch.func.grad, to 1e-6."""
    X, y, X_val, y_val = ridge_data()
    lam = torch.tensor(0.7, dtype=F64)

    def validation(w: torch.Tensor) -> torch.Tensor:
        return ((X_val @ w - y_val) ** 2).mean()

    expected = grad(lambda *a: validation(ridge_closed_form(*a)), argnums=(0, 1, 2))(lam, X, y)
    options = torchlbfgs.ImplicitDiff(solver=solver)  # type: ignore[arg-type]
    w0 = torch.zeros(X.shape[1], dtype=F64)

    def solved(*data: torch.Tensor) -> torch.Tensor:
        params: torch.Tensor = torchlbfgs.minimize(ridge, w0, *data, implicit_diff=options, **TIGHT).params
        return params

    by_func = grad(lambda *a: validation(solved(*a)), argnums=(0, 1, 2))(lam, X, y)
    leaves = [t.clone().requires_grad_() for t in (lam, X, y)]
    validation(solved(*leaves)).backward()
    for got_func, leaf, exact in zip(by_func, leaves, expected, strict=True):
        assert_close(got_func, exact, 1e-6)
        assert leaf.grad is not None
        assert_close(leaf.grad, exact, 1e-6)


def test_tensors_fun_closes_over_get_gradients() -> None:
    X, y, _, _ = ridge_data(1)
    lam = torch.tensor(0.3, dtype=F64)
    w0 = torch.zeros(X.shape[1], dtype=F64)
    expected = jacrev(ridge_closed_form, argnums=(0, 1))(lam, X, y)

    def solved(lam: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        params: torch.Tensor = torchlbfgs.minimize(
            lambda w: ridge(w, lam, X, y), w0, implicit_diff=True, **TIGHT
        ).params
        return params

    for got, exact in zip(jacrev(solved, argnums=(0, 1))(lam, X), expected, strict=True):
        assert_close(got, exact, 1e-6)
    lam_leaf = lam.clone().requires_grad_()
    solved(lam_leaf, X).sum().backward()
    assert lam_leaf.grad is not None
    assert_close(lam_leaf.grad, expected[0].sum(0), 1e-6)


def test_forward_mode_and_vjp_give_the_same_jacobian() -> None:
    X, y, _, _ = ridge_data(2)
    lam = torch.tensor(1.5, dtype=F64)
    w0 = torch.zeros(X.shape[1], dtype=F64)
    exact = jacrev(ridge_closed_form)(lam, X, y)

    def solved(lam: torch.Tensor) -> torch.Tensor:
        params: torch.Tensor = torchlbfgs.minimize(ridge, w0, lam, X, y, implicit_diff=True, **TIGHT).params
        return params

    assert_close(jacfwd(solved)(lam), exact, 1e-6)
    _, pullback = vjp(solved, lam)
    cotangent = torch.arange(1.0, X.shape[1] + 1, dtype=F64)
    (pulled,) = pullback(cotangent)
    assert_close(pulled, cotangent @ exact, 1e-6)


def test_the_solution_and_the_solve_are_those_without_implicit_diff() -> None:
    """Same iterates, value and counters bit for bit; params0 gets no gradient; the value's
    gradient is the envelope theorem's, df/dlam = |w*|^2 / 2."""
    X, y, _, _ = ridge_data(3)
    lam = torch.tensor(0.2, dtype=F64, requires_grad=True)
    w0 = torch.full((X.shape[1],), 0.5, dtype=F64, requires_grad=True)
    plain = torchlbfgs.minimize(ridge, w0.detach(), lam.detach(), X, y)
    implicit = torchlbfgs.minimize(ridge, w0, lam, X, y, implicit_diff=True)
    for field in torchlbfgs.Result._fields:
        assert torch.equal(getattr(plain, field), getattr(implicit, field).detach()), field
    (dvalue,) = torch.autograd.grad(implicit.value, lam, retain_graph=True)
    torch.testing.assert_close(dvalue, 0.5 * (plain.params @ plain.params), rtol=1e-9, atol=0.0)
    implicit.params.sum().backward()
    assert w0.grad is None
    assert lam.grad is not None


def test_positional_args_are_passed_on_to_fun() -> None:
    """minimize(fun, params0, *args) solves what the closure over the args solves, bit for bit."""
    X, y, _, _ = ridge_data(4)
    lam = torch.tensor(0.5, dtype=F64)
    w0 = torch.zeros(X.shape[1], dtype=F64)
    with_args = torchlbfgs.minimize(ridge, w0, lam, X, y)
    closed_over = torchlbfgs.minimize(lambda w: ridge(w, lam, X, y), w0)
    assert torch.equal(with_args.params, closed_over.params)
    assert int(with_args.n_evals) == int(closed_over.n_evals)
    with pytest.raises(TypeError, match="tolerance_gard"):
        torchlbfgs.minimize(ridge, w0, lam, X, y, tolerance_gard=1e-3)


# ---- logistic regression: finite differences and unrolled differentiation ---------------------


def logistic(w: torch.Tensor, lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y) + 0.5 * lam * (w @ w)


def logistic_data(seed: int, n: int = 40, d: int = 4) -> tuple[torch.Tensor, ...]:
    g = make_generator(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    y = (torch.rand(n, generator=g, dtype=F64) < torch.sigmoid(X @ torch.ones(d, dtype=F64))).to(F64)
    X_val = torch.randn(25, d, generator=g, dtype=F64)
    y_val = (torch.rand(25, generator=g, dtype=F64) < 0.5).to(F64)
    return X, y, X_val, y_val


def test_logistic_gradients_equal_finite_differences_and_unrolled_differentiation() -> None:
    X, y, X_val, y_val = logistic_data(5)
    lam = torch.tensor(0.05, dtype=F64)
    w0 = torch.zeros(X.shape[1], dtype=F64)

    def validation_loss(lam: torch.Tensor, X: torch.Tensor, *, implicit: bool = True) -> torch.Tensor:
        w = torchlbfgs.minimize(logistic, w0, lam, X, y, implicit_diff=implicit, **TIGHT).params
        return torch.nn.functional.binary_cross_entropy_with_logits(X_val @ w, y_val)

    d_lam, d_X = grad(validation_loss, argnums=(0, 1))(lam, X)
    # Central differences of the whole solve, along lam and along a random direction of X.
    h = 1e-4
    fd_lam = (validation_loss(lam + h, X) - validation_loss(lam - h, X)) / (2 * h)
    direction = torch.randn(X.shape, generator=make_generator(6), dtype=F64)
    fd_X = (validation_loss(lam, X + h * direction) - validation_loss(lam, X - h * direction)) / (2 * h)
    torch.testing.assert_close(d_lam, fd_lam, rtol=1e-5, atol=0.0)
    torch.testing.assert_close((d_X * direction).sum(), fd_X, rtol=1e-5, atol=0.0)
    # Unrolled: autograd through every iteration of the same solve run to convergence.
    leaves = [lam.clone().requires_grad_(), X.clone().requires_grad_()]
    unrolled = torch.autograd.grad(validation_loss(*leaves, implicit=False), leaves)
    torch.testing.assert_close(d_lam, unrolled[0], rtol=1e-8, atol=0.0)
    assert_close(d_X, unrolled[1], 1e-8)


def test_vmap_over_256_problems_equals_a_loop_of_single_solves() -> None:
    X, y, X_val, y_val = logistic_data(7, n=20, d=3)
    lams = torch.logspace(-3, 0, 256, dtype=F64)
    w0 = torch.zeros(X.shape[1], dtype=F64)

    reports: list[torchlbfgs.BackwardSolve] = []
    options = torchlbfgs.ImplicitDiff(on_solve=reports.append)

    def solved(lam: torch.Tensor) -> torch.Tensor:
        params: torch.Tensor = torchlbfgs.minimize(
            logistic, w0, lam, X, y, implicit_diff=options, **REACHABLE
        ).params
        return params

    def validation_loss(lam: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(X_val @ solved(lam), y_val)

    batched = vmap(solved)(lams)
    bilevel = grad(lambda lams: vmap(validation_loss)(lams).mean())(lams)
    jacobian = vmap(jacrev(solved))(lams)
    # one batched backward solve each: 256 problems, then 256 x 3 (jacrev's rows)
    assert [report.converged.shape for report in reports] == [(256,), (256, 3)]
    assert all(bool(report.converged.all()) for report in reports)
    # Single solves of every 8th problem and single backward passes of every 16th (for time).
    loop = torch.stack([solved(lams[i]) for i in range(0, len(lams), 8)])
    torch.testing.assert_close(batched[::8], loop, rtol=1e-10, atol=1e-12)
    some = range(0, len(lams), 16)
    loop_bilevel = torch.stack([grad(validation_loss)(lams[i]) for i in some]) / len(lams)
    loop_jacobian = torch.stack([jacrev(solved)(lams[i]) for i in some])
    torch.testing.assert_close(bilevel[some], loop_bilevel, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(jacobian[some], loop_jacobian, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
def test_batched_minimize_differentiates_like_vmapped_minimize(solver: str) -> None:
    """Per-problem data and lam, shared validation data: batched_minimize's hypergradients equal
    those of vmap(minimize), and each problem's closed form (ridge)."""
    g = make_generator(8)
    batch, n, d = 12, 25, 4
    Xs, ys = torch.randn(batch, n, d, generator=g, dtype=F64), torch.randn(batch, n, generator=g, dtype=F64)
    lams = torch.rand(batch, generator=g, dtype=F64) + 0.1
    X_val, y_val = torch.randn(15, d, generator=g, dtype=F64), torch.randn(15, generator=g, dtype=F64)
    options = torchlbfgs.ImplicitDiff(solver=solver)  # type: ignore[arg-type]

    def validation(w: torch.Tensor) -> torch.Tensor:
        return ((X_val @ w - y_val) ** 2).mean()

    def batched(lams: torch.Tensor, Xs: torch.Tensor) -> torch.Tensor:
        w0 = torch.zeros(batch, d, dtype=F64)
        result = torchlbfgs.batched_minimize(ridge, w0, lams, Xs, ys, implicit_diff=options, **TIGHT)
        return vmap(validation)(result.params).sum()

    def one(lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return validation(ridge_closed_form(lam, X, y))

    got = grad(batched, argnums=(0, 1))(lams, Xs)
    exact = vmap(grad(one, argnums=(0, 1)))(lams, Xs, ys)
    for got_part, exact_part in zip(got, exact, strict=True):
        assert_close(got_part, exact_part, 1e-6)


def _ridge_batch(seed: int, batch: int) -> tuple[torch.Tensor, ...]:
    """Ridge problems whose backward solves need from 1 to d iterations: problem i's design
    has i % d + 1 distinct singular values (CG takes one iteration per distinct eigenvalue)."""
    g = make_generator(seed)
    n, d = 20, 6
    Xs = torch.zeros(batch, n, d, dtype=F64)
    for i in range(batch):
        q_left = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=F64))[0]
        q_right = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
        distinct = torch.linspace(1.0, 3.0, i % d + 1, dtype=F64)
        singular = distinct[torch.arange(d) % len(distinct)]
        Xs[i] = q_left @ torch.diag(singular) @ q_right.T
    ys = torch.randn(batch, n, generator=g, dtype=F64)
    lams = torch.rand(batch, generator=g, dtype=F64) + 0.1
    return Xs, ys, lams


def test_batched_backward_leaves_converged_problems_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """batched_minimize's backward solves the batch's systems as vmap(minimize)'s masked CG
    does (same iterations per problem, same hypergradients), while the problems that have
    converged leave the batch: the rows it iterates on shrink."""
    import torchlbfgs.batched_implicit as batched_implicit

    Xs, ys, lams = _ridge_batch(13, batch=24)
    w0 = torch.zeros(24, Xs.shape[-1], dtype=F64)
    rows: list[int] = []
    iterate = batched_implicit.cg_iteration

    def counting(cg: Any, *rest: Any) -> Any:
        rows.append(cg.u.shape[0])
        return iterate(cg, *rest)

    monkeypatch.setattr(batched_implicit, "cg_iteration", counting)
    got_reports: list[torchlbfgs.BackwardSolve] = []
    vmap_reports: list[torchlbfgs.BackwardSolve] = []

    def batched(lams: torch.Tensor) -> torch.Tensor:
        options = torchlbfgs.ImplicitDiff(on_solve=got_reports.append)
        return torchlbfgs.batched_minimize(ridge, w0, lams, Xs, ys, implicit_diff=options, **TIGHT).params

    def vmapped(lams: torch.Tensor) -> torch.Tensor:
        options = torchlbfgs.ImplicitDiff(on_solve=vmap_reports.append)

        def one(w0: torch.Tensor, lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torchlbfgs.minimize(ridge, w0, lam, X, y, implicit_diff=options, **TIGHT).params

        params: torch.Tensor = vmap(one)(w0, lams, Xs, ys)
        return params

    weights = torch.linspace(1.0, 2.0, Xs.shape[-1], dtype=F64)
    got = grad(lambda lams: (batched(lams) * weights).sum())(lams)
    expected = grad(lambda lams: (vmapped(lams) * weights).sum())(lams)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0.0)
    exact = vmap(grad(lambda lam, X, y: (ridge_closed_form(lam, X, y) * weights).sum()))(lams, Xs, ys)
    assert_close(got, exact, 1e-9)
    (report,) = got_reports
    assert torch.equal(report.iterations, vmap_reports[0].iterations)
    assert int(report.iterations.min()) < int(report.iterations.max())
    assert rows[0] == 24  # converged problems left the batch:
    assert rows[-1] < 24 // 2, rows
    assert sum(rows) < 24 * len(rows)


def test_a_compiled_backward_solve_equals_the_eager_one_with_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """compile= compiles the backward's CG iteration (the masks of bounds and the preconditioner
    inside, so with solver="preconditioned_cg": every part of it); it solves as the eager
    iterations do. (The compiled round is tested elsewhere;
    here the solve's systems are caught and solved again by a compiling adjoint.)"""
    import dataclasses

    import torchlbfgs.batched_implicit as batched_implicit

    Xs, ys, lams = _ridge_batch(14, batch=16)
    w0 = torch.ones(16, Xs.shape[-1], dtype=F64)
    bounds = (torch.zeros(Xs.shape[-1], dtype=F64), None)
    caught: list[tuple[Any, ...]] = []
    solve = batched_implicit.BatchedAdjoint.solve

    def catching(adjoint: Any, *systems: Any) -> torch.Tensor:
        caught.append((adjoint, *systems))
        return solve(adjoint, *systems)

    monkeypatch.setattr(batched_implicit.BatchedAdjoint, "solve", catching)
    leaf = lams.clone().requires_grad_()
    options = torchlbfgs.ImplicitDiff(solver="preconditioned_cg")
    params = torchlbfgs.batched_minimize(
        ridge, w0, leaf, Xs, ys, bounds=bounds, implicit_diff=options, **TIGHT
    ).params  # fmt: skip
    params.square().sum().backward()
    ((adjoint, x, free, memory, v),) = caught
    assert adjoint.bounded
    assert 0 < int((~free).sum()) < free.numel()
    eager = solve(adjoint, x, free, memory, v)
    torch._dynamo.reset()
    counters.clear()
    compiling = dataclasses.replace(adjoint, compile={"backend": "eager"})
    rows: list[int] = []
    iterate = batched_implicit.BatchedAdjoint._step
    monkeypatch.setattr(
        batched_implicit.BatchedAdjoint, "_step",
        lambda self, batch, **how: rows.append(batch.state.x.shape[0]) or iterate(self, batch, **how),
    )  # fmt: skip
    compiled = solve(compiling, x, free, memory, v)
    assert len(rows) >= 3
    assert rows[-1] < rows[1] < rows[0]
    assert counters["stats"]["unique_graphs"] == 1  # one graph as the batch shrinks
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-15)
    assert torch.equal(compiled == 0, ~free | (eager == 0))
    # {"dynamic": False}: static shapes, the batch kept whole, still one graph and the same solve
    torch._dynamo.reset()
    counters.clear()
    static = dataclasses.replace(adjoint, compile={"backend": "eager", "dynamic": False})
    rows.clear()
    kept_whole = solve(static, x, free, memory, v)
    assert rows == [x.shape[0]]
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(kept_whole, eager, rtol=1e-12, atol=1e-15)


def test_compiled_backward_solves_of_two_losses_each_keep_a_compile_cache_of_their_own() -> None:
    """The backward's compiled CG iteration, as the round (``test_compile.py``), is compiled in a
    Dynamo cache of each loss function's own: with one graph allowed per cache, the compiled
    solves of two losses each give the closed form's hyperparameter gradients. (Before, every
    loss's iteration shared one code object, and the second loss's failed to compile.)"""
    Xs, ys, lams = _ridge_batch(3, batch=6)
    w0 = torch.zeros(6, Xs.shape[-1], dtype=F64)

    def doubled(w: torch.Tensor, lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 2.0 * ridge(w, lam, X, y)  # the same minimiser

    exact = vmap(grad(lambda lam, X, y: ridge_closed_form(lam, X, y).sum()))(lams, Xs, ys)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=1):
        for loss in (ridge, doubled):
            leaf = lams.clone().requires_grad_()
            params = torchlbfgs.batched_minimize(
                loss, w0, leaf, Xs, ys, implicit_diff=True, compile={"backend": "eager"}, **TIGHT
            ).params
            (got,) = torch.autograd.grad(params.sum(), leaf)
            assert_close(got, exact, 1e-8)
    assert counters["stats"]["unique_graphs"] == 4  # a round and a CG iteration per loss


# ---- a nonconvex inner problem ----------------------------------------------------------------


def test_a_small_mlp_fit_at_a_local_minimum_matches_finite_differences() -> None:
    g = make_generator(9)
    inputs = torch.linspace(-2, 2, 24, dtype=F64).unsqueeze(-1)
    targets = torch.sin(2 * inputs).squeeze(-1) + 0.05 * torch.randn(24, generator=g, dtype=F64)
    params0 = {
        "w1": 0.8 * torch.randn(1, 6, generator=g, dtype=F64),
        "b1": 0.1 * torch.randn(6, generator=g, dtype=F64),
        "w2": 0.8 * torch.randn(6, 1, generator=g, dtype=F64),
    }

    def predict(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]).squeeze(-1)

    def fit(p: dict[str, torch.Tensor], targets: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
        weights = sum((leaf**2).sum() for leaf in p.values())
        return ((predict(p, inputs) - targets) ** 2).mean() + decay * weights

    probe = torch.tensor([[-1.3], [0.4], [1.7]], dtype=F64)

    def solution(targets: torch.Tensor, decay: torch.Tensor) -> dict[str, torch.Tensor]:
        result = torchlbfgs.minimize(
            fit, params0, targets, decay, implicit_diff=True, tolerance_grad=1e-10, tolerance_change=0.0,
            max_iter=2000,
        )  # fmt: skip
        assert bool(result.converged), torchlbfgs.status_message(result.status)
        params: dict[str, torch.Tensor] = result.params
        return params

    def newton_polished(targets: torch.Tensor, decay: torch.Tensor) -> dict[str, torch.Tensor]:
        """The local minimum next to the base one, to machine precision: solved from the base
        solution, then Newton steps (L-BFGS stops where f's rounding hides further decrease,
        |g| ~ 1e-10, too coarse for differences with small steps)."""
        result = torchlbfgs.minimize(fit, base, targets, decay, tolerance_grad=1e-10, tolerance_change=0.0)
        x, unravel = ravel_pytree(result.params)
        objective = lambda x: fit(unravel(x), targets, decay)  # noqa: E731
        for _ in range(3):
            x = x - torch.linalg.solve(torch.func.hessian(objective)(x), grad(objective)(x))
        assert float(torch.linalg.eigvalsh(torch.func.hessian(objective)(x))[0]) > 0  # a strict minimum
        params: dict[str, torch.Tensor] = unravel(x)
        return params

    decay = torch.tensor(1e-2, dtype=F64)
    d_targets, d_decay = grad(lambda *a: predict(solution(*a), probe).sum(), argnums=(0, 1))(targets, decay)
    base = solution(targets, decay)
    outer = lambda *a: predict(newton_polished(*a), probe).sum()  # noqa: E731
    h = 1e-6  # the derivative in decay changes by ~1% over 1e-4 (decay = 1e-2)
    direction = torch.randn(targets.shape, generator=g, dtype=F64)
    fd_targets = (outer(targets + h * direction, decay) - outer(targets - h * direction, decay)) / (2 * h)
    fd_decay = (outer(targets, decay + h) - outer(targets, decay - h)) / (2 * h)
    torch.testing.assert_close((d_targets * direction).sum(), fd_targets, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(d_decay, fd_decay, rtol=1e-5, atol=0.0)


# ---- bounds: free variables only ----------------------------------------------------------------


def test_with_bounds_only_the_free_variables_move_as_the_reduced_closed_form() -> None:
    """Nonnegative ridge: at w* the active variables sit at 0 (derivative 0, or the bound's
    when the bound depends on theta), the free ones are the ridge solution on the free columns
    with the active ones held at their bounds."""
    X, y, X_val, y_val = ridge_data(10, n=40, d=8)
    lam = torch.tensor(0.4, dtype=F64)
    lower = torch.zeros(8, dtype=F64)
    w0 = torch.ones(8, dtype=F64)
    result = torchlbfgs.minimize(ridge, w0, lam, X, y, bounds=(lower, None), **TIGHT)
    active = result.params <= 0
    assert 0 < int(active.sum()) < 8, "the data must make some, not all, bounds active"
    free = ~active

    def reduced_closed_form(lam: torch.Tensor, X: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        at_bounds = torch.where(active, lower, 0.0)
        w_free = ridge_closed_form(lam, X[:, free], y - X @ at_bounds)
        return at_bounds.index_put((free.nonzero().squeeze(-1),), w_free)

    def validation(w: torch.Tensor) -> torch.Tensor:
        return ((X_val @ w - y_val) ** 2).mean()

    def solved(lam: torch.Tensor, X: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        params: torch.Tensor = torchlbfgs.minimize(
            ridge, w0, lam, X, y, bounds=(lower, None), implicit_diff=True, **TIGHT
        ).params
        return params

    assert_close(reduced_closed_form(lam, X, lower), result.params, 1e-9)
    expected = jacrev(reduced_closed_form, argnums=(0, 1, 2))(lam, X, lower)
    got = jacrev(solved, argnums=(0, 1, 2))(lam, X, lower)
    for got_part, exact_part in zip(got, expected, strict=True):
        assert_close(got_part, exact_part, 1e-6)
    assert torch.equal(got[0][active], torch.zeros(int(active.sum()), dtype=F64))
    # the same through validation losses, with torch.autograd
    leaf = lam.clone().requires_grad_()
    validation(solved(leaf, X, lower)).backward()
    assert leaf.grad is not None
    assert_close(leaf.grad, grad(lambda lam: validation(reduced_closed_form(lam, X, lower)))(lam), 1e-6)


# ---- memory: the backward stores no iteration --------------------------------------------------


def _kept_for_backward(output: torch.Tensor) -> tuple[int, int]:
    """The autograd graph behind ``output``: its number of nodes, and the bytes of the tensors
    they keep for the backward pass (built-in nodes' ``_saved_*``, custom functions' saved
    tensors). torch.func's transforms refuse saved-tensor hooks, so the graph is walked."""
    seen: set[Any] = set()
    stack, kept = [output.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names = [name for name in dir(node) if name.startswith("_saved_")]
        values = [getattr(node, name) for name in names] + list(getattr(node, "saved_tensors", ()))
        for value in values:
            for tensor in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(tensor, torch.Tensor):
                    kept += tensor.numel() * tensor.element_size()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen), kept


def test_the_backward_stores_nothing_per_iteration() -> None:
    """10 or 500 iterations: the same graph behind the solution, holding the final memory and a
    few vectors; an unrolled solve's graph grows with its iterations."""
    n = 200
    scales = torch.logspace(0, 5, n, dtype=F64)  # ill-conditioned: 500 iterations do not converge
    target = torch.linspace(-1, 1, n, dtype=F64)
    theta = torch.ones(n, dtype=F64, requires_grad=True)

    def quadratic(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return 0.5 * (scales * (x - target * theta) ** 2).sum()

    def solved(iterations: int, implicit: bool, closure: bool = False) -> torch.Tensor:
        fun, args = (lambda x: quadratic(x, theta), ()) if closure else (quadratic, (theta,))
        result = torchlbfgs.minimize(
            fun, torch.zeros(n, dtype=F64), *args, implicit_diff=implicit, history_size=5,
            max_iter=iterations, tolerance_grad=0.0, tolerance_change=0.0,
        )  # fmt: skip
        assert int(result.n_iter) == iterations
        # what the solve computed, unlike params and value, is not joined to theta
        assert result.grad_norm.requires_grad == (not implicit)
        params: torch.Tensor = result.params
        return params

    short, long = _kept_for_backward(solved(10, True).sum()), _kept_for_backward(solved(500, True).sum())
    assert short == long == _kept_for_backward(solved(10, True, closure=True).sum())
    history_bytes = 2 * 5 * n * 8  # the final memory, the backward's preconditioner
    assert long[1] < history_bytes + 10 * n * 8  # and a few vectors of n
    unrolled_short = _kept_for_backward(solved(10, False).sum())
    unrolled_long = _kept_for_backward(solved(20, False).sum())
    assert unrolled_long[1] > unrolled_short[1] > long[1]  # the measure sees what unrolling keeps


# ---- the backward's linear solve ----------------------------------------------------------------


def test_conjugate_gradient_solves_batched_systems_and_reports_failures() -> None:
    g = make_generator(11)
    n = 12
    factors = torch.randn(32, n, n, generator=g, dtype=F64)
    spd = factors @ factors.mT + 0.1 * torch.eye(n, dtype=F64)
    rhs = torch.randn(32, n, generator=g, dtype=F64)

    def solve(matrix: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return conjugate_gradient(lambda p: matrix @ p, b, tolerance=1e-12, max_iter=200)

    u, report = vmap(solve)(spd, rhs)
    assert_close(u, torch.linalg.solve(spd, rhs), 1e-8)
    assert bool(report.converged.all())
    assert bool((report.residual <= 1e-12).all())
    assert bool((report.iterations >= 1).all())
    indefinite = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=F64))
    _, failed = solve(indefinite, torch.ones(3, dtype=F64))
    assert not bool(failed.converged)
    _, zero = solve(spd[0], torch.zeros(n, dtype=F64))
    assert bool(zero.converged)
    assert int(zero.iterations) == 0
    assert float(zero.residual) == 0.0


def test_the_lbfgs_memory_preconditions_the_backward_solve() -> None:
    """An ill-conditioned problem: preconditioned CG needs fewer Hessian-vector products than
    plain CG, and both give the closed form dx*/dtheta."""
    n = 20
    scales = torch.logspace(0, 3, n, dtype=F64)

    def fun(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return 0.5 * (scales * (x - theta) ** 2).sum() + 0.25 * ((x - theta) ** 4).sum()

    iterations = {}
    converged = {"tolerance_grad": 1e-9, "max_iter": 1000}
    for solver in SOLVERS:
        reports: list[torchlbfgs.BackwardSolve] = []
        options = torchlbfgs.ImplicitDiff(solver=solver, on_solve=reports.append)  # type: ignore[arg-type]
        theta = torch.linspace(-1, 1, n, dtype=F64).requires_grad_()
        x0 = torch.zeros(n, dtype=F64)
        x = torchlbfgs.minimize(fun, x0, theta, implicit_diff=options, **converged).params
        (x * torch.linspace(1, 2, n, dtype=F64)).sum().backward()
        assert theta.grad is not None
        torch.testing.assert_close(theta.grad, torch.linspace(1, 2, n, dtype=F64), rtol=1e-8, atol=0.0)
        iterations[solver] = int(reports[0].iterations)
    assert iterations["preconditioned_cg"] < iterations["cg"], iterations


def test_an_unconverged_backward_solve_warns() -> None:
    X, y, _, _ = ridge_data(12)
    lam = torch.tensor(0.1, dtype=F64, requires_grad=True)
    w = torchlbfgs.minimize(
        ridge, torch.zeros(X.shape[1], dtype=F64), lam, X, y,
        implicit_diff=torchlbfgs.ImplicitDiff(solver="cg", max_iter=2),
    ).params  # fmt: skip
    with pytest.warns(torchlbfgs.BackwardSolveWarning, match=r"1 of 1 problem\(s\).*at most 2 iterations"):
        w.sum().backward()
    lam.grad = None
    w = torchlbfgs.minimize(ridge, torch.zeros(X.shape[1], dtype=F64), lam, X, y, implicit_diff=True).params
    with warnings.catch_warnings():
        warnings.simplefilter("error", torchlbfgs.BackwardSolveWarning)
        w.sum().backward()


def test_bad_implicit_diff_options_are_refused() -> None:
    fun = lambda x: (x**2).sum()  # noqa: E731
    x0 = torch.ones(2, dtype=F64)
    with pytest.raises(ValueError, match="value_and_grad=False"):
        torchlbfgs.minimize(lambda x: (fun(x), 2 * x), x0, value_and_grad=True, implicit_diff=True)
    with pytest.raises(ValueError, match="value_and_grad=False"):
        torchlbfgs.batched_minimize(
            lambda x: (fun(x), 2 * x), x0.expand(3, 2), value_and_grad=True, implicit_diff=True
        )
    with pytest.raises(TypeError, match="implicit_diff must be"):
        torchlbfgs.minimize(fun, x0, implicit_diff="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ImplicitDiff\.solver"):
        torchlbfgs.ImplicitDiff(solver="qr")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ImplicitDiff\.max_iter"):
        torchlbfgs.ImplicitDiff(max_iter=0)
    with pytest.raises(ValueError, match=r"ImplicitDiff\.tolerance"):
        torchlbfgs.ImplicitDiff(tolerance=-1.0)
