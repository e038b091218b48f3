"""One rank of the data-parallel test (:func:`run_two_ranks` starts two for
``test_data_parallel.py``; ``torchrun --nproc-per-node 2 tests/data_parallel_worker.py OUT`` does
the same).

Each rank holds a shard of the samples. The closure protocol that keeps every rank in step:
compute the shard's *summed* loss, backward, then all-reduce (sum) the loss and every
gradient and divide by the global sample count. Every rank then sees the same loss and
gradient bits, so every rank's L-BFGS takes the same decisions: the same steps and the same
number of closure calls, and the collectives inside the closure never mismatch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import ranks
import torch
import torch.distributed as dist

import torchlbfgs

SAMPLES, FEATURES = 64, 5


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(SAMPLES, FEATURES, generator=generator, dtype=torch.float64)
    targets = torch.tanh(inputs @ torch.randn(FEATURES, 1, generator=generator, dtype=torch.float64))
    return inputs, targets


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()


def train(rank: int, world_size: int, steps: int = 4) -> dict[str, object]:
    inputs, targets = data()
    shard = slice(rank * SAMPLES // world_size, (rank + 1) * SAMPLES // world_size)
    inputs, targets = inputs[shard], targets[shard]
    net = model()
    optimizer = torchlbfgs.LBFGS(net.parameters(), history_size=5, max_iter=10, line_search_fn="strong_wolfe")
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        optimizer.zero_grad()
        loss = ((net(inputs) - targets) ** 2).sum()  # this shard's sum
        loss.backward()
        if world_size > 1:
            dist.all_reduce(loss.detach())
            for p in net.parameters():
                dist.all_reduce(p.grad)
        with torch.no_grad():
            for p in net.parameters():
                p.grad /= SAMPLES
        return loss.detach() / SAMPLES

    losses = [float(optimizer.step(closure)) for _ in range(steps)]
    return {"params": [p.detach().clone() for p in net.parameters()], "calls": calls, "losses": losses}


def run_two_ranks(out: Path) -> list[tuple[int, str]]:
    """Two ranks of this script, each saving its result to ``{out}.rank{rank}``; the exit code
    of each, and its traceback if it failed (:func:`ranks.run_ranks`)."""
    return ranks.run_ranks(main, out, 2, preload=["torch", "torchlbfgs"])


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    result = train(rank, world_size)
    dist.barrier()
    dist.destroy_process_group()
    torch.save(result, f"{out}.rank{rank}")


if __name__ == "__main__":
    main(sys.argv[1])
