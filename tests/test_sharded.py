"""Parameters sharded over processes (``DTensor``: FSDP2's ``fully_shard``, ``distribute_tensor``
with ``Shard(0)`` and ``Replicate()``), gloo on loopback, on meshes of 2 and 4 processes.

The 4 ranks run in the background from the start of the session (``sharded_run`` in
conftest.py, which calls ``sharded_worker.run_ranks``); the protocol and the configurations
are in ``sharded_worker.py``. Each must take the steps one process takes on the unsharded
model (float64, 1e-10), with the same closure calls, while holding only its share of the
vectors, and reduce with a number of all-reduces that does not grow with the parameters.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from background_runs import PendingRun
from sharded_worker import (
    FUNCTIONAL_ITERATIONS,
    HIDDEN,
    batch_problems,
    checkpointed_optimizer,
    configs,
    full_batch_closure,
    functional,
    functional_configs,
    logistic,
    model,
    train,
)

import torchlbfgs

HISTORY = 3  # sharded_worker's history_size


def _results(run: tuple[Path, PendingRun[list[tuple[int, str]]]], world_size: int) -> list[dict[str, Any]]:
    """What each rank of the mesh of ``world_size`` ranks saved."""
    out, ranks_run = run
    for returncode, output in ranks_run.result():
        assert returncode == 0, output[-3000:]
    return [torch.load(f"{out}.rank{rank}", weights_only=False)[world_size] for rank in range(world_size)]


@functools.cache
def _alone(layout: str, search: str | None) -> dict[str, Any]:
    """The reference: one process, plain parameters (what every rank must match)."""
    return train(layout, search, rank=0, world_size=1)


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_steps_equal_one_process(
    world_size: int, sharded_run: tuple[Path, PendingRun[list[tuple[int, str]]]]
) -> None:
    ranks = _results(sharded_run, world_size)
    for layout, search in configs(world_size):
        key = f"{layout}-{search}"
        alone = _alone(layout, search)
        n = sum(p.numel() for p in alone["params"])
        local_sizes = [rank[key]["local_size"] for rank in ranks]
        replicated = 0 if layout == "fsdp" else HIDDEN + 1  # the biases, on every rank
        assert sum(local_sizes) == n + (world_size - 1) * replicated, key  # each rank: its share
        assert max(local_sizes) < n, key
        for rank in ranks:
            mine = rank[key]
            assert mine["calls"] == alone["calls"], key
            assert mine["iterations"] == alone["iterations"] > HISTORY, key  # the ring wraps
            losses = torch.tensor(mine["losses"])
            torch.testing.assert_close(losses, torch.tensor(alone["losses"]), rtol=1e-10, atol=0.0)
            for got, expected in zip(mine["params"], alone["params"], strict=True):
                torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
            # O(1) all-reduces per iteration and per evaluation, whatever the number of tensors
            # or pairs in memory. Per iteration: the curvature pair's s'y, y'y and its products
            # with the memory, the direction's products with the memory (one all-reduce: the
            # compact representation), the slope, max|d| and max|g| after a search; per
            # evaluation its slope or max|g|; a few per step. With m = 3 the two-loop recursion's
            # 2m sequential products would make 12 per iteration; one per tensor, 4x as many.
            steps = len(mine["losses"])
            bound = 7 * mine["iterations"] + mine["evaluations"] + 3 * steps
            assert 0 < sum(mine["all_reduces"]) <= bound, (key, mine["all_reduces"], bound)
        assert all(rank[key]["all_reduces"] == ranks[0][key]["all_reduces"] for rank in ranks), key
    for rank in ranks if world_size == 2 else ():  # the worker checks these on 2 ranks
        assert rank["bounds refused"].startswith("torchlbfgs.LBFGS: bounds (lower/upper) are not supported")
        assert rank["bounds refused"].endswith("(unchanged: True, state: 0)")


@pytest.mark.parametrize("world_size", [2])
def test_a_sharded_checkpoint_resumes_on_its_layout_only(
    world_size: int, sharded_run: tuple[Path, PendingRun[list[tuple[int, str]]]]
) -> None:
    """state_dict -> torch.save -> a fresh sharded model and optimizer -> load_state_dict: the
    steps after equal uninterrupted ones, bit for bit; onto unsharded parameters it is refused."""
    for rank in _results(sharded_run, world_size):
        checkpoint = rank["checkpoint"]
        for resumed, uninterrupted in zip(checkpoint["resumed"], checkpoint["uninterrupted"], strict=True):
            assert torch.equal(resumed, uninterrupted)
        assert (
            "saved for sharded parameters (its leaves are DTensors), this optimizer's"
            in checkpoint["refused"]
        )
        # the plain state dict: one DTensor per parameter and vector, of the parameter's shape
        # (history: a leading dimension of 3 rows, the placement moved to dim 1)
        shapes = [tuple(p.shape) for p in model().parameters()]
        for index, shape in enumerate(shapes):
            for name, expected in (
                ("grad", shape),
                ("s_history", (HISTORY, *shape)),
                ("pending_direction", shape),
            ):
                kind, found, placements = checkpoint["leaves"][f"{index}/{name}"]
                assert (kind, found) == ("DTensor", expected), (index, name)
                assert placements == ("(Shard(dim=1),)" if name == "s_history" else "(Shard(dim=0),)")
        # broken leaves are refused, on every rank alike, and change nothing
        wrong_shape, plain, nan, no_scalars, to_torch = checkpoint["refusals"]
        assert no_scalars.startswith("state[0] is missing or not a dict")
        assert "torch.optim.LBFGS cannot step on sharded parameters" in to_torch
        assert wrong_shape.startswith("state[1]['grad']: expected shape (7,) (the parameter's), found (1,)")
        assert "the parameter is a DTensor and this leaf a plain tensor" in plain
        assert "['grad']: expected finite values, found NaN or Inf (on this process or another)" in nan
        assert all(said.endswith("(unchanged: True)") for said in checkpoint["refusals"][:4])
        # extremes over ranks keep infinities and NaN (what the non-finite checks read)
        extremes = rank["extremes"]
        assert extremes["inf"] == [-2.0, math.inf]
        assert extremes["-inf"] == [-math.inf, 2.0]
        assert all(math.isnan(value) for value in extremes["nan"])
        assert extremes["empty on rank 1"] == [-4.0, 3.0]
        # what torchlbfgs.LBFGS replaces fails on the same model (the docs say so)
        assert rank["torch.optim.LBFGS"].startswith("RuntimeError"), rank["torch.optim.LBFGS"]


def test_distributed_checkpoints_reshard_between_mesh_sizes(
    sharded_run: tuple[Path, PendingRun[list[tuple[int, str]]]],
) -> None:
    """torch.distributed.checkpoint (get/set_optimizer_state_dict, sharded save): saved on 2
    ranks and loaded on 1, and the reverse. The loaded state is the saved one, bit for bit, and
    the step after it is the one an uninterrupted run on one process takes (float64, 1e-12)."""
    out, ranks_run = sharded_run
    for returncode, output in ranks_run.result():
        assert returncode == 0, output[-3000:]
    ranks = [torch.load(f"{out}.rank{rank}", weights_only=False)["resharded"] for rank in range(2)]
    uninterrupted = _two_steps_alone()
    for saved_on, loaded_on, loaders in (
        ("saved on 2", "2 -> 1", ranks[:1]),
        ("saved on 1", "1 -> 2", ranks),
    ):
        saved = ranks[0][saved_on]
        assert saved["1/s_history"].abs().sum() > 0  # a state with pairs in memory
        for rank in loaders:
            loaded = rank[loaded_on]
            assert loaded["loaded"].keys() == saved.keys()
            for name, tensor in saved.items():
                assert torch.equal(loaded["loaded"][name], tensor), (loaded_on, name)
            for got, expected in zip(loaded["params"], uninterrupted, strict=True):
                torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14, msg=loaded_on)


@functools.cache
def _two_steps_alone() -> list[torch.Tensor]:
    """Two steps of the resharded checkpoints' optimizer, uninterrupted, on plain parameters."""
    net = model()
    optimizer = checkpointed_optimizer(net.parameters())
    closure = full_batch_closure(net, optimizer)
    for _ in range(2):
        optimizer.step(closure)
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_batch_sharded_over_ranks_solves_as_one_process(
    world_size: int, sharded_run: tuple[Path, PendingRun[list[tuple[int, str]]]]
) -> None:
    """batched_minimize on Shard(0) DTensors (11 problems: uneven shards): each rank solves its
    rows with no collective during the solve, the result comes back Shard(0), and gathered it
    equals one process solving the whole batch."""
    w0, X, y, decay = batch_problems()
    alone = torchlbfgs.batched_minimize(
        logistic, w0, X, y, decay, in_dims=(0, 0, 0, None), tolerance_grad=1e-10
    )
    ranks = _results(sharded_run, world_size)
    assert sum(rank["batch"]["local_rows"] for rank in ranks) == len(w0)
    for rank in ranks:
        batch = rank["batch"]
        assert batch["collectives"] == 0
        assert set(batch["placements"].values()) == {"(Shard(dim=0),)"}
        for name, expected in alone._asdict().items():
            torch.testing.assert_close(batch["fields"][name], expected, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("world_size", [2, 4])
def test_the_functional_api_on_dtensors_equals_one_process(
    world_size: int, sharded_run: tuple[Path, PendingRun[list[tuple[int, str]]]]
) -> None:
    """minimize, and init with a loop of update, on a dict of DTensors (Shard(0), uneven
    Shard(1), Replicate): the values, counters and parameters of one process on the plain
    tensors (float64, 1e-10), DTensors of the same placements back, each process holding its
    share of the state, and all-reduces that do not grow with the parameters."""
    ranks = _results(sharded_run, world_size)
    for api, search, direction in functional_configs(world_size):
        key = f"functional {api}-{search}-{direction}"
        alone = functional(api, search, direction, world_size=1)
        assert alone["iterations"] == FUNCTIONAL_ITERATIONS > 3  # the ring of 3 pairs wraps
        n = sum(p.numel() for p in alone["params"].values())
        for rank in ranks:
            mine = rank[key]
            assert (mine["iterations"], mine["evaluations"]) == (alone["iterations"], alone["evaluations"]), (
                key
            )
            torch.testing.assert_close(
                torch.tensor(mine["values"]), torch.tensor(alone["values"]), rtol=1e-10, atol=0.0
            )
            for name, expected in alone["params"].items():
                torch.testing.assert_close(mine["params"][name], expected, rtol=1e-10, atol=1e-12, msg=key)
            assert mine["placements"] == ranks[0][key]["placements"]
            assert "Shard(dim=1)" in mine["placements"]["2.weight"]
            assert "Replicate" in mine["placements"]["0.bias"]
            if mine["grad_norm"] is not None:
                assert mine["grad_norm"] == pytest.approx(alone["grad_norm"], rel=1e-8)
            if mine["local_size"] is not None:
                assert mine["local_size"] < n
            # O(1) all-reduces of scalars per iteration and per evaluation, whatever the number of
            # tensors: update makes about 14 per iteration (the direction's products with the
            # memory in one, the pair's, the slope, max-norms, finiteness) and one or two per
            # evaluation; minimize's evaluation rounds plan an iteration in every round, about 15
            # per evaluation. The two-loop recursion adds two per pair in memory (3).
            two_loop = 6 if direction == "two_loop" else 0
            if api == "minimize":
                bound = (16 + two_loop) * mine["evaluations"] + 4
            else:
                bound = (15 + two_loop) * mine["iterations"] + 2 * mine["evaluations"] + 4
            assert 0 < mine["all_reduces"] <= bound, (key, mine["all_reduces"], bound)
    if world_size == 2:
        for rank in ranks:
            bounds_said, implicit_said = rank["functional refusals"]
            assert "bounds are not supported with parameters sharded over processes" in bounds_said
            assert "implicit_diff is not supported with parameters sharded" in implicit_said
