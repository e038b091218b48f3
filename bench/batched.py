"""Throughput on a batch of independent problems: torchlbfgs vmapped against the usual tools.

B independent L2-regularised logistic regressions, each with its own data: d=32 features,
256 samples, feature scales spread over 10^±0.5, uncentred features (mean 2 before scaling,
which makes the Hessians ill-conditioned), labels from a noisy linear model
``y = (X w_true + noise > 0)`` (classes balanced, noise 1% of the logits' spread), loss
``mean BCE + 1e-4 |w|^2``. With lambda this small nearly all problems are still short of their
(float32) optimum after 50 iterations, so the solvers run all of them; the few problems where a
solver stops earlier (float32 precision reached, line search failed) are counted in the table.
Every solver starts from w=0, keeps 10 curvature pairs, has its tolerances set to 0 and works
in float32 on the same data (generated once with numpy, converted per library). Solvers:

* ours, eager: ``torchlbfgs.batched_minimize``, 50 iterations, strong Wolfe (``max_ls=25``):
  evaluation rounds over the batch, stopped problems leaving it (see ``torchlbfgs.batched``);
* ours, compiled: the same with ``compile=True`` (one round compiled by Inductor, batch
  dimension dynamic), run in a fresh process with an empty inductor cache (so the compile time
  is a cold one), abandoned if it has not compiled after ``--compile-timeout`` seconds;
* a Python loop of ``torch.optim.LBFGS``, one ``step`` of ``max_iter=50`` per problem,
  strong Wolfe. With tolerances 0 torch stops only on an exactly zero gradient or step, a
  non-descent direction, or ``max_eval``, whose default ``max_iter * 5 // 4 = 62`` could bind
  (here it rarely does: ~57 evaluations per solve): we pass ``max_eval=10**6``;
* a loop of scipy L-BFGS-B (``maxiter=50, maxcor=10, gtol=0, ftol=0``; the objective is
  computed in float32 with numpy, L-BFGS-B itself works in float64);
* if JAX is installed: ``jax.jit(jax.vmap(...))`` of optax.lbfgs (50 updates in a
  ``fori_loop``, default zoom line search) and of jaxopt.LBFGS (``maxiter=50, tol=0``); compile
  time is excluded from problems/s and reported apart.

The Python loops are timed on the first ``--loop-max`` problems of each batch (the table says
so). Final losses of all solvers are evaluated by one float64 function at their float32
params. The machine's speed drifts by tens of percent within minutes, so the ratios the issues
set targets on are taken from runs that alternate: our eager solve, the JAX solvers and
two floors take turns ``--repeats`` times: ``eager evaluations alone`` (the eager solve's
floor: as many eager vmapped values and gradients of the batch as a problem needs, nothing
else) and ``eager bare iterations alone`` (as many eager vmapped L-BFGS iterations with
nothing but the direction, a unit step, the evaluation and the new pair: ``bare_iteration``,
the floor of any eager L-BFGS solve, with or without a line search); the
compiled solve alternates with its evaluation bound (the compiled value and gradient, as many
times) and with as many compiled bare iterations (static shapes), in its own process; each
ratio is the median over the pairs. Also reported: peak
memory per problem of our eager solve and the size of our state
per problem, counted from its leaves. The peak is the increase of the process's resident set
high-water mark (VmHWM, reset through /proc/self/clear_refs just before the solve, inputs
already resident) in a fresh process, measured twice: with every allocation of 16 KiB or more
mmapped (MALLOC_MMAP_THRESHOLD_), so that freed tensors leave RSS at once and the peak counts
live memory, and with glibc's default malloc, which keeps freed memory for reuse (what a
process really sees). Torch has no allocator statistics on CPU, and tracemalloc does not see
its buffers.

Run: ``python bench/batched.py`` (``--sizes 64 1024 8192`` for the large batch; about 30 s
of compiling per B).
One thread everywhere; the thread variables below are set only if not already set.
"""

from __future__ import annotations

import os

import common

common.use_one_thread()

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import torchlbfgs  # noqa: E402

