"""The floor loops of ``bench/step_cost.py`` take torch's iterates bit for bit and do its work
(iterations and closure calls): their timings are floors of torch's iteration only if so."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

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
