"""Weak scaling over processes: ``batched_minimize`` on a batch sharded across ranks, and
``torchlbfgs.LBFGS`` steps on an FSDP2-sharded model, with 1 and 2 processes (gloo, one thread
each), the work per process fixed.

* batch: ``--batch`` (per process) of ``batched.py``'s logistic regressions (float32, 100
  iterations, no early stop), ``Shard(0)`` DTensors over the ranks; time of the solve.
* model: an MLP of ``--width`` hidden units per process (so parameters per rank stay fixed:
  the width grows with the ranks) under ``fully_shard``, each rank its own ``--samples``;
  time of ``--steps`` ``LBFGS.step`` calls (strong Wolfe, ``max_iter=10``), closure included.

Efficiency = time with 1 process / time with 2 (1.0: perfect weak scaling; this 2-core
machine runs both processes at once, so it measures the communication and coordination, not
more hardware). Medians over ``--repeats``, the slowest rank per repeat.

Usage: ``.venv/bin/python bench/distributed.py`` (about a minute); JSON in
``bench/results/distributed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common

common.use_one_thread()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import torchlbfgs  # noqa: E402

HERE = Path(__file__).resolve().parent


def _slowest(seconds: float) -> float:
    """The slowest rank's time (what a run waits for)."""
    value = torch.tensor(seconds, dtype=torch.float64)
    if dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def batch_times(per_rank: int, repeats: int, mesh: Any) -> dict[str, Any]:
    import batched
    from torch.distributed.tensor import DTensor, Shard

    world, rank = dist.get_world_size(), dist.get_rank()
    X, y = batched.make_data(per_rank * world)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)  # each rank builds only its rows

    def sharded(local: np.ndarray) -> Any:
        tensor = torch.from_numpy(local[rows].copy())
        return DTensor.from_local(tensor, mesh, [Shard(0)], run_check=False)

    w0 = sharded(np.zeros((per_rank * world, batched.D), dtype=np.float32))
    X_, y_ = sharded(X), sharded(y)
    options = {"max_iter": batched.MAX_ITER, "tolerance_grad": 0.0, "tolerance_change": 0.0,
               "history_size": batched.HISTORY}  # fmt: skip
    times = []
    for _ in range(repeats + 1):  # the first warms up
        dist.barrier()
        began = time.perf_counter()
        torchlbfgs.batched_minimize(batched.torch_loss, w0, X_, y_, **options)
        times.append(_slowest(time.perf_counter() - began))
    return {"times": times[1:]}


def model_times(width: int, samples: int, steps: int, repeats: int, mesh: Any) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    world, rank = dist.get_world_size(), dist.get_rank()
    generator = torch.Generator().manual_seed(rank)
    inputs = torch.randn(samples, 64, generator=generator)
    targets = torch.sin(inputs[:, :1])
    times = []
    for _ in range(repeats + 1):
        torch.manual_seed(0)
        hidden = width * world  # parameters per rank stay fixed
        net = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
        if world > 1:
            fully_shard(net, mesh=mesh)
        optimizer = torchlbfgs.LBFGS(net.parameters(), max_iter=10, line_search_fn="strong_wolfe")

        def closure(net: torch.nn.Module = net, optimizer: torchlbfgs.LBFGS = optimizer) -> torch.Tensor:
            optimizer.zero_grad()
            loss = ((net(inputs) - targets) ** 2).mean()
            loss.backward()
            loss = loss.detach()
            if world > 1:
                dist.all_reduce(loss)
            return loss / world

        all_reduce, counted = dist.all_reduce, [0]

        def counting(
            *args: Any, counted: list[int] = counted, all_reduce: Any = all_reduce, **kwargs: Any
        ) -> Any:
            counted[0] += 1
            return all_reduce(*args, **kwargs)

        dist.all_reduce = counting  # type: ignore[assignment]
        dist.barrier()
        began = time.perf_counter()
        for _ in range(steps):
            optimizer.step(closure)
        times.append(_slowest(time.perf_counter() - began))
        dist.all_reduce = all_reduce
    # What the steps are made of: the closure alone, as often as the steps called it, and the
    # optimizer's all-reduces of scalars (counted: all of them but the closures') at the
    # latency of one.
    calls = int(optimizer.state[next(net.parameters())]["n_evals"])
    reductions = counted[0] - (calls if world > 1 else 0)
    dist.barrier()
    began = time.perf_counter()
    for _ in range(calls):
        closure()
    closure_seconds = _slowest(time.perf_counter() - began)
    scalar = torch.zeros(3)
    dist.barrier()
    began = time.perf_counter()
    for _ in range(200):
        if world > 1:
            dist.all_reduce(scalar)
    latency = _slowest(time.perf_counter() - began) / 200
    return {
        "times": times[1:], "closure_s": closure_seconds, "closure_calls": calls,
        "all_reduces": reductions, "all_reduce_s": latency,
    }  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    report = {
        "batch": batch_times(args.batch, args.repeats, mesh),
        "model": model_times(args.width, args.samples, args.steps, args.repeats, mesh),
    }
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(report))
    dist.destroy_process_group()


def launch(world: int, args: argparse.Namespace) -> dict[str, Any]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = HERE / "results" / f".distributed.{world}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    names = ("batch", "width", "samples", "steps", "repeats")
    forwarded = [f"--{name}={getattr(args, name)}" for name in names]
    processes = []
    for rank in range(world):
        env = {**os.environ, **common.ONE_THREAD, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "WORLD_SIZE": str(world)}  # fmt: skip
        command = [sys.executable, __file__, "--worker", f"--out={out}", *forwarded]
        processes.append(subprocess.Popen(command, env=env))
    for process in processes:
        if process.wait(timeout=1800) != 0:
            raise SystemExit(f"a rank of the {world}-process run failed")
    result: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1024, help="problems per process (default 1024)")
    parser.add_argument("--width", type=int, default=256, help="hidden units per process (default 256)")
    parser.add_argument("--samples", type=int, default=2048, help="samples per process (default 2048)")
    parser.add_argument("--steps", type=int, default=5, help="LBFGS steps timed per repeat (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, median (default 3)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "distributed.json")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    began = time.perf_counter()
    runs = {world: launch(world, args) for world in (1, 2)}
    rows = []
    print(
        f"\n### Weak scaling, gloo, one thread per process ({args.batch} problems / {args.width} "
        "hidden units per process)\n"
    )
    print("| workload | 1 process s | 2 processes s | efficiency (1 / 2) |")
    print("|---|---|---|---|")
    for workload in ("batch", "model"):
        one, two = (statistics.median(runs[world][workload]["times"]) for world in (1, 2))
        rows.append({"workload": workload, "one_s": one, "two_s": two, "efficiency": one / two,
                     "details": {str(world): runs[world][workload] for world in (1, 2)}})  # fmt: skip
        print(f"| {workload} | {one:.3f} | {two:.3f} | {one / two:.2f} |")
    for world in (1, 2):
        model = runs[world]["model"]
        steps_s = statistics.median(model["times"])
        print(
            f"\nmodel, {world} process(es): {args.steps} steps, {model['closure_calls']} closure calls "
            "taking "
            f"{model['closure_s']:.3f} s alone, so {steps_s - model['closure_s']:.3f} s in the optimizer; "
            f"its all-reduces: {model['all_reduces']} (a scalar all-reduce alone: "
            f"{1e3 * model['all_reduce_s']:.3f} ms)"
        )
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "output", "worker")}
    report = {"machine": common.machine(), "args": settings, "rows": rows}
    common.write_report(report, began, args.output)


if __name__ == "__main__":
    main()
