"""Cost of one functional L-BFGS iteration: torchlbfgs.update eager and compiled, optax, torch.

One iteration is direction + line search + state update, function evaluations included.
Problems (float32, history 10, one thread), both with a gradient cheap enough for the
optimizer's own work to show:

* ``quadratic``: f(x) = 1/2 sum(c_i x_i^2), c spread over [1, 100] (as ``step_cost.py``);
* ``logistic``: L2-regularised logistic regression, n features, 32 samples, labels from a
  noisy linear model, ``mean BCE + sum(lambda_i w_i^2)`` with lambda log-spaced over
  [1e-4, 1e-2] (gradient: two products with a 32 x n matrix). One ridge weight for all would
  leave a problem of rank 32 that L-BFGS solves to float32 precision in about 20 iterations,
  inside the timed window; spread weights keep all n directions in play, as in the quadratic.

Both start from x0 ~ N(0, 1) and run with default tolerances; the table says whether each of
our runs was still running at the end of its timed iterations (all are, in the runs so far).

Solvers, each with strong Wolfe and with no line search (fixed step 1; each library scales its
first step by the gradient's norm in its own way):

* ``ours eager``: ``torchlbfgs.update`` with default options, and with ``early_exit=False``
  (the line search then runs all of its ``max_ls + 1`` trips, evaluating ``fun`` each time);
* ``ours compiled``: ``torch.compile(step, fullgraph=True)`` (Inductor; a graph break raises)
  of ``step = update(fun, x, state, ...)``, static shapes, cold Inductor cache. Under compile
  the line search is one ``while_loop`` that stops on the device once the search is done, so
  it evaluates ``fun`` as often as eager does (``--compiled-max-ls``, default 25 as eager;
  before the loop became a ``while_loop`` the search was unrolled ``max_ls + 1`` times, which
  took minutes to compile and evaluated ``fun`` on every trip). The compiled iterates are
  checked against the eager step with the same options: one step from the same state ("|dx| 1 step") and the
  whole run from x0 ("|dx| run"; float32, so reductions that Inductor orders differently
  change the last bits, which later iterations amplify). Compile time (first call minus one
  steady-state call) is reported apart from the steady-state time;
* ``optax jit``: ``jax.jit`` of one ``optax.lbfgs`` iteration, the documented pattern
  (``value_and_grad_from_state``, ``update(..., value=, grad=, value_fn=)``,
  ``apply_updates``) with its default zoom line search (a ``while_loop``: it stops once
  done), or ``linesearch=None, learning_rate=1``;
* ``torch.optim.LBFGS``: one ``step`` with ``max_iter=1`` per iteration (each step calls the
  closure once more at its start, so it evaluates about once more per iteration).

Every solver starts from the same point, takes ``--warmup`` untimed iterations (to fill its
history and compile), then windows of ``--iters`` iterations are timed (the functional solvers
restart from the same warm state, torch from a fresh optimizer and its own warm-up). Once every
solver of a case is ready, their windows take turns ``--repeats`` times, so that the windows a
ratio pairs are timed seconds apart (this machine's speed drifts by tens of percent within
minutes); ms/iteration is a solver's median window, and each ratio the median over the turns
of that turn's ratio. Evaluations per iteration are those counted by each
solver; "calls" are the evaluations actually executed (more than counted where the masked loop
runs on: eager with ``early_exit=False``). Ratios: ours/optax on the same problem and line
search; "vs eager" against the default eager update. "|dx| run" of the other rows:
max|x - x_ours| after the same number of iterations from x0 (different algorithms: a scale,
not a check). All in one process; JAX and
torch each on one thread. Shared machines are noisy: the JSON keeps every window
(``ms_all``), their minimum and the load average before and after.

Run: ``python bench/update_cost.py`` (about 4 minutes, most of it compiling; ``--sizes 1e3 1e5
1e6`` for the large case).
"""

from __future__ import annotations

import os
import tempfile

import common

common.use_one_thread()
# Cold compiles: an empty Inductor cache of our own, unless the caller chose one.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="update-cost-inductor-"))

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import torchlbfgs  # noqa: E402

