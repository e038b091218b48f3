"""``state_dict`` / ``load_state_dict`` of :class:`torchlbfgs.LBFGS`.

Covered: torch's standard format and ``weights_only`` loading; bitwise-exact resume in a new
process (float32/float64, fixed step and strong Wolfe, wrapped history, linear model and MLP);
validation of every kind of bad checkpoint, leaving the optimizer and model untouched; dtype
and device moves; restored hyper-parameters; migration to and from ``torch.optim.LBFGS``;
checkpoints after ``add_param_group``.

The subprocess in the resume test imports this file by path and calls :func:`resume_all`, so
both processes build models, data and closures with the very same code.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import torchlbfgs
from torchlbfgs import checkpoint

Tensor = torch.Tensor
StateDict = dict[str, Any]

FLOAT_LEAVES = {
    "value",
    "grad",
    "s_history",
    "y_history",
    "rho",
    "gamma",
    "sy_products",
    "yy_products",
    "pending_direction",
    "pending_step",
}
INT_LEAVES = {"head", "n_pairs", "iteration", "n_evals", "status"}
LEAF_NAMES = FLOAT_LEAVES | INT_LEAVES | {"has_pending", "format_version"}
HYPER_PARAMETERS = (
    "lr",
    "max_iter",
    "max_eval",
    "tolerance_grad",
    "tolerance_change",
    "history_size",
    "line_search_fn",
)

# history_size is smaller than the iterations of one half (STEPS * max_iter), so the ring
# buffer has wrapped before the checkpoint and wraps again after it.
HISTORY_SIZE = 3
OPTIONS: dict[str, Any] = {"history_size": HISTORY_SIZE, "max_iter": 4}
STEPS = 3
LINE_SEARCHES: dict[str, dict[str, Any]] = {
    "fixed": {"line_search_fn": None, "lr": 0.2},
    "strong_wolfe": {"line_search_fn": "strong_wolfe", "lr": 1.0},
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
KINDS = ("linear", "mlp")


# --------------------------------------------------------------------------------------------
# Problems (also used by the resume subprocess)


def make_data(kind: str, dtype: torch.dtype, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Inputs and targets: an ill-conditioned least-squares problem or a smooth curve fit."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "linear":
        scales = torch.logspace(-1, 1, 10, dtype=torch.float64)
        inputs = torch.randn(64, 10, generator=generator, dtype=torch.float64) * scales
        weights = torch.randn(10, 1, generator=generator, dtype=torch.float64)
        targets = inputs @ weights + 0.1 * torch.randn(64, 1, generator=generator, dtype=torch.float64)
    else:
        inputs = torch.randn(48, 3, generator=generator, dtype=torch.float64)
        targets = torch.sin(2.0 * inputs.sum(dim=1, keepdim=True))
    return inputs.to(dtype), targets.to(dtype)


def make_model(kind: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """``Linear(10, 1)`` or a small MLP, initialised from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "linear":
            model: torch.nn.Module = torch.nn.Linear(10, 1)
        else:
            model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return model.to(dtype)


class Closure:
    """The usual closure (zero_grad, loss, backward, return loss), counting its calls."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: Tensor, targets: Tensor
    ):
        self.model, self.optimizer = model, optimizer
        self.inputs, self.targets = inputs, targets
        self.calls = 0

    def __call__(self) -> Tensor:
        self.calls += 1
        self.optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(self.model(self.inputs), self.targets)
        loss.backward()
        return loss


def loss_of(model: torch.nn.Module, inputs: Tensor, targets: Tensor) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(inputs), targets))


def run(optimizer: torch.optim.Optimizer, closure: Closure, steps: int) -> list[Tensor]:
    return [optimizer.step(closure).detach().clone() for _ in range(steps)]


def resume_all(paths: list[str]) -> None:
    """Subprocess side of the resume test: for each checkpoint, a fresh model and a fresh
    optimizer (constructed with default hyper-parameters except ``history_size``: the rest is
    restored from the checkpoint) load the saved state and run ``STEPS`` more steps."""
    for path in paths:
        checkpoint = torch.load(path, weights_only=True)
        kind, dtype = checkpoint["kind"], DTYPES[checkpoint["dtype"]]
        model = make_model(kind, dtype, seed=12345)
        optimizer = torchlbfgs.LBFGS(model.parameters(), history_size=HISTORY_SIZE)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        closure = Closure(model, optimizer, *make_data(kind, dtype))
        losses = run(optimizer, closure, STEPS)
        result = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "losses": torch.stack(losses),
            "calls": closure.calls,
        }
        torch.save(result, path + ".resumed")


RESUME_SCRIPT = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("state_dict_cases", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.resume_all(sys.argv[2:])
"""


# --------------------------------------------------------------------------------------------
# Comparison helpers


def snapshot_state_dict(optimizer: torch.optim.Optimizer) -> StateDict:
    """A deep copy of ``optimizer.state_dict()`` (tensors cloned)."""
    return copy.deepcopy(optimizer.state_dict())


