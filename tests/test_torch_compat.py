"""``torchlbfgs.LBFGS`` against ``torch.optim.LBFGS`` where torch.optim's conventions are at stake:
torch's own test configurations (``optim_db``), hooks and state-dict entries of the user's, a
compiled training step, closures that change the parameters in place, ``max_iter=0``, what a
step reports, and the errors a user meets."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch

import torchlbfgs
from torchlbfgs import StopReason

Tensor = torch.Tensor

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")
LBFGS_INFO = next(info for info in common_optimizers.optim_db if info.optim_cls is torch.optim.LBFGS)


def model_and_data(seed: int = 0) -> tuple[torch.nn.Module, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    inputs = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    targets = torch.randn(30, 2, generator=generator, dtype=torch.float64)
    return model, inputs, targets


class Run:
    """One optimizer on its own copy of a model, counting closure calls."""

    def __init__(self, optimizer_class: type[torch.optim.Optimizer], model: torch.nn.Module,
                 inputs: Tensor, targets: Tensor, **options: Any) -> None:  # fmt: skip
        self.model = copy.deepcopy(model)
        self.optimizer = optimizer_class(self.model.parameters(), **options)
        self.inputs, self.targets, self.calls = inputs, targets, 0

    def closure(self) -> Tensor:
        self.calls += 1
        self.optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(self.model(self.inputs), self.targets)
        loss.backward()
        return loss

    def step(self) -> float:
        return float(self.optimizer.step(self.closure).detach())

    def params(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]


def assert_same_params(ours: list[Tensor], theirs: list[Tensor], what: str) -> None:
    for mine, reference in zip(ours, theirs, strict=True):
        scale = float(reference.abs().max().clamp(min=1.0))
        assert float((mine - reference).abs().max()) / scale <= 1e-9, what


# --- torch's own test configurations ----------------------------------------------------------

OPTIM_INPUTS = LBFGS_INFO.optim_inputs_func(device="cpu", dtype=torch.float64)


@pytest.mark.parametrize("optim_input", OPTIM_INPUTS, ids=lambda i: i.desc)
def test_torch_test_configurations_match_torch(optim_input: Any) -> None:
    """Every configuration torch's test suite drives its LBFGS with (``optim_db``): the same
    parameters and closure calls step by step, and state-dict round trips that continue
    exactly: ours -> ours, ours -> torch's format -> torch, torch -> ours."""
    assert optim_input.params is None  # torch's configurations are options for a model's parameters
    options = optim_input.kwargs
    model, inputs, targets = model_and_data()
    ours, theirs = (
        Run(torchlbfgs.LBFGS, model, inputs, targets, **options),
        Run(torch.optim.LBFGS, model, inputs, targets, **options),
    )
    for step in range(4):
        assert ours.step() == pytest.approx(theirs.step(), rel=1e-12, abs=1e-300), f"loss of step {step}"
        assert ours.calls == theirs.calls, f"closure calls after step {step}"
        assert_same_params(ours.params(), theirs.params(), f"params after step {step}")

    def resumed(
        optimizer_class: type[torch.optim.Optimizer], state_dict: dict[str, Any], params: list[Tensor]
    ) -> Run:
        run = Run(optimizer_class, model, inputs, targets, **options)
        with torch.no_grad():
            for p, value in zip(run.model.parameters(), params, strict=True):
                p.copy_(value)
        run.optimizer.load_state_dict(copy.deepcopy(state_dict))
        return run

    ours_resumed = resumed(torchlbfgs.LBFGS, ours.optimizer.state_dict(), ours.params())
    theirs_from_ours = resumed(
        torch.optim.LBFGS, torchlbfgs.to_torch_state_dict(ours.optimizer.state_dict()), ours.params()
    )
    ours_from_theirs = resumed(torchlbfgs.LBFGS, theirs.optimizer.state_dict(), theirs.params())
    for step in range(3):
        expected = ours.step()
        theirs.step()
        for run, what in ((ours_resumed, "ours -> ours"), (theirs_from_ours, "ours -> torch"),
                          (ours_from_theirs, "torch -> ours")):  # fmt: skip
            assert run.step() == pytest.approx(expected, rel=1e-12, abs=1e-300), f"{what}, step {step}"
            assert_same_params(run.params(), ours.params(), f"{what}, params after step {step}")