D, SAMPLES, LAM, HISTORY, MAX_ITER, SEED = 32, 256, 1e-4, 10, 50, 0
FEATURE_MEAN, LABEL_NOISE = 2.0, 0.01
INPUT_KIB = 4 * SAMPLES * (D + 1) / 1024  # X and y of one problem, float32
OURS = "ours: batched_minimize (eager)"
TORCH_LOOP, SCIPY_LOOP = "loop of torch.optim.LBFGS", "loop of scipy L-BFGS-B"
OPTAX, JAXOPT = "jax.jit(vmap(optax.lbfgs)), fori_loop", "jax.jit(vmap(jaxopt.LBFGS))"


COMPILED = "ours: batched_minimize(compile=True)"
EAGER_FLOOR = "eager evaluations alone"
ITERATION_FLOOR = "eager bare iterations alone"


# ---------------------------------------------------------------------------------------- data


def make_data(batch: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """``X`` (batch, 256, 32) and ``y`` (batch, 256), float32; the same for every solver."""
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-0.5, 0.5, (batch, 1, D))
    X = (rng.standard_normal((batch, SAMPLES, D)) + FEATURE_MEAN) * scales
    w_true = rng.standard_normal((batch, D))
    logits = np.einsum("bnd,bd->bn", X, w_true)
    logits -= np.median(logits, axis=1, keepdims=True)  # balanced classes
    noise = LABEL_NOISE * logits.std(axis=1, keepdims=True) * rng.standard_normal(logits.shape)
    return X.astype(np.float32), (logits + noise > 0).astype(np.float32)


def torch_loss(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y) + LAM * torch.dot(w, w)


