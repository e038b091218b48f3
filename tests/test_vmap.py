"""``torch.func.vmap`` of ``init`` and ``update`` against a Python loop over the same problems.

A batch holds *different* problems of one family, batched by their data: SPD quadratics of
different conditioning (``A_i, b_i``), logistic regressions on different data sets, Rosenbrock
from different starting points. The problems of a batch stop at very different iterations, so
the batch also checks that a stopped problem is frozen while the others keep going.

The reference is the unbatched ``init``/``update`` run in a Python loop. Batched kernels
(``bmm`` for ``A @ x``, batched dot products inside the solver) round differently from their
unbatched forms, so agreement is to a tolerance, not bitwise:

* one step: each vmapped iterate is compared with the unbatched ``update`` applied to the same
  previous (vmapped) iterate, to 1e-12 in float64 and 1e-5 in float32;
* whole run (float64): the vmapped trajectory is compared with an independent loop trajectory,
  with identical integer fields and floats to 1e-8 (rounding differences compound over the run).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from assertions import bitwise_equal
from problems import Problem, classic_problems, logistic_regression, rosenbrock, spd_quadratic

import torchlbfgs
from torchlbfgs import LBFGSState, StopReason

Tensor = torch.Tensor

LINE_SEARCHES = ("strong_wolfe", "more_thuente", "backtracking", None)
DTYPES = (torch.float64, torch.float32)

# Tolerance of one vmapped step against the unbatched step from the same point.
STEP_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
# rho = 1/(s'y) and gamma = s'y/y'y amplify the rounding of s and y by the cancellation in s'y
# near a minimum; s and y themselves are held to STEP_TOLERANCE.
CURVATURE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3}
CURVATURE_FIELDS = ("rho", "gamma")
# Whole float64 trajectories, vmapped against looped.
TRAJECTORY_TOLERANCE = 1e-8

# Under vmap the line searches run a fixed-length masked loop of max_ls + 1 evaluations; a
# short one keeps the test fast and is the same option on both sides of every comparison.
MAX_LS = 6
# In float32, tolerance_change = 1e-9 would compare value changes far below the rounding of
# f (~1e-7 relative), where batched and unbatched rounding could flip a stopping test.
FLOAT32_TOLERANCES = {"tolerance_grad": 1e-5, "tolerance_change": 1e-6}
MAX_UPDATES = 20


@dataclass(frozen=True)
class Batch:
    """``B`` problems ``fun(x, *data_i)`` with starting points ``x0[i]``."""

    fun: Callable[..., Tensor]
    x0: Tensor  # (B, n)
    data: tuple[Tensor, ...]  # each (B, ...)

    @property
    def size(self) -> int:
        return self.x0.shape[0]

    def problem_fun(self, i: int) -> Callable[[Tensor], Tensor]:
        data = tuple(d[i] for d in self.data)
        return lambda x: self.fun(x, *data)


def _captured(problem: Problem, *names: str) -> tuple[Any, ...]:
    """The data tensors a ``problems.py`` objective closes over."""
    nonlocals = inspect.getclosurevars(problem.fun).nonlocals
    return tuple(nonlocals[name] for name in names)


def quadratic(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return 0.5 * x @ (a @ x) - b @ x


def logistic(w: Tensor, features: Tensor, labels: Tensor, lam: Tensor) -> Tensor:
    logits = features @ w
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels) + 0.5 * lam * (w @ w)


def rosenbrock_batch_fun(x: Tensor) -> Tensor:
    return rosenbrock(x)


def quadratic_batch(dtype: torch.dtype) -> tuple[Batch, list[Problem]]:
    # Condition 1 is A = I: solved in two iterations; condition 30 needs many more.
    problems = [spd_quadratic(8, cond, seed=i, dtype=dtype) for i, cond in enumerate((1.0, 10.0, 30.0))]
    a, b = (torch.stack(leaves) for leaves in zip(*(_captured(p, "a", "b") for p in problems), strict=True))
    return Batch(quadratic, torch.stack([p.x0 for p in problems]), (a, b)), problems


def logistic_batch(dtype: torch.dtype) -> tuple[Batch, list[Problem]]:
    # Strong regularisation makes a problem well conditioned and quick; weak makes it slow.
    problems = [
        logistic_regression(40, 5, lam, seed=i, dtype=dtype) for i, lam in enumerate((10.0, 0.1, 1e-3))
    ]
    captured = [_captured(p, "features", "labels", "lam") for p in problems]
    features = torch.stack([c[0] for c in captured])
    labels = torch.stack([c[1] for c in captured])
    lam = torch.tensor([c[2] for c in captured], dtype=dtype)
    return Batch(logistic, torch.stack([p.x0 for p in problems]), (features, labels, lam)), problems


def rosenbrock_batch(dtype: torch.dtype) -> tuple[Batch, list[Problem]]:
    # From the minimiser itself (stops at once), from near it, and from the standard start.
    mgh = next(p for p in classic_problems(dtype) if p.name == "rosenbrock2")
    assert mgh.solution is not None
    starts = [mgh.solution, 0.8 * mgh.solution, mgh.x0]
    problems = [Problem("rosenbrock2", rosenbrock, start, mgh.solution) for start in starts]
    return Batch(rosenbrock_batch_fun, torch.stack(starts), ()), problems


BATCHES = {"quadratic": quadratic_batch, "logistic": logistic_batch, "rosenbrock": rosenbrock_batch}


def _options(line_search: str | None, dtype: torch.dtype) -> dict[str, Any]:
    options: dict[str, Any] = {"line_search": line_search, "max_ls": MAX_LS}
    if dtype == torch.float32:
        options.update(FLOAT32_TOLERANCES)
    return options


def vmapped_init(batch: Batch) -> LBFGSState:
    def one(x: Tensor, *data: Tensor) -> LBFGSState:
        return torchlbfgs.init(lambda p: batch.fun(p, *data), x)

    return torch.func.vmap(one)(batch.x0, *batch.data)


def vmapped_update(
    batch: Batch, params: Tensor, state: LBFGSState, options: dict[str, Any]
) -> tuple[Tensor, LBFGSState]:
    def one(x: Tensor, s: LBFGSState, *data: Tensor) -> tuple[Tensor, LBFGSState]:
        return torchlbfgs.update(lambda p: batch.fun(p, *data), x, s, **options)

    return torch.func.vmap(one)(params, state, *batch.data)


def state_slice(state: LBFGSState, i: int) -> LBFGSState:
    return LBFGSState(*(leaf[i] for leaf in state))


def assert_leaf_close(actual: Tensor, expected: Tensor, tolerance: float, what: str) -> None:
    """Integer leaves exactly; floating leaves to ``tolerance`` relative to the leaf's magnitude,
    with an absolute floor of ``tolerance`` (so entries near zero compare sensibly)."""
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    if not actual.is_floating_point() or actual.numel() == 0:
        assert torch.equal(actual, expected), f"{what}: {actual} != {expected}"
        return
    error = (actual - expected).abs().max().item()
    bound = tolerance * (1.0 + expected.abs().max().item())
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g}"


def assert_state_close(
    actual: tuple[Tensor, LBFGSState],
    expected: tuple[Tensor, LBFGSState],
    tolerance: float,
    curvature_tolerance: float,
    what: str,
) -> None:
    assert_leaf_close(actual[0], expected[0], tolerance, f"{what}: params")
    for name, a, e in zip(LBFGSState._fields, actual[1], expected[1], strict=True):
        tol = curvature_tolerance if name in CURVATURE_FIELDS else tolerance
        assert_leaf_close(a, e, tol, f"{what}: state.{name}")


def test_batches_reproduce_their_problems() -> None:
    """The batched objectives are the ``problems.py`` objectives, problem by problem."""
    generator = torch.Generator().manual_seed(0)
    for make in BATCHES.values():
        batch, problems = make(torch.float64)
        for i, problem in enumerate(problems):
            x = torch.randn(batch.x0.shape[1], generator=generator, dtype=torch.float64)
            torch.testing.assert_close(batch.problem_fun(i)(x), problem.fun(x), rtol=1e-14, atol=0)
            torch.testing.assert_close(batch.x0[i], problem.x0, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", BATCHES)
def test_vmapped_init_matches_loop(family: str, dtype: torch.dtype) -> None:
    batch, _ = BATCHES[family](dtype)
    batched = vmapped_init(batch)
    assert isinstance(batched, LBFGSState)
    for i in range(batch.size):
        looped = torchlbfgs.init(batch.problem_fun(i), batch.x0[i])
        assert_state_close(
            (batch.x0[i], state_slice(batched, i)),
            (batch.x0[i], looped),
            STEP_TOLERANCE[dtype],
            STEP_TOLERANCE[dtype],
            f"init problem {i}",
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("line_search", LINE_SEARCHES, ids=str)
@pytest.mark.parametrize("family", BATCHES)
def test_vmapped_update_matches_loop(family: str, line_search: str | None, dtype: torch.dtype) -> None:
    batch, _ = BATCHES[family](dtype)
    options = _options(line_search, dtype)
    tolerance, curvature_tolerance = STEP_TOLERANCE[dtype], CURVATURE_TOLERANCE[dtype]

    params, state = batch.x0, vmapped_init(batch)
    looped = [(batch.x0[i], torchlbfgs.init(batch.problem_fun(i), batch.x0[i])) for i in range(batch.size)]
    frozen: dict[int, tuple[int, Tensor, LBFGSState]] = {}  # problem -> (update, params, state) at its stop
    freeze_checks = 0
    updates = 0
    while updates < MAX_UPDATES and not (
        len(frozen) == batch.size and all(updates - stop > 2 for stop, _, _ in frozen.values())
    ):
        k, updates = updates, updates + 1
        previous_params, previous_state = params, state
        params, state = vmapped_update(batch, params, state, options)
        for i in range(batch.size):
            fun_i = batch.problem_fun(i)
            here = (params[i], state_slice(state, i))

            one_step = torchlbfgs.update(fun_i, previous_params[i], state_slice(previous_state, i), **options)
            assert_state_close(here, one_step, tolerance, curvature_tolerance, f"update {k}, problem {i}")

            if dtype == torch.float64:
                looped[i] = torchlbfgs.update(fun_i, *looped[i], **options)
                assert_state_close(
                    here,
                    looped[i],
                    TRAJECTORY_TOLERANCE,
                    TRAJECTORY_TOLERANCE,
                    f"run to update {k}, problem {i}",
                )

            if i in frozen:
                _, frozen_params, frozen_state = frozen[i]
                assert bitwise_equal(params[i], frozen_params), f"update {k}: stopped problem {i} moved"
                for name, a, b in zip(LBFGSState._fields, here[1], frozen_state, strict=True):
                    assert bitwise_equal(a, b), f"update {k}: state.{name} of stopped problem {i} changed"
                assert state.n_evals[i] == frozen_state.n_evals
                freeze_checks += 1
            elif state.status[i] != StopReason.RUNNING:
                frozen[i] = (k, params[i].clone(), LBFGSState(*(leaf.clone() for leaf in here[1])))

    # The batch did what it is here for: problems stopped at very different updates, and the
    # early ones stayed frozen while the others kept going.
    stops = [frozen[i][0] if i in frozen else updates for i in range(batch.size)]
    assert len(frozen) >= 1, "no problem of the batch stopped"
    assert max(stops) - min(stops) >= 5, f"problems stopped at updates {stops}"
    assert freeze_checks >= 5


def _least_squares(params: dict[str, Tensor], inputs: Tensor, targets: Tensor) -> Tensor:
    predictions = inputs @ params["w"] + params["b"]
    return 0.5 * ((predictions - targets) ** 2).mean() + 1e-3 * (params["w"] ** 2).sum()


@pytest.mark.parametrize("line_search", LINE_SEARCHES, ids=str)
def test_vmap_over_pytree_params(line_search: str | None) -> None:
    """Params ``{"w": (3, 2), "b": (2,)}`` batched along a leading axis of both leaves."""
    generator = torch.Generator().manual_seed(3)
    batch_size = 3
    inputs = torch.randn(batch_size, 12, 3, generator=generator, dtype=torch.float64)
    targets = torch.randn(batch_size, 12, 2, generator=generator, dtype=torch.float64)
    params = {
        "w": torch.randn(batch_size, 3, 2, generator=generator, dtype=torch.float64),
        "b": torch.randn(batch_size, 2, generator=generator, dtype=torch.float64),
    }
    options = {"line_search": line_search, "max_ls": MAX_LS}

    def init_one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> LBFGSState:
        return torchlbfgs.init(lambda q: _least_squares(q, x, y), p, history_size=4)

    def update_one(
        p: dict[str, Tensor], s: LBFGSState, x: Tensor, y: Tensor
    ) -> tuple[dict[str, Tensor], LBFGSState]:
        return torchlbfgs.update(lambda q: _least_squares(q, x, y), p, s, **options)

    state = torch.func.vmap(init_one)(params, inputs, targets)
    assert state.grad.shape == (batch_size, 3 * 2 + 2)
    for k in range(6):
        previous_params, previous_state = params, state
        params, state = torch.func.vmap(update_one)(params, state, inputs, targets)
        assert set(params) == {"w", "b"}
        assert params["w"].shape == (batch_size, 3, 2)
        assert params["b"].shape == (batch_size, 2)
        for i in range(batch_size):
            fun_i = lambda q, i=i: _least_squares(q, inputs[i], targets[i])  # noqa: E731
            expected_params, expected_state = torchlbfgs.update(
                fun_i,
                {name: leaf[i] for name, leaf in previous_params.items()},
                state_slice(previous_state, i),
                **options,
            )
            what = f"update {k}, problem {i}"
            for name in ("w", "b"):
                assert_leaf_close(params[name][i], expected_params[name], 1e-12, f"{what}: params[{name!r}]")
            for name, a, e in zip(LBFGSState._fields, state_slice(state, i), expected_state, strict=True):
                tol = CURVATURE_TOLERANCE[torch.float64] if name in CURVATURE_FIELDS else 1e-12
                assert_leaf_close(a, e, tol, f"{what}: state.{name}")
    assert bool((state.iteration > 0).all())


class CountingFun:
    """A problem's objective that counts its calls (a Python counter counts under torch.func too)."""

    def __init__(self, fun: Callable[[Tensor], Tensor]) -> None:
        self.fun = fun
        self.calls = 0

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.fun(x)