def assert_same_state_dict(actual: StateDict, expected: StateDict) -> None:
    """Same entries, same param groups, every tensor leaf with the same dtype, device and bits."""
    assert actual["param_groups"] == expected["param_groups"]
    assert set(actual["state"]) == set(expected["state"])
    for index, leaves in expected["state"].items():
        assert set(actual["state"][index]) == set(leaves)
        for name, leaf in leaves.items():
            found = actual["state"][index][name]
            assert_same_leaf(found, leaf, name)


def assert_same_leaf(found: Any, expected: Any, name: str) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(found, torch.Tensor), name
        assert found.dtype == expected.dtype, name
        assert found.device == expected.device, name
        assert found.shape == expected.shape, name
        assert torch.equal(found, expected), name
    elif isinstance(expected, list):  # torch.optim.LBFGS's history lists
        assert isinstance(found, list), name
        assert len(found) == len(expected), name
        for index, (a, b) in enumerate(zip(found, expected, strict=True)):
            assert_same_leaf(a, b, f"{name}[{index}]")
    else:
        assert type(found) is type(expected), name
        assert found == expected, name


def assert_params_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert p.dtype == q.dtype, name
        assert torch.equal(p.detach().cpu(), q.detach().cpu()), name


def continue_in_lockstep(
    first: torch.optim.Optimizer,
    first_closure: Closure,
    second: torch.optim.Optimizer,
    second_closure: Closure,
    steps: int,
) -> None:
    """Step both optimizers; after every step the returned losses, the number of closure calls
    and the params must be identical. The first step must move the params."""
    start = [p.detach().clone() for p in first_closure.model.parameters()]
    for step in range(steps):
        first_closure.calls = second_closure.calls = 0
        first_loss = first.step(first_closure)
        second_loss = second.step(second_closure)
        assert first_closure.calls == second_closure.calls, f"step {step}"
        assert torch.equal(first_loss.detach(), second_loss.detach()), f"step {step}"
        assert_params_equal(first_closure.model, second_closure.model)
    moved = [p.detach() for p in first_closure.model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(start, moved, strict=True)), "nothing moved"


def stepped_optimizer(
    kind: str = "linear",
    dtype: torch.dtype = torch.float64,
    steps: int = 2,
    seed: int = 0,
    line_search: str = "strong_wolfe",
    **options: Any,
) -> tuple[torch.nn.Module, torchlbfgs.LBFGS, Closure]:
    model = make_model(kind, dtype, seed)
    optimizer = torchlbfgs.LBFGS(model.parameters(), **{**OPTIONS, **LINE_SEARCHES[line_search], **options})
    closure = Closure(model, optimizer, *make_data(kind, dtype))
    run(optimizer, closure, steps)
    return model, optimizer, closure


# --------------------------------------------------------------------------------------------
# Format


def test_state_dict_has_torch_format_and_loads_with_weights_only(tmp_path: Path) -> None:
    model = make_model("mlp", torch.float64, 0)
    fresh = torchlbfgs.LBFGS(model.parameters(), **OPTIONS)
    reference = torch.optim.LBFGS(model.parameters(), **OPTIONS)
    shapes = [[list(p.shape) for p in model.parameters()]]
    expected_groups = [
        {**group, "param_shapes": shapes[i]} for i, group in enumerate(reference.state_dict()["param_groups"])
    ]
    assert fresh.state_dict() == {"state": {}, "param_groups": expected_groups}

    _, optimizer, _ = stepped_optimizer("mlp")
    state_dict = optimizer.state_dict()
    assert set(state_dict) == {"state", "param_groups"}
    n_params = sum(p.numel() for p in model.parameters())
    assert state_dict["param_groups"] == [
        {
            **{option: optimizer.param_groups[0][option] for option in HYPER_PARAMETERS},
            "params": [0, 1, 2, 3],
            "param_shapes": shapes[0],
        }
    ]
    assert list(state_dict["state"]) == [0]  # the whole state under the first param's index
    leaves = state_dict["state"][0]
    assert set(leaves) == LEAF_NAMES
    for name, leaf in leaves.items():
        assert isinstance(leaf, torch.Tensor) or type(leaf) in (int, float, bool), name
    assert type(leaves["format_version"]) is int
    assert leaves["grad"].shape == (n_params,)
    assert leaves["s_history"].shape == leaves["y_history"].shape == (HISTORY_SIZE, n_params)
    # the adapter uses the two-loop recursion (torch's rounding): no compact-form products
    assert leaves["sy_products"].shape == leaves["yy_products"].shape == (0, 0)
    assert all(leaves[name].dtype == torch.float64 for name in FLOAT_LEAVES)
    assert all(leaves[name].dtype == torch.int64 and leaves[name].shape == () for name in INT_LEAVES)
    assert leaves["has_pending"].dtype == torch.bool
    for group in state_dict["param_groups"]:
        for value in group.values():
            assert value is None or type(value) in (int, float, bool, str, list), value

    path = tmp_path / "optimizer.pt"
    torch.save(state_dict, path)
    loaded = torch.load(path, weights_only=True)
    assert_same_state_dict(loaded, state_dict)


