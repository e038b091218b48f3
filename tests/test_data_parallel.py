"""Data-parallel training with ``torch.distributed`` (gloo, two processes on loopback).

Each rank holds half of the samples; the closure all-reduces the loss and the gradients
(protocol in ``data_parallel_worker.py``). Every rank must take the same steps with the same
number of closure calls (so collectives never deadlock, the failure users report with
L-BFGS under DDP), and the result must equal one process training on all the data.
"""

from __future__ import annotations

from pathlib import Path

import torch
from background_runs import PendingRun
from data_parallel_worker import train


def test_two_ranks_step_identically_and_match_full_batch(
    data_parallel_run: tuple[Path, PendingRun[list[tuple[int, str]]]],
) -> None:
    """The two ranks run in the background from the start of the session (``data_parallel_run``
    in conftest.py, which calls ``data_parallel_worker.run_two_ranks``); this waits for them."""
    out, ranks_run = data_parallel_run
    for returncode, output in ranks_run.result():
        assert returncode == 0, output[-3000:]
    ranks = [torch.load(f"{out}.rank{rank}", weights_only=True) for rank in range(2)]
    # identical steps and closure calls on every rank
    assert ranks[0]["calls"] == ranks[1]["calls"]
    assert ranks[0]["losses"] == ranks[1]["losses"]
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(a, b)
    # the same run as one process on the full batch (sums in another order: 1e-10)
    alone = train(rank=0, world_size=1)
    assert alone["calls"] == ranks[0]["calls"]
    for mine, reference in zip(ranks[0]["params"], alone["params"], strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-12)