def reference_losses(params: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The objective of each problem at ``params`` (k, 32), in float64: one judge for all."""
    k = params.shape[0]
    w = params.astype(np.float64)
    z = np.einsum("bnd,bd->bn", X[:k].astype(np.float64), w)
    return np.mean(np.logaddexp(0.0, z) - y[:k] * z, axis=1) + LAM * np.sum(w * w, axis=1)


# ------------------------------------------------------------------------------------- solvers
# Each solver returns a dict with the seconds it took, its final params (k, 32) and iterations
# (k,) for the first k problems, and the compile time where there is one.


def solve_ours(X: torch.Tensor, y: torch.Tensor, compile: bool = False) -> torchlbfgs.Result:
    w0 = torch.zeros(X.shape[0], D, dtype=X.dtype)
    return torchlbfgs.batched_minimize(
        torch_loss, w0, X, y, max_iter=MAX_ITER, tolerance_grad=0.0, tolerance_change=0.0,
        history_size=HISTORY, compile=compile,
    )  # fmt: skip


def ours_timer(X: np.ndarray, y: np.ndarray) -> common.Timer:
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    solve_ours(Xt[:4], yt[:4])  # warm-up

    def timed() -> tuple[float, dict[str, Any]]:
        start = time.perf_counter()
        result = solve_ours(Xt, yt)
        seconds = time.perf_counter() - start
        return seconds, {"params": result.params.numpy(), "iterations": result.n_iter.numpy(),
                         "evals_mean": float(result.n_evals.float().mean())}  # fmt: skip

    return timed


def floor_timer(floor: BatchEvaluation | BareIterations, calls: float, per: int = 1) -> common.Timer:
    """A floor (:class:`BatchEvaluation` or :class:`BareIterations`) timed as ``calls`` calls of
    the whole batch, measured over ``per`` calls and scaled (as many evaluations or iterations
    as a problem needs)."""
    return lambda: (floor.seconds(per) / per * calls, {})


def bare_iteration(
    loss: Callable[..., torch.Tensor], state: tuple[torch.Tensor, ...], *data: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """One L-BFGS iteration of one problem and nothing else, in the cheapest eager form we know
    (Nocedal & Wright, algorithm 7.4 with the scaling of eq. 7.20): the two-loop direction over
    the pairs stored newest first (row 0 the newest: rows read in place, no gather), a unit
    step, one value and gradient, the new pair shifted in. No line search, no curvature or
    stopping test, no counters: what any eager L-BFGS iteration must at least do.

    ``state`` is ``(w, g, s_rows, y_rows, rho)`` with ``(m, n)`` rows and ``rho = 1 / s'y`` (0
    in empty rows, which then contribute nothing)."""
    w, g, s_rows, y_rows, rho = state
    q, alphas = -g, []
    for i in range(s_rows.shape[0]):  # newest to oldest
        alpha = rho[i] * torch.dot(s_rows[i], q)
        q = torch.addcmul(q, y_rows[i], alpha, value=-1)
        alphas.append(alpha)
    yy = torch.dot(y_rows[0], y_rows[0])
    direction = q * torch.where(yy > 0, 1 / (rho[0] * yy), 1.0)  # gamma = s'y / y'y, 1 when empty
    for i in reversed(range(s_rows.shape[0])):  # oldest to newest
        beta = rho[i] * torch.dot(y_rows[i], direction)
        direction = torch.addcmul(direction, s_rows[i], alphas[i] - beta)
    new_w = w + direction
    new_g, _ = torch.func.grad_and_value(loss)(new_w, *data)
    change = new_g - g

    def shifted_in(rows: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        return torch.cat([row.unsqueeze(0), rows[:-1]])

    return (new_w, new_g, shifted_in(s_rows, direction), shifted_in(y_rows, change),
            shifted_in(rho, 1 / torch.dot(direction, change)))  # fmt: skip


class BareIterations:
    """What bare L-BFGS iterations cost: :func:`bare_iteration`, vmapped over the whole batch,
    eager or compiled (Inductor, static shapes: shifting the pairs in specialises the batch
    size). Each starts from ``w = 0`` with a full memory (the pairs of ``HISTORY`` iterations
    from 0): unit steps without a line search stray far from the optimum within a few dozen
    iterations, and the loss's arithmetic should stay that of a solve. Times as many
    iterations as the evaluations a problem needs: the floor of any L-BFGS solve, eager or
    compiled as this one is, with or without a line search."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, *, compiled: bool) -> None:
        self.X, self.y = X.clone(), y.clone()  # tensors of its own: nothing the solve's compile saw
        batch = X.shape[0]
        eager = torch.func.vmap(functools.partial(bare_iteration, torch_loss))
        w = torch.zeros(batch, D)
        origin = (w, torch.func.vmap(torch.func.grad(torch_loss))(w, self.X, self.y))
        state = (
            *origin,
            torch.zeros(batch, HISTORY, D),
            torch.zeros(batch, HISTORY, D),
            torch.zeros(batch, HISTORY),
        )
        for _ in range(HISTORY):
            state = eager(state, self.X, self.y)
        self.start = (*origin, *state[2:])
        self.iterate = torch.compile(eager, fullgraph=True, dynamic=False) if compiled else eager
        self.iterate(self.start, self.X, self.y)  # warm-up (compiles)

    def seconds(self, iterations: int) -> float:
        """The time of ``iterations`` bare iterations of the batch, each from the same start."""
        return seconds_of_calls(iterations, self.iterate, self.start, self.X, self.y)


def run_torch_loop(X: np.ndarray, y: np.ndarray, count: int) -> dict[str, Any]:
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    params, iterations, evals = np.empty((count, D), np.float32), np.empty(count, np.int64), 0
    start = time.perf_counter()
    for i in range(count):
        w = torch.zeros(D, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [w], max_iter=MAX_ITER, max_eval=10**6, history_size=HISTORY, tolerance_grad=0.0,
            tolerance_change=0.0, line_search_fn="strong_wolfe",
        )  # fmt: skip

        def closure(w: torch.Tensor = w, optimizer: Any = optimizer, i: int = i) -> torch.Tensor:
            optimizer.zero_grad()
            value = torch_loss(w, Xt[i], yt[i])
            value.backward()
            return value

        optimizer.step(closure)
        params[i] = w.detach().numpy()
        iterations[i] = optimizer.state[w]["n_iter"]
        evals += optimizer.state[w]["func_evals"]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "params": params, "iterations": iterations, "evals_mean": evals / count}


