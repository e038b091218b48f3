"""``torch.distributed.checkpoint`` round-trips ``torchlbfgs.LBFGS`` (one process, gloo).

``get_optimizer_state_dict`` keys the state by parameter name, ``dcp.save``/``dcp.load`` write
and read it, ``set_optimizer_state_dict`` puts it back; the run then continues exactly as the
uninterrupted one. L-BFGS keeps its whole state under the first parameter (as
``torch.optim.LBFGS`` does), so loading needs ``StateDictOptions(strict=False)``: the other
parameters have, correctly, no state of their own.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

import torchlbfgs


@pytest.fixture
def process_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def make(seed: int = 0) -> tuple[torch.nn.Module, torchlbfgs.LBFGS]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    optimizer = torchlbfgs.LBFGS(
        model.parameters(), history_size=3, max_iter=5, line_search_fn="strong_wolfe"
    )
    return model, optimizer


INPUTS = torch.randn(30, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
TARGETS = torch.randn(30, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def steps(model: torch.nn.Module, optimizer: torchlbfgs.LBFGS, count: int) -> None:
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(INPUTS), TARGETS)
        loss.backward()
        return loss

    for _ in range(count):
        optimizer.step(closure)


@pytest.mark.parametrize("steps_before", [1, 3])  # 3 steps of 5 iterations wrap the history
def test_dcp_round_trip_continues_exactly(process_group: None, tmp_path, steps_before: int) -> None:  # type: ignore[no-untyped-def]
    model, optimizer = make()
    steps(model, optimizer, steps_before)
    dcp.save(
        {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer)},
        checkpoint_id=tmp_path,
    )
    steps(model, optimizer, 2)  # the uninterrupted run

    resumed_model, resumed = make(seed=1)  # other initial weights: everything must come from the file
    target = {"model": resumed_model.state_dict(), "optim": get_optimizer_state_dict(resumed_model, resumed)}
    dcp.load(target, checkpoint_id=tmp_path)
    resumed_model.load_state_dict(target["model"])
    set_optimizer_state_dict(
        resumed_model, resumed, optim_state_dict=target["optim"], options=StateDictOptions(strict=False)
    )
    steps(resumed_model, resumed, 2)
    for mine, reference in zip(resumed_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(mine, reference)
    for name, leaf in optimizer.state_dict()["state"][0].items():
        other = resumed.state_dict()["state"][0][name]
        assert torch.equal(leaf, other) if isinstance(leaf, torch.Tensor) else leaf == other, name


def test_dcp_initialisation_of_a_fresh_optimizer_changes_nothing() -> None:
    """What ``get_optimizer_state_dict`` does to a fresh optimizer (zero gradients, then
    ``step(closure=None)``) stores the "no step yet" state: the first real step is then the
    same as a fresh optimizer's, and no parameter moved."""
    model, optimizer = make()
    reference_model, reference = make()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    assert optimizer.step(None) is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert int(optimizer.state_dict()["state"][0]["n_evals"]) == 0
    steps(model, optimizer, 2)
    steps(reference_model, reference, 2)
    for mine, theirs in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    ours, expected = optimizer.state_dict()["state"][0], reference.state_dict()["state"][0]
    assert all(
        torch.equal(ours[k], expected[k]) if isinstance(ours[k], torch.Tensor) else ours[k] == expected[k]
        for k in expected
    )
    with pytest.raises(ValueError, match="needs a closure"):
        optimizer.step(None)  # with state, a missing closure is an error