HISTORY, SAMPLES, RIDGE, LABEL_NOISE, SEED = 10, 32, (-4.0, -2.0), 0.1, 0
PROBLEMS = ("quadratic", "logistic")
LINE_SEARCHES = ("strong_wolfe", None)
EAGER, NO_EXIT, COMPILED = "ours eager", "ours eager, early_exit=False", "ours compiled"
OPTAX, TORCH = "optax.lbfgs, jax.jit", "torch.optim.LBFGS, max_iter=1"

Carry = Any

# ---------------------------------------------------------------------------------- problems


def make_data(problem: str, n: int) -> dict[str, np.ndarray]:
    """The problem's data and starting point, float32 numpy: the same for every solver."""
    rng = np.random.default_rng(SEED)
    x0 = rng.standard_normal(n).astype(np.float32)
    if problem == "quadratic":
        return {"x0": x0, "c": np.logspace(0, 2, n).astype(np.float32)}
    features = rng.standard_normal((SAMPLES, n)) / np.sqrt(n)
    logits = features @ rng.standard_normal(n)
    labels = logits + LABEL_NOISE * logits.std() * rng.standard_normal(SAMPLES) > 0
    return {"x0": x0, "X": features.astype(np.float32), "y": labels.astype(np.float32),
            "lam": np.logspace(*RIDGE, n).astype(np.float32)}  # fmt: skip


def torch_loss(problem: str, data: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    if problem == "quadratic":
        c = data["c"]
        return lambda x: 0.5 * (c * x * x).sum()
    X, y, lam = data["X"], data["y"], data["lam"]
    return lambda w: torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y) + torch.dot(lam * w, w)


def jax_loss(problem: str) -> Callable[..., Any]:
    """``loss(x, data)`` in JAX, the same function as :func:`torch_loss`."""
    import jax
    import jax.numpy as jnp

    if problem == "quadratic":
        return lambda x, data: 0.5 * jnp.sum(data["c"] * x * x)

    def logistic(w: Any, data: dict[str, Any]) -> Any:
        z = data["X"] @ w
        return jnp.mean(jax.nn.softplus(z) - data["y"] * z) + (data["lam"] * w) @ w

    return logistic


# ------------------------------------------------------------------------------------ timing


def run(step: Callable[[Carry], Carry], carry: Carry, iterations: int) -> Carry:
    for _ in range(iterations):
        carry = step(carry)
    return carry


Window = Callable[[], float]  # one timed window: ms per iteration


def window_of(
    step: Callable[[Carry], Carry], carry: Carry, iterations: int, sync: Callable[[Carry], Any]
) -> Window:
    """A timed window: ms per iteration of ``iterations`` steps from ``carry``."""

    def window() -> float:
        start = time.perf_counter()
        sync(run(step, carry, iterations))
        return 1e3 * (time.perf_counter() - start) / iterations

    return window


def summary(times: list[float], **extra: Any) -> dict[str, Any]:
    return {"ms_per_iteration": statistics.median(times), "ms_min": min(times), "ms_all": times, **extra}


# ------------------------------------------------------------------------------------- ours


def ours_step(fun: Callable, line_search: str | None, **options: Any) -> Callable[[Carry], Carry]:
    def step(carry: Carry) -> Carry:
        return torchlbfgs.update(fun, *carry, line_search=line_search, **options)

    return step


def counting(fun: Callable) -> tuple[Callable, list[int]]:
    calls = [0]

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return fun(x)

    return counted, calls


def window_outcome(start: Carry, end: Carry, iterations: int) -> dict[str, Any]:
    x, state = end
    return {"evals_per_iteration": int(state.n_evals - start[1].n_evals) / iterations,
            "status": torchlbfgs.status_message(state.status), "running": int(state.status) == 0,
            "value_end": float(state.value), "n_evals": int(state.n_evals), "x_end": x}  # fmt: skip