@pytest.mark.parametrize("line_search", LINE_SEARCHES, ids=str)
def test_early_exit_false_changes_only_the_number_of_calls(line_search: str | None) -> None:
    problem = logistic_regression(40, 5, 0.1, seed=0)
    x0 = problem.x0
    runs = {}
    for early_exit in (None, False):
        fun = CountingFun(problem.fun)
        params, state = x0, torchlbfgs.init(fun, x0)
        history = [(params, state)]
        after_stop = 0
        for _ in range(60):
            params, state = torchlbfgs.update(
                fun, params, state, line_search=line_search, early_exit=early_exit
            )
            history.append((params, state))
            after_stop += int(state.status != StopReason.RUNNING)
            if after_stop == 3:  # three updates of a stopped problem
                break
        runs[early_exit] = (fun.calls, history)

    default_calls, default_history = runs[None]
    masked_calls, masked_history = runs[False]
    assert len(default_history) == len(masked_history)
    for k, ((p_default, s_default), (p_masked, s_masked)) in enumerate(
        zip(default_history, masked_history, strict=True)
    ):
        assert bitwise_equal(p_default, p_masked), f"update {k}: params differ"
        for name, a, b in zip(LBFGSState._fields, s_default, s_masked, strict=True):
            assert bitwise_equal(a, b), f"update {k}: state.{name} differs"
    final_state = default_history[-1][1]
    assert final_state.status != StopReason.RUNNING, "the run must stop for the last updates to be no-ops"
    # The default exits early on eager CPU tensors: every call of fun is a counted evaluation.
    assert default_calls == int(final_state.n_evals)
    # Without early exit, the masked loop keeps calling fun after the search is done (and on
    # the stopped problem), changing nothing.
    assert masked_calls > default_calls


