"""Box constraints in the drop-in ``torchlbfgs.LBFGS``: per-group ``lower``/``upper`` options,
against scipy's L-BFGS-B, feasibility, checkpoints (bitwise resume in a fresh process) and
clear errors. The subprocess imports this file by path and calls :func:`resume`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize
import torch

import torchlbfgs

DT = torch.float64
LINE_SEARCHES = [None, "strong_wolfe"]


def make_problem(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(120, 5, generator=generator, dtype=DT)
    truth = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=DT)
    targets = inputs @ truth + 0.1 * torch.randn(120, generator=generator, dtype=DT) - 0.3
    torch.manual_seed(seed)
    return torch.nn.Linear(5, 1).double(), inputs, targets


def make_optimizer(model: torch.nn.Module, line_search: str | None) -> torchlbfgs.LBFGS:
    return torchlbfgs.LBFGS(
        [{"params": [model.weight], "lower": 0.0, "upper": 2.0}, {"params": [model.bias], "upper": -0.5}],
        line_search_fn=line_search, max_iter=8, history_size=4, tolerance_grad=1e-12, tolerance_change=0.0,
    )  # fmt: skip


def make_closure(model, optimizer, inputs, targets, seen=None):
    def closure():
        if seen is not None:
            seen.append([p.detach().clone() for p in model.parameters()])
        optimizer.zero_grad()
        loss = ((model(inputs).squeeze(-1) - targets) ** 2).mean()
        loss.backward()
        return loss

    return closure


def scipy_solution(inputs, targets):
    def fun(v):
        w, b = torch.tensor(v[:5]), torch.tensor(v[5])
        return float(((inputs @ w + b - targets) ** 2).mean())

    bounds = [(0.0, 2.0)] * 5 + [(None, -0.5)]
    found = scipy.optimize.minimize(
        fun,
        np.zeros(6),
        method="L-BFGS-B",
        bounds=bounds,
        options={"ftol": 0, "gtol": 1e-12, "maxiter": 10_000},
    )
    return torch.tensor(found.x, dtype=DT)


@pytest.mark.parametrize("line_search", LINE_SEARCHES)
def test_bounded_groups_reach_scipys_solution_and_every_point_is_feasible(line_search):
    model, inputs, targets = make_problem()
    optimizer = make_optimizer(model, line_search)
    seen: list[list[torch.Tensor]] = []
    closure = make_closure(model, optimizer, inputs, targets, seen)
    for _ in range(15):
        optimizer.step(closure)
    reference = scipy_solution(inputs, targets)
    ours = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)
    assert torch.equal(ours == 0.0, reference == 0.0)  # the same active set (the bias sits at -0.5)
    assert float(model.bias.detach()) == -0.5
    assert optimizer.converged
    on_bounds = int((reference[:5] == 0).sum() + (reference[:5] == 2).sum() + (reference[5] == -0.5))
    assert optimizer.n_active_bounds == on_bounds >= 2
    for weight, bias in seen:  # every point the closure saw, the projected start included
        assert bool(((weight >= 0) & (weight <= 2)).all())
        assert bool((bias <= -0.5).all())


def test_a_start_outside_the_bounds_is_projected_before_the_first_evaluation():
    model, inputs, targets = make_problem()
    with torch.no_grad():
        model.weight.fill_(5.0)
        model.bias.fill_(3.0)
    optimizer = make_optimizer(model, "strong_wolfe")
    seen: list[list[torch.Tensor]] = []
    optimizer.step(make_closure(model, optimizer, inputs, targets, seen))
    assert torch.equal(seen[0][0], torch.full((1, 5), 2.0, dtype=DT))
    assert torch.equal(seen[0][1], torch.full((1,), -0.5, dtype=DT))


def test_without_bounds_nothing_changes_not_even_the_groups():
    model, inputs, targets = make_problem()
    optimizer = torchlbfgs.LBFGS(model.parameters(), line_search_fn="strong_wolfe")
    optimizer.step(make_closure(model, optimizer, inputs, targets))
    assert "lower" not in optimizer.param_groups[0]
    assert optimizer.n_active_bounds == 0
    assert "upper" not in optimizer.state_dict()["param_groups"][0]


def test_bounds_round_trip_through_the_state_dict():
    model, inputs, targets = make_problem()
    optimizer = make_optimizer(model, "strong_wolfe")
    optimizer.step(make_closure(model, optimizer, inputs, targets))
    saved = optimizer.state_dict()
    assert saved["param_groups"][0]["lower"] == 0.0
    assert saved["param_groups"][1]["upper"] == -0.5
    other_model, _, _ = make_problem()
    other = torchlbfgs.LBFGS(
        [{"params": [other_model.weight]}, {"params": [other_model.bias]}], history_size=4
    )
    other.load_state_dict(saved)
    assert other.param_groups[0]["upper"] == 2.0
    assert other.param_groups[1]["upper"] == -0.5


def test_a_bounds_free_state_loaded_into_a_bounded_optimizer_is_projected_and_continues():
    model, inputs, targets = make_problem()
    free = torchlbfgs.LBFGS(
        [{"params": [model.weight]}, {"params": [model.bias]}], line_search_fn="strong_wolfe", max_iter=3,
        max_eval=10, history_size=4, tolerance_grad=1e-12, tolerance_change=0.0,
    )  # fmt: skip
    free.step(make_closure(model, free, inputs, targets))
    assert float(model.bias.detach()) > -0.5  # the unbounded iterate is outside the box below
    bounded = make_optimizer(model, "strong_wolfe")
    bounded.load_state_dict(free.state_dict())
    assert bounded.param_groups[1]["upper"] == -0.5  # the optimizer's bounds stay
    closure = make_closure(model, bounded, inputs, targets)
    for _ in range(15):
        bounded.step(closure)
    assert float(model.bias.detach()) == -0.5
    ours = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    torch.testing.assert_close(ours, scipy_solution(inputs, targets), rtol=1e-6, atol=1e-7)


def test_bad_bounds_are_refused_naming_the_group_and_parameter():
    model, _, _ = make_problem()
    with pytest.raises(ValueError, match=r"param group 1, parameter 0: lower > upper"):
        torchlbfgs.LBFGS([{"params": [model.weight]}, {"params": [model.bias], "lower": 1.0, "upper": 0.0}])
    with pytest.raises(ValueError, match=r"param group 0: lower has 1 entries but the group has 2"):
        torchlbfgs.LBFGS([{"params": [model.weight, model.bias], "lower": [torch.zeros(1, 5)]}])
    with pytest.raises(ValueError, match=r"does not broadcast"):
        torchlbfgs.LBFGS([{"params": [model.weight], "lower": [torch.zeros(3)]}])
    with pytest.raises(TypeError, match="complex"):
        torchlbfgs.LBFGS([torch.zeros(2, dtype=torch.complex128, requires_grad=True)], lower=0.0)
    optimizer = torchlbfgs.LBFGS(model.parameters(), lower=0.0)
    optimizer.param_groups[0]["upper"] = -1.0  # set after construction: refused at the step
    with pytest.raises(ValueError, match="lower > upper"):
        optimizer.step(lambda: model.weight.sum())


# --- Bitwise resume in a fresh process ---------------------------------------------------------

STEPS = 3


def run(optimizer, closure, steps):
    return [optimizer.step(closure).detach().clone() for _ in range(steps)]


def resume(checkpoint_path: str, line_search: str | None) -> None:
    """In the subprocess: load the checkpoint into a fresh model and optimizer, run, save."""
    saved = torch.load(checkpoint_path, weights_only=True)
    model, inputs, targets = make_problem()
    model.load_state_dict(saved["model"])
    optimizer = make_optimizer(model, line_search)
    optimizer.load_state_dict(saved["optimizer"])
    losses = run(optimizer, make_closure(model, optimizer, inputs, targets), STEPS)
    torch.save({"model": model.state_dict(), "losses": torch.stack(losses)}, checkpoint_path + ".resumed")


def test_resume_with_bounds_in_a_fresh_process_is_bitwise_exact(tmp_path: Path):
    expected, paths = {}, []
    for line_search in LINE_SEARCHES:
        model, inputs, targets = make_problem()
        optimizer = make_optimizer(model, line_search)
        closure = make_closure(model, optimizer, inputs, targets)
        run(optimizer, closure, STEPS)
        path = str(tmp_path / f"bounded-{line_search}.pt")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
        losses = torch.stack(run(optimizer, closure, STEPS))
        assert int(optimizer.state[model.weight]["n_pairs"]) == 4  # the history wrapped
        expected[line_search] = (losses, model.state_dict())
        paths += [path, str(line_search)]

    script = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('bounded', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "for path, line_search in zip(sys.argv[2::2], sys.argv[3::2]):\n"
        "    module.resume(path, None if line_search == 'None' else line_search)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, __file__, *paths],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    for path, line_search in zip(paths[::2], LINE_SEARCHES, strict=True):
        resumed = torch.load(path + ".resumed", weights_only=True)
        losses, state = expected[line_search]
        assert torch.equal(resumed["losses"], losses), line_search
        for name, value in state.items():
            assert torch.equal(resumed["model"][name], value), (line_search, name)
