"""Compile time of ``batched_minimize(compile=True)``, cold and warm, and what dominates it.

Two problem families, float32, one thread:

* ``logistic``: ``bench/batched.py``'s L2-regularised logistic regressions (d=32, 256 samples
  each), 50 iterations, tolerances 0, history 10, B=1024 by default;
* ``peaks``: Gaussian-peak fits, ``a exp(-(t - c)^2 / (2 w^2)) + b`` to 64 noisy samples each
  (four parameters per problem, from ``a, c, w, b = 1, 0, 0.25, 0``), default tolerances,
  ``max_iter=100``, B=10000 by default.

Each measurement runs in a fresh process (``--worker``): "cold" with an empty inductor cache
(``TORCHINDUCTOR_CACHE_DIR`` a new directory), "warm" in a second fresh process that keeps the
cold run's cache. A worker solves three times: compiled (first call: compile and solve),
compiled again (the solve alone), and eager; the compile time is the first call's time less
the second's. It also reports torch._dynamo's own account of the first call: bytecode tracing
(Dynamo running our Python), AOTAutograd and Inductor (graph passes, code generation) and
the C++ compile of Inductor's kernels within it, the size of the graph (calls captured) and
how many graphs were compiled.

Beside ours, the same workers measure (``--variants``):

* ``static``: ours with ``compile={"dynamic": False}`` (static shapes; the batch kept whole);
* three floors, compiled as ours is (``vmap`` over the batch, ``fullgraph=True``, the batch
  dimension dynamic), written here with nothing of this package: ``floor: one operation``, a
  multiplication of the iterates by 2 (what ``torch.compile`` costs in a fresh process for
  any function); ``floor: evaluation``, the problem's value and gradient alone (what any
  compiled solver of it compiles); and ``floor: iteration``, one L-BFGS iteration and nothing
  else (the two-loop direction over a ring buffer of ``history`` pairs, a unit step, one
  evaluation, the pair stored; no line search, no stopping test, no counters).

Targets (issue 14): cold <= 15 s, warm <= 3 s, compiled solve >= 2.5x the eager one.

Run: ``python bench/compile_time.py`` (about 10 minutes on a 2-core machine; ``--problems``,
``--variants``, ``--batch-logistic``, ``--batch-peaks`` to choose).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
TARGETS = {"cold_s": 15.0, "warm_s": 3.0, "speedup": 2.5}


def logistic_problem(batch: int) -> tuple[Any, torch.Tensor, tuple[torch.Tensor, ...], dict[str, Any]]:
    sys.path.insert(0, str(HERE))
    from batched import HISTORY, MAX_ITER, make_data, torch_loss

    features, labels = make_data(batch)
    options = {"max_iter": MAX_ITER, "tolerance_grad": 0.0, "tolerance_change": 0.0, "history_size": HISTORY}
    start = torch.zeros(batch, features.shape[-1])
    return torch_loss, start, (torch.tensor(features), torch.tensor(labels)), options


def peak_loss(theta: torch.Tensor, t: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    amplitude, centre, width, offset = theta.unbind(-1)
    model = amplitude * torch.exp(-((t - centre) ** 2) / (2 * width**2)) + offset
    return ((model - signal) ** 2).mean()


def peaks_problem(batch: int) -> tuple[Any, torch.Tensor, tuple[torch.Tensor, ...], dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    t = torch.linspace(-1, 1, 64)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, 1, generator=generator)

    amplitude, centre, width, offset = (
        uniform(0.5, 2),
        uniform(-0.5, 0.5),
        uniform(0.1, 0.4),
        uniform(-0.1, 0.1),
    )
    signals = amplitude * torch.exp(-((t - centre) ** 2) / (2 * width**2)) + offset
    signals = signals + 0.01 * torch.randn(signals.shape, generator=generator)
    start = torch.tensor([1.0, 0.0, 0.25, 0.0]).expand(batch, 4).contiguous()
    return peak_loss, start, (t.expand(batch, -1).contiguous(), signals), {"max_iter": 100}


PROBLEMS = {"logistic": logistic_problem, "peaks": peaks_problem}


def gradient(fun: Any, x: torch.Tensor, data: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One problem's gradient at ``x`` (its value is computed on the way, as any solver's is)."""
    return torch.func.grad(lambda point: fun(point, *data))(x)


