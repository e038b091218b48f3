"""Cost of the L-BFGS direction: compact representation against the two-loop recursion.

1. One problem: for each ``n`` and dtype, the time of ``inv_hessian_product`` on a full
   memory (history 10, wrapped ring), of keeping the compact form's products up to date for
   one new pair (what ``push_curvature_pair`` adds), and their sum, against the two-loop
   recursion on the same memory; median of ``--repeats``.
2. Many problems: ``batched_minimize`` of 1024 logistic regressions (n=32, float32, 50
   iterations) with each direction, eager (and compiled with ``--compile``), seconds per solve.

One thread. The ratios compact/two-loop decide the default (``direction="two_loop"``).

Run: ``python bench/direction_cost.py`` (``--sizes 1e2 1e3 1e4 1e5 1e6 1e7`` for large n,
``--compile`` for the compiled batch, ``--device cuda`` on a GPU); writes
``bench/results/direction_cost.json``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from common import machine, timed_ms, use_one_thread

import torchlbfgs
from torchlbfgs.history import History, push_curvature_pair


def median_ms(work: Callable[[], object], repeats: int, device: str = "cpu") -> float:
    return timed_ms(work, repeats, device, warmup=5)  # the first triangular solves are slow


def full_memory(n: int, m: int, dtype: torch.dtype, products: bool, device: str = "cpu") -> History:
    """A memory after ``m + 3`` accepted pairs (the ring has wrapped), from a fixed seed."""
    generator = torch.Generator().manual_seed(0)
    k = m if products else 0

    def zeros(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)

    history = History(
        zeros(m, n), zeros(m, n), zeros(m), zeros() + 1, zeros(dtype=torch.int64), zeros(dtype=torch.int64),
        zeros(k, k), zeros(k, k),
    )  # fmt: skip
    accept = torch.tensor(True, device=device)
    for _ in range(m + 3):
        s = torch.randn(n, generator=generator, dtype=dtype).to(device)
        y = s + 0.1 * torch.randn(n, generator=generator, dtype=dtype).to(device)
        history = push_curvature_pair(history, s, y, torch.dot(y, s), accept, in_place=True)
    return history


def measure_one(n: int, dtype: torch.dtype, m: int, repeats: int, device: str) -> dict[str, object]:
    two_loop_memory = full_memory(n, m, dtype, products=False, device=device)
    compact_memory = full_memory(n, m, dtype, products=True, device=device)
    vector = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    s, y = compact_memory.s_history[0].clone(), compact_memory.y_history[0].clone()
    ys, refused = torch.dot(y, s), torch.tensor(False, device=device)

    def direction(memory: History) -> float:
        return median_ms(lambda: torchlbfgs.inv_hessian_product(memory, vector), repeats, device)

    def push(memory: History) -> float:
        # in place, as the owner of a state may, so that the O(n) row write is all that remains
        # beside the products; refused, so the memory stays as it is (the work is the same)
        return median_ms(
            lambda: push_curvature_pair(memory, s, y, ys, refused, in_place=True), repeats, device
        )

    two_loop, compact = direction(two_loop_memory), direction(compact_memory)
    products = max(push(compact_memory) - push(two_loop_memory), 0.0)  # the products' share of a push
    ratio = (compact + products) / two_loop
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "two_loop_ms": two_loop,
            "compact_ms": compact, "products_ms": products, "ratio": ratio}  # fmt: skip


def one_problem_rows(sizes: list[float], m: int, repeats: int, device: str) -> list[dict[str, object]]:
    header = ("n", "dtype", "two-loop ms", "compact ms", "products ms", "compact+products", "ratio")
    print(" ".join(f"{name:>16}" for name in header))
    rows = []
    for size in sizes:
        for dtype in (torch.float32, torch.float64):
            row = measure_one(int(size), dtype, m, repeats, device)
            rows.append(row)
            total = float(row["compact_ms"]) + float(row["products_ms"])  # type: ignore[arg-type]
            cells = (row["n"], row["dtype"], f"{row['two_loop_ms']:.4f}", f"{row['compact_ms']:.4f}",
                     f"{row['products_ms']:.4f}", f"{total:.4f}", f"{row['ratio']:.2f}")  # fmt: skip
            print(" ".join(f"{cell:>16}" for cell in cells))
    return rows


def _logistic(w: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    loss = torch.nn.functional.binary_cross_entropy_with_logits(features @ w, labels)
    return loss + 1e-3 * (w * w).sum()


def batched_rows(compiled: bool, repeats: int, device: str) -> list[dict[str, object]]:
    generator = torch.Generator().manual_seed(0)
    batch, samples, n = 1024, 64, 32
    features = torch.randn(batch, samples, n, generator=generator).to(device)
    labels = (torch.rand(batch, samples, generator=generator) > 0.5).float().to(device)
    start = torch.zeros(batch, n, device=device)
    modes = [False, True] if compiled else [False]
    rows: list[dict[str, object]] = []
    print(f"{'batched (B=1024, n=32)':>24} {'two-loop s':>12} {'compact s':>12} {'ratio':>8}")
    for compile_round in modes:
        seconds = {}
        for direction in ("two_loop", "compact"):

            def solve(direction: str = direction, compile_round: bool = compile_round) -> object:
                return torchlbfgs.batched_minimize(
                    _logistic, start, features, labels, direction=direction, max_iter=50,
                    compile=compile_round,
                )  # fmt: skip

            seconds[direction] = median_ms(solve, repeats, device) / 1e3
        ratio = seconds["compact"] / seconds["two_loop"]
        mode = "compiled" if compile_round else "eager"
        rows.append({"mode": mode, **{f"{k}_s": v for k, v in seconds.items()}, "ratio": ratio})
        print(f"{mode:>24} {seconds['two_loop']:>12.3f} {seconds['compact']:>12.3f} {ratio:>8.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e2, 1e3, 1e4, 1e5])
    parser.add_argument("--history-size", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--batch-repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time the compiled batched solve")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "direction_cost.json"
    )
    args = parser.parse_args()
    use_one_thread()
    torch.set_num_threads(1)
    single = one_problem_rows(args.sizes, args.history_size, args.repeats, args.device)
    batched = batched_rows(args.compile, args.batch_repeats, args.device)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    meta = {**machine(), "history_size": args.history_size, "device": args.device}
    args.output.write_text(json.dumps({"meta": meta, "one_problem": single, "batched": batched}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
