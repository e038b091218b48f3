"""Data-parallel training with ``torch.distributed`` (gloo, two processes on loopback).

Each rank holds half of the samples; the closure all-reduces the loss and the gradients
(protocol in ``data_parallel_worker.py``). Every rank must take the same steps with the same
number of closure calls (so collectives never deadlock, the failure users report with
L-BFGS under DDP), and the result must equal one process training on all the data.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from data_parallel_worker import train

WORKER = Path(__file__).with_name("data_parallel_worker.py")


def test_two_ranks_step_identically_and_match_full_batch(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "result"
    processes = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}  # fmt: skip
        command = [sys.executable, str(WORKER), str(out)]
        processes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    for process in processes:
        output, _ = process.communicate(timeout=240)
        assert process.returncode == 0, output[-3000:]
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
