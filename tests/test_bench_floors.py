"""The floor loops of ``bench/step_cost.py`` take torch's iterates bit for bit and do its work
(iterations and closure calls): their timings are floors of torch's iteration only if so."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import torchlbfgs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
step_cost = pytest.importorskip("step_cost")


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
@pytest.mark.parametrize("floor", ["ParityLoop", "DesignFloorLoop"])
def test_a_floor_loop_takes_torchs_iterates_and_does_its_work(floor: str, line_search: str | None) -> None:
    runs = [
        step_cost._Timed(cls, 1000, line_search, max_iter=10, device="cpu")
        for cls in (torch.optim.LBFGS, getattr(step_cost, floor))
    ]
    theirs, loop = runs
    for _ in range(6):
        iterations, calls = theirs.iterations(), theirs.calls
        for run in runs:
            run.step()
        assert torch.equal(loop.x, theirs.x)
        assert (loop.iterations(), loop.calls) == (theirs.iterations(), theirs.calls)
        # the regime the benchmark times: each step stops at max_iter or at its budget of
        # closure calls (max_iter * 5 // 4), never on a stopping test
        assert theirs.iterations() - iterations == 10 or theirs.calls - calls >= 12


def test_same_work_tells_a_pass_whose_runs_differ() -> None:
    run = {"work": (10, 12)}
    assert step_cost.same_work([run, dict(run)])
    assert not step_cost.same_work([run, {"work": (10, 11)}])


def test_the_compile_floor_iteration_is_an_lbfgs_iteration() -> None:
    """``bench/compile_time.py``'s bare iteration, the floor ours is compared with, is L-BFGS:
    vmapped over two quadratics (curvatures in [0.5, 1.5]) its unit steps reach the minimiser
    to 1e-10 in twelve iterations; gradient descent with unit steps is at 0.5^12 = 2.4e-4 of
    its start there. Its stored pairs are the steps' and gradient changes' (in newest slot)."""
    compile_time = pytest.importorskip("compile_time")
    curvatures = torch.stack([torch.linspace(0.5, 1.5, 5), torch.linspace(1.5, 0.5, 5)]).double()

    def quadratic(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return 0.5 * (c * x * x).sum()

    x0 = torch.ones(2, 5, dtype=torch.float64)
    m = 10
    state = (x0, curvatures * x0, torch.zeros(2, m, 5, dtype=torch.float64),
             torch.zeros(2, m, 5, dtype=torch.float64), torch.zeros(2, m, dtype=torch.float64),
             torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))  # fmt: skip
    iterate = torch.func.vmap(lambda st, c: compile_time.floor_iteration(quadratic, st, c))
    for k in range(12):
        previous = state
        state = iterate(state, curvatures)
        x, g, s_rows, y_rows, rho, head, stored = state
        torch.testing.assert_close(g, curvatures * x)  # the gradient at the new point
        if k < m:
            assert stored.tolist() == [k + 1] * 2
            torch.testing.assert_close(s_rows[:, k], x - previous[0])
            torch.testing.assert_close(y_rows[:, k], g - previous[1])
            torch.testing.assert_close(rho[:, k], 1 / (s_rows[:, k] * y_rows[:, k]).sum(-1))
            assert head.tolist() == [(k + 1) % m] * 2
    assert float(state[0].abs().max()) < 1e-10


def test_the_eager_floor_iteration_is_an_lbfgs_iteration() -> None:
    """``bench/batched.py``'s bare iteration, the floor of any eager L-BFGS solve, takes the
    L-BFGS step: its direction is torchlbfgs's two-loop direction ``-H g`` for the same pairs
    (scaled by the newest pair's ``s'y / y'y``), and it shifts the new pair in, newest first.
    Vmapped, each problem's iteration is its own alone."""
    batched = pytest.importorskip("batched")
    generator = torch.Generator().manual_seed(0)
    n, m, stored = 6, 4, 3
    root = torch.randn(n, n, generator=generator, dtype=torch.float64)
    hessian = root @ root.T + torch.eye(n, dtype=torch.float64)

    def quadratic(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return 0.5 * (x - shift) @ hessian @ (x - shift)

    shift = torch.randn(n, generator=generator, dtype=torch.float64)
    x = torch.randn(n, generator=generator, dtype=torch.float64)
    g = hessian @ (x - shift)
    s_rows = torch.zeros(m, n, dtype=torch.float64)
    s_rows[:stored] = torch.randn(stored, n, generator=generator, dtype=torch.float64)
    y_rows = s_rows @ hessian  # s'y > 0 in the rows in use, empty rows 0
    rho = torch.where(torch.arange(m) < stored, 1 / (s_rows * y_rows).sum(-1), 0.0)

    # The same pairs in torchlbfgs's ring buffer: slot (head - 1) % m the newest.
    state = torchlbfgs.init(lambda p: quadratic(p, shift), x, history_size=m)
    ring = torch.remainder(-1 - torch.arange(m), m)  # newest-first row i sits in slot ring[i]
    state = state._replace(
        s_history=torch.zeros_like(s_rows).index_copy(0, ring, s_rows),
        y_history=torch.zeros_like(y_rows).index_copy(0, ring, y_rows),
        rho=torch.zeros_like(rho).index_copy(0, ring, rho),
        gamma=(s_rows[0] @ y_rows[0]) / (y_rows[0] @ y_rows[0]),
        head=torch.tensor(0), n_pairs=torch.tensor(stored),
    )  # fmt: skip
    direction = -torchlbfgs.inv_hessian_product(state, g)

    step = batched.bare_iteration(quadratic, (x, g, s_rows, y_rows, rho), shift)
    new_x, new_g, new_s, new_y, new_rho = step
    torch.testing.assert_close(new_x, x + direction, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_g, hessian @ (new_x - shift), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_s[0], direction, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_y[0], new_g - g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_rho[0], 1 / (new_s[0] @ new_y[0]))
    assert torch.equal(new_s[1:], s_rows[:-1])
    assert torch.equal(new_y[1:], y_rows[:-1])
    assert torch.equal(new_rho[1:], rho[:-1])

    # An empty memory: a unit step along -g.
    empty = (x, g, torch.zeros(m, n, dtype=torch.float64), torch.zeros(m, n, dtype=torch.float64),
             torch.zeros(m, dtype=torch.float64))  # fmt: skip
    torch.testing.assert_close(batched.bare_iteration(quadratic, empty, shift)[0], x - g)

    # Vmapped over problems (distinct shifts), each as alone.
    shifts = torch.stack([shift, -shift, 2 * shift])
    stack = tuple(t.expand(3, *t.shape).clone() for t in (x, g, s_rows, y_rows, rho))
    stack = (stack[0], (x - shifts) @ hessian, *stack[2:])
    together = torch.func.vmap(lambda st, c: batched.bare_iteration(quadratic, st, c))(stack, shifts)
    for i in range(3):
        alone = batched.bare_iteration(quadratic, tuple(t[i] for t in stack), shifts[i])
        for a, b in zip(together, alone, strict=True):
            torch.testing.assert_close(a[i], b, rtol=1e-12, atol=1e-12)