def run_ours_eager(fun: Callable, x0: torch.Tensor, line_search: str | None, early_exit: bool | None,
                   args: argparse.Namespace) -> tuple[dict[str, Any], Window]:  # fmt: skip
    """Eager ``update``: a counted pass from x0 (iterates, evaluations), and its timed window."""
    counted_fun, calls = counting(fun)
    counted = ours_step(counted_fun, line_search, early_exit=early_exit)
    warm = run(counted, (x0, torchlbfgs.init(fun, x0, history_size=HISTORY)), args.warmup)
    calls[0] = 0
    outcome = window_outcome(warm, run(counted, warm, args.iters), args.iters)
    step = ours_step(fun, line_search, early_exit=early_exit)
    window = window_of(step, warm, args.iters, sync=lambda _: None)
    return {"calls_per_iteration": calls[0] / args.iters, **outcome}, window


def update_step(fun: Callable, line_search: str | None, max_ls: int) -> Callable:
    def step(x: torch.Tensor, state: torchlbfgs.LBFGSState) -> tuple[torch.Tensor, torchlbfgs.LBFGSState]:
        return torchlbfgs.update(fun, x, state, line_search=line_search, max_ls=max_ls)

    return step


def one_step_check(eager: Callable, compiled: Callable, carry: Carry) -> dict[str, Any]:
    """One step from the same state, eager and compiled: how far apart the new iterates are
    (float32 rounding only, before iterations amplify it), and whether the counters agree."""
    (x_e, s_e), (x_c, s_c) = eager(*carry), compiled(*carry)
    counters = ("n_evals", "status", "n_pairs", "iteration")
    same = all(torch.equal(getattr(s_e, name), getattr(s_c, name)) for name in counters)
    return {"one_step_max_abs_diff": float((x_e - x_c).abs().max()), "x_max_abs": float(x_e.abs().max()),
            "one_step_same_counters": same}  # fmt: skip


def run_ours_compiled(fun: Callable, x0: torch.Tensor, line_search: str | None, args: argparse.Namespace,
                      backend: str) -> tuple[dict[str, Any], Window]:  # fmt: skip
    """``torch.compile(update step, fullgraph=True)``: compile on the first call (timed), then
    the same counted pass and timed window as eager. A graph break raises here. The iterates
    are compared with the eager step of the same options (``max_ls`` included)."""
    from torch._dynamo.utils import counters

    max_ls = args.compiled_max_ls if line_search else 0
    torch._dynamo.reset()
    counters.clear()
    plain = update_step(fun, line_search, max_ls)
    compiled = torch.compile(plain, fullgraph=True, backend=backend, dynamic=False)
    step = lambda carry: compiled(*carry)  # noqa: E731
    initial = (x0, torchlbfgs.init(fun, x0, history_size=HISTORY))
    start = time.perf_counter()
    carry = step(initial)
    first_call = time.perf_counter() - start
    warm = run(step, carry, args.warmup - 1)
    outcome = window_outcome(warm, run(step, warm, args.iters), args.iters)
    window = window_of(step, warm, args.iters, sync=lambda _: None)
    check = one_step_check(plain, compiled, warm)
    reference = run(lambda carry: plain(*carry), initial, args.warmup + args.iters)
    # the search is a device-side while_loop: it evaluates what it counts
    calls = outcome["evals_per_iteration"]
    info = {"calls_per_iteration": calls, "first_call_seconds": first_call, "backend": backend,
            "max_ls": max_ls, "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()), **check, **outcome,
            "x_reference": reference[0], "n_evals_eager": int(reference[1].n_evals)}  # fmt: skip
    return info, window


def compiled_or_failure(fun: Callable, x0: torch.Tensor, line_search: str | None,
                        args: argparse.Namespace) -> tuple[dict[str, Any], Window | None]:  # fmt: skip
    """Compile with Inductor; if Inductor itself fails (not a graph break), say why and fall
    back to ``aot_eager``. A graph break (``fullgraph=True``) is reported as a failure."""
    try:
        return run_ours_compiled(fun, x0, line_search, args, backend="inductor")
    except torch._dynamo.exc.Unsupported as error:
        return {"failure": f"graph break: {str(error).splitlines()[0][:300]}"}, None
    except Exception as error:  # an Inductor failure is a result to report
        reason = f"inductor failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
    try:
        fallback, window = run_ours_compiled(fun, x0, line_search, args, backend="aot_eager")
    except Exception as error:
        return {"failure": f"{reason}; aot_eager failed too: {type(error).__name__}: {error}"[:600]}, None
    return {**fallback, "inductor_failure": reason}, window


