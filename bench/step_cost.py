"""Per-iteration cost of torchlbfgs.LBFGS against torch.optim.LBFGS, same closure, same run.

A diagonal quadratic f(x) = 1/2 sum(c_i x_i^2) with c spread over [1, 100], float32, history 10,
one thread. Each optimizer takes ``--steps`` steps of up to ``max_iter`` iterations, the two
optimizers' steps interleaved; the table reports milliseconds per inner iteration (the median
over steps, closure calls included), the bare closure time, and the ratio
ours/torch measured in this process. The "floor" is the time this machine needs to read the
history as any L-BFGS direction must (the ``2m`` stored vectors twice, streamed by BLAS); the
"overhead/floor" columns divide each optimizer's time beyond its closure calls by it. Both
optimizers take the same iterates (the test suite checks that), so the comparison is like for
like.

The "parity floor" is what an iteration that reproduces torch's iterates cannot avoid: the
closure calls torch makes per iteration, plus the kernels whose sequence fixes the rounding
(the two-loop recursion as torch writes it, the pair, g'd, the update): ``parity/torch`` is the
best ratio any such implementation can reach on this machine.

Run: ``python bench/step_cost.py`` (add ``--sizes 1e3 1e5 1e7`` for the large case). On a
GPU: ``python bench/step_cost.py --device cuda --sizes 1e5 1e7`` (timings then synchronise the
device before reading the clock; the closure time is measured the same way).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from common import synchronize, timed_ms

import torchlbfgs


def closure_factory(optimizer: torch.optim.Optimizer, x: torch.Tensor, scales: torch.Tensor):
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = 0.5 * (scales * x * x).sum()
        loss.backward()
        return loss

    return closure


class _Timed:
    """One optimizer on its own copy of the problem, timing its steps."""

    def __init__(self, optimizer_class, n: int, line_search: str | None, max_iter: int, device: str) -> None:
        generator = torch.Generator().manual_seed(0)
        scales = torch.logspace(0, 2, n, device=device)
        self.x = torch.nn.Parameter(torch.randn(n, generator=generator).to(device))
        lr = 1.0 if line_search else 0.01
        self.optimizer = optimizer_class([self.x], lr=lr, history_size=10, max_iter=max_iter,
                                         line_search_fn=line_search, tolerance_grad=0.0,
                                         tolerance_change=0.0)  # fmt: skip
        self.counted = closure_factory(self.optimizer, self.x, scales)
        self.calls, self.device, self.seconds = 0, device, []

    def closure(self) -> torch.Tensor:
        self.calls += 1
        return self.counted()

    def iterations(self) -> int:
        state = self.optimizer.state.get(self.x)
        return state["n_iter"] if state else 0  # ours reads its "iteration" leaf under torch's name

    def step(self) -> None:
        """One step; its time per iteration taken (a step that stops early has fewer)."""
        before = self.iterations()
        synchronize(self.device)
        start = time.perf_counter()
        self.optimizer.step(self.closure)
        synchronize(self.device)
        self.seconds.append((time.perf_counter() - start) / max(self.iterations() - before, 1))


def time_optimizers(
    n: int, line_search: str | None, steps: int, max_iter: int, device: str = "cpu"
) -> tuple[dict, dict]:
    """torch's and ours on the same problem, their steps interleaved (so that the machine's
    drift hits both alike), after a warm-up step that fills part of the history: the median
    over steps of the time per iteration, and the closure calls per iteration."""
    runs = [_Timed(cls, n, line_search, max_iter, device) for cls in (torch.optim.LBFGS, torchlbfgs.LBFGS)]
    for run in runs:
        run.step()  # warm-up
        run.seconds, run.calls, run.start = [], 0, run.iterations()
    for _ in range(steps):
        for run in runs:
            run.step()
    results = []
    for run in runs:
        iterations = run.iterations() - run.start
        results.append({
            "ms_per_iteration": 1e3 * statistics.median(run.seconds),
            "evals_per_iteration": run.calls / iterations,
        })  # fmt: skip
    return results[0], results[1]


def closure_time(n: int, repeats: int = 20, device: str = "cpu") -> float:
    scales = torch.logspace(0, 2, n, device=device)
    x = torch.nn.Parameter(torch.randn(n, device=device))
    optimizer = torch.optim.SGD([x], lr=0.0)
    closure = closure_factory(optimizer, x, scales)
    closure()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        closure()
    synchronize(device)
    return 1e3 * (time.perf_counter() - start) / repeats


def traffic_floor(n: int, history_size: int = 10, repeats: int = 5, device: str = "cpu") -> float:
    """Milliseconds to read the history as the direction must: the ``2m`` stored vectors twice
    (once to project the gradient, once to combine), timed as four BLAS matrix-vector products
    over the ``(m, n)`` buffers, the fastest way this machine streams them."""
    generator = torch.Generator().manual_seed(1)
    s_history = torch.randn(history_size, n, generator=generator).to(device)
    y_history = torch.randn(history_size, n, generator=generator).to(device)
    vector = torch.randn(n, generator=generator).to(device)
    weights = torch.randn(history_size, generator=generator).to(device)

    def read_twice() -> None:
        torch.mv(s_history, vector), torch.mv(y_history, vector)
        torch.mv(s_history.T, weights), torch.mv(y_history.T, weights)

    return timed_ms(read_twice, repeats, device, statistic=min)


def parity_kernels_ms(n: int, history_size: int = 10, repeats: int = 5, device: str = "cpu") -> float:
    """Milliseconds per iteration for the kernels every L-BFGS iteration with torch's iterates
    must run (the "parity floor" beyond the closure): the flat gradient copy, the curvature
    pair (y = g - g_prev, s = t d, s'y, y'y), the two-loop recursion written exactly as
    torch's (its kernel sequence fixes the rounding: ``4m`` dot and axpy passes over the
    history, none of which can be fused without changing the bits), g'd, and the parameter
    update. Nothing else: no stopping test, no bookkeeping, no host reads."""
    generator = torch.Generator().manual_seed(2)

    def vector() -> torch.Tensor:
        return torch.randn(n, generator=generator).to(device)

    s_rows = [vector() for _ in range(history_size)]
    y_rows = [vector() for _ in range(history_size)]
    rho = [torch.rand((), generator=generator).to(device) for _ in range(history_size)]
    param, grad, previous_grad, direction = vector(), vector(), vector(), vector()
    gamma = torch.tensor(0.5, device=device)

    def iteration() -> None:
        flat_grad = grad.view(-1).clone()
        y = flat_grad.sub(previous_grad)
        s = direction.mul(0.5)
        y.dot(s), y.dot(y)
        q = flat_grad.neg()
        alphas = []
        for i in range(history_size - 1, -1, -1):
            alpha = float(s_rows[i].dot(q) * rho[i])
            q.add_(y_rows[i], alpha=-alpha)
            alphas.append(alpha)
        r = q.mul_(gamma)
        for i, alpha in zip(range(history_size), reversed(alphas), strict=True):
            beta = float(y_rows[i].dot(r) * rho[i])
            r.add_(s_rows[i], alpha=alpha - beta)
        flat_grad.dot(r)
        param.add_(r, alpha=1e-3)

    return timed_ms(iteration, repeats, device, statistic=min)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e5])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--max-iter", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "step_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    header = ("n", "line search", "closure ms", "floor ms", "torch ms/it", "ours ms/it", "ours/torch",
              "torch ovh/floor", "ours ovh/floor", "parity ms/it", "parity/torch")  # fmt: skip
    print(" ".join(f"{name:>12}" for name in header))
    for size in args.sizes:
        n = int(size)
        bare = closure_time(n, device=args.device)
        floor = traffic_floor(n, device=args.device)
        kernels = parity_kernels_ms(n, device=args.device)
        for line_search in (None, "strong_wolfe"):
            theirs, ours = time_optimizers(n, line_search, args.steps, args.max_iter, args.device)
            ratio = ours["ms_per_iteration"] / theirs["ms_per_iteration"]
            # overhead: an iteration's time beyond its closure calls (one per iteration here,
            # more with a line search), against the traffic floor of the direction
            evals_theirs, evals_ours = theirs["evals_per_iteration"], ours["evals_per_iteration"]
            overhead_theirs = (theirs["ms_per_iteration"] - evals_theirs * bare) / floor
            overhead_ours = (ours["ms_per_iteration"] - evals_ours * bare) / floor
            # the parity floor: the closure calls torch makes, plus the kernels that fix its iterates
            parity = evals_theirs * bare + kernels
            parity_ratio = parity / theirs["ms_per_iteration"]
            row = {"n": n, "line_search": line_search, "closure_ms": bare, "floor_ms": floor,
                   "torch": theirs, "ours": ours, "torch_overhead_over_floor": overhead_theirs,
                   "ours_overhead_over_floor": overhead_ours, "parity_floor_ms": parity,
                   "parity_floor_over_torch": parity_ratio}  # fmt: skip
            rows.append({**row, "ratio": ratio})
            cells = (n, line_search or "none", f"{bare:.3f}", f"{floor:.3f}",
                     f"{theirs['ms_per_iteration']:.3f}", f"{ours['ms_per_iteration']:.3f}", f"{ratio:.2f}",
                     f"{overhead_theirs:.2f}", f"{overhead_ours:.2f}", f"{parity:.3f}",
                     f"{parity_ratio:.2f}")  # fmt: skip
            print(" ".join(f"{cell:>12}" for cell in cells))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads(), "dtype": "float32", "history_size": 10,
            "device": args.device, "device_name": device_name(args.device)}  # fmt: skip
    args.output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
