"""Hostile checkpoints, generated: ``load_state_dict`` refuses every broken state with a
``ValueError``/``TypeError`` that names what is wrong, and leaves the optimizer exactly as it
was. The hand-picked cases (other optimizers, torch's format, truncated files, ...) are in
``test_state_dict.py``; here hypothesis combines one to three random breakages of random
leaves (removed, extra, renamed, reshaped, wrong dtype kind, counters out of range, NaN/Inf,
non-tensor junk, a wrong format version), at least 500 cases a run.
"""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchlbfgs
from torchlbfgs.checkpoint import FORMAT_VERSION, _leaf_specs

HISTORY_SIZE = 4
N = 11  # parameters of Linear(10, 1)
SPECS = _leaf_specs(N, HISTORY_SIZE)
# The adapter keeps no compact-form products, so their expected shape is (0, 0).
COUNTER_RANGES = {
    "head": (0, HISTORY_SIZE - 1),
    "n_pairs": (0, HISTORY_SIZE),
    "iteration": (0, None),
    "n_evals": (0, None),
    "status": (0, max(torchlbfgs.StopReason)),
}
KIND_DTYPES = {
    "floating": [torch.float32, torch.float64],
    "integer": [torch.int64, torch.int32],
    "bool": [torch.bool],
    "complex": [torch.complex64],
}


def optimizer_and_closure(seed: int) -> tuple[torchlbfgs.LBFGS, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(10, 1).double()
    optimizer = torchlbfgs.LBFGS(model.parameters(), history_size=HISTORY_SIZE, max_iter=3,
                                 line_search_fn="strong_wolfe")  # fmt: skip
    inputs = torch.randn(20, 10, dtype=torch.float64)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), inputs.sum(1, keepdim=True))
        loss.backward()
        return loss

    return optimizer, closure


def stepped(seed: int, steps: int) -> torchlbfgs.LBFGS:
    optimizer, closure = optimizer_and_closure(seed)
    for _ in range(steps):
        optimizer.step(closure)
    return optimizer


GOOD = copy.deepcopy(stepped(0, 3).state_dict())  # the history has wrapped
TARGETS = {"fresh": lambda: stepped(1, 0), "stepped": lambda: stepped(1, 2)}


@st.composite
def breakages(draw: st.DrawFn) -> tuple[str, str, Any]:
    """(what, which leaf, how): one breakage of the state entry."""
    name = draw(st.sampled_from(sorted(SPECS)))
    shape, kind = SPECS[name]
    options = ["remove", "rename", "extra", "junk", "shape", "dtype", "version"]
    if name in COUNTER_RANGES:
        options.append("range")
    if kind == "floating" and math.prod(shape) > 0:
        options.append("nonfinite")
    what = draw(st.sampled_from(options))
    if what == "junk":
        return what, name, draw(st.sampled_from([None, "text", [1.0, 2.0], {"a": 1}, 1.5, 3]))
    if what == "shape":
        wrong = draw(st.lists(st.integers(0, 13), max_size=3).map(tuple).filter(lambda s: s != shape))
        return what, name, wrong
    if what == "dtype":
        return (
            what,
            name,
            draw(st.sampled_from([d for k, ds in KIND_DTYPES.items() if k != kind for d in ds])),
        )
    if what == "range":
        low, high = COUNTER_RANGES[name]
        too_low = draw(st.integers(-(2**40), low - 1))
        return (
            what,
            name,
            too_low if high is None else draw(st.sampled_from([too_low, high + 1, high + 1000])),
        )
    if what == "nonfinite":
        return (
            what,
            name,
            (
                draw(st.integers(0, math.prod(shape) - 1)),
                draw(st.sampled_from([math.nan, math.inf, -math.inf])),
            ),
        )
    if what == "version":
        return what, "format_version", draw(st.sampled_from([0, 1_000, -1, "2", 2.0, None]))
    if what == "extra":
        return (
            what,
            draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in SPECS and k != "format_version")),
            None,
        )
    return what, name, None