# -------------------------------------------------------------------------------------- optax


def optax_step(problem: str, line_search: str | None) -> Callable[..., Any]:
    """One jitted optax.lbfgs iteration ``(w, state, data) -> (w, state)``, and its optimizer."""
    import jax
    import optax

    loss = jax_loss(problem)
    if line_search:
        optimizer = optax.lbfgs(memory_size=HISTORY)  # default: zoom line search, 20 steps max
    else:
        optimizer = optax.lbfgs(learning_rate=1.0, memory_size=HISTORY, linesearch=None)

    def step(w: Any, state: Any, data: dict[str, Any]) -> tuple[Any, Any]:
        fun = functools.partial(loss, data=data)
        if line_search:
            value, grad = optax.value_and_grad_from_state(fun)(w, state=state)
            updates, state = optimizer.update(grad, state, w, value=value, grad=grad, value_fn=fun)
        else:
            _, grad = jax.value_and_grad(fun)(w)
            updates, state = optimizer.update(grad, state, w)
        return optax.apply_updates(w, updates), state

    return jax.jit(step), optimizer


def run_optax(problem: str, data: dict[str, np.ndarray], line_search: str | None,
              args: argparse.Namespace) -> tuple[dict[str, Any], Window]:  # fmt: skip
    import jax
    import optax

    jitted, optimizer = optax_step(problem, line_search)
    arrays = {name: jax.device_put(value) for name, value in data.items() if name != "x0"}
    w0 = jax.device_put(data["x0"])
    carry = (w0, optimizer.init(w0))
    start = time.perf_counter()
    compiled = jitted.lower(*carry, arrays).compile()
    compile_seconds = time.perf_counter() - start
    step = lambda carry: compiled(*carry, arrays)  # noqa: E731
    warm = jax.block_until_ready(run(step, carry, args.warmup))
    evals = 0.0
    end = warm
    for _ in range(args.iters):
        end = step(end)
        evals += float(optax.tree.get(end[1], "num_linesearch_steps")) if line_search else 1.0
    window = window_of(step, warm, args.iters, sync=jax.block_until_ready)
    value_end = float(jax_loss(problem)(end[0], arrays))
    info = {"evals_per_iteration": evals / args.iters, "calls_per_iteration": evals / args.iters,
            "compile_seconds": compile_seconds, "value_end": value_end,
            "x_end": torch.from_numpy(np.array(end[0]))}  # fmt: skip
    return info, window


# -------------------------------------------------------------------------- torch.optim.LBFGS


def torch_window(fun: Callable, x0: torch.Tensor, line_search: str | None,
                 args: argparse.Namespace) -> tuple[float, torch.optim.LBFGS, torch.Tensor, int]:  # fmt: skip
    """A fresh optimizer, ``--warmup`` untimed steps, then ``--iters`` timed ones."""
    x = torch.nn.Parameter(x0.clone())
    optimizer = torch.optim.LBFGS([x], lr=1.0, max_iter=1, history_size=HISTORY, line_search_fn=line_search,
                                  tolerance_grad=0.0, tolerance_change=0.0)  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = fun(x)
        loss.backward()
        return loss

    for _ in range(args.warmup):
        optimizer.step(closure)
    evals = optimizer.state[x]["func_evals"]
    start = time.perf_counter()
    for _ in range(args.iters):
        optimizer.step(closure)
    elapsed = time.perf_counter() - start
    return 1e3 * elapsed / args.iters, optimizer, x, optimizer.state[x]["func_evals"] - evals


