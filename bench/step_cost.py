"""Per-iteration cost of torchlbfgs.LBFGS against torch.optim.LBFGS, same closure, same run.

A diagonal quadratic f(x) = 1/2 sum(c_i x_i^2) with c spread over [1, 10^4], float32, history 10,
one thread. (Condition 10^4 keeps the timed steps iterating: with c over [1, 100] the strong-Wolfe
runs reached float32's rounding floor within about ten steps and then timed degenerate steps,
searches that fail and steps of one iteration.) Each optimizer takes ``--steps`` steps of up to
``max_iter`` iterations, the two optimizers' steps interleaved; the table reports milliseconds
per inner iteration (the median over steps, closure calls included), the bare closure time, and
the ratio ours/torch measured in this process. The "floor" is the time this machine needs to
read the history as any L-BFGS direction must (the ``2m`` stored vectors twice, streamed by
BLAS); the "overhead/floor" columns divide each optimizer's time beyond its closure calls by it.
Both optimizers take the same iterates (the test suite checks that), so the comparison is like
for like; every pass also checks that its optimizers did the same work (iterations and closure
calls) and warns that a ratio is void where they did not.

The last two columns are floors, each timed in a pass of its own interleaved with torch's
optimizer (each ratio is against the torch of its own pass): :class:`ParityLoop`, torch's
iteration reduced to the kernels that fix its iterates (the pair, the two-loop recursion as
torch writes it, g'd, the update) and the closure calls torch makes, nothing else, so
``parity/torch`` is about the best ratio an implementation that reproduces torch's iterates can
reach on this machine; and :class:`DesignFloorLoop`, the same plus the passes this package's
design cannot skip. Both take torch's iterates bit for bit (``tests/test_bench_floors.py``).

Run: ``python bench/step_cost.py`` (add ``--sizes 1e3 1e5 1e7`` for the large case). On a
GPU: ``python bench/step_cost.py --device cuda --sizes 1e5 1e7`` (timings then synchronise the
device before reading the clock; the closure time is measured the same way).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import numpy
import torch
from common import synchronize, timed_ms
from torch.optim.lbfgs import _strong_wolfe as torch_strong_wolfe

import torchlbfgs


def curvatures(n: int, device: str) -> torch.Tensor:
    """The quadratic's diagonal, spread over [1, 10^4]."""
    return torch.logspace(0, 4, n, device=device)


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
        scales = curvatures(n, device)
        self.x = torch.nn.Parameter(torch.randn(n, generator=generator).to(device))
        lr = 1.0 if line_search else 0.01
        self.optimizer = optimizer_class([self.x], lr=lr, history_size=10, max_iter=max_iter,
                                         line_search_fn=line_search, tolerance_grad=0.0,
                                         tolerance_change=0.0)  # fmt: skip
        self.counted = closure_factory(self.optimizer, self.x, scales)
        self.calls, self.device, self.seconds, self.faults = 0, device, [], []

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
        faults, start = minor_faults(), time.perf_counter()
        self.optimizer.step(self.closure)
        synchronize(self.device)
        iterations = max(self.iterations() - before, 1)
        self.seconds.append((time.perf_counter() - start) / iterations)
        self.faults.append((minor_faults() - faults) / iterations)


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where not counted): each first touch of a
    fresh page (on CPUs a new large tensor is a new mapping), which dominates at large n."""
    try:
        import resource  # Unix only
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_optimizers(
    classes: tuple[type, ...], n: int, line_search: str | None, steps: int, max_iter: int, device: str = "cpu"
) -> list[dict]:
    """The optimizers ``classes`` on the same problem, their steps interleaved (so that the
    machine's drift hits all alike), after a warm-up step that fills part of the history: the
    median over steps of the time per iteration, the closure calls per iteration, and the work
    done (iterations and closure calls; equal for optimizers whose iterates are equal)."""
    runs = [_Timed(cls, n, line_search, max_iter, device) for cls in classes]
    for run in runs:
        run.step()  # warm-up
        run.seconds, run.faults, run.calls, run.start = [], [], 0, run.iterations()
    for _ in range(steps):
        for run in runs:
            run.step()
    results = []
    for run in runs:
        iterations = run.iterations() - run.start
        results.append({
            "ms_per_iteration": 1e3 * statistics.median(run.seconds),
            "page_faults_per_iteration": statistics.median(run.faults),
            "evals_per_iteration": run.calls / iterations,
            "iterations_per_step": iterations / steps,
            "work": (iterations, run.calls),
        })  # fmt: skip
    return results


def same_work(runs: list[dict]) -> bool:
    """Whether the runs of one pass took as many iterations and closure calls as each other:
    their iterates are torch's, so anything else means a run left the regime the others time
    (a floor loop without a stopping test torch's makes, for instance) and the ratio is void."""
    return all(run["work"] == runs[0]["work"] for run in runs)


def closure_time(n: int, repeats: int = 20, device: str = "cpu") -> float:
    scales = curvatures(n, device)
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


class ParityLoop(torch.optim.Optimizer):
    """The parity floor, run as an optimizer: ``torch.optim.LBFGS``'s iteration reduced to the
    kernels whose sequence fixes its iterates, on the benchmark's one dense parameter. Per
    iteration: the pair (``y = g - g_prev``, ``s = t d``, ``s'y`` read for the curvature test,
    ``y'y``), the two-loop recursion as torch writes it (``4m`` dot and axpy passes, the pairs
    kept by reference in lists as torch keeps them), ``g'd`` read for torch's descent test, the
    update ``x += t d``, and the closure calls torch makes (its strong-Wolfe search itself,
    ``torch.optim.lbfgs._strong_wolfe``, with a line search). Nothing else: no copy of the
    gradient (the benchmark's closure makes a fresh one), none of the parameters outside the
    search, no stopping test beyond the descent test and torch's budget of closure calls (the
    benchmark's tolerances are 0; in the timed steps no other test fires), no state to save, no
    checks. Its iterates are torch's bit for bit (its scalars are host numbers of the parameters'
    precision, and the first trial step torch's 0-d tensor, so they round as torch's); any L-BFGS
    that reproduces them runs these kernels in this order: a lower bound for a drop-in's time per
    iteration here.
    """

    def __init__(self, params, lr: float, history_size: int, max_iter: int, line_search_fn: str | None,
                 tolerance_grad: float, tolerance_change: float) -> None:  # fmt: skip
        if tolerance_grad != 0.0 or tolerance_change != 0.0:
            raise ValueError("ParityLoop runs no stopping test: it needs the benchmark's zero tolerances")
        super().__init__(params, {"lr": lr})
        self.x = self.param_groups[0]["params"][0]
        self.lr, self.m, self.max_iter, self.line_search = lr, history_size, max_iter, line_search_fn
        self.max_eval = max_iter * 5 // 4  # torch's default budget of closure calls per step
        self.s_list, self.y_list, self.rho = [], [], []
        self.direction, self.t, self.previous_grad, self.gamma = None, lr, None, 1.0
        # torch's scalars are 0-d tensors of the parameters' precision: numpy scalars of that
        # precision round as they do (NEP 50), so that the iterates are torch's to the last bit
        self.scalar = numpy.float32 if self.x.dtype == torch.float32 else numpy.float64
        self.state[self.x]["n_iter"] = 0

    def _grad(self) -> torch.Tensor:
        return self.x.grad.view(-1)  # zero_grad(set_to_none=True) in the closure: a fresh tensor

    def _kept(self, s: torch.Tensor, y: torch.Tensor) -> None:
        """Where a drop-in stores the pair: here, by reference in the lists, as torch does."""

    def _iteration_start(self, direction: torch.Tensor) -> None:
        """What a drop-in does as an iteration starts beyond torch's kernels: nothing here."""

    def _evaluate_along(self, closure, x0: torch.Tensor, t: float, d: torch.Tensor):
        self.x.add_(d.view_as(self.x), alpha=t)
        loss = float(closure())
        grad = self._grad()
        self.x.copy_(x0)
        return loss, grad

    @torch.no_grad()
    def step(self, closure):  # type: ignore[override]
        closure = torch.enable_grad()(closure)
        loss = float(closure())
        grad, evals = self._grad(), 1
        for n_iter in range(1, self.max_iter + 1):
            self.state[self.x]["n_iter"] += 1
            if self.direction is None:
                direction = grad.neg()
                t = min(1.0, 1.0 / grad.abs().sum()) * self.lr  # a 0-d tensor, as torch's
            else:
                y, s = grad.sub(self.previous_grad), self.direction.mul(self.t)
                ys = self.scalar(y.dot(s).item())
                if ys > 1e-10:
                    if len(self.s_list) == self.m:
                        self.s_list.pop(0), self.y_list.pop(0), self.rho.pop(0)
                    self.s_list.append(s), self.y_list.append(y), self.rho.append(1.0 / ys)
                    self._kept(s, y)
                    self.gamma = ys / self.scalar(y.dot(y).item())
                q, alphas = grad.neg(), []
                for i in range(len(self.s_list) - 1, -1, -1):
                    alphas.append(self.scalar(self.s_list[i].dot(q).item()) * self.rho[i])
                    q.add_(self.y_list[i], alpha=float(-alphas[-1]))
                direction = q.mul_(float(self.gamma))
                for i, alpha in zip(range(len(self.s_list)), reversed(alphas), strict=True):
                    beta = self.scalar(self.y_list[i].dot(direction).item()) * self.rho[i]
                    direction.add_(self.s_list[i], alpha=float(alpha - beta))
                t = self.lr
            self.previous_grad, self.direction = grad, direction
            self._iteration_start(direction)
            gtd = grad.dot(direction)
            if gtd.item() > 0.0:  # torch's descent test (tolerance_change = 0)
                break
            if self.line_search:
                x0 = self.x.clone()
                along = functools.partial(self._evaluate_along, closure)
                loss, grad, t, search_evals = torch_strong_wolfe(along, x0, t, direction, loss, grad, gtd)
                evals += search_evals
                self.x.add_(direction.view_as(self.x), alpha=t)
            else:
                self.x.add_(direction.view_as(self.x), alpha=t)
                if n_iter != self.max_iter:
                    loss = float(closure())
                    grad, evals = self._grad(), evals + 1
            self.t = t
            if evals >= self.max_eval:  # torch's budget, checked between iterations
                break
        return loss


class DesignFloorLoop(ParityLoop):
    """:class:`ParityLoop` plus the passes over ``n`` values that a drop-in with torch's stopping
    tests and this package's design cannot skip either: the gradient copied (a closure may
    change ``p.grad`` in place), ``max|g|`` and ``max|d|`` (torch's gradient and step tests), the
    pair copied into the fixed-shape ring buffer of the state (two rows), and the parameters
    copied where each iteration starts (the exact rollback point). Still no Python beyond
    torch's loop."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        n = self.x.numel()
        self.ring = torch.zeros(2, self.m, n, dtype=self.x.dtype, device=self.x.device)
        self.head = 0

    def _grad(self) -> torch.Tensor:
        grad = self.x.grad.view(-1).clone()
        torch.aminmax(grad)[0].item()
        return grad

    def _kept(self, s: torch.Tensor, y: torch.Tensor) -> None:
        self.ring[0, self.head].copy_(s), self.ring[1, self.head].copy_(y)
        self.head = (self.head + 1) % self.m

    def _iteration_start(self, direction: torch.Tensor) -> None:
        torch.aminmax(direction)[0].item()
        self.rollback_point = self.x.detach().clone()


OPTIMIZERS = (torch.optim.LBFGS, torchlbfgs.LBFGS)
FLOORS = (ParityLoop, DesignFloorLoop)


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
              "torch ovh/floor", "ours ovh/floor", "parity/torch", "design/torch",
              "faults/it t/o", "its/step")  # fmt: skip
    print(" ".join(f"{name:>12}" for name in header))
    for size in args.sizes:
        n = int(size)
        bare = closure_time(n, device=args.device)
        floor = traffic_floor(n, device=args.device)
        for line_search in (None, "strong_wolfe"):
            # One pass per pair, torch against each of ours and the two floor loops, and each
            # ratio against the torch of its own pass: every ratio is then taken with two
            # optimizers in turn sharing the caches (running all four together once shifted
            # ours/torch by up to 0.15 with strong Wolfe at n = 1e3).
            runs = time_optimizers(OPTIMIZERS, n, line_search, args.steps, args.max_iter, args.device)
            theirs, ours = runs
            floors = [time_optimizers((torch.optim.LBFGS, floor), n, line_search, args.steps, args.max_iter,
                                      args.device) for floor in FLOORS]  # fmt: skip
            ratio = ours["ms_per_iteration"] / theirs["ms_per_iteration"]
            # overhead: an iteration's time beyond its closure calls (one per iteration here,
            # more with a line search), against the traffic floor of the direction
            evals_theirs, evals_ours = theirs["evals_per_iteration"], ours["evals_per_iteration"]
            overhead_theirs = (theirs["ms_per_iteration"] - evals_theirs * bare) / floor
            overhead_ours = (ours["ms_per_iteration"] - evals_ours * bare) / floor
            parity_ratio, design_ratio = (floor["ms_per_iteration"] / torch_run["ms_per_iteration"]
                                          for torch_run, floor in floors)  # fmt: skip
            row = {"n": n, "line_search": line_search, "closure_ms": bare, "floor_ms": floor,
                   "torch": theirs, "ours": ours, "floor_passes": floors,
                   "torch_overhead_over_floor": overhead_theirs, "ours_overhead_over_floor": overhead_ours,
                   "parity_over_torch": parity_ratio, "design_floor_over_torch": design_ratio}  # fmt: skip
            comparable = [same_work(runs), *(same_work(floor_pass) for floor_pass in floors)]
            rows.append({**row, "ratio": ratio, "same_work": comparable})
            names = ("ours", "parity", "design")
            void = [name for name, same in zip(names, comparable, strict=True) if not same]
            if void:  # a ratio over different work measures nothing: say so, loudly
                print(
                    f"warning: n={n} {line_search}: {', '.join(void)} did not do torch's work (iterations, "
                    "closure calls); their ratios here are void"
                )
            cells = (n, line_search or "none", f"{bare:.3f}", f"{floor:.3f}",
                     f"{theirs['ms_per_iteration']:.3f}", f"{ours['ms_per_iteration']:.3f}", f"{ratio:.2f}",
                     f"{overhead_theirs:.2f}", f"{overhead_ours:.2f}", f"{parity_ratio:.2f}",
                     f"{design_ratio:.2f}",
                     "/".join(f"{run['page_faults_per_iteration']:.0f}" for run in runs),
                     f"{theirs['iterations_per_step']:.1f}")  # fmt: skip
            print(" ".join(f"{cell:>12}" for cell in cells))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads(), "dtype": "float32", "history_size": 10,
            "device": args.device, "device_name": device_name(args.device)}  # fmt: skip
    args.output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
