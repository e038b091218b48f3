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