def run_scipy_loop(X: np.ndarray, y: np.ndarray, count: int) -> dict[str, Any]:
    import scipy.optimize
    import scipy.special

    def objective(w64: np.ndarray, X: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        w = w64.astype(np.float32)
        z = X @ w
        value = np.mean(np.logaddexp(np.float32(0), z) - y * z) + np.float32(LAM) * (w @ w)
        grad = X.T @ (scipy.special.expit(z) - y) / np.float32(SAMPLES) + np.float32(2 * LAM) * w
        return float(value), grad.astype(np.float64)

    params, iterations, evals = np.empty((count, D), np.float32), np.empty(count, np.int64), 0
    options = {"maxiter": MAX_ITER, "maxcor": HISTORY, "gtol": 0.0, "ftol": 0.0}
    start = time.perf_counter()
    for i in range(count):
        found = scipy.optimize.minimize(
            objective, np.zeros(D), args=(X[i], y[i]), jac=True, method="L-BFGS-B", options=options
        )
        params[i], iterations[i], evals = found.x, found.nit, evals + found.nfev
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "params": params, "iterations": iterations, "evals_mean": evals / count}


def jax_solvers() -> dict[str, Callable[..., Any]] | str:
    """The two jitted, vmapped JAX solvers, or why they are unavailable."""
    imported = common.import_jax(x64=False)
    if isinstance(imported, str):
        return imported
    jax, jnp, jaxopt, optax = imported

    def loss(w: Any, X: Any, y: Any) -> Any:
        z = X @ w
        return jnp.mean(jax.nn.softplus(z) - y * z) + LAM * (w @ w)

    def optax_one(X: Any, y: Any) -> tuple[Any, Any]:
        def fun(w: Any) -> Any:
            return loss(w, X, y)

        optimizer = optax.lbfgs(memory_size=HISTORY)
        value_and_grad = optax.value_and_grad_from_state(fun)

        def body(_: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
            w, state = carry
            value, grad = value_and_grad(w, state=state)
            updates, state = optimizer.update(grad, state, w, value=value, grad=grad, value_fn=fun)
            return optax.apply_updates(w, updates), state

        w0 = jnp.zeros(D, X.dtype)
        w, _ = jax.lax.fori_loop(0, MAX_ITER, body, (w0, optimizer.init(w0)))
        return w, jnp.asarray(MAX_ITER)  # a fori_loop: always 50 updates

    def jaxopt_one(X: Any, y: Any) -> tuple[Any, Any]:
        solver = jaxopt.LBFGS(fun=loss, maxiter=MAX_ITER, tol=0.0, history_size=HISTORY)
        w, state = solver.run(jnp.zeros(D, X.dtype), X, y)
        return w, state.iter_num

    return {OPTAX: jax.jit(jax.vmap(optax_one)), JAXOPT: jax.jit(jax.vmap(jaxopt_one))}


def jax_timer(solver: Callable[..., Any], X: np.ndarray, y: np.ndarray) -> common.Timer:
    """A timer of the jitted ``solver`` on this data (compiled here; its results say how long
    that took)."""
    import jax

    Xj, yj = jax.device_put(X), jax.device_put(y)
    start = time.perf_counter()
    compiled = solver.lower(Xj, yj).compile()
    compile_seconds = time.perf_counter() - start
    jax.block_until_ready(compiled(Xj, yj))  # warm-up

    def timed() -> tuple[float, dict[str, Any]]:
        start = time.perf_counter()
        params, iterations = jax.block_until_ready(compiled(Xj, yj))
        seconds = time.perf_counter() - start
        return seconds, {"params": np.asarray(params), "iterations": np.asarray(iterations),
                         "compile_seconds": compile_seconds}  # fmt: skip

    return timed


# ------------------------------------------------------------------ workers in fresh processes


def compiled_worker(batch: int, repeats: int, out: Path) -> None:
    """Time ``batched_minimize(compile=True)`` and the evaluation bound, alternated; write the
    results to ``out``."""
    X, y = (torch.from_numpy(a) for a in make_data(batch))
    report: dict[str, Any] = {"stage": "compiling"}
    write_report(out, report)
    start = time.perf_counter()
    first = solve_ours(X, y, compile=True)
    report.update(stage="timing", first_solve_seconds=time.perf_counter() - start,
                  graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"])  # fmt: skip
    write_report(out, report)
    evals = float(first.n_evals.float().mean())
    evaluation, calls = BatchEvaluation(X, y, compiled=True), 20
    iterations = BareIterations(X, y, compiled=True)

    def solve() -> tuple[float, dict[str, Any]]:
        start = time.perf_counter()
        result = solve_ours(X, y, compile=True)
        return time.perf_counter() - start, {"result": result}

    # the evaluations the problems need, alone, and as many compiled bare iterations
    bound, bare = floor_timer(evaluation, evals, calls), floor_timer(iterations, evals, calls)

    # The solve, the bound and the floor take turns, so that each pair sees the same state of
    # the machine (whose speed drifts by more than the ratio's margin within a minute).
    timed = common.alternate({"solve": solve, "bound": bound, "bare": bare}, max(repeats, 5))
    seconds, result = timed["solve"]["seconds"], timed["solve"]["result"]
    report.update(stage="done", seconds=seconds, compile_seconds=report["first_solve_seconds"] - seconds,
                  evals_mean=evals, evaluation_bound_per_s=batch / timed["bound"]["seconds"],
                  compiled_over_bound=common.paired_ratio(timed["bound"], timed["solve"]),
                  bare_over_bound=common.paired_ratio(timed["bound"], timed["bare"]))  # fmt: skip
    np.save(out / "params.npy", result.params.numpy())
    np.save(out / "iterations.npy", result.n_iter.numpy())
    write_report(out, report)


class BatchEvaluation:
    """What evaluation alone costs: the vmapped value and gradient of the loss over the whole
    batch, eager or compiled (Inductor). Times the evaluations a problem needs, no solver built
    on these evaluations can go faster."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, *, compiled: bool) -> None:
        evaluate = torch.func.vmap(torch.func.grad_and_value(torch_loss))
        self.evaluate = torch.compile(evaluate) if compiled else evaluate
        self.X, self.y = X.clone(), y.clone()  # tensors of its own: nothing the solve's compile saw
        self.w = torch.zeros(X.shape[0], X.shape[-1])
        self.evaluate(self.w, self.X, self.y)  # warm-up (compiles)

    def seconds(self, calls: int) -> float:
        """The time of ``calls`` evaluations of the batch."""
        return seconds_of_calls(calls, self.evaluate, self.w, self.X, self.y)


def seconds_of_calls(calls: int, function: Callable[..., Any], *args: Any) -> float:
    """The time of ``calls`` calls of ``function(*args)``."""
    start = time.perf_counter()
    for _ in range(calls):
        function(*args)
    return time.perf_counter() - start


def memory_worker(batch: int, out: Path) -> None:
    """Peak RSS increase during one eager solve of ``batch`` problems (inputs already resident)."""
    X, y = (torch.from_numpy(a) for a in make_data(batch))
    solve_ours(X[:4], y[:4])  # load code paths and allocator pools first
    before = common.rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to VmRSS
    solve_ours(X, y)
    peak = common.rss_kib("VmHWM")
    write_report(out, {"rss_before_kib": before, "peak_kib": peak})


def write_report(out: Path, report: dict[str, Any]) -> None:
    """Replace ``out/result.json`` atomically (the parent polls it)."""
    partial = out / "result.json.partial"
    partial.write_text(json.dumps(report))
    partial.replace(out / "result.json")


def read_report(out: Path) -> dict[str, Any]:
    path = out / "result.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run_worker(
    arguments: list[str],
    timeout: float,
    env: dict[str, str] | None = None,
    timeout_after_compile: float = 900,
) -> dict[str, Any]:
    """Run this script as a worker in a new process group and return its report (with the arrays
    it saved). The group is killed if the worker is still starting or compiling after
    ``timeout`` seconds, or after ``timeout_after_compile`` more once it has compiled."""
    out = Path(tempfile.mkdtemp(prefix="batched-bench-"))
    command = [sys.executable, __file__, "--worker", *arguments, "--worker-out", str(out)]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(out / "inductor-cache"), **(env or {})}
    killed = None
    with (
        (out / "log.txt").open("w") as log_file,
        subprocess.Popen(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        ) as process,
    ):
        start = time.monotonic()
        while process.poll() is None:
            time.sleep(0.2)
            elapsed, stage = time.monotonic() - start, read_report(out).get("stage", "compiling")
            if elapsed > (timeout if stage == "compiling" else timeout + timeout_after_compile):
                os.killpg(process.pid, signal.SIGKILL)  # the worker and any compile workers it started
                process.wait()
                killed = f"killed after {elapsed:.0f} s while {stage}"
    report = read_report(out)
    if process.returncode != 0:
        report["error"] = killed or _last_error((out / "log.txt").read_text())
    for array in out.glob("*.npy"):
        report[array.stem] = np.load(array)
    shutil.rmtree(out, ignore_errors=True)
    return report


def _last_error(log: str) -> str:
    lines = [line for line in log.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors[-1] if errors else (lines[-1] if lines else "no output"))[:500]


def run_compiled(batch: int, repeats: int, timeout: float) -> dict[str, Any]:
    report = run_worker(["compiled", str(batch), str(repeats)], timeout)
    if report.get("stage") != "done":
        error = report.get("error", "unknown error")
        if report.get("stage") == "timing":
            failure = f"compiled in {report['first_solve_seconds']:.0f} s, then failed: {error}"
        else:
            failure = f"no result: {error}"
        return {"failure": failure, **{k: v for k, v in report.items() if k != "stage"}}
    return report


def run_memory(batch: int) -> dict[str, Any]:
    """Peak RSS increase of one eager solve, with glibc's default malloc and with every
    allocation of 16 KiB or more mmapped (freed buffers go back to the OS at once, so the peak
    counts live memory only, not memory the allocator keeps for reuse)."""
    measured: dict[str, Any] = {}
    for name, env in (("default_malloc", {}), ("live", {"MALLOC_MMAP_THRESHOLD_": "16384"})):
        report = run_worker(["memory", str(batch)], timeout=600, env=env)
        if "peak_kib" not in report:
            measured[name] = {"failure": report.get("error", "no result")}
            continue
        increase = report["peak_kib"] - report["rss_before_kib"]
        measured[name] = {**report, "peak_increase_kib": increase, "kib_per_problem": increase / batch}
    return measured


def _named_leaves(tree: Any, prefix: str = "") -> Any:
    """``(dotted field name, tensor)`` for every leaf of nested NamedTuples."""
    if isinstance(tree, tuple):
        for field in tree._fields:
            yield from _named_leaves(getattr(tree, field), f"{prefix}{field}.")
    else:
        yield prefix[:-1], tree


def state_size() -> dict[str, Any]:
    """Values and bytes per problem that the solve keeps between rounds, from its leaves: the
    L-BFGS state (history, gradient, counters) and the current iteration's direction and
    line-search state."""
    from torchlbfgs.objective import flat_objective
    from torchlbfgs.pytree import ravel_pytree
    from torchlbfgs.rounds import Settings, start

    settings = Settings(history_size=HISTORY)
    X, y = (torch.from_numpy(a) for a in make_data(4))

    def start_one(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> Any:
        x, unravel = ravel_pytree(w)
        return start(flat_objective(functools.partial(torch_loss, X=X, y=y), unravel), x, settings)

    state = torch.func.vmap(start_one)(torch.zeros(4, D), X, y)
    leaves = dict(_named_leaves(state))
    values = sum(leaf[0].numel() for leaf in leaves.values())
    size = sum(leaf[0].numel() * leaf.element_size() for leaf in leaves.values())
    shapes = {name: [list(leaf.shape[1:]), str(leaf.dtype)] for name, leaf in leaves.items()}
    return {"values": values, "bytes": size, "constant": values / D - 2 * HISTORY, "leaves": shapes}


# --------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 1024], help="batch sizes B")
    parser.add_argument(
        "--loop-max", type=int, default=256, help="time the Python loops on this many problems"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs of each vectorised solver (median)"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled solve")
    parser.add_argument("--compile-timeout", type=float, default=300.0, help="seconds per compiled case")
    parser.add_argument("--no-jax", action="store_true", help="skip the JAX solvers")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "batched.json")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.worker:
        kind, *numbers = args.worker
        if kind == "compiled":
            compiled_worker(*(int(n) for n in numbers), out=args.worker_out)
        else:
            memory_worker(int(numbers[0]), out=args.worker_out)
        return

    jax = {} if args.no_jax else jax_solvers()
    jax_note = jax if isinstance(jax, str) else None
    rows: list[dict[str, Any]] = []
    header = ("solver", "B", "timed", "problems/s", "vs torch loop", "mean final loss", "- ours", "<50 its",
              "compile s")  # fmt: skip
    widths = (42, 5, 5, 11, 13, 15, 9, 7, 9)
    print(" ".join(f"{name:>{width}}" for name, width in zip(header, widths, strict=True)))
    for batch in args.sizes:
        X, y = make_data(batch)
        # ours eager and the JAX solvers (its anchors) take turns; the compiled solve runs in a
        # fresh process, its evaluation bound alternated with it there
        timers = {OURS: ours_timer(X, y)}
        evaluations = round(timers[OURS]()[1]["evals_mean"])
        Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
        for name, floor in ((EAGER_FLOOR, BatchEvaluation), (ITERATION_FLOOR, BareIterations)):
            timers[name] = floor_timer(floor(Xt, yt, compiled=False), evaluations, evaluations)
        if isinstance(jax, dict):
            timers.update({name: jax_timer(solver, X, y) for name, solver in jax.items()})
        results = common.alternate(timers, args.repeats)
        floors = {name: results.pop(name) for name in (EAGER_FLOOR, ITERATION_FLOOR)}
        if not args.no_compile:
            results[COMPILED] = run_compiled(batch, args.repeats, args.compile_timeout)
        count = min(batch, args.loop_max)
        results[TORCH_LOOP] = run_torch_loop(X, y, count)
        results[SCIPY_LOOP] = run_scipy_loop(X, y, count)
        order = (OURS, COMPILED, TORCH_LOOP, SCIPY_LOOP, OPTAX, JAXOPT)
        results = {name: results[name] for name in order if name in results}
        ours_losses = reference_losses(results[OURS]["params"], X, y)
        torch_rate = count / results[TORCH_LOOP]["seconds"]
        for name, result in results.items():
            row: dict[str, Any] = {"solver": name, "B": batch}
            if "failure" in result:
                row.update({k: v for k, v in result.items() if k not in ("params", "iterations")})
                rows.append(row)
                print(f"{name:>42} {batch:>5} {'':>5} {result['failure']}")
                continue
            timed = result["params"].shape[0]
            losses = reference_losses(result["params"], X, y)
            rate = timed / result["seconds"]
            row.update(
                timed_problems=timed, problems_per_s=rate, vs_torch_loop=rate / torch_rate,
                mean_final_loss=float(losses.mean()),
                minus_ours=float(losses.mean() - ours_losses[:timed].mean()),
                stopped_before_50=int((result["iterations"] < MAX_ITER).sum()),
                min_iterations=int(result["iterations"].min()), evals_mean=result.get("evals_mean"),
                compile_seconds=result.get("compile_seconds"), graphs=result.get("graphs"),
            )  # fmt: skip
            rows.append(row)
            compile_cell = "" if row["compile_seconds"] is None else f"{row['compile_seconds']:.1f}"
            cells = (name, batch, timed, f"{rate:.1f}", f"{row['vs_torch_loop']:.2f}",
                     f"{row['mean_final_loss']:.7f}", f"{row['minus_ours']:+.1e}", row["stopped_before_50"],
                     compile_cell)  # fmt: skip
            print(" ".join(f"{cell:>{width}}" for cell, width in zip(cells, widths, strict=True)), flush=True)
        if jax_note:
            print(f"{'JAX solvers':>42} {batch:>5} {jax_note}")
        elif OPTAX in results:
            eager_over_optax = common.paired_ratio(results[OPTAX], results[OURS])
            print(f"{'ours eager against optax':>42} {batch:>5} {batch:>5} {eager_over_optax:>11.2f}x  "
                  "(optax's time over ours: median of alternated pairs)")  # fmt: skip
            rows.append({"solver": "ours eager against optax", "B": batch, "ratio": eager_over_optax})
            for name, what in (
                (EAGER_FLOOR, "eager evaluations of the batch: an eager solve's floor"),
                (ITERATION_FLOOR, "bare L-BFGS iterations of the batch: any eager L-BFGS's floor"),
            ):
                floor_over_optax = common.paired_ratio(results[OPTAX], floors[name])
                print(f"{name + ' against optax':>42} {batch:>5} {batch:>5} {floor_over_optax:>11.2f}x  "
                      f"({evaluations} {what})")  # fmt: skip
                rows.append({"solver": f"{name} against optax", "B": batch, "ratio": floor_over_optax,
                             "evaluations": evaluations, "seconds": floors[name]["seconds"]})  # fmt: skip
            of_floor = common.paired_ratio(floors[ITERATION_FLOOR], results[OURS])
            print(f"{'ours eager against ' + ITERATION_FLOOR:>42} {batch:>5} {batch:>5} {of_floor:>11.2f}x  "
                  "(the floor's time over ours: how close to it a solve with its search comes)")  # fmt: skip
            rows.append({"solver": f"ours eager against {ITERATION_FLOOR}", "B": batch, "ratio": of_floor})
        bound = results.get(COMPILED, {}).get("evaluation_bound_per_s")
        if bound:
            reached = results[COMPILED]["compiled_over_bound"]
            label = "evaluation bound (compiled value and grad)"
            bare = results[COMPILED]["bare_over_bound"]
            print(f"{label:>42} {batch:>5} {batch:>5} {bound:>11.1f}   "
                  f"compiled ours reaches {reached:.2f} of it, compiled bare iterations {bare:.2f} "
                  "(medians of alternated pairs)")  # fmt: skip
            rows.append({"solver": "evaluation bound", "B": batch, "problems_per_s": bound,
                         "compiled_over_bound": reached, "bare_iterations_over_bound": bare})  # fmt: skip

    state = state_size()
    print(f"\nour state per problem: {state['values']} values ({state['bytes']} bytes) = "
          f"(2*history_size + {state['constant']:.3f}) * n for n={D}, history_size={HISTORY}")  # fmt: skip
    memory = {}
    for batch in args.sizes:
        memory[batch] = run_memory(batch)
        cells = []
        for name, label in (("live", "live"), ("default_malloc", "with glibc's default malloc")):
            entry = memory[batch][name]
            if "failure" in entry:
                cells.append(f"{label}: {entry['failure']}")
            else:
                per_problem, total = entry["kib_per_problem"], entry["peak_increase_kib"]
                cells.append(f"{label}: {per_problem:.1f} KiB/problem (+{total} KiB)")
        print(f"peak memory increase of our eager solve, B={batch}: " + "; ".join(cells))
    print(f"(inputs X, y: {INPUT_KIB:.1f} KiB per problem, resident before the solve; "
          f"state: {state['bytes'] / 1024:.1f} KiB per problem)")  # fmt: skip

    args.output.parent.mkdir(parents=True, exist_ok=True)
    config = {"d": D, "samples": SAMPLES, "lambda": LAM, "history_size": HISTORY, "max_iter": MAX_ITER,
              "seed": SEED, "feature_mean": FEATURE_MEAN, "label_noise": LABEL_NOISE, "dtype": "float32",
              "sizes": args.sizes, "loop_max": args.loop_max, "repeats": args.repeats,
              "compiled": not args.no_compile, "compile_timeout_s": args.compile_timeout,
              "jax": jax_note or "measured"}  # fmt: skip
    report = {"meta": common.machine(), "config": config, "rows": rows, "state_per_problem": state,
              "peak_memory": memory}  # fmt: skip
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