def run_torch(
    fun: Callable, x0: torch.Tensor, line_search: str | None, args: argparse.Namespace
) -> tuple[dict[str, Any], Window]:
    """A first window for the iterates and evaluations, and the timed window (each a fresh
    optimizer with its own warm-up)."""
    _, _, x, evals = torch_window(fun, x0, line_search, args)
    info = {"evals_per_iteration": evals / args.iters, "calls_per_iteration": evals / args.iters,
            "value_end": float(fun(x.detach())), "x_end": x.detach()}  # fmt: skip
    return info, lambda: torch_window(fun, x0, line_search, args)[0]


# --------------------------------------------------------------------------------------- main


def measure_case(problem: str, n: int, line_search: str | None, args: argparse.Namespace) -> dict[str, Any]:
    data = make_data(problem, n)
    tensors = {name: torch.from_numpy(value) for name, value in data.items()}
    fun, x0 = torch_loss(problem, tensors), tensors["x0"]
    prepared: dict[str, tuple[dict[str, Any], Window | None]] = {
        EAGER: run_ours_eager(fun, x0, line_search, None, args),
        NO_EXIT: run_ours_eager(fun, x0, line_search, False, args),
    }
    if not args.no_compile:
        prepared[COMPILED] = compiled_or_failure(fun, x0, line_search, args)
    if not args.no_jax:
        prepared[OPTAX] = run_optax(problem, data, line_search, args)
    prepared[TORCH] = run_torch(fun, x0, line_search, args)
    # The solvers' windows take turns, --repeats times: a ratio pairs windows timed seconds
    # apart (this machine's speed drifts by tens of percent within minutes).
    timers: dict[str, common.Timer] = {
        name: (lambda window=window: (window(), {})) for name, (_, window) in prepared.items() if window
    }
    timed = common.alternate(timers, args.repeats)  # "times": each turn's ms per iteration
    results = {name: summary(timed[name]["times"], **info) if name in timed else info
               for name, (info, _) in prepared.items()}  # fmt: skip

    def paired(name: str, anchor: str) -> float:
        return common.paired_ratio(timed[name], timed[anchor])

    default_end = results[EAGER]["x_end"]
    for name, result in results.items():
        if "failure" in result:
            continue
        reference = result.pop("x_reference", default_end)
        result["max_abs_diff_vs_eager"] = float((result.pop("x_end") - reference).abs().max())
        if "first_call_seconds" in result:
            result["compile_seconds"] = result["first_call_seconds"] - result["ms_per_iteration"] / 1e3
        if name.startswith("ours") and OPTAX in timed:
            result["ours_over_optax"] = paired(name, OPTAX)
        if name in (NO_EXIT, COMPILED):
            result["over_eager"] = paired(name, EAGER)
    return results


HEADER = ("problem", "n", "line search", "solver", "ms/it", "evals/it", "calls/it", "ours/optax",
          "vs eager", "compile s", "|dx| 1 step", "|dx| run", "status")  # fmt: skip
WIDTHS = (9, 7, 12, 30, 8, 8, 8, 10, 8, 9, 11, 8, 7)


def print_row(problem: str, n: int, line_search: str | None, name: str, result: dict[str, Any]) -> None:
    def number(key: str, spec: str) -> str:
        return "" if result.get(key) is None else format(result[key], spec)

    if "failure" in result:
        cells = (problem, f"{n:.0e}", line_search or "none", name, result["failure"])
        print(" ".join(f"{cell:>{width}}" for cell, width in zip(cells, WIDTHS, strict=False)))
        return
    status = "" if "running" not in result else ("running" if result["running"] else "STOPPED")
    cells = (problem, f"{n:.0e}", line_search or "none", name, number("ms_per_iteration", ".3f"),
             number("evals_per_iteration", ".2f"), number("calls_per_iteration", ".2f"),
             number("ours_over_optax", ".2f"), number("over_eager", ".2f"), number("compile_seconds", ".1f"),
             number("one_step_max_abs_diff", ".1e"), number("max_abs_diff_vs_eager", ".1e"),
             status)  # fmt: skip
    print(" ".join(f"{cell:>{width}}" for cell, width in zip(cells, WIDTHS, strict=True)), flush=True)