ERROR_INPUTS = LBFGS_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float64)


@pytest.mark.parametrize("error_input", ERROR_INPUTS, ids=lambda e: e.error_regex[:40])
def test_torch_error_configurations_raise_torchs_errors(error_input: Any) -> None:
    """torch's error configurations for LBFGS raise the same error (or warning), with torch's
    message, when ours is built (torch's own message wins over any check of ours)."""
    construction = common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR
    assert error_input.error_on == construction
    given = error_input.optimizer_error_input
    for optimizer_class in (torch.optim.LBFGS, torchlbfgs.LBFGS):
        if issubclass(error_input.error_type, Warning):
            with pytest.warns(error_input.error_type, match=error_input.error_regex):
                optimizer_class(given.params, **given.kwargs)
        else:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                optimizer_class(given.params, **given.kwargs)


# --- hooks and entries of the user's ----------------------------------------------------------


@pytest.mark.parametrize("optimizer_class", [torch.optim.LBFGS, torchlbfgs.LBFGS], ids=["torch", "ours"])
def test_a_state_dict_pre_hook_may_add_entries_of_its_own(
    optimizer_class: type[torch.optim.Optimizer],
) -> None:
    model, inputs, targets = model_and_data()
    run = Run(optimizer_class, model, inputs, targets)
    run.step()

    def remember_epoch(optimizer: torch.optim.Optimizer) -> None:
        optimizer.state["epoch"] = 7  # type: ignore[index]

    run.optimizer.register_state_dict_pre_hook(remember_epoch)
    state_dict = run.optimizer.state_dict()
    assert state_dict["state"]["epoch"] == 7
    fresh = Run(optimizer_class, model, inputs, targets)
    fresh.optimizer.load_state_dict(state_dict)
    assert fresh.optimizer.state["epoch"] == 7  # type: ignore[index]
    fresh.step()  # and it still steps