def test_format_version_1_checkpoint_loads_and_continues_identically() -> None:
    """A checkpoint written before the compact-form products existed (format 1: no
    ``sy_products``/``yy_products``) loads, and the run continues exactly as from today's."""
    model, optimizer, _ = stepped_optimizer("mlp")
    current = optimizer.state_dict()
    version_1 = copy.deepcopy(current)
    leaves = version_1["state"][0]
    del leaves["sy_products"], leaves["yy_products"]
    leaves["format_version"] = 1
    start = [p.detach().clone() for p in model.parameters()]
    losses = []
    for state_dict in (current, version_1):
        with torch.no_grad():
            for p, value in zip(model.parameters(), start, strict=True):
                p.copy_(value)
        loaded = torchlbfgs.LBFGS(model.parameters(), **OPTIONS)
        loaded.load_state_dict(state_dict)
        assert loaded.state_dict()["state"][0]["format_version"] == checkpoint.FORMAT_VERSION
        losses.append(run(loaded, Closure(model, loaded, *make_data("mlp", torch.float64)), 3))
        losses.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(losses[0] + losses[1], losses[2] + losses[3], strict=True):
        assert torch.equal(a, b)
    # Only a complete version-1 state migrates: one product leaf alone is refused.
    half = copy.deepcopy(version_1)
    half["state"][0]["sy_products"] = torch.zeros(0, 0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"format_version|yy_products"):
        torchlbfgs.LBFGS(model.parameters(), **OPTIONS).load_state_dict(half)


def test_state_dicts_do_not_alias_the_live_state() -> None:
    """Later steps change neither a state dict already taken (ours, or converted to torch's
    format) nor one that was loaded (ours, or torch's)."""
    model, optimizer, closure = stepped_optimizer("mlp")
    state_dict = optimizer.state_dict()
    converted = torchlbfgs.to_torch_state_dict(state_dict)
    saved, saved_converted = copy.deepcopy(state_dict), copy.deepcopy(converted)
    run(optimizer, closure, 2)
    assert_same_state_dict(state_dict, saved)
    assert_same_state_dict(converted, saved_converted)
    assert not torch.equal(optimizer.state_dict()["state"][0]["grad"], saved["state"][0]["grad"])

    loaded = torchlbfgs.LBFGS(model.parameters(), history_size=HISTORY_SIZE)
    loaded.load_state_dict(state_dict)
    run(loaded, Closure(model, loaded, *make_data("mlp", torch.float64)), 2)
    assert_same_state_dict(state_dict, saved)

    theirs = torch.optim.LBFGS(model.parameters(), **OPTIONS)
    run(theirs, Closure(model, theirs, *make_data("mlp", torch.float64)), 2)
    torch_state_dict = theirs.state_dict()
    saved_torch = copy.deepcopy(torch_state_dict)
    ours = torchlbfgs.LBFGS(model.parameters(), **OPTIONS)
    ours.load_state_dict(torch_state_dict)
    run(ours, Closure(model, ours, *make_data("mlp", torch.float64)), 2)
    assert_same_state_dict(torch_state_dict, saved_torch)


# --------------------------------------------------------------------------------------------
# Exact resume in a new process

RESUME_CASES = [
    f"{kind}-{dtype}-{line_search}"
    for kind, dtype, line_search in itertools.product(KINDS, DTYPES, LINE_SEARCHES)
]


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """For every case: a run of N steps here, saved with ``torch.save`` and resumed for N more
    steps in one separate process (for all cases at once); and an uninterrupted 2N-step run
    here, stepped without any ``state_dict`` call."""
    directory = tmp_path_factory.mktemp("resume")
    runs: dict[str, dict[str, Any]] = {}
    for case in RESUME_CASES:
        kind, dtype_name, line_search = case.split("-")
        dtype = DTYPES[dtype_name]
        options = {**OPTIONS, **LINE_SEARCHES[line_search]}

        model = make_model(kind, dtype, seed=0)
        optimizer = torchlbfgs.LBFGS(model.parameters(), **options)
        closure = Closure(model, optimizer, *make_data(kind, dtype))
        run(optimizer, closure, STEPS)
        path = str(directory / f"{case}.pt")
        checkpoint = {
            "kind": kind,
            "dtype": dtype_name,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
        }
        torch.save(checkpoint, path)

        reference_model = make_model(kind, dtype, seed=0)
        reference = torchlbfgs.LBFGS(reference_model.parameters(), **options)
        reference_closure = Closure(reference_model, reference, *make_data(kind, dtype))
        run(reference, reference_closure, STEPS)
        assert reference_closure.calls == closure.calls
        reference_closure.calls = 0
        runs[case] = {
            "path": path,
            "checkpoint": checkpoint,
            "reference_model": reference_model,
            "reference_optimizer": reference,
            "reference_losses": torch.stack(run(reference, reference_closure, STEPS)),
            "reference_calls": reference_closure.calls,
        }

    paths = [runs[case]["path"] for case in RESUME_CASES]
    completed = subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, __file__, *paths],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    for case in RESUME_CASES:
        runs[case]["resumed"] = torch.load(runs[case]["path"] + ".resumed", weights_only=True)
    return runs


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_in_new_process_is_bitwise_exact(case: str, resumed_runs: dict[str, dict[str, Any]]) -> None:
    run_ = resumed_runs[case]
    resumed = run_["resumed"]
    reference_model: torch.nn.Module = run_["reference_model"]

    # the checkpoint is taken with a full, wrapped history
    leaves = run_["checkpoint"]["optimizer"]["state"][0]
    assert int(leaves["n_pairs"]) == HISTORY_SIZE
    assert int(leaves["iteration"]) > HISTORY_SIZE

    # the resumed half matches the uninterrupted run bit for bit
    reference_params = reference_model.state_dict()
    assert set(resumed["model"]) == set(reference_params)
    for name, value in reference_params.items():
        assert resumed["model"][name].dtype == value.dtype, name
        assert torch.equal(resumed["model"][name], value), name
    assert torch.equal(resumed["losses"], run_["reference_losses"])
    assert resumed["calls"] == run_["reference_calls"]
    assert_same_state_dict(resumed["optimizer"], run_["reference_optimizer"].state_dict())

    # ... and the second half did something
    for name, value in run_["checkpoint"]["model"].items():
        if not torch.equal(value, reference_params[name]):
            break
    else:
        pytest.fail("the second half did not move the params")