def apply(leaves: dict[str, Any], breakage: tuple[str, str, Any]) -> str | None:
    """Break ``leaves`` in place; return the key the error must name (None: any key)."""
    what, name, how = breakage
    if name not in leaves and what not in ("extra", "version"):
        return None  # an earlier breakage removed or renamed it
    if what == "remove":
        del leaves[name]
    elif what == "rename":
        leaves[name + "_renamed"] = leaves.pop(name)
    elif what == "extra":
        leaves[name] = torch.zeros(1)
    elif what == "junk":
        leaves[name] = how
    elif what == "shape":
        current = leaves[name]
        leaves[name] = torch.zeros(
            how, dtype=current.dtype if isinstance(current, torch.Tensor) else torch.float64
        )
    elif what == "dtype":
        leaves[name] = torch.zeros(SPECS[name][0], dtype=how)
    elif what == "range":
        leaves[name] = torch.tensor(how)
    elif what == "nonfinite":
        current = leaves[name]
        if not (
            isinstance(current, torch.Tensor) and current.is_floating_point() and current.numel() > how[0]
        ):
            return None  # an earlier breakage changed the leaf: nothing finite left to spoil here
        index, value = how
        leaves[name] = leaves[name].clone()
        leaves[name].view(-1)[index] = value
    elif what == "version":
        if how == FORMAT_VERSION:
            return None
        leaves["format_version"] = how
    return name


def snapshot(optimizer: torchlbfgs.LBFGS) -> dict[str, Any]:
    return copy.deepcopy(optimizer.state_dict())


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index in a["state"]:
        for key, leaf in a["state"][index].items():
            other = b["state"][index][key]
            assert torch.equal(leaf, other) if isinstance(leaf, torch.Tensor) else leaf == other, key


@pytest.mark.parametrize("target", sorted(TARGETS))
@settings(max_examples=300, deadline=None, database=None)
@given(
    broken=st.lists(breakages(), min_size=1, max_size=3),
    history_size=st.none() | st.integers(1, 50).filter(lambda m: m != HISTORY_SIZE),
)
def test_generated_hostile_checkpoints_are_refused_and_change_nothing(
    target: str, broken: list[Any], history_size: int | None
) -> None:
    """Broken leaves, and sometimes also a checkpoint written with another history size."""
    state_dict = copy.deepcopy(GOOD)
    leaves = state_dict["state"][0]
    named = {apply(leaves, breakage) for breakage in broken} - {None}
    if history_size is not None:
        state_dict["param_groups"][0]["history_size"] = history_size
        named.add("history_size")
    if not named:
        return  # every breakage was undone by an earlier one (e.g. renamed, then removed)
    optimizer = TARGETS[target]()
    before = snapshot(optimizer)
    with pytest.raises((ValueError, TypeError)) as raised:
        optimizer.load_state_dict(state_dict)
    message = str(raised.value)
    assert any(key in message or repr(key) in message for key in named), (message, named)
    assert_same(snapshot(optimizer), before)


@settings(max_examples=60, deadline=None, database=None)
@given(fraction=st.floats(0.0, 0.999))
def test_truncated_checkpoint_files_fail_to_load_and_change_nothing(fraction: float) -> None:
    """A file cut short fails in ``torch.load(..., weights_only=True)`` (never executing code),
    before the optimizer is touched."""
    buffer = io.BytesIO()
    torch.save(GOOD, buffer)
    data = buffer.getvalue()
    optimizer = TARGETS["stepped"]()
    before = snapshot(optimizer)
    with pytest.raises(Exception) as raised:  # noqa: PT011 - torch raises several kinds here
        optimizer.load_state_dict(
            torch.load(io.BytesIO(data[: int(fraction * len(data))]), weights_only=True)
        )
    assert not isinstance(raised.value, AssertionError)
    assert_same(snapshot(optimizer), before)