# --------------------------------------------------------------------------------------------
# The memory's row gather and row write, under every transform the core meets


def test_history_rows_gathered_and_written_under_vmap_grad_and_compile_as_by_indexing() -> None:
    """``buffer_rows`` (eagerly an embedding lookup, for the speed of its batching rule) and
    the out-of-place row write of ``push_curvature_pair`` (an ``index_put``) give each problem
    exactly what plain indexing gives it alone: batched buffers with batched or shared indices,
    a vmap inside a vmap, a compiled vmap whose batch dimension stays dynamic, and gradients
    through the gather; the inputs are left as they were."""
    from torchlbfgs.direction import newest_first_order
    from torchlbfgs.history import buffer_rows

    generator = torch.Generator().manual_seed(3)
    batch, m, n = 6, 5, 7
    buffers = torch.randn(batch, m, n, generator=generator, dtype=torch.float64)
    heads = torch.tensor([0, 1, 4, 2, 3, 4])

    def alone(buffer: Tensor, head: Tensor) -> Tensor:
        return buffer[newest_first_order(head, m)]

    def rows(buffer: Tensor, head: Tensor) -> Tensor:
        return buffer_rows(buffer, newest_first_order(head, m))

    expected = torch.stack([alone(buffers[i], heads[i]) for i in range(batch)])
    before = buffers.clone()
    assert torch.equal(torch.func.vmap(rows)(buffers, heads), expected)
    assert torch.equal(buffers, before)
    shared = torch.func.vmap(rows, in_dims=(0, None))(buffers, heads[2])
    assert torch.equal(shared, torch.stack([alone(b, heads[2]) for b in buffers]))
    one_buffer = torch.func.vmap(rows, in_dims=(None, 0))(buffers[1], heads)
    assert torch.equal(one_buffer, torch.stack([alone(buffers[1], h) for h in heads]))
    nested = torch.func.vmap(torch.func.vmap(rows))(buffers.view(2, 3, m, n), heads.view(2, 3))
    assert torch.equal(nested, expected.view(2, 3, m, n))
    entries = torch.func.vmap(rows)(buffers[..., 0], heads)  # an (m,) buffer: rho
    assert torch.equal(entries, expected[..., 0])

    # gradients through the gather: d/dbuffer sum(w * buffer[order]) puts w back in the rows' slots
    weights = torch.randn(m, n, generator=generator, dtype=torch.float64)
    grads = torch.func.vmap(torch.func.grad(lambda b, h: (weights * rows(b, h)).sum()))(buffers, heads)
    for i in range(batch):
        assert torch.equal(grads[i][newest_first_order(heads[i], m)], weights)

    # the row write: slot `head` takes the new row where the pair is accepted, nothing else moves
    s_new = torch.randn(batch, n, generator=generator, dtype=torch.float64)
    accept = torch.tensor([True, False, True, True, False, True])
    written = torch.func.vmap(_push_s_row)(buffers, heads, s_new, accept)
    assert torch.equal(buffers, before)
    for i in range(batch):
        want = buffers[i].clone()
        if accept[i]:
            want[heads[i]] = s_new[i]
        assert torch.equal(written[i], want), i

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = torch.compile(torch.func.vmap(rows), fullgraph=True, backend="aot_eager")
    for size in (batch, 4):  # a batch dimension marked dynamic (which a specialisation refuses)
        torch._dynamo.mark_dynamic(b := buffers[:size].clone(), 0)
        torch._dynamo.mark_dynamic(h := heads[:size].clone(), 0)
        assert torch.equal(compiled(b, h), expected[:size])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1  # one graph for both sizes


def _push_s_row(buffer: Tensor, head: Tensor, s: Tensor, accept: Tensor) -> Tensor:
    """The ``s`` buffer after ``push_curvature_pair`` of ``(s, y = 2 s)`` into a memory whose
    ring stands at ``head``."""
    from torchlbfgs.history import History, push_curvature_pair

    m = buffer.shape[0]
    zeros = torch.zeros(m, dtype=buffer.dtype)
    memory = History(buffer, buffer.clone(), zeros, zeros.sum() + 1, head, head.clone(), zeros[:0], zeros[:0])
    return push_curvature_pair(memory, s, 2 * s, 2 * (s @ s), accept).s_history