# --------------------------------------------------------------------------------------------
# Validation


def _leaves(state_dict: StateDict) -> dict[str, Any]:
    return state_dict["state"][0]


def set_leaf(name: str, make: Callable[[Tensor], Any]) -> Callable[[StateDict], None]:
    def corrupt(state_dict: StateDict) -> None:
        _leaves(state_dict)[name] = make(_leaves(state_dict)[name])

    return corrupt


def _with_nan(tensor: Tensor) -> Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[0] = math.nan
    return tensor


def _drop_leaf(state_dict: StateDict) -> None:
    del _leaves(state_dict)["rho"]


def _extra_leaf(state_dict: StateDict) -> None:
    _leaves(state_dict)["momentum_buffer"] = torch.zeros(11, dtype=torch.float64)


def _history_size(state_dict: StateDict) -> None:
    state_dict["param_groups"][0]["history_size"] = HISTORY_SIZE + 2


def _extra_group(state_dict: StateDict) -> None:
    state_dict["param_groups"].append({**state_dict["param_groups"][0], "params": [2]})


def _state_under_second_param(state_dict: StateDict) -> None:
    state_dict["state"] = {1: state_dict["state"][0]}


def _state_not_a_dict(state_dict: StateDict) -> None:
    state_dict["state"][0] = [1, 2, 3]


def _other_optimizer_state(
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
) -> Callable[[StateDict], None]:
    """A state dict written by another optimizer over a model like ours, after one step."""

    def replace(state_dict: StateDict) -> None:
        model = make_model("linear", torch.float64, seed=7)
        other = make(list(model.parameters()))
        inputs, targets = make_data("linear", torch.float64)
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        other.step()
        state_dict.clear()
        state_dict.update(other.state_dict())

    return replace


def _other_optimizer_state_under_our_groups(
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
) -> Callable[[StateDict], None]:
    def replace(state_dict: StateDict) -> None:
        groups = state_dict["param_groups"]
        _other_optimizer_state(make)(state_dict)
        state_dict["param_groups"] = groups

    return replace


def _other_optimizer_first_entry(
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
) -> Callable[[StateDict], None]:
    def replace(state_dict: StateDict) -> None:
        groups = state_dict["param_groups"]
        _other_optimizer_state(make)(state_dict)
        state_dict["state"] = {0: state_dict["state"][0]}
        state_dict["param_groups"] = groups

    return replace


def _torch_lbfgs_state(kind: str) -> Callable[[StateDict], None]:
    """A ``torch.optim.LBFGS`` state dict over a model with 12 parameters instead of 11, or
    over the right model but with a NaN in its memory."""

    def replace(state_dict: StateDict) -> None:
        model = torch.nn.Linear(11 if kind == "bigger" else 10, 1).double()
        optimizer = torch.optim.LBFGS(model.parameters(), **{**OPTIONS, "lr": 0.5})
        inputs = torch.randn(
            20, model.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
        )
        run(optimizer, Closure(model, optimizer, inputs, inputs.sum(dim=1, keepdim=True)), 2)
        state_dict.clear()
        state_dict.update(copy.deepcopy(optimizer.state_dict()))
        if kind == "nan":
            state_dict["state"][0]["old_stps"][0].view(-1)[0] = math.nan

    return replace


def _adam(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params)


