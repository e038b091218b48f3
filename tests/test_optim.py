"""torchlbfgs.LBFGS against torch.optim.LBFGS, side by side, plus what torch cannot do."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from problems import Problem, classic_problems

import torchlbfgs

Tensor = torch.Tensor

SETTINGS = [
    pytest.param({"line_search_fn": None, "lr": 0.1, "history_size": 4, "max_iter": 7}, id="fixed-lr0.1"),
    pytest.param({"line_search_fn": None, "lr": 0.5, "history_size": 3, "max_iter": 20}, id="fixed-lr0.5"),
    pytest.param({"line_search_fn": "strong_wolfe", "history_size": 5, "max_iter": 7}, id="wolfe-h5"),
    pytest.param({"line_search_fn": "strong_wolfe", "history_size": 3, "max_iter": 20}, id="wolfe-h3"),
    pytest.param(
        {"line_search_fn": "strong_wolfe", "history_size": 4, "max_iter": 9, "max_eval": 10},
        id="wolfe-budget",
    ),
]


def run_optimizer(
    optimizer_class: type[torch.optim.Optimizer], problem: Problem, steps: int, **options: Any
) -> tuple[list[Tensor], list[int], list[float]]:
    """Iterates, cumulative closure calls and returned losses after each ``step``."""
    x = torch.nn.Parameter(problem.x0.clone())
    optimizer = optimizer_class([x], **options)
    calls = 0

    def closure() -> Tensor:
        nonlocal calls
        calls += 1
        optimizer.zero_grad()
        loss = problem.fun(x)
        loss.backward()
        return loss

    iterates, counts, losses = [], [], []
    for _ in range(steps):
        losses.append(float(optimizer.step(closure).detach()))
        iterates.append(x.detach().clone())
        counts.append(calls)
    return iterates, counts, losses


@pytest.mark.parametrize("options", SETTINGS)
@pytest.mark.parametrize("problem", classic_problems(), ids=lambda p: p.name)
def test_same_iterates_and_closure_calls_as_torch(problem: Problem, options: dict[str, Any]) -> None:
    theirs = run_optimizer(torch.optim.LBFGS, problem, 6, **options)
    ours = run_optimizer(torchlbfgs.LBFGS, problem, 6, **options)
    assert ours[1] == theirs[1], "closure evaluations differ"
    assert ours[2] == pytest.approx(theirs[2], rel=1e-9, abs=1e-300)
    for mine, reference in zip(ours[0], theirs[0], strict=True):
        scale = reference.abs().max().clamp(min=1.0)
        assert ((mine - reference).abs().max() / scale).item() <= 1e-9
    total_iterations_bound = 6 * options["max_iter"]
    assert total_iterations_bound > options["history_size"]  # the history wraps


def state_after_steps(problem: Problem, steps: int, **options: Any) -> dict[str, Any]:
    """The state leaves of a ``torchlbfgs.LBFGS`` after ``steps`` steps on ``problem``."""
    x = torch.nn.Parameter(problem.x0.clone())
    optimizer = torchlbfgs.LBFGS([x], **options)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = problem.fun(x)
        loss.backward()
        return loss

    for _ in range(steps):
        optimizer.step(closure)
    return optimizer.state_dict()["state"][0]  # type: ignore[no-any-return]


def test_history_wraps_in_the_parity_runs() -> None:
    problem = classic_problems()[1]  # Rosenbrock n=100: many iterations per step
    leaves = state_after_steps(problem, 3, history_size=3, max_iter=20, line_search_fn="strong_wolfe")
    assert int(leaves["n_pairs"]) == 3
    assert int(leaves["iteration"]) > 3


def test_refused_pairs_mid_step_match_torch() -> None:
    """Fixed steps on a nonconvex function cross negative curvature, so the curvature test
    refuses pairs in the middle of a step: the adapter, which plans each next iteration
    betting that the pair was kept, still takes torch's iterates and closure calls."""
    problem = Problem("sine valley", lambda x: (torch.sin(3 * x) + 0.1 * x * x).sum(),
                      torch.linspace(-2, 2, 5, dtype=torch.float64))  # fmt: skip
    options = {"lr": 0.5, "max_iter": 20, "history_size": 100}
    theirs = run_optimizer(torch.optim.LBFGS, problem, 3, **options)
    ours = run_optimizer(torchlbfgs.LBFGS, problem, 3, **options)
    assert ours[1] == theirs[1]
    for mine, reference in zip(ours[0], theirs[0], strict=True):
        assert torch.allclose(mine, reference, rtol=1e-12, atol=1e-12)
    leaves = state_after_steps(problem, 3, **options)
    # one candidate pair per iteration but the first, the last still pending: fewer were kept
    assert int(leaves["n_pairs"]) < int(leaves["iteration"]) - 2