def floor_one_operation(
    fun: Any, state: tuple[torch.Tensor, ...], *data: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """One multiplication: what ``torch.compile`` costs in a fresh process for any function."""
    return (2 * state[0], *state[1:])


def floor_evaluation(
    fun: Any, state: tuple[torch.Tensor, ...], *data: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The value and gradient of one problem at its point: what any compiled solver evaluates."""
    x = state[0]
    return (x, gradient(fun, x, data), *state[2:])


def floor_iteration(
    fun: Any, state: tuple[torch.Tensor, ...], *data: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """One L-BFGS iteration of one problem and nothing else (Nocedal & Wright, algorithm 7.4):
    the two-loop direction over the ring buffer of ``m`` pairs (newest first, masked to the
    pairs stored), a unit step, one evaluation, the pair stored when ``s'y > 0``."""
    x, g, s_rows, y_rows, rho, head, stored = state
    m = s_rows.shape[0]
    positions = torch.arange(m)
    newest_first = torch.remainder(head - 1 - positions, m)
    in_use = positions < stored
    q, alphas = -g, []
    for i in range(m):
        k = newest_first[i]
        alpha = torch.where(in_use[i], rho[k] * torch.dot(s_rows[k], q), 0.0)
        q = q - alpha * y_rows[k]
        alphas.append(alpha)
    newest = newest_first[0]
    gamma = torch.where(stored > 0, 1 / (rho[newest] * torch.dot(y_rows[newest], y_rows[newest])), 1.0)
    r = gamma * q
    for i in reversed(range(m)):
        k = newest_first[i]
        beta = torch.where(in_use[i], rho[k] * torch.dot(y_rows[k], r), 0.0)
        r = r + (alphas[i] - beta) * s_rows[k]
    x_new = x + r
    g_new = gradient(fun, x_new, data)
    s, y = x_new - x, g_new - g
    sy = torch.dot(s, y)
    keep = sy > 0
    slot = (positions == head) & keep
    s_rows = torch.where(slot[:, None], s, s_rows)
    y_rows = torch.where(slot[:, None], y, y_rows)
    rho = torch.where(slot, 1 / sy, rho)
    head = torch.where(keep, torch.remainder(head + 1, m), head)
    stored = torch.where(keep, torch.clamp(stored + 1, max=m), stored)
    return x_new, g_new, s_rows, y_rows, rho, head, stored


def floor_worker(
    variant: str, fun: Any, start: torch.Tensor, data: tuple[torch.Tensor, ...], history: int
) -> dict[str, Any]:
    """A floor compiled as ours is (vmapped, fullgraph, batch dimension dynamic): compile time =
    first call less second call."""
    batch, n = start.shape
    g = torch.func.vmap(lambda x, *d: gradient(fun, x, d))(start, *data)
    state = (start.clone(), g, torch.zeros(batch, history, n), torch.zeros(batch, history, n),
             torch.zeros(batch, history), torch.zeros(batch, dtype=torch.long),
             torch.zeros(batch, dtype=torch.long))  # fmt: skip
    body = FLOORS[variant]
    step = torch.compile(torch.func.vmap(lambda st, *d: body(fun, st, *d)), fullgraph=True)
    for tensor in (*state, *data):
        torch._dynamo.mark_dynamic(tensor, 0)
    began = time.perf_counter()
    state = step(state, *data)
    first = time.perf_counter() - began
    began = time.perf_counter()
    step(state, *data)
    second = time.perf_counter() - began
    return {"first_call_s": first, "compile_s": first - second}


FLOORS = {
    "floor: one operation": floor_one_operation,
    "floor: evaluation": floor_evaluation,
    "floor: iteration": floor_iteration,
}
VARIANTS = ("ours", "static", *FLOORS)

_PHASES = {  # our column: torch._dynamo.utils.compile_times() entries, summed
    "tracing_s": ("bytecode_tracing",),
    "aot_inductor_s": ("create_aot_dispatcher_function",),
    "cpp_compile_s": ("compile_file",),
}


def worker(problem: str, variant: str, batch: int, out: Path) -> None:
    torch.set_num_threads(1)
    from torch._dynamo.utils import compile_times, counters

    import torchlbfgs

    fun, start, data, options = PROBLEMS[problem](batch)
    compile: bool | dict[str, Any] = {"dynamic": False} if variant == "static" else True

    def solve(compile: bool | dict[str, Any]) -> tuple[float, torchlbfgs.Result]:
        began = time.perf_counter()
        result = torchlbfgs.batched_minimize(fun, start, *data, compile=compile, progress=False, **options)
        return time.perf_counter() - began, result

    if variant in FLOORS:
        report = floor_worker(variant, fun, start, data, options.get("history_size", 10))
        phases = compile_times(repr="csv", aggregate=True)
    else:
        first, _ = solve(compile)
        phases = compile_times(repr="csv", aggregate=True)
        second, compiled = solve(compile)
        eager, reference = solve(False)
        report = {
            "first_call_s": first, "compiled_solve_s": second, "eager_solve_s": eager,
            "compile_s": first - second, "speedup": eager / second,
            "same_result": bool(torch.equal(compiled.n_evals, reference.n_evals)),
        }  # fmt: skip
    names, values = phases
    times = dict(zip(names, values, strict=True))
    report = {
        "problem": problem, "variant": variant, "batch": batch, **report,
        "calls_captured": counters["stats"]["calls_captured"], "graphs": counters["stats"]["unique_graphs"],
        **{column: sum(float(times.get(name, 0.0)) for name in keys) for column, keys in _PHASES.items()},
    }  # fmt: skip
    out.write_text(json.dumps(report))


def measure(problem: str, variant: str, batch: int, cache: Path, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "report.json"
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")
        command = [sys.executable, __file__, "--worker", problem, "--variant", variant, "--batch", str(batch),
                   "--out", str(out)]  # fmt: skip
        completed = subprocess.run(
            command, env=env, timeout=timeout, capture_output=True, text=True, check=False
        )
        if completed.returncode != 0:
            raise RuntimeError(f"{problem} ({variant}) worker failed:\n{completed.stderr[-3000:]}")
        report: dict[str, Any] = json.loads(out.read_text())
        return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch-logistic", type=int, default=1024)
    parser.add_argument("--batch-peaks", type=int, default=10000)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "compile_time.json")
    parser.add_argument("--worker", choices=list(PROBLEMS), help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=list(VARIANTS), default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.variant, args.batch, args.out)
        return
    batches = {"logistic": args.batch_logistic, "peaks": args.batch_peaks}
    header = ("problem", "variant", "B", "cache", "compile s", "target", "compiled s", "eager s", "speedup",
              "tracing s", "aot+inductor s", "c++ s", "ops", "graphs")  # fmt: skip
    print(" ".join(f"{name:>17}" for name in header))
    rows = []
    for problem in args.problems:
        for variant in args.variants:
            with tempfile.TemporaryDirectory() as cache:  # each variant's cold run starts empty
                for kind in ("cold", "warm"):
                    row = {
                        "cache": kind,
                        **measure(problem, variant, batches[problem], Path(cache), args.timeout),
                    }
                    target = TARGETS[f"{kind}_s"]
                    row["meets_compile_target"] = row["compile_s"] <= target
                    if "speedup" in row:
                        row["meets_speedup_target"] = row["speedup"] >= TARGETS["speedup"]
                    rows.append(row)
                    seconds = [f"{row[key]:.2f}" if key in row else "-"
                               for key in ("compiled_solve_s", "eager_solve_s", "speedup")]  # fmt: skip
                    phases = [f"{row[key]:.1f}" for key in _PHASES]
                    cells = (problem, variant, row["batch"], kind, f"{row['compile_s']:.1f}",
                             f"<= {target:g}", *seconds, *phases, row["calls_captured"],
                             row["graphs"])  # fmt: skip
                    print(" ".join(f"{cell!s:>17}" for cell in cells), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "python": sys.version.split()[0], "threads": 1, "targets": TARGETS}
    args.output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