def _sgd(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _from_bigger_model(state_dict: StateDict) -> None:
    model = torch.nn.Linear(11, 1).double()
    optimizer = torchlbfgs.LBFGS(
        model.parameters(), **{**OPTIONS, **LINE_SEARCHES["strong_wolfe"], "lr": 0.5}
    )
    inputs = torch.randn(20, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    run(optimizer, Closure(model, optimizer, inputs, inputs.sum(dim=1, keepdim=True)), 1)
    state_dict.clear()
    state_dict.update(optimizer.state_dict())


def _from_fewer_tensors(state_dict: StateDict) -> None:
    state_dict["param_groups"][0]["params"] = [0]


N = 11  # parameters of Linear(10, 1)
CORRUPTIONS: dict[str, tuple[Callable[[StateDict], None], type[Exception], str]] = {
    # id: (corruption, error type, text the message must contain)
    "missing-leaf": (_drop_leaf, ValueError, "rho"),
    "extra-leaf": (_extra_leaf, ValueError, "momentum_buffer"),
    "grad-n": (set_leaf("grad", lambda t: torch.zeros(N + 1, dtype=t.dtype)), ValueError, "grad"),
    "direction-n": (set_leaf("pending_direction", lambda t: t[:-1]), ValueError, "pending_direction"),
    "s_history-m": (set_leaf("s_history", lambda t: torch.cat([t, t[:1]])), ValueError, "s_history"),
    "y_history-m": (set_leaf("y_history", lambda t: t[:-1]), ValueError, "y_history"),
    "rho-m": (set_leaf("rho", lambda t: t[:-1]), ValueError, "rho"),
    "value-shape": (set_leaf("value", lambda t: t.reshape(1)), ValueError, "value"),
    "float-as-int": (set_leaf("rho", lambda t: t.to(torch.int64)), ValueError, "rho"),
    "float-as-complex": (set_leaf("grad", lambda t: t.to(torch.complex128)), ValueError, "grad"),
    "int-as-float": (set_leaf("n_evals", lambda t: t.double()), ValueError, "n_evals"),
    "int-as-bool": (set_leaf("head", lambda t: t.bool()), ValueError, "head"),
    "bool-as-int": (set_leaf("has_pending", lambda t: t.long()), ValueError, "has_pending"),
    "head-high": (set_leaf("head", lambda t: torch.tensor(HISTORY_SIZE)), ValueError, "head"),
    "head-negative": (set_leaf("head", lambda t: torch.tensor(-1)), ValueError, "head"),
    "n_pairs-high": (set_leaf("n_pairs", lambda t: torch.tensor(HISTORY_SIZE + 1)), ValueError, "n_pairs"),
    "n_pairs-negative": (set_leaf("n_pairs", lambda t: torch.tensor(-1)), ValueError, "n_pairs"),
    "status-high": (set_leaf("status", lambda t: torch.tensor(99)), ValueError, "status"),
    "status-negative": (set_leaf("status", lambda t: torch.tensor(-1)), ValueError, "status"),
    "iteration-neg": (set_leaf("iteration", lambda t: torch.tensor(-1)), ValueError, "iteration"),
    "n_evals-negative": (set_leaf("n_evals", lambda t: torch.tensor(-5)), ValueError, "n_evals"),
    "nan-s_history": (set_leaf("s_history", _with_nan), ValueError, "s_history"),
    "inf-gamma": (set_leaf("gamma", lambda t: t + math.inf), ValueError, "gamma"),
    "nan-pending_step": (set_leaf("pending_step", _with_nan), ValueError, "pending_step"),
    "gamma-not-tensor": (set_leaf("gamma", float), TypeError, "gamma"),
    "grad-not-tensor": (set_leaf("grad", lambda t: t.tolist()), TypeError, "grad"),
    "format-version": (set_leaf("format_version", lambda v: v + 1), ValueError, "format_version"),
    "state-entry-not-dict": (_state_not_a_dict, TypeError, "dict"),
    "state-under-param-1": (_state_under_second_param, ValueError, "first parameter"),
    "history-size": (_history_size, ValueError, "history_size"),
    "param-count": (_from_bigger_model, ValueError, "saved for shape (1, 11)"),
    "param-tensor-count": (_from_fewer_tensors, ValueError, "param group 0"),
    "group-count": (_extra_group, ValueError, "parameter groups"),
    "adam": (_other_optimizer_state(_adam), ValueError, "max_iter"),
    "sgd-momentum": (_other_optimizer_state(_sgd), ValueError, "max_iter"),
    "adam-state": (_other_optimizer_state_under_our_groups(_adam), ValueError, "[1]"),
    "sgd-state": (_other_optimizer_state_under_our_groups(_sgd), ValueError, "[1]"),
    "adam-first-entry": (_other_optimizer_first_entry(_adam), ValueError, "missing"),
    "sgd-first-entry": (_other_optimizer_first_entry(_sgd), ValueError, "missing"),
    "torch-lbfgs-param-count": (_torch_lbfgs_state("bigger"), ValueError, "shape (11,)"),
    "torch-lbfgs-nan": (_torch_lbfgs_state("nan"), ValueError, "s_history"),
}


@pytest.fixture(scope="module")
def good_checkpoint() -> StateDict:
    """A valid checkpoint of a Linear(10, 1) optimizer with lr=0.5 that has taken steps."""
    _, optimizer, _ = stepped_optimizer("linear", lr=0.5)
    return copy.deepcopy(optimizer.state_dict())


@pytest.mark.parametrize("target_stepped", [False, True], ids=["fresh-target", "stepped-target"])
@pytest.mark.parametrize(("corrupt", "error", "field"), list(CORRUPTIONS.values()), ids=list(CORRUPTIONS))
def test_bad_checkpoint_is_rejected_and_changes_nothing(
    good_checkpoint: StateDict,
    corrupt: Callable[[StateDict], None],
    error: type[Exception],
    field: str,
    target_stepped: bool,
) -> None:
    # the target's hyper-parameters differ from the checkpoint's, so a partial load would show
    model, optimizer, _ = stepped_optimizer(
        "linear", seed=1, steps=2 if target_stepped else 0, lr=0.7, max_iter=6
    )
    assert bool(optimizer.state) == target_stepped
    optimizer_before = snapshot_state_dict(optimizer)
    params_before = copy.deepcopy(model.state_dict())
    state_object_before = optimizer.state

    checkpoint = copy.deepcopy(good_checkpoint)
    corrupt(checkpoint)
    with pytest.raises(error, match=re.escape(field)):
        optimizer.load_state_dict(checkpoint)

    assert_same_state_dict(optimizer.state_dict(), optimizer_before)
    assert optimizer.state is state_object_before
    assert optimizer.param_groups[0]["lr"] == 0.7
    assert optimizer.param_groups[0]["max_iter"] == 6
    assert optimizer.param_groups[0]["params"] == list(model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, params_before[name]), name


def test_good_checkpoint_loads_into_validation_targets(good_checkpoint: StateDict) -> None:
    """Control for the test above: the uncorrupted checkpoint loads into the same targets."""
    for steps in (0, 2):
        _, optimizer, _ = stepped_optimizer("linear", seed=1, steps=steps, lr=0.7, max_iter=6)
        optimizer.load_state_dict(copy.deepcopy(good_checkpoint))
        assert_same_state_dict(optimizer.state_dict(), good_checkpoint)


def test_not_a_state_dict_is_rejected() -> None:
    _, optimizer, _ = stepped_optimizer()
    before = snapshot_state_dict(optimizer)
    with pytest.raises(ValueError, match="param_groups"):
        optimizer.load_state_dict({"state": {}})
    with pytest.raises(ValueError, match="param_groups"):
        optimizer.load_state_dict([1, 2])  # type: ignore[arg-type]
    assert_same_state_dict(optimizer.state_dict(), before)


# --------------------------------------------------------------------------------------------
# Dtype and device moves


MAP_LOCATIONS = {
    "none": None,
    "str": "cpu",
    "device": torch.device("cpu"),
    "dict": {"cpu": "cpu"},
    "callable": lambda storage, location: storage,
}


@pytest.mark.parametrize("map_location", MAP_LOCATIONS)
@pytest.mark.parametrize("line_search", LINE_SEARCHES)
@pytest.mark.parametrize(
    ("source", "target"),
    [(torch.float64, torch.float32), (torch.float32, torch.float64)],
    ids=["64to32", "32to64"],
)
def test_checkpoint_loads_into_other_dtype(
    tmp_path: Path, source: torch.dtype, target: torch.dtype, line_search: str, map_location: str
) -> None:
    model, optimizer, _ = stepped_optimizer("mlp", source, line_search=line_search)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    saved = copy.deepcopy(optimizer.state_dict())

    checkpoint = torch.load(path, map_location=MAP_LOCATIONS[map_location], weights_only=True)
    moved_model = make_model("mlp", target, seed=1)
    moved_model.load_state_dict(checkpoint["model"])
    moved = torchlbfgs.LBFGS(moved_model.parameters(), history_size=HISTORY_SIZE)
    moved.load_state_dict(checkpoint["optimizer"])

    leaves = moved.state_dict()["state"][0]
    for name in FLOAT_LEAVES:
        assert leaves[name].dtype == target, name
        assert torch.equal(leaves[name], saved["state"][0][name].to(target)), name
    for name in INT_LEAVES:
        assert leaves[name].dtype == torch.int64, name
        assert torch.equal(leaves[name], saved["state"][0][name]), name
    assert leaves["has_pending"].dtype == torch.bool
    assert torch.equal(leaves["has_pending"], saved["state"][0]["has_pending"])
    assert leaves["format_version"] == saved["state"][0]["format_version"]
    assert_same_state_dict(optimizer.state_dict(), saved)  # the source is untouched

    inputs, targets = make_data("mlp", target)
    closure = Closure(moved_model, moved, inputs, targets)
    loss_at_checkpoint = loss_of(moved_model, inputs, targets)
    losses = run(moved, closure, STEPS)
    assert all(loss.dtype == target for loss in losses)
    assert float(losses[0]) == pytest.approx(loss_at_checkpoint)
    assert loss_of(moved_model, inputs, targets) < loss_at_checkpoint
    assert all(p.dtype == target and bool(torch.isfinite(p).all()) for p in moved_model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("map_location", [None, "cuda"])
@pytest.mark.parametrize("line_search", LINE_SEARCHES)
def test_cpu_checkpoint_continues_on_cuda(tmp_path: Path, line_search: str, map_location: str | None) -> None:
    model, optimizer, _ = stepped_optimizer("mlp", torch.float64, line_search=line_search)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)

    def resume(device: str) -> tuple[torch.nn.Module, torchlbfgs.LBFGS, Closure]:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        resumed_model = make_model("mlp", torch.float64, seed=1).to(device)
        resumed_model.load_state_dict(checkpoint["model"])
        resumed = torchlbfgs.LBFGS(resumed_model.parameters(), history_size=HISTORY_SIZE)
        resumed.load_state_dict(checkpoint["optimizer"])
        inputs, targets = make_data("mlp", torch.float64)
        return resumed_model, resumed, Closure(resumed_model, resumed, inputs.to(device), targets.to(device))

    cpu_model, cpu_optimizer, cpu_closure = resume("cpu")
    cuda_model, cuda_optimizer, cuda_closure = resume("cuda")
    for device, resumed in (("cuda", cuda_optimizer), ("cpu", cpu_optimizer)):
        for name, leaf in resumed.state_dict()["state"][0].items():
            if isinstance(leaf, torch.Tensor):
                assert leaf.device.type == device, name
    run(cpu_optimizer, cpu_closure, 2)
    run(cuda_optimizer, cuda_closure, 2)
    for p, q in zip(cpu_model.parameters(), cuda_model.parameters(), strict=True):
        assert q.device.type == "cuda"
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-6, atol=1e-6)
    assert not torch.equal(next(cpu_model.parameters()).detach(), next(model.parameters()).detach())


# --------------------------------------------------------------------------------------------
# Hyper-parameters


@pytest.mark.parametrize("source_steps", [0, 2])
def test_load_restores_hyper_parameters(source_steps: int) -> None:
    chosen = {
        "lr": 0.5,
        "max_iter": 7,
        "max_eval": 9,
        "tolerance_grad": 1e-6,
        "tolerance_change": 1e-8,
        "history_size": HISTORY_SIZE,
        "line_search_fn": "strong_wolfe",
    }
    _, source, _ = stepped_optimizer("linear", steps=source_steps, **chosen)
    model = make_model("linear", torch.float64, seed=1)
    optimizer = torchlbfgs.LBFGS(model.parameters(), history_size=HISTORY_SIZE)
    assert optimizer.param_groups[0]["lr"] == 1
    optimizer.load_state_dict(source.state_dict())
    for option, value in chosen.items():
        assert optimizer.param_groups[0][option] == value, option
    assert optimizer.param_groups[0]["params"] == list(model.parameters())
    assert_same_state_dict(optimizer.state_dict(), source.state_dict())


def test_history_size_is_not_restored_but_checked() -> None:
    _, source, _ = stepped_optimizer("linear", history_size=HISTORY_SIZE)
    for steps in (0, 1):
        _, optimizer, _ = stepped_optimizer("linear", seed=1, steps=steps, history_size=HISTORY_SIZE + 1)
        before = snapshot_state_dict(optimizer)
        with pytest.raises(ValueError, match="history_size"):
            optimizer.load_state_dict(source.state_dict())
        assert_same_state_dict(optimizer.state_dict(), before)
        assert optimizer.param_groups[0]["history_size"] == HISTORY_SIZE + 1
    # a fresh checkpoint (no state yet) carries history_size too
    fresh = torchlbfgs.LBFGS(make_model("linear", torch.float64, 2).parameters(), history_size=HISTORY_SIZE)
    with pytest.raises(ValueError, match="history_size"):
        optimizer.load_state_dict(fresh.state_dict())


# --------------------------------------------------------------------------------------------
# Migration to and from torch.optim.LBFGS


def _torch_lbfgs(model: torch.nn.Module, line_search: str) -> torch.optim.LBFGS:
    return torch.optim.LBFGS(model.parameters(), **OPTIONS, **LINE_SEARCHES[line_search])


def _ours(model: torch.nn.Module, line_search: str) -> torchlbfgs.LBFGS:
    return torchlbfgs.LBFGS(model.parameters(), **OPTIONS, **LINE_SEARCHES[line_search])


@pytest.mark.parametrize("steps", [0, 1, STEPS])
@pytest.mark.parametrize("line_search", LINE_SEARCHES)
@pytest.mark.parametrize("kind", KINDS)
def test_torch_lbfgs_state_continues_in_ours(kind: str, line_search: str, steps: int) -> None:
    inputs, targets = make_data(kind, torch.float64)
    model = make_model(kind, torch.float64, seed=0)
    theirs = _torch_lbfgs(model, line_search)
    their_closure = Closure(model, theirs, inputs, targets)
    run(theirs, their_closure, steps)
    torch_state = theirs.state_dict()["state"]
    if steps == STEPS:
        assert len(torch_state[0]["old_dirs"]) == HISTORY_SIZE
        assert torch_state[0]["n_iter"] > HISTORY_SIZE

    our_model = copy.deepcopy(model)
    ours = _ours(our_model, line_search)
    ours.load_state_dict(theirs.state_dict())
    if steps:
        assert int(ours.state_dict()["state"][0]["n_evals"]) == torch_state[0]["func_evals"]
    continue_in_lockstep(theirs, their_closure, ours, Closure(our_model, ours, inputs, targets), steps=4)


@pytest.mark.parametrize("steps", [0, 1, STEPS])
@pytest.mark.parametrize("line_search", LINE_SEARCHES)
@pytest.mark.parametrize("kind", KINDS)
def test_our_state_continues_in_torch_lbfgs(kind: str, line_search: str, steps: int) -> None:
    inputs, targets = make_data(kind, torch.float64)
    model = make_model(kind, torch.float64, seed=0)
    ours = _ours(model, line_search)
    our_closure = Closure(model, ours, inputs, targets)
    run(ours, our_closure, steps)

    converted = torchlbfgs.to_torch_state_dict(ours.state_dict())
    their_model = copy.deepcopy(model)
    theirs = _torch_lbfgs(their_model, line_search)
    theirs.load_state_dict(converted)
    continue_in_lockstep(ours, our_closure, theirs, Closure(their_model, theirs, inputs, targets), steps=4)


@pytest.mark.parametrize("line_search", LINE_SEARCHES)
@pytest.mark.parametrize("direction", ["torch-to-ours", "ours-to-torch"])
def test_migration_after_a_step_that_returned_at_once(direction: str, line_search: str) -> None:
    """The first step meets a zero gradient (the model already fits its batch) and returns
    before iterating; the state moves to the other optimizer, which continues on new data."""
    model = make_model("linear", torch.float64, seed=0)
    inputs, new_targets = make_data("linear", torch.float64)
    with torch.no_grad():
        fitted_targets = model(inputs)
    make_first, make_second = (_torch_lbfgs, _ours) if direction == "torch-to-ours" else (_ours, _torch_lbfgs)

    first = make_first(model, line_search)
    first_closure = Closure(model, first, inputs, fitted_targets)
    before = copy.deepcopy(model.state_dict())
    run(first, first_closure, 1)
    assert first_closure.calls == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    state_dict = first.state_dict()
    if direction == "ours-to-torch":
        state_dict = torchlbfgs.to_torch_state_dict(state_dict)
    assert state_dict["state"][0] == {"func_evals": 1, "n_iter": 0}  # torch's format, both ways
    second_model = copy.deepcopy(model)
    second = make_second(second_model, line_search)
    second.load_state_dict(state_dict)

    first_closure.targets = new_targets
    continue_in_lockstep(first, first_closure, second, Closure(second_model, second, inputs, new_targets), 4)


@pytest.mark.parametrize("line_search", LINE_SEARCHES)
def test_torch_state_with_a_tensor_step_migrates(line_search: str) -> None:
    """After torch's very first iteration its pending step ``t`` is a tensor, min(1, 1/|g|_1) * lr,
    and its memory is still empty."""
    inputs, targets = make_data("linear", torch.float64)
    targets = 30.0 * targets  # |g|_1 > 1, so the first step is scaled
    model = make_model("linear", torch.float64, seed=0)
    options = {**OPTIONS, **LINE_SEARCHES[line_search], "max_iter": 1}
    theirs = torch.optim.LBFGS(model.parameters(), **options)
    their_closure = Closure(model, theirs, inputs, targets)
    run(theirs, their_closure, 1)
    torch_state = theirs.state_dict()["state"][0]
    assert isinstance(torch_state["t"], torch.Tensor)
    assert torch_state["old_dirs"] == []

    our_model = copy.deepcopy(model)
    ours = torchlbfgs.LBFGS(our_model.parameters(), **options)
    ours.load_state_dict(theirs.state_dict())
    assert bool(ours.state_dict()["state"][0]["has_pending"])
    continue_in_lockstep(theirs, their_closure, ours, Closure(our_model, ours, inputs, targets), steps=6)


def test_converted_state_dict_loads_with_weights_only(tmp_path: Path) -> None:
    _, ours, _ = stepped_optimizer("mlp", steps=STEPS)
    converted = torchlbfgs.to_torch_state_dict(ours.state_dict())
    torch.save(converted, tmp_path / "torch_format.pt")
    loaded = torch.load(tmp_path / "torch_format.pt", weights_only=True)
    assert set(loaded["state"][0]) >= {"d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad"}
    assert len(loaded["state"][0]["old_dirs"]) == HISTORY_SIZE
    ours_groups = [
        {k: v for k, v in g.items() if k != "param_shapes"} for g in ours.state_dict()["param_groups"]
    ]
    assert loaded["param_groups"] == ours_groups


# --------------------------------------------------------------------------------------------
# add_param_group


@pytest.mark.parametrize("steps_after_adding", [0, 1])
@pytest.mark.parametrize("line_search", LINE_SEARCHES)
def test_round_trip_after_add_param_group(tmp_path: Path, line_search: str, steps_after_adding: int) -> None:
    """Steps, ``add_param_group``, maybe another step, then save: a fresh optimizer with the
    same two groups loads the checkpoint and continues exactly as the original."""
    inputs, targets = make_data("mlp", torch.float64)
    model = make_model("mlp", torch.float64, seed=0)
    optimizer = torchlbfgs.LBFGS(model[0].parameters(), **OPTIONS, **LINE_SEARCHES[line_search])
    closure = Closure(model, optimizer, inputs, targets)
    run(optimizer, closure, 2)
    optimizer.add_param_group({"params": list(model[2].parameters())})
    run(optimizer, closure, steps_after_adding)

    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    state_dict = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert len(state_dict["param_groups"]) == 2
    assert state_dict["state"][0]["grad"].numel() == sum(p.numel() for p in model.parameters())
    resumed_model = copy.deepcopy(model)
    resumed = torchlbfgs.LBFGS(resumed_model[0].parameters(), **OPTIONS, **LINE_SEARCHES[line_search])
    resumed.add_param_group({"params": list(resumed_model[2].parameters())})
    resumed.load_state_dict(state_dict)
    assert_same_state_dict(resumed.state_dict(), optimizer.state_dict())
    continue_in_lockstep(optimizer, closure, resumed, Closure(resumed_model, resumed, inputs, targets), 3)