def test_float32_matches_torch() -> None:
    problem = classic_problems(torch.float32)[0]
    for options in ({"line_search_fn": None, "lr": 0.1}, {"line_search_fn": "strong_wolfe"}):
        theirs = run_optimizer(torch.optim.LBFGS, problem, 4, history_size=5, max_iter=10, **options)
        ours = run_optimizer(torchlbfgs.LBFGS, problem, 4, history_size=5, max_iter=10, **options)
        assert ours[1] == theirs[1]
        for mine, reference in zip(ours[0], theirs[0], strict=True):
            torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"], ids=str)
def test_a_step_that_changes_no_coordinate_does_not_stop_the_adapter(line_search_fn: str | None) -> None:
    """float32 params near 1e8 (spacing 8) and torch's first step min(1, 1/|g|_1) = 1e-10 move
    no coordinate; torch has no test for that and goes on (with ``tolerance_change=0``), so the
    adapter must too, where the functional core would stop with STEP_TOLERANCE."""
    problem = Problem(
        name="far quadratic", fun=lambda x: 0.5 * (x * x).sum(), x0=torch.full((100,), 1e8), solution=None
    )
    options = {"line_search_fn": line_search_fn, "history_size": 5, "max_iter": 6, "tolerance_change": 0.0}
    theirs = run_optimizer(torch.optim.LBFGS, problem, 2, **options)
    ours = run_optimizer(torchlbfgs.LBFGS, problem, 2, **options)
    assert ours[1] == theirs[1]
    assert theirs[1][0] > 2  # torch did go on past the stalled first iteration
    for mine, reference in zip(ours[0], theirs[0], strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-6)
    assert float(ours[0][-1].abs().max()) < 1e7  # and got away from the start


def test_constructor_matches_torch_signature() -> None:
    ours = inspect.signature(torchlbfgs.LBFGS.__init__).parameters
    theirs = inspect.signature(torch.optim.LBFGS.__init__).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    # beyond torch's: the bounds (L-BFGS-B), keyword-only and off by default
    assert [(name, ours[name].kind, ours[name].default) for name in list(ours)[len(theirs) :]] == [
        ("lower", inspect.Parameter.KEYWORD_ONLY, None),
        ("upper", inspect.Parameter.KEYWORD_ONLY, None),
    ]
    for name in theirs:
        assert ours[name].default == theirs[name].default, name
    x = torch.nn.Parameter(torch.zeros(3))
    ours_defaults = torchlbfgs.LBFGS([x]).defaults
    theirs_defaults = torch.optim.LBFGS([x]).defaults
    assert ours_defaults == theirs_defaults  # no bounds: not even an option in the groups


def test_step_returns_the_first_closure_result() -> None:
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = torchlbfgs.LBFGS([x])
    returned: list[Tensor] = []

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = (x**2).sum()
        loss.backward()
        returned.append(loss)
        return loss

    assert optimizer.step(closure) is returned[0]