@pytest.mark.parametrize("optimizer_class", [torch.optim.LBFGS, torchlbfgs.LBFGS], ids=["torch", "ours"])
def test_extra_top_level_keys_load(optimizer_class: type[torch.optim.Optimizer]) -> None:
    """A state-dict post-hook that adds metadata: the state dict still loads (the extra key is
    ignored, as torch ignores it) and the run continues exactly."""
    model, inputs, targets = model_and_data()
    run = Run(optimizer_class, model, inputs, targets, line_search_fn="strong_wolfe")
    run.step()

    def add_metadata(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        state_dict["metadata"] = {"saved_by": "post-hook"}

    run.optimizer.register_state_dict_post_hook(add_metadata)
    state_dict = run.optimizer.state_dict()
    assert state_dict["metadata"] == {"saved_by": "post-hook"}
    resumed = Run(optimizer_class, model, inputs, targets, line_search_fn="strong_wolfe")
    with torch.no_grad():
        for p, value in zip(resumed.model.parameters(), run.params(), strict=True):
            p.copy_(value)
    # a copy, as from a file: torch's state dict holds its live tensors
    resumed.optimizer.load_state_dict(copy.deepcopy(state_dict))
    assert resumed.step() == run.step()
    assert_same_params(resumed.params(), run.params(), "after the resumed step")


def test_load_pre_hooks_see_and_may_replace_the_real_state_dict() -> None:
    """As in torch: the hook gets the state dict as given, before anything is checked, and may
    repair it; post-hooks run after loading."""
    model, inputs, targets = model_and_data()
    run = Run(torchlbfgs.LBFGS, model, inputs, targets)
    run.step()
    saved = run.optimizer.state_dict()
    broken = copy.deepcopy(saved)
    broken["state"][0]["s_history"] = broken["state"][0]["s_history"][:, :-1]  # would be refused
    seen: list[dict[str, Any]] = []

    def repair(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        seen.append(state_dict)
        return saved

    loaded: list[bool] = []
    fresh = Run(torchlbfgs.LBFGS, model, inputs, targets)
    fresh.optimizer.register_load_state_dict_pre_hook(repair)
    fresh.optimizer.register_load_state_dict_post_hook(lambda optimizer: loaded.append(True))
    fresh.optimizer.load_state_dict(broken)
    assert len(seen) == 1
    assert seen[0]["state"][0]["s_history"].shape == broken["state"][0]["s_history"].shape  # the real one
    assert loaded == [True]
    assert torch.equal(fresh.optimizer.state_dict()["state"][0]["s_history"], saved["state"][0]["s_history"])


# --- a compiled training step ------------------------------------------------------------------


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"], ids=str)
def test_step_inside_a_compiled_training_step(line_search_fn: str | None) -> None:
    """``torch.compile`` of a function that calls ``optimizer.step(closure)``: the step runs
    eagerly inside it, as torch's does, with the same result."""
    model, inputs, targets = model_and_data()
    results = []
    for optimizer_class in (torch.optim.LBFGS, torchlbfgs.LBFGS):
        torch._dynamo.reset()
        run = Run(optimizer_class, model, inputs, targets, line_search_fn=line_search_fn, max_iter=5)

        @torch.compile(backend="eager")
        def train_step(run: Run = run) -> Tensor:
            return run.optimizer.step(run.closure)  # type: ignore[no-any-return]

        losses = [float(train_step().detach()) for _ in range(3)]
        results.append((losses, run.calls, run.params()))
    (theirs_losses, theirs_calls, theirs_params), (ours_losses, ours_calls, ours_params) = results
    assert ours_calls == theirs_calls
    assert ours_losses == pytest.approx(theirs_losses, rel=1e-12)
    assert_same_params(ours_params, theirs_params, "after the compiled steps")


# --- closures that change the parameters in place ---------------------------------------------


def clamping_run(
    optimizer_class: type[torch.optim.Optimizer], steps: int = 3, **options: Any
) -> tuple[Tensor, int]:
    """PyTorch's neural-style-transfer pattern: the closure clamps the parameters in place.
    The parameters after ``steps`` steps, and the closure's calls."""
    x = torch.nn.Parameter(torch.tensor([0.5, 0.5], dtype=torch.float64))
    target = torch.tensor([3.0, -2.0], dtype=torch.float64)
    optimizer = optimizer_class([x], **options)
    calls = 0

    def closure() -> Tensor:
        nonlocal calls
        calls += 1
        with torch.no_grad():
            x.clamp_(0, 1)
        optimizer.zero_grad()
        loss = ((x - target) ** 2).sum()
        loss.backward()
        return loss

    for _ in range(steps):
        optimizer.step(closure)
    return x.detach().clone(), calls


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"], ids=str)
@pytest.mark.parametrize("lr", [0.1, 1.0])
def test_in_place_changes_by_the_closure_are_honoured_as_torch_honours_them(
    line_search_fn: str | None, lr: float
) -> None:
    options = {"max_iter": 5, "lr": lr, "line_search_fn": line_search_fn}
    theirs, theirs_calls = clamping_run(torch.optim.LBFGS, **options)
    ours, ours_calls = clamping_run(torchlbfgs.LBFGS, **options)
    assert ours_calls == theirs_calls
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("max_iter", [1, 2])
def test_a_step_leaves_the_parameters_where_torchs_does_after_the_closure_clamped_them(max_iter: int) -> None:
    """The search's accepted trial was clamped by the closure that evaluated it (lr = 3: the
    first trial, (2, -1), is outside the box and meets the strong-Wolfe conditions at its
    clamped point); torch then moves from where the search started, so the step ends at the
    unclamped point, and so must ours (skipping that move because the parameters "already hold"
    the accepted trial, without noticing the closure's change, fails here)."""
    options = {"lr": 3.0, "max_iter": max_iter, "line_search_fn": "strong_wolfe"}
    ends = [clamping_run(cls, steps=1, **options)[0] for cls in (torch.optim.LBFGS, torchlbfgs.LBFGS)]
    assert not ((ends[0] >= 0) & (ends[0] <= 1)).all()  # torch's step ends outside the box
    torch.testing.assert_close(ends[1], ends[0], rtol=0, atol=0)


def test_the_issues_clamping_example_ends_at_the_box_minimiser() -> None:
    """min (x1 - 3)^2 + (x2 + 2)^2 over [0, 1]^2 is at (1, 0); torch gets there, and so must we
    (ignoring the clamp, the iterate would run off to (3, -2))."""
    ours, _ = clamping_run(torchlbfgs.LBFGS, max_iter=5)
    theirs, _ = clamping_run(torch.optim.LBFGS, max_iter=5)
    box_minimiser = torch.tensor([1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(theirs, box_minimiser, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours, box_minimiser, rtol=0, atol=1e-12)


# --- what a step does and reports --------------------------------------------------------------


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"], ids=str)
def test_max_iter_zero_evaluates_once_and_moves_nothing(line_search_fn: str | None) -> None:
    model, inputs, targets = model_and_data()
    ours = Run(torchlbfgs.LBFGS, model, inputs, targets, max_iter=0, line_search_fn=line_search_fn)
    theirs = Run(torch.optim.LBFGS, model, inputs, targets, max_iter=0, line_search_fn=line_search_fn)
    before = ours.params()
    assert ours.step() == theirs.step()
    assert ours.calls == theirs.calls == 1
    assert all(torch.equal(a, b) for a, b in zip(ours.params(), before, strict=True))
    assert ours.optimizer.stop_reason == StopReason.MAX_ITERATIONS


@pytest.mark.parametrize("loss", [torch.ones(3), torch.ones(2, 2), None, "0.5"], ids=repr)
def test_a_closure_must_return_a_scalar_loss(loss: Any) -> None:
    x = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    optimizer = torchlbfgs.LBFGS([x])

    def closure() -> Any:
        optimizer.zero_grad()
        (x * x).sum().backward()
        return loss

    with pytest.raises((ValueError, TypeError), match="closure must return the loss"):
        optimizer.step(closure)
    assert torch.equal(x.detach(), torch.ones(3, dtype=torch.float64))
    assert not optimizer.state


def test_stop_reason_says_why_the_last_step_stopped() -> None:
    x = torch.nn.Parameter(torch.tensor([3.0, -1.0], dtype=torch.float64))
    optimizer = torchlbfgs.LBFGS([x], max_iter=2, max_eval=100, line_search_fn="strong_wolfe")
    assert optimizer.stop_reason is None
    assert not optimizer.converged

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = ((x - 1.0) ** 2 * torch.tensor([1.0, 30.0], dtype=torch.float64)).sum()
        loss.backward()
        return loss

    optimizer.step(closure)  # two iterations are not enough here
    assert optimizer.stop_reason == StopReason.MAX_ITERATIONS
    assert not optimizer.converged
    assert int(optimizer.state_dict()["state"][0]["status"]) == StopReason.MAX_ITERATIONS
    for _ in range(10):
        optimizer.step(closure)
        if optimizer.converged:
            break
    assert optimizer.converged
    assert optimizer.stop_reason in (StopReason.GRADIENT_TOLERANCE, StopReason.STEP_TOLERANCE,
                                     StopReason.VALUE_CHANGE_TOLERANCE,
                                     StopReason.DIRECTIONAL_DERIVATIVE_TOLERANCE)  # fmt: skip
    # the step that finds the gradient already small says so too
    optimizer.step(closure)
    if float(x.grad.abs().max()) <= 1e-7:  # type: ignore[union-attr]
        assert optimizer.stop_reason == StopReason.GRADIENT_TOLERANCE


def test_torch_counter_names_read_from_our_leaves() -> None:
    model, inputs, targets = model_and_data()
    ours = Run(torchlbfgs.LBFGS, model, inputs, targets, max_iter=4)
    theirs = Run(torch.optim.LBFGS, model, inputs, targets, max_iter=4)
    for _ in range(2):
        ours.step()
        theirs.step()
    first_ours, first_theirs = next(iter(ours.model.parameters())), next(iter(theirs.model.parameters()))
    for name in ("n_iter", "func_evals"):
        assert ours.optimizer.state[first_ours][name] == theirs.optimizer.state[first_theirs][name], name
    with pytest.raises(KeyError, match="'iteration' and 'n_evals'"):
        ours.optimizer.state[first_ours]["old_dirs"]
    assert "n_iter" not in ours.optimizer.state_dict()["state"][0]  # the checkpoint format is ours


def _stepped_once(w: torch.nn.Parameter) -> torchlbfgs.LBFGS:
    """An optimizer over ``w`` after one step on ``sum(w**2)``."""
    optimizer = torchlbfgs.LBFGS([w])

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return optimizer


@pytest.mark.parametrize(
    ("saved_shape", "loaded_shape"), [((2, 4), (4, 2)), ((6,), (2, 3))], ids=["transposed", "reshaped"]
)
def test_a_checkpoint_for_other_shapes_with_as_many_values_is_refused(
    saved_shape: tuple[int, ...], loaded_shape: tuple[int, ...]
) -> None:
    """Same number of values, other shapes (``Linear(4, 2)`` into ``Linear(2, 4)`` without
    bias): refused, naming the parameter and both shapes; nothing changes."""

    def stepped(shape: tuple[int, ...]) -> torchlbfgs.LBFGS:
        values = torch.arange(1.0, 1.0 + torch.Size(shape).numel(), dtype=torch.float64)
        return _stepped_once(torch.nn.Parameter(values.reshape(shape)))

    saved, target = stepped(saved_shape), stepped(loaded_shape)
    before = copy.deepcopy(target.state_dict())
    pattern = f"parameter 0: .*shape {re.escape(str(saved_shape))}.*shape {re.escape(str(loaded_shape))}"
    with pytest.raises(ValueError, match=pattern):
        target.load_state_dict(saved.state_dict())
    after = target.state_dict()
    assert all(
        torch.equal(after["state"][0][k], v) for k, v in before["state"][0].items() if isinstance(v, Tensor)
    )


# --- bit for bit --------------------------------------------------------------------------------


@pytest.mark.parametrize("two_loop", ["host numbers", "on the device"])
def test_float64_iterates_are_bit_for_bit_torchs(two_loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same kernels in the same order as torch's step (the two-loop recursion from -g, the
    pair, the update) and the same decisions: float64 iterates, losses and closure counts equal
    torch's bit for bit on every classic problem and setting of the parity tests, whether the
    two-loop recursion reads its inner products (CPUs) or keeps them on the device (GPUs)."""
    from problems import classic_problems
    from test_optim import SETTINGS, run_optimizer

    import torchlbfgs.scalars
    import torchlbfgs.torch_schedule

    if two_loop == "on the device":
        tensors = torchlbfgs.scalars.TENSORS
        monkeypatch.setattr(torchlbfgs.torch_schedule, "_two_loop_scalars", lambda device: tensors)

    for problem in classic_problems():
        for setting in SETTINGS:
            options = setting.values[0]
            theirs = run_optimizer(torch.optim.LBFGS, problem, 6, **options)
            ours = run_optimizer(torchlbfgs.LBFGS, problem, 6, **options)
            what = f"{problem.name}, {setting.id}"
            assert ours[1] == theirs[1], what
            assert ours[2] == theirs[2], what
            assert all(torch.equal(a, b) for a, b in zip(ours[0], theirs[0], strict=True)), what


@pytest.mark.parametrize("junk", [7, [["a", 3]], [[2, 3, 1.5]], [[2, 3], [1]]], ids=repr)
def test_malformed_recorded_shapes_are_refused(junk: Any) -> None:
    optimizer = _stepped_once(torch.nn.Parameter(torch.ones(2, 3, dtype=torch.float64)))
    saved = optimizer.state_dict()
    broken = {**saved, "param_groups": [{**saved["param_groups"][0], "param_shapes": junk}]}
    with pytest.raises(ValueError, match="param_shapes"):
        optimizer.load_state_dict(broken)
    assert torch.equal(optimizer.state_dict()["state"][0]["grad"], saved["state"][0]["grad"])