def print_compile_notes(rows: list[dict[str, Any]]) -> None:
    """One line per compiled case: backend, graphs, graph breaks, the checks against eager."""
    print("\ncompiled steps (torch.compile(update step, fullgraph=True, dynamic=False)):")
    for row in rows:
        if row["solver"] != COMPILED:
            continue
        case = f"  {row['problem']} n={row['n']:.0e} {row['line_search'] or 'none'}:"
        if "failure" in row:
            print(f"{case} {row['failure']}")
            continue
        fallback = f" (inductor failed: {row['inductor_failure']})" if "inductor_failure" in row else ""
        print(f"{case} backend {row['backend']}{fallback}, max_ls {row['max_ls']}, {row['graphs']} graph(s), "
              f"{row['graph_breaks']} graph breaks, compile {row['compile_seconds']:.1f} s; against eager "
              f"with the same options, one step from the same state: max|dx| "
              f"{row['one_step_max_abs_diff']:.1e} (max|x| {row['x_max_abs']:.2f}), counters "
              f"{'equal' if row['one_step_same_counters'] else 'DIFFER'}; the whole run from x0: max|dx| "
              f"{row['max_abs_diff_vs_eager']:.1e}, evaluations {row['n_evals']} compiled, "
              f"{row['n_evals_eager']} eager")  # fmt: skip


def warm_up_inductor() -> float:
    """Seconds to compile a trivial function: Inductor's one-time start-up (imports, compile
    workers), which would otherwise be charged to the first case's compile time."""
    start = time.perf_counter()
    torch.compile(lambda x: x.sin() + 1.0, fullgraph=True)(torch.ones(8))
    torch._dynamo.reset()
    return time.perf_counter() - start


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e5])
    parser.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS))
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per case (median)")
    parser.add_argument("--iters", type=int, default=10, help="iterations per timed window")
    parser.add_argument("--warmup", type=int, default=10, help="untimed iterations before the window")
    parser.add_argument("--compiled-max-ls", type=int, default=25,
                        help="max_ls of the compiled strong-Wolfe step")  # fmt: skip
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled step")
    parser.add_argument("--no-jax", action="store_true", help="skip optax")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "update_cost.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.warmup < 1:
        raise SystemExit("--warmup must be at least 1 (the compiled step compiles on its first call)")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="jax")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")
    load_before, start = os.getloadavg(), time.perf_counter()
    inductor_start = 0.0 if args.no_compile else warm_up_inductor()
    print(" ".join(f"{name:>{width}}" for name, width in zip(HEADER, WIDTHS, strict=True)))
    rows = []
    for problem in args.problems:
        for size in args.sizes:
            for line_search in LINE_SEARCHES:
                results = measure_case(problem, int(size), line_search, args)
                for name, result in results.items():
                    print_row(problem, int(size), line_search, name, result)
                    rows.append({"problem": problem, "n": int(size), "line_search": line_search,
                                 "solver": name, **result})  # fmt: skip
    print_compile_notes(rows)
    config = {"history_size": HISTORY, "dtype": "float32", "samples": SAMPLES, "ridge_log10_range": RIDGE,
              "sizes": [int(size) for size in args.sizes], "problems": args.problems,
              "repeats": args.repeats, "iters": args.iters, "warmup": args.warmup,
              "compiled_max_ls": args.compiled_max_ls, "eager_max_ls": 25,
              "inductor_cache": os.environ["TORCHINDUCTOR_CACHE_DIR"], "inductor_startup_s": inductor_start,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "seconds": time.perf_counter() - start}  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"meta": common.machine(), "config": config, "rows": rows}, indent=2))
    print(f"Inductor start-up (a trivial compile, not in the compile times above): {inductor_start:.1f} s; "
          f"load average before/after: {load_before[0]:.1f}/{config['load_average_after'][0]:.1f} "
          f"on {os.cpu_count()} CPUs")  # fmt: skip
    print(f"wrote {args.output} ({config['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