def test_step_needs_a_closure() -> None:
    optimizer = torchlbfgs.LBFGS([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="needs a closure"):
        optimizer.step(None)  # type: ignore[arg-type]


# --- parameter groups ---------------------------------------------------------------------


def _two_tensor_problem() -> tuple[Callable[[Tensor, Tensor], Tensor], Tensor, Tensor]:
    generator = torch.Generator().manual_seed(5)
    a = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    target = torch.randn(6, generator=generator, dtype=torch.float64)

    def fun(w: Tensor, b: Tensor) -> Tensor:
        return ((a @ w + b - target) ** 2).sum() + 0.1 * (w**4).sum()

    return fun, torch.zeros(4, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)


def _run_groups(make_optimizer: Callable[[Tensor, Tensor], torch.optim.Optimizer], steps: int = 4):
    fun, w0, b0 = _two_tensor_problem()
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    optimizer = make_optimizer(w, b)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = fun(w, b)
        loss.backward()
        return loss

    for _ in range(steps):
        optimizer.step(closure)
    return w.detach(), b.detach(), optimizer


def test_param_groups_are_optimized_jointly() -> None:
    options = {"line_search_fn": "strong_wolfe", "history_size": 3, "max_iter": 5}
    w_groups, b_groups, _ = _run_groups(
        lambda w, b: torchlbfgs.LBFGS([{"params": [w]}, {"params": [b]}], **options)
    )
    w_torch, b_torch, _ = _run_groups(lambda w, b: torch.optim.LBFGS([w, b], **options))
    assert torch.equal(w_groups, w_torch)
    assert torch.equal(b_groups, b_torch)


def test_groups_with_different_options_are_refused() -> None:
    w, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="'lr' must be the same"):
        torchlbfgs.LBFGS([{"params": [w]}, {"params": [b], "lr": 0.5}])
    with pytest.raises(ValueError, match="'history_size' must be the same"):
        torchlbfgs.LBFGS([{"params": [w], "history_size": 3}, {"params": [b]}])
    optimizer = torchlbfgs.LBFGS([w])
    with pytest.raises(ValueError, match="'line_search_fn' must be the same"):
        optimizer.add_param_group({"params": [b], "line_search_fn": "strong_wolfe"})
    assert len(optimizer.param_groups) == 1  # the refused group was not added


def test_scheduler_changing_lr_in_every_group_is_allowed_and_differing_lr_is_refused() -> None:
    w, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torchlbfgs.LBFGS([{"params": [w]}, {"params": [b]}], lr=1.0)
    optimizer.param_groups[1]["lr"] = 0.25

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = (w - 1).pow(2).sum() + b.pow(2).sum()
        loss.backward()
        return loss

    before = (w.detach().clone(), b.detach().clone())
    with pytest.raises(ValueError, match="'lr' must be the same"):
        optimizer.step(closure)
    assert torch.equal(w.detach(), before[0])
    assert torch.equal(b.detach(), before[1])


def test_add_param_group_after_steps_extends_the_problem() -> None:
    fun, w0, b0 = _two_tensor_problem()
    w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    optimizer = torchlbfgs.LBFGS(
        [w],
        line_search_fn="strong_wolfe",
        history_size=50,
        max_iter=5,
        tolerance_grad=1e-12,
        tolerance_change=0,
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = fun(w, b)
        loss.backward()
        return loss

    optimizer.step(closure)
    optimizer.step(closure)
    before = optimizer.state_dict()["state"][0]
    optimizer.add_param_group({"params": [b]})
    optimizer.step(closure)
    after = optimizer.state_dict()["state"][0]
    assert after["grad"].shape == (5,)
    assert after["s_history"].shape == (50, 5)
    # The pairs stored before b joined are kept (no wrap-around yet), with zeros for b.
    kept = int(before["n_pairs"])
    assert kept > 0
    assert torch.equal(after["s_history"][:kept, :4], before["s_history"][:kept])
    assert torch.equal(after["s_history"][:kept, 4], torch.zeros(kept, dtype=torch.float64))
    # b is now optimized: run to convergence and compare with a joint solve from the start.
    for _ in range(30):
        optimizer.step(closure)
    w_joint, b_joint, _ = _run_groups(
        lambda w, b: torch.optim.LBFGS(
            [w, b], line_search_fn="strong_wolfe", max_iter=200, tolerance_grad=1e-12, tolerance_change=0
        ),
        3,
    )
    torch.testing.assert_close(b.detach(), b_joint, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.detach(), w_joint, rtol=1e-6, atol=1e-6)


# --- complex parameters -------------------------------------------------------------------


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_complex_parameters_match_torch(line_search_fn: str | None) -> None:
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(5, 3, dtype=torch.complex128, generator=generator)
    target = torch.randn(5, dtype=torch.complex128, generator=generator)

    def run(optimizer_class: type[torch.optim.Optimizer]) -> Tensor:
        z = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex128))
        optimizer = optimizer_class([z], lr=0.2, history_size=3, max_iter=10, line_search_fn=line_search_fn)

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = (a @ z - target).abs().pow(2).sum()
            loss.backward()
            return loss

        for _ in range(3):
            optimizer.step(closure)
        return z.detach()

    torch.testing.assert_close(run(torchlbfgs.LBFGS), run(torch.optim.LBFGS), rtol=1e-12, atol=1e-14)


# --- a closure that raises ------------------------------------------------------------------


class ClosureError(RuntimeError):
    pass


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_closure_raising_leaves_an_iteration_boundary_that_continues(line_search_fn: str | None) -> None:
    """A closure that raises at its k-th call of a step: the parameters go back to the start of
    the inner iteration that call belonged to (the first call: nothing changes), the stored
    state describes exactly that point (its value and gradient are f and grad f there, nothing
    pending, everything finite), and steps from there go on to the solution."""
    problem = classic_problems()[0]
    options = {"lr": 0.2 if line_search_fn is None else 1, "history_size": 3, "max_iter": 6,
               "line_search_fn": line_search_fn}  # fmt: skip

    def optimizer_after_two_steps() -> tuple[torchlbfgs.LBFGS, torch.nn.Parameter, list[Tensor], Any]:
        x = torch.nn.Parameter(problem.x0.clone())
        optimizer = torchlbfgs.LBFGS([x], **options)
        seen: list[Tensor] = []  # the point of every closure call
        fail_at: list[int | None] = [None]

        def closure() -> Tensor:
            seen.append(x.detach().clone())
            if len(seen) == fail_at[0]:
                raise ClosureError
            optimizer.zero_grad()
            loss = problem.fun(x)
            loss.backward()
            return loss

        optimizer.step(closure)
        optimizer.step(closure)
        seen.clear()
        closure.fail_at = fail_at  # type: ignore[attr-defined]
        return optimizer, x, seen, closure

    clean, _, clean_points, clean_closure = optimizer_after_two_steps()
    clean.step(clean_closure)
    calls = len(clean_points)
    assert calls > 2
    for k in range(1, calls + 1):
        optimizer, x, _, closure = optimizer_after_two_steps()
        before = {name: value.clone() for name, value in optimizer.state_dict()["state"][0].items()
                  if isinstance(value, Tensor)}  # fmt: skip
        x_before = x.detach().clone()
        closure.fail_at[0] = k
        with pytest.raises(ClosureError):
            optimizer.step(closure)
        leaves = optimizer.state_dict()["state"][0]
        if k == 1:  # the first call failed: nothing was changed
            assert torch.equal(x.detach(), x_before)
            assert all(torch.equal(leaves[name], value) for name, value in before.items())
            continue
        # the run evaluated the clean run's points up to the failure; it is back at one of them
        assert any(torch.equal(x.detach(), point) for point in clean_points[: k - 1]), k
        for name, value in leaves.items():
            if isinstance(value, Tensor) and value.is_floating_point():
                assert bool(torch.isfinite(value).all()), name
        assert not bool(leaves["has_pending"])
        here = x.detach().clone().requires_grad_(True)
        value = problem.fun(here)
        (grad,) = torch.autograd.grad(value, here)
        assert torch.equal(leaves["value"], value.detach()), k
        assert torch.equal(leaves["grad"], grad), k
        closure.fail_at[0] = None
        for _ in range(30):
            optimizer.step(closure)
        assert problem.solution is not None
        torch.testing.assert_close(x.detach(), problem.solution, rtol=0, atol=1e-4)


# --- torch.optim machinery -----------------------------------------------------------------


def test_step_hooks_and_zero_grad() -> None:
    x = torch.nn.Parameter(torch.tensor([3.0, -1.0]))
    optimizer = torchlbfgs.LBFGS([x], line_search_fn="strong_wolfe")
    seen: list[str] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: seen.append("post"))

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = (x**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    assert seen == ["pre", "post"]
    optimizer.zero_grad()
    assert x.grad is None


def test_lr_scheduler_drives_the_step_size_as_in_torch() -> None:
    problem = classic_problems()[2]  # Beale

    def run(optimizer_class: type[torch.optim.Optimizer]) -> Tensor:
        x = torch.nn.Parameter(problem.x0.clone())
        optimizer = optimizer_class([x], lr=0.5, max_iter=5, history_size=4)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = problem.fun(x)
            loss.backward()
            return loss

        for _ in range(4):
            optimizer.step(closure)
            scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 0.5**4)
        return x.detach()

    ours, theirs = run(torchlbfgs.LBFGS), run(torch.optim.LBFGS)
    assert torch.equal(ours, theirs)
    without_scheduler = run_optimizer(torchlbfgs.LBFGS, problem, 4, lr=0.5, max_iter=5, history_size=4)[0][-1]
    assert not torch.equal(ours, without_scheduler)


def test_tensor_lr() -> None:
    problem = classic_problems()[0]
    ours = run_optimizer(torchlbfgs.LBFGS, problem, 3, lr=torch.tensor(0.3, dtype=torch.float64), max_iter=5)
    theirs = run_optimizer(
        torch.optim.LBFGS, problem, 3, lr=torch.tensor(0.3, dtype=torch.float64), max_iter=5
    )
    assert torch.equal(ours[0][-1], theirs[0][-1])


def _rosenbrock_optimizer(**options: Any) -> tuple[torchlbfgs.LBFGS, Callable[[], Tensor], Tensor]:
    x = torch.nn.Parameter(torch.tensor([-1.2, 1.0, -0.5, 0.8], dtype=torch.float64))
    optimizer = torchlbfgs.LBFGS([x], history_size=3, max_iter=4, **options)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()
        loss.backward()
        return loss

    return optimizer, closure, x


@pytest.mark.parametrize("edit", ["replace s_history", "scale rho in place", "replace the dict"])
def test_state_edited_between_steps_is_what_the_next_step_uses(edit: str) -> None:
    """The adapter reuses, from one step to the next, the state it handed back (and views of
    its buffers) instead of rebuilding it from ``optimizer.state``; an edit of the leaves made
    in between must still count: the edited optimizer continues exactly as a fresh one loaded
    with the same edited state."""
    edited, closure, x = _rosenbrock_optimizer(line_search_fn="strong_wolfe")
    for _ in range(2):  # the memory (3 pairs) is full
        edited.step(closure)
    leaves = edited.state[x]
    if edit == "replace s_history":
        leaves["s_history"] = leaves["s_history"] * 0.5
    elif edit == "scale rho in place":
        leaves["rho"].mul_(0.5)
    else:
        edited.state[x] = dict(leaves, s_history=leaves["s_history"] * 0.5)
    fresh, fresh_closure, fresh_x = _rosenbrock_optimizer(line_search_fn="strong_wolfe")
    with torch.no_grad():
        fresh_x.copy_(x)
    fresh.load_state_dict(edited.state_dict())
    unedited, unedited_closure, unedited_x = _rosenbrock_optimizer(line_search_fn="strong_wolfe")
    for _ in range(2):
        unedited.step(unedited_closure)
    for _ in range(2):
        edited.step(closure), fresh.step(fresh_closure), unedited.step(unedited_closure)
    assert torch.equal(x, fresh_x)
    assert not torch.equal(x, unedited_x)  # the edit changed the course: the check can fail


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"], ids=str)
def test_a_step_frees_the_previous_steps_vectors_as_it_goes(line_search_fn: str | None) -> None:
    """What keeps a step's peak memory at torch's (bench/memory.py): the previous step's
    gradient and direction are freed once the step's first iteration has used them, before the
    closure is called again, and nothing (the adapter, a cache) keeps them alive."""
    x = torch.nn.Parameter(torch.randn(1000, dtype=torch.float64))
    optimizer = torchlbfgs.LBFGS([x], max_iter=5, history_size=3, line_search_fn=line_search_fn)
    alive: list[tuple[bool, bool]] = []
    previous: list[Any] = []

    def closure() -> Tensor:
        if previous:
            alive.append((previous[0]() is not None, previous[1]() is not None))
        optimizer.zero_grad()
        loss = ((x - 1) ** 4).sum() + (x**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    leaves = optimizer.state[x]
    previous.extend((weakref.ref(leaves["grad"]), weakref.ref(leaves["pending_direction"])))
    del leaves
    optimizer.step(closure)
    assert alive[0] == (True, True)  # the step's first evaluation: the pending pair needs them
    assert len(alive) > 1
    assert all(state == (False, False) for state in alive[1:]), alive


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"], ids=str)
def test_a_step_works_in_place_only_on_vectors_it_made(line_search_fn: str | None) -> None:
    """A step reuses its own dead vectors (the previous direction becomes s, the previous
    gradient y, ...), never the state it started from: leaves a user holds from before the
    step keep their values (the history rows excepted: documented as updated in place)."""
    optimizer, closure, x = _rosenbrock_optimizer(line_search_fn=line_search_fn)
    optimizer.step(closure)
    held = {
        name: leaf
        for name, leaf in optimizer.state[x].items()
        if isinstance(leaf, Tensor) and name not in ("s_history", "y_history", "rho")
    }
    before = {name: leaf.clone() for name, leaf in held.items()}
    assert bool(held["has_pending"])  # the step below starts with the pending pair of this one
    optimizer.step(closure)
    assert optimizer.state[x]["iteration"] > before["iteration"]
    for name, leaf in held.items():
        assert torch.equal(leaf, before[name]), name


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("max_iter", -1, ValueError),
        ("line_search_fn", "wolfe", ValueError),
        ("tolerance_grad", "tiny", TypeError),
    ],
)
def test_options_changed_between_steps_are_checked_again(option: str, value: Any, error: type) -> None:
    """The adapter reuses the last step's checked options while the groups hold the same
    values; a value changed between steps is checked (and used) again."""
    optimizer, closure, x = _rosenbrock_optimizer()
    optimizer.step(closure)
    before = x.detach().clone()
    optimizer.param_groups[0][option] = value
    with pytest.raises(error, match=option):
        optimizer.step(closure)
    assert torch.equal(x, before)
    optimizer.param_groups[0][option] = optimizer.defaults[option]
    optimizer.param_groups[0]["max_iter"] = 1  # used at once: one iteration, no evaluation after it
    evaluations = optimizer.state[x]["func_evals"]
    optimizer.step(closure)
    assert optimizer.state[x]["func_evals"] - evaluations == 1
