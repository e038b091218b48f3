"""Box constraints (L-BFGS-B): torchlbfgs against scipy and jaxopt, to convergence and batched.

Part 1, convergence. How many function+gradient evaluations (and iterations) does each
L-BFGS-B implementation need to reach ``max|P(x - g) - x| <= 1e-6`` (the max-norm of the
projected gradient, ``P`` the projection onto the box) from the same start, with at most 2000
evaluations (``--cap``), history 10, everything in float64? Eleven problems (``make_problems``;
bounds given as ``-inf``/``inf`` where a side is free; a start outside the box is projected
onto it first, so every solver starts from the same feasible point):

* chained Rosenbrock ``sum 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2`` with n=2 and n=25 from
  (-1.2, ..., -1.2), lower -2, upper 0.5 on the even (0-based) indices and 2 on the odd ones:
  the unconstrained minimum (1, ..., 1) is cut off (the boxes of ``tests/test_bounds.py``);
* Beale (Moré, Garbow & Hillstrom 1981, [5]) from (1, 1) in [-4.5, 2.5] x [-4.5, 4.5] (the
  minimum (3, 0.5) cut off); Wood ([14]) from (-3, -1, -3, -1) in [-3, 0.5] x [-3, 3] x
  [-3, 0.5] x [-3, 3]; extended Powell singular ([22]) n=100 with lower 0.1 (no upper), from
  (3, -1, 0, 1) repeated, projected to (3, 0.1, 0.1, 1);
* a quadratic ``0.5 x'Ax - b'x``, n=20, in [-1, 1], with ``b`` built so that a chosen x*
  meets the KKT conditions with 5 variables on a bound (3 lower, 2 upper, multipliers >= 0.1)
  and 15 strictly inside (known solution), from 0;
* a box quadratic n=100, eigenvalues log-spaced over [1e-2, 10] (condition 1e3) in a random
  orthogonal basis, ``b = A z`` with ``z ~ N(0, 1)`` (unconstrained minimum z), in [-1, 1],
  from 0 (47 bounds active at x*). The scale matters: with eigenvalues over [1, 1e3] (and
  ``z ~ 2 N(0, 1)``, f* about -3.5e4), a projected gradient of 1e-6 along the flattest
  directions promises a decrease below f's rounding error, and the solvers stop at the
  precision limit short of 1e-6;
* non-negative least squares ``0.5 |Ax - b|^2``, x >= 0, with A, b standard normal, 30x8 and
  200x50, from (1, ..., 1);
* L2-regularised logistic regression ``mean(softplus(Xw) - y Xw) + 1e-3 |w|^2`` (200 samples,
  6 features, labels drawn from the model with weights (3, -2, 0.2, 1.5, -0.1, 0)), weights
  boxed in [-0.5, 0.5], from 0;
* one-sided bounds only, n=5: ``sum_i i (x_i - t_i)^2 + 0.1 (sum x)^2 + sum x^4`` with
  t = (-1, 2, -3, 0.5, -0.2), lower (0, -inf, -1, -inf, 0.1), upper (inf, 1, inf, inf, inf)
  (no variable bounded on both sides), from 0.5.

Reference solutions x* (for ``f - f*`` and the active set): known for the KKT-built
quadratic; ``scipy.optimize.nnls`` (an exact active-set method) for NNLS; for the box
quadratic n=100 scipy's L-BFGS-B run to ``gtol=1e-12`` and then polished on its active set
(the free variables solved exactly); for the rest scipy's L-BFGS-B to ``gtol=1e-12``, ftol 0.
Each objective is written once (``fun(x, data, ops)``; several are those of
``bench/convergence.py``) and runs on torch tensors or jax.numpy arrays through ``Ops``.

Solvers, all with history 10 from the same start:

* ``ours SW``, ``ours MT``, ``ours BT``: ``torchlbfgs.minimize(bounds=(lower, upper),
  max_iter=cap, max_evals=cap, tolerance_grad=1e-6, tolerance_change=0)`` with
  ``line_search="strong_wolfe"``, ``"more_thuente"`` or ``"backtracking"``;
* ``scipy``: ``scipy.optimize.minimize(method="L-BFGS-B", jac=True, bounds=Bounds(lower,
  upper))`` with ``maxcor=10, gtol=1e-6, ftol=0, maxiter=cap, maxfun=cap``; the objective is
  the torch function, called on ``torch.from_numpy(x)`` with an autograd gradient;
* ``jaxopt`` (if JAX is installed; ``--no-jax`` skips it), float64 enabled:
  ``jaxopt.LBFGSB(maxiter=cap, tol=1e-6, history_size=10).run(x0, (lower, upper), data)``
  under ``jax.jit`` (its test is the same max-norm of the projected gradient; it has no
  evaluation budget, only ``maxiter``).

How it is counted:

* evaluations: calls of the objective counted by this script in every solver: a counter in
  the torch function (ours, scipy) and, in JAX, a ``jax.debug.callback`` inside the objective,
  which runs each time the compiled code evaluates it (value and gradient together are one
  evaluation). The solver's own count (``Result.n_evals``, scipy's ``nfev``, jaxopt's
  ``num_fun_eval``) is kept in the JSON and any disagreement is printed;
* iterations: the solver's own count (``n_iter``, ``nit``, ``iter_num``);
* solved: at the returned point, one float64 autograd gradient of the torch objective (not the
  solver's report) gives ``max|P(x - g) - x| <= 1e-6``, the point lies inside the bounds
  (exactly: no tolerance), and at most ``cap`` evaluations were used. ``FAIL(reason)``:
  ``cap`` = converged over the budget, ``infeasible`` = outside the box, ``claims conv`` = the
  solver reported convergence that the independent gradient does not confirm, otherwise the
  solver's own stop reason;
* seconds: wall time of one solve, one thread; jaxopt's compile time is excluded (compiled
  ahead of time) and kept in the JSON; the counting callback costs JAX some microseconds per
  evaluation.

Printed: a markdown table of ``evals/its`` per problem and solver (with n and the number of
bounds active at x*), one of the independent ``max|P(x-g)-x|`` and ``f - f*``, and a summary
per solver: problems solved, median evaluations over those it solved and over those every
solver solved, and whether ours solve every problem an anchor solves; then notes (failures of
ours where an anchor succeeds, false convergence claims, count mismatches, other minima or
active sets than x*'s).

Part 2, batched throughput. B (``--batch``, 1024) independent NNLS problems
``0.5 |A_i x - b_i|^2 / 40``, x >= 0 (upper ``None``), each with its own A_i (40x10, standard
normal, column scales spread over 10^±0.5) and b_i (standard normal), float64, all from
(1, ..., 1), history 10 (``make_nnls_batch``; the eigenvalues of ``A_i'A_i / 40`` lie in
[0.034, 19] over the batch of 1024). Comparable work: every solver runs to the same stopping
test, ``max|P(x - g) - x| <= 1e-6`` (ours ``tolerance_grad=1e-6, tolerance_change=0``; scipy
``gtol=1e-6, ftol=0``; jaxopt ``tol=1e-6``), with at most 1000 iterations as a safety cap; the
mean evaluations and iterations per problem show each solver's work, and the table counts the
problems each solver reports as not converged (in ours, any stop but the gradient test). The
division by 40 keeps that test well above f's rounding: without it (f about 20, curvature up
to 1e3) a projected gradient of 1e-6 along the stiff directions promises a decrease of about
one rounding unit of f, and whether a problem passes the test or stops at the precision limit
depends on how its evaluation rounds (vmapped or not). Every solver's solutions are compared
with ``scipy.optimize.nnls``'s (an exact active-set method): the table gives the max
``|x - x_nnls|`` over the batch, which must be <= 1e-4 (a projected gradient of 1e-6 with
curvature down to 0.034 leaves x within about 3e-5 of the solution). Solvers:

* ours eager: ``torchlbfgs.batched_minimize(fun, x0, A, b, bounds=(0.0, None))``, strong
  Wolfe (the default line search), after a warm-up on 4 problems;
* ours compiled: the same with ``compile=True``; the first call compiles (its time minus the
  median of the timed calls is the compile time, reported apart). Inductor's on-disk cache is
  a fresh temporary folder (unless ``TORCHINDUCTOR_CACHE_DIR`` is set), so the compile time is
  a cold one;
* a Python loop of scipy L-BFGS-B (``maxcor=10``, the objective and gradient in numpy) over
  the first ``--loop-max`` (64) problems; problems/s is scaled from those;
* if JAX is installed: ``jax.jit(jax.vmap(solve_one))``, ``solve_one`` running
  ``jaxopt.LBFGSB`` on one problem; compiled ahead of time (compile time reported apart),
  one warm-up call, each call timed with ``block_until_ready``.

Once all are compiled and warm, the solvers take turns ``--repeats`` times (each round times
every solver once), so that the timings a ratio pairs are made seconds apart: this machine's
speed drifts by tens of percent within minutes, and solvers timed one after the other minutes
apart gave ratios off by that much (``bench/README.md``, ``batched.py``'s section). Each
solver's time is its median over the rounds, and each ratio ours / anchor the median over the
rounds of that round's ratio.

Printed: a markdown table of problems/s, seconds, mean evaluations and iterations, problems
not converged, max disagreement with nnls and compile seconds; then the ratios ours/anchor
(problems/s, above 1 = ours faster) of compiled ours and of eager ours against the faster
anchor, all from the same run.

Run: ``.venv/bin/python bench/bounded.py`` (``--only convergence|batched`` for one part,
``--batch 64`` for a quick check, ``--no-jax``, ``--no-compile``, ``--cap``, ``--output``).
JSON goes to ``bench/results/bounded.json`` (a run of one part writes that part only).
One thread everywhere; the thread variables below are set only if not already set.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import common

common.use_one_thread()
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # a cold compile: Inductor reads this on import
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bounded-bench-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import argparse  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import convergence  # noqa: E402
import numpy as np  # noqa: E402
import scipy.optimize  # noqa: E402
import torch  # noqa: E402
from convergence import (  # noqa: E402
    Counter,
    Ops,
    Run,
    beale,
    git_state,
    logistic,
    powell,
    quadratic,
    value_and_grad,
    wood,
)

import torchlbfgs  # noqa: E402

TOL, HISTORY, SEED = 1e-6, 10, 0
OURS_SW, OURS_MT, OURS_BT, SCIPY, JAXOPT = "ours SW", "ours MT", "ours BT", "scipy", "jaxopt"
OURS = (OURS_SW, OURS_MT, OURS_BT)

Array = Any  # a torch tensor or a jax array
Objective = Callable[[Array, dict[str, Array], Ops], Array]


# ------------------------------------------------------------------------------------ problems


def chained_rosenbrock(x: Array, data: dict[str, Array], ops: Ops) -> Array:
    """``sum_i 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2`` (all neighbours coupled, any n)."""
    return ops.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def least_squares(x: Array, data: dict[str, Array], ops: Ops) -> Array:
    """``0.5 |Ax - b|^2``."""
    return 0.5 * ops.sum((data["A"] @ x - data["b"]) ** 2)


def one_sided(x: Array, data: dict[str, Array], ops: Ops) -> Array:
    """``sum_i w_i (x_i - t_i)^2 + 0.1 (sum x)^2 + sum x^4``."""
    return ops.sum(data["w"] * (x - data["t"]) ** 2) + 0.1 * ops.sum(x) ** 2 + ops.sum(x**4)


@dataclass(frozen=True)
class Problem:
    """One bounded test problem: objective, data (numpy, converted per library), feasible
    start, bounds (``-inf``/``inf`` where free) and the reference solution."""

    name: str
    fun: Objective
    x0: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    source: str
    data: dict[str, np.ndarray] = field(default_factory=dict)
    x_star: np.ndarray | None = None
    f_star: float = float("nan")
    reference: str = ""

    def torch_data(self) -> dict[str, torch.Tensor]:
        return {key: torch.from_numpy(value) for key, value in self.data.items()}

    def active(self, x: np.ndarray) -> np.ndarray:
        return (x == self.lower) | (x == self.upper)


def projected_gradient_max(problem: Problem, x: np.ndarray, grad: np.ndarray) -> float:
    """``max|P(x - g) - x|``; NaN if the gradient is not finite."""
    return float(np.max(np.abs(np.clip(x - grad, problem.lower, problem.upper) - x)))


def tight_scipy(problem: Problem) -> np.ndarray:
    """scipy's L-BFGS-B from the problem's start, run to ``gtol=1e-12`` (the reference for
    problems without a known or exact solution)."""
    data = problem.torch_data()
    found = scipy.optimize.minimize(
        lambda x: value_and_grad(problem, x, data), problem.x0.copy(), jac=True, method="L-BFGS-B",
        bounds=scipy.optimize.Bounds(problem.lower, problem.upper),
        options={"maxcor": HISTORY, "gtol": 1e-12, "ftol": 0.0, "maxiter": 100_000, "maxfun": 100_000},
    )  # fmt: skip
    return np.asarray(found.x)


def polish_quadratic(problem: Problem, x: np.ndarray) -> np.ndarray:
    """``x`` with its free variables replaced by the exact minimiser of the quadratic with the
    active ones fixed (kept only if that is feasible and no worse)."""
    A, b = problem.data["A"], problem.data["b"]
    active = problem.active(x)
    free = ~active
    polished = x.copy()
    polished[free] = np.linalg.solve(A[np.ix_(free, free)], b[free] - A[np.ix_(free, active)] @ x[active])
    feasible = np.all((polished >= problem.lower) & (polished <= problem.upper))
    data = problem.torch_data()
    better = value_and_grad(problem, polished, data)[0] <= value_and_grad(problem, x, data)[0]
    return polished if feasible and better else x


def with_reference(problem: Problem, x_star: np.ndarray | None = None, how: str = "") -> Problem:
    """``problem`` with its reference solution (``tight_scipy`` unless given) and ``f*``."""
    if x_star is None:
        x_star, how = tight_scipy(problem), "scipy L-BFGS-B, gtol 1e-12"
    f_star = value_and_grad(problem, x_star, problem.torch_data())[0]
    return replace(problem, x_star=x_star, f_star=f_star, reference=how)


def bounded(name: str, fun: Objective, x0: Any, lower: Any, upper: Any, source: str,
            data: dict[str, np.ndarray] | None = None) -> Problem:  # fmt: skip
    """A problem with the bounds broadcast to ``x0``'s shape and ``x0`` projected onto them."""
    x0 = np.asarray(x0, dtype=np.float64)
    low = np.broadcast_to(np.asarray(lower, dtype=np.float64), x0.shape).copy()
    high = np.broadcast_to(np.asarray(upper, dtype=np.float64), x0.shape).copy()
    return Problem(name, fun, np.clip(x0, low, high), low, high, source, data or {})


def rosenbrock_problem(n: int) -> Problem:
    upper = np.where(np.arange(n) % 2 == 0, 0.5, 2.0)
    problem = bounded(f"rosenbrock n={n}", chained_rosenbrock, np.full(n, -1.2), -2.0, upper,
                      "chained Rosenbrock; x <= 0.5 at even indices cuts off (1, ..., 1)")  # fmt: skip
    return with_reference(problem)


def kkt_quadratic_problem(n: int = 20) -> Problem:
    """``0.5 x'Ax - b'x`` in [-1, 1] with a chosen solution: 3 at lower, 2 at upper, the rest
    inside, and ``b`` such that the gradient there is 0 on the free variables, >= 0.1 where
    x* is at its lower bound and <= -0.1 at its upper."""
    rng = np.random.default_rng(SEED + 1)
    root = rng.standard_normal((n, n))
    A = root @ root.T + 0.2 * n * np.eye(n)
    solution = rng.uniform(-0.8, 0.8, n)
    solution[:3], solution[3:5] = -1.0, 1.0
    grad = np.zeros(n)
    multipliers = rng.uniform(0.1, 1.1, n)
    grad[:3], grad[3:5] = multipliers[:3], -multipliers[3:5]
    b = A @ solution - grad
    source = "b chosen so that x* (5 active) meets the KKT conditions"
    problem = bounded(
        f"quadratic n={n} (KKT-built)", quadratic, np.zeros(n), -1.0, 1.0, source, {"A": A, "b": b}
    )
    return with_reference(problem, solution, "known (KKT-built)")


def box_quadratic_problem(n: int = 100, condition: float = 1e3) -> Problem:
    rng = np.random.default_rng(SEED + 2)
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (basis * np.logspace(-2, np.log10(condition) - 2, n)) @ basis.T
    A = (A + A.T) / 2
    b = A @ rng.standard_normal(n)
    source = "eigenvalues log-spaced over [1e-2, 10], b = A z, z ~ N(0, 1)"
    problem = bounded(
        f"box quadratic n={n} cond 1e3", quadratic, np.zeros(n), -1.0, 1.0, source, {"A": A, "b": b}
    )
    polished = polish_quadratic(problem, tight_scipy(problem))
    return with_reference(problem, polished, "scipy L-BFGS-B gtol 1e-12, polished on its active set")


def nnls_problem(rows: int, columns: int, seed: int) -> Problem:
    rng = np.random.default_rng(seed)
    A, b = rng.standard_normal((rows, columns)), rng.standard_normal(rows)
    problem = bounded(f"NNLS {rows}x{columns}", least_squares, np.ones(columns), 0.0, np.inf,
                      "A, b standard normal", {"A": A, "b": b})  # fmt: skip
    return with_reference(problem, scipy.optimize.nnls(A, b)[0], "scipy.optimize.nnls")


def logistic_problem(samples: int = 200) -> Problem:
    rng = np.random.default_rng(SEED + 3)
    truth = np.array([3.0, -2.0, 0.2, 1.5, -0.1, 0.0])
    X = rng.standard_normal((samples, truth.size))
    y = (rng.uniform(size=samples) < 1 / (1 + np.exp(-(X @ truth)))).astype(np.float64)
    source = "labels from weights (3, -2, 0.2, 1.5, -0.1, 0); l2 1e-3"
    name = "logistic 200x6, w in [-0.5, 0.5]"
    problem = bounded(name, logistic, np.zeros(truth.size), -0.5, 0.5, source, {"X": X, "y": y})
    return with_reference(problem)


def one_sided_problem() -> Problem:
    data = {"w": np.arange(1.0, 6.0), "t": np.array([-1.0, 2.0, -3.0, 0.5, -0.2])}
    lower = [0.0, -np.inf, -1.0, -np.inf, 0.1]
    upper = [np.inf, 1.0, np.inf, np.inf, np.inf]
    problem = bounded("one-sided bounds n=5", one_sided, np.full(5, 0.5), lower, upper,
                      "lower on 3 variables, upper on 1, none on 1", data)  # fmt: skip
    return with_reference(problem)


def make_problems() -> list[Problem]:
    mgh = "Moré, Garbow & Hillstrom (1981)"
    beale_data = {"y": np.array([1.5, 2.25, 2.625]), "i": np.arange(1.0, 4.0)}
    return [
        rosenbrock_problem(2),
        rosenbrock_problem(25),
        with_reference(bounded("beale x1 <= 2.5", beale, [1.0, 1.0], -4.5, [2.5, 4.5], f"{mgh} [5]",
                               beale_data)),
        with_reference(bounded("wood x1, x3 <= 0.5", wood, [-3.0, -1.0, -3.0, -1.0], -3.0,
                               [0.5, 3.0, 0.5, 3.0], f"{mgh} [14]")),
        with_reference(bounded("ext. powell n=100 x >= 0.1", powell, np.tile([3.0, -1.0, 0.0, 1.0], 25),
                               0.1, np.inf, f"{mgh} [22]")),
        kkt_quadratic_problem(),
        box_quadratic_problem(),
        nnls_problem(30, 8, SEED + 4),
        nnls_problem(200, 50, SEED + 5),
        logistic_problem(),
        one_sided_problem(),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------- solvers


Solver = Callable[[Problem, int], Run]


def run_minimize(problem: Problem, cap: int, line_search: str) -> Run:
    bounds = (torch.from_numpy(problem.lower), torch.from_numpy(problem.upper))
    return convergence.run_minimize(problem, cap, line_search, bounds=bounds)  # type: ignore[arg-type]


def run_scipy(problem: Problem, cap: int) -> Run:
    bounds = scipy.optimize.Bounds(problem.lower, problem.upper)
    return convergence.run_scipy(problem, cap, bounds=bounds)  # type: ignore[arg-type]


def jax_solvers() -> dict[str, Solver] | str:
    """The jaxopt.LBFGSB solver, or why it is unavailable."""
    imported = common.import_jax()
    if isinstance(imported, str):
        return imported
    jax, jnp, jaxopt, _ = imported
    ops = Ops(jnp.cos, jnp.sin, jnp.sum, lambda z: jnp.logaddexp(z, 0.0))

    def run_jaxopt(problem: Problem, cap: int) -> Run:
        calls = Counter()

        def fun(x: Array, data: dict[str, Array]) -> Array:
            jax.debug.callback(calls.tick)  # runs once per evaluation of the compiled code
            return problem.fun(x, data, ops)

        data = {key: jnp.asarray(value) for key, value in problem.data.items()}
        solver = jaxopt.LBFGSB(fun=fun, maxiter=cap, tol=TOL, history_size=HISTORY)
        x0, bounds = jnp.asarray(problem.x0), (jnp.asarray(problem.lower), jnp.asarray(problem.upper))
        start = time.perf_counter()
        compiled = jax.jit(solver.run).lower(x0, bounds, data).compile()
        compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        x, state = jax.block_until_ready(compiled(x0, bounds, data))
        seconds = time.perf_counter() - start
        iterations = int(state.iter_num)
        claims = bool(state.error <= TOL)
        stop = "gtol" if claims else "max_iter" if iterations >= cap else "stopped"
        return Run(np.asarray(x), calls.count, iterations, seconds, stop, claims, int(state.num_fun_eval),
                   compile_seconds)  # fmt: skip

    return {JAXOPT: run_jaxopt}


def torch_solvers() -> dict[str, Solver]:
    return {
        OURS_SW: functools.partial(run_minimize, line_search="strong_wolfe"),
        OURS_MT: functools.partial(run_minimize, line_search="more_thuente"),
        OURS_BT: functools.partial(run_minimize, line_search="backtracking"),
        SCIPY: run_scipy,
    }


# -------------------------------------------------------------------------------------- judging


def judge(problem: Problem, run: Run, cap: int) -> dict[str, Any]:
    """Check ``run`` with an independent float64 torch gradient; the row of the JSON."""
    value, grad = value_and_grad(problem, run.x, problem.torch_data())
    pg_max = projected_gradient_max(problem, run.x, grad)
    violation = float(np.max(np.maximum(problem.lower - run.x, run.x - problem.upper), initial=0.0))
    feasible = violation == 0.0  # exactly inside the box (NaN compares False)
    gradient_ok = pg_max <= TOL  # False for NaN
    solved = gradient_ok and feasible and run.evals <= cap
    if solved:
        reason = None
    elif not feasible:
        reason = "infeasible"
    elif gradient_ok:
        reason = "cap"  # converged, but with more evaluations than the budget
    elif run.claims_converged:
        reason = "claims conv"
    else:
        reason = run.stop
    active = problem.active(run.x)
    reference_active = problem.active(problem.x_star) if problem.x_star is not None else active
    row = {key: value for key, value in asdict(run).items() if key != "x"}
    row.update(solved=solved, fail_reason=reason, pg_max=pg_max, bound_violation=violation, value=value,
               f_minus_f_star=value - problem.f_star, n_active=int(active.sum()),
               active_set_differs=int((active != reference_active).sum()),
               x_distance_to_reference=float(np.max(np.abs(run.x - problem.x_star))))  # fmt: skip
    return row


def evals_cell(row: dict[str, Any]) -> str:
    if "error" in row:
        return "FAIL(error)"
    return f"{row['evals']}/{row['iterations']}" if row["solved"] else f"FAIL({row['fail_reason']})"


def check_cell(row: dict[str, Any]) -> str:
    if "error" in row:
        return "-"
    return f"{row['pg_max']:.1e} / {row['f_minus_f_star']:.1e}"


def markdown(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def summarise(names: list[str], problems: list[str], rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per solver: problems solved, median evaluations over those and over the common ones."""
    solved = {name: [p for p in problems if rows[f"{p}|{name}"].get("solved")] for name in names}
    common_problems = [p for p in problems if all(p in solved[name] for name in names)]
    anchors = [name for name in names if name not in OURS]
    anchor_solved = [p for p in problems if any(p in solved[a] for a in anchors)]
    summary: dict[str, Any] = {
        "common_problems": common_problems,
        "anchor_solved": anchor_solved,
        "solvers": {},
    }
    for name in names:
        evals = [rows[f"{p}|{name}"]["evals"] for p in solved[name]]
        common_evals = [rows[f"{p}|{name}"]["evals"] for p in common_problems]
        summary["solvers"][name] = {
            "solved": len(solved[name]),
            "of": len(problems),
            "median_evals_solved": statistics.median(evals) if evals else None,
            "median_evals_common": statistics.median(common_evals) if common_evals else None,
            "seconds_total": sum(rows[f"{p}|{name}"].get("seconds", 0.0) for p in problems),
            "solves_every_anchor_solved": (
                all(p in solved[name] for p in anchor_solved) if name in OURS else None
            ),
        }
    return summary


def surprises(
    problems: list[Problem], names: list[str], rows: dict[str, dict[str, Any]], cap: int
) -> list[str]:
    """Ours failing where an anchor succeeds, false convergence claims, count mismatches,
    budget overruns, and solved runs at another minimum or active set than the reference's."""
    notes = []
    anchors = [name for name in names if name not in OURS]
    for problem in problems:
        p = problem.name
        for name in names:
            row, label = rows[f"{p}|{name}"], f"{p}, {name}"
            if "error" in row:
                notes.append(f"{label}: raised {row['error']}")
                continue
            if row["claims_converged"] and row["pg_max"] > TOL:
                notes.append(f"{label}: reports convergence ({row['stop']}) but the independent "
                             f"max|P(x-g)-x| is {row['pg_max']:.2e}")  # fmt: skip
            if row["bound_violation"] > 0:
                notes.append(f"{label}: returned point outside the box by {row['bound_violation']:.1e}")
            if row["reported_evals"] is not None and row["reported_evals"] != row["evals"]:
                notes.append(f"{label}: counted {row['evals']} evaluations, the solver reports "
                             f"{row['reported_evals']}")  # fmt: skip
            if row["evals"] > cap:
                notes.append(f"{label}: {row['evals']} evaluations, over the cap of {cap}")
            scale = max(1.0, abs(problem.f_star))
            if row["solved"] and row["f_minus_f_star"] > 1e-6 * scale:
                notes.append(f"{label}: solved at another stationary point, f - f* = "
                             f"{row['f_minus_f_star']:.2e} (max|x - x*| "
                             f"{row['x_distance_to_reference']:.2e})")  # fmt: skip
            elif row["solved"] and row["active_set_differs"]:
                notes.append(f"{label}: {row['active_set_differs']} variables differ from x*'s active set "
                             f"(on a bound in one, not the other; max|x - x*| "
                             f"{row['x_distance_to_reference']:.1e})")  # fmt: skip
        winners = [a for a in anchors if rows[f"{p}|{a}"].get("solved")]
        for name in (name for name in OURS if name in names and winners):
            row = rows[f"{p}|{name}"]
            if not row.get("solved"):
                verb = "solves" if len(winners) == 1 else "solve"
                notes.append(f"{p}: {name} fails ({row.get('fail_reason')}, stop {row.get('stop')}, "
                             f"max|P(x-g)-x| {row.get('pg_max', float('nan')):.2e}, {row.get('evals')} "
                             f"evals) where {', '.join(winners)} {verb} it")  # fmt: skip
    return notes


def convergence_part(cap: int, no_jax: bool) -> dict[str, Any]:
    solvers = torch_solvers()
    jax = "skipped (--no-jax)" if no_jax else jax_solvers()
    if isinstance(jax, dict):
        solvers.update(jax)
    jax_note = jax if isinstance(jax, str) else "measured"
    names = list(solvers)
    problems = make_problems()
    for name in [name for name in names if name != JAXOPT]:  # warm-up: load code paths
        solvers[name](problems[0], 3)

    rows: dict[str, dict[str, Any]] = {}
    for problem in problems:
        for name, solver in solvers.items():
            try:
                row = judge(problem, solver(problem, cap), cap)
            except Exception as error:  # a crash is a result too
                row = {"error": f"{type(error).__name__}: {error}"[:300], "solved": False}
            rows[f"{problem.name}|{name}"] = {"problem": problem.name, "solver": name, **row}
        print(f"  {problem.name}: done", flush=True)

    print(f"\n### Part 1: evals/its to max|P(x-g)-x| <= {TOL:g} (cap {cap} evaluations), float64, history "
          f"{HISTORY}; FAIL(reason) when not solved\n")  # fmt: skip
    table = [[p.name, p.x0.size, int(p.active(p.x_star).sum()),
              *(evals_cell(rows[f"{p.name}|{name}"]) for name in names)] for p in problems]  # fmt: skip
    print(markdown(["problem", "n", "active at x*", *names], table))
    print("\nindependent max|P(x-g)-x| / f - f* at the returned point\n")
    table = [[p.name, f"{p.f_star:.6g}", *(check_cell(rows[f"{p.name}|{name}"]) for name in names)]
             for p in problems]  # fmt: skip
    print(markdown(["problem", "f*", *names], table))
    if jax_note != "measured":
        print(f"\njaxopt: {jax_note}")

    problem_names = [p.name for p in problems]
    summary = summarise(names, problem_names, rows)
    common_problems = summary["common_problems"]
    print(f"\nsummary (median evals over the {len(common_problems)} problems every solver solved)\n")
    table = []
    for name, entry in summary["solvers"].items():
        median_solved, median_common = entry["median_evals_solved"], entry["median_evals_common"]
        every = entry["solves_every_anchor_solved"]
        table.append([name, f"{entry['solved']}/{entry['of']}",
                      "-" if median_solved is None else f"{median_solved:g}",
                      "-" if median_common is None else f"{median_common:g}",
                      "-" if every is None else ("yes" if every else "no"),
                      f"{entry['seconds_total']:.2f}"])  # fmt: skip
    print(markdown(["solver", "solved", "median evals (solved)", "median evals (common)",
                    "solves all an anchor solves", "total s"], table))  # fmt: skip
    notes = surprises(problems, names, rows, cap)
    print("\nnotes:" if notes else "\nnotes: none")
    for note in notes:
        print(f"- {note}")
    described = [{"name": p.name, "n": int(p.x0.size), "f_star": p.f_star, "source": p.source,
                  "reference": p.reference, "active_at_reference": int(p.active(p.x_star).sum()),
                  "x0_head": p.x0[:4].tolist(), "lower_head": p.lower[:4].tolist(),
                  "upper_head": p.upper[:4].tolist()} for p in problems]  # fmt: skip
    config = {"tolerance_grad": TOL, "cap": cap, "history_size": HISTORY, "seed": SEED, "dtype": "float64",
              "jax": jax_note, "solvers": names}  # fmt: skip
    return {"config": config, "problems": described, "rows": list(rows.values()), "summary": summary,
            "notes": notes}  # fmt: skip


# ------------------------------------------------------------------------------- part 2: batched

ROWS_B, COLUMNS_B, TOL_B, MAX_ITER_B, AGREE = 40, 10, 1e-6, 1000, 1e-4
EAGER, COMPILED = "ours: batched_minimize (eager)", "ours: batched_minimize(compile=True)"
SCIPY_LOOP, JAXOPT_VMAP = "loop of scipy L-BFGS-B", "jax.jit(jax.vmap(jaxopt.LBFGSB))"


def make_nnls_batch(batch: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """``A`` (batch, 40, 10) with column scales over 10^±0.5 and ``b`` (batch, 40), float64."""
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-0.5, 0.5, (batch, 1, COLUMNS_B))
    A = rng.standard_normal((batch, ROWS_B, COLUMNS_B)) * scales
    return A, rng.standard_normal((batch, ROWS_B))


def nnls_loss(x: torch.Tensor, A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    residual = A @ x - b
    return 0.5 * (residual @ residual) / ROWS_B


def solve_ours(A: torch.Tensor, b: torch.Tensor, compile: bool = False) -> torchlbfgs.Result:
    x0 = torch.ones(A.shape[0], COLUMNS_B, dtype=A.dtype)
    return torchlbfgs.batched_minimize(
        nnls_loss, x0, A, b, bounds=(0.0, None), max_iter=MAX_ITER_B, tolerance_grad=TOL_B,
        tolerance_change=0.0, history_size=HISTORY, compile=compile,
    )  # fmt: skip


def ours_entry(result: torchlbfgs.Result) -> dict[str, Any]:
    gtol = torchlbfgs.StopReason.GRADIENT_TOLERANCE.value
    return {"params": result.params.numpy(),
            "evals_mean": float(result.n_evals.double().mean()),
            "iterations_mean": float(result.n_iter.double().mean()),
            "not_converged": int((result.status != gtol).sum())}  # fmt: skip


def ours_timer(A: np.ndarray, b: np.ndarray, compile: bool) -> common.Timer:
    """A timer of ``batched_minimize`` on the batch, warmed up here (compiled: compiled here,
    and its results say how long the first call took)."""
    At, bt = torch.from_numpy(A), torch.from_numpy(b)
    graphs = torch._dynamo.utils.counters["stats"]
    compiled: dict[str, Any] = {}
    if compile:  # the first call compiles
        start = time.perf_counter()
        solve_ours(At, bt, compile=True)
        compiled = {"first_call_seconds": time.perf_counter() - start,
                    "graphs_after_first_call": graphs["unique_graphs"]}  # fmt: skip
    else:
        solve_ours(At[:4], bt[:4])  # warm-up

    def timed() -> tuple[float, dict[str, Any]]:
        start = time.perf_counter()
        result = solve_ours(At, bt, compile=compile)
        seconds = time.perf_counter() - start
        after = {"graphs_after_timed_calls": graphs["unique_graphs"]} if compile else {}
        return seconds, {**ours_entry(result), **compiled, **after}

    return timed


def scipy_loop_timer(A: np.ndarray, b: np.ndarray, count: int) -> common.Timer:
    """A timer of a loop of scipy's L-BFGS-B over the first ``count`` problems."""

    def objective(x: np.ndarray, A: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
        residual = A @ x - b
        return 0.5 * float(residual @ residual) / ROWS_B, A.T @ residual / ROWS_B

    options = {"maxcor": HISTORY, "gtol": TOL_B, "ftol": 0.0, "maxiter": MAX_ITER_B, "maxfun": 10**6}
    bounds = scipy.optimize.Bounds(np.zeros(COLUMNS_B), np.full(COLUMNS_B, np.inf))

    def timed() -> tuple[float, dict[str, Any]]:
        params, evals, iterations, failed = np.empty((count, COLUMNS_B)), 0, 0, 0
        start = time.perf_counter()
        for i in range(count):
            found = scipy.optimize.minimize(objective, np.ones(COLUMNS_B), args=(A[i], b[i]), jac=True,
                                            method="L-BFGS-B", bounds=bounds, options=options)  # fmt: skip
            params[i] = found.x
            evals, iterations = evals + found.nfev, iterations + found.nit
            failed += "PROJECTED GRADIENT" not in str(found.message)
        seconds = time.perf_counter() - start
        return seconds, {"params": params, "evals_mean": evals / count,
                         "iterations_mean": iterations / count, "not_converged": failed}  # fmt: skip

    return timed


def jaxopt_timer(A: np.ndarray, b: np.ndarray) -> common.Timer | str:
    """A timer of ``jax.jit(jax.vmap(jaxopt.LBFGSB))`` on the batch, compiled and warmed up
    here; or why JAX cannot run."""
    imported = common.import_jax()
    if isinstance(imported, str):
        return imported
    jax, jnp, jaxopt, _ = imported

    def loss(x: Any, A: Any, b: Any) -> Any:
        residual = A @ x - b
        return 0.5 * (residual @ residual) / ROWS_B

    def solve_one(A: Any, b: Any) -> tuple[Any, Any, Any, Any]:
        solver = jaxopt.LBFGSB(fun=loss, maxiter=MAX_ITER_B, tol=TOL_B, history_size=HISTORY)
        bounds = (jnp.zeros(COLUMNS_B, A.dtype), jnp.full(COLUMNS_B, jnp.inf, A.dtype))
        x, state = solver.run(jnp.ones(COLUMNS_B, A.dtype), bounds, A, b)
        return x, state.iter_num, state.num_fun_eval, state.error

    Aj, bj = jax.device_put(A), jax.device_put(b)
    start = time.perf_counter()
    compiled = jax.jit(jax.vmap(solve_one)).lower(Aj, bj).compile()
    compile_seconds = time.perf_counter() - start
    jax.block_until_ready(compiled(Aj, bj))  # warm-up

    def timed() -> tuple[float, dict[str, Any]]:
        start = time.perf_counter()
        x, iterations, evals, error = jax.block_until_ready(compiled(Aj, bj))
        seconds = time.perf_counter() - start
        return seconds, {"params": np.asarray(x),
                         "evals_mean": float(np.mean(evals)), "iterations_mean": float(np.mean(iterations)),
                         "not_converged": int(np.sum(~(np.asarray(error) <= TOL_B))),
                         "compile_seconds": compile_seconds}  # fmt: skip

    return timed


def batched_part(batch: int, loop_max: int, repeats: int, no_compile: bool, no_jax: bool) -> dict[str, Any]:
    A, b = make_nnls_batch(batch)
    exact = np.stack([scipy.optimize.nnls(A[i], b[i])[0] for i in range(batch)])
    count = min(batch, loop_max)
    failures: dict[str, str] = {}
    makers: list[tuple[str, Callable[[], common.Timer | str]]] = [(EAGER, lambda: ours_timer(A, b, False))]
    if not no_compile:
        makers.append((COMPILED, lambda: ours_timer(A, b, True)))
    makers.append((SCIPY_LOOP, lambda: scipy_loop_timer(A, b, count)))
    if not no_jax:
        makers.append((JAXOPT_VMAP, lambda: jaxopt_timer(A, b)))
    timers: dict[str, common.Timer] = {}
    for name, make in makers:
        try:
            timer = make()
        except Exception as error:  # a crash is a result too
            timer = f"raised {type(error).__name__}: {error}"[:300]
        if isinstance(timer, str):
            failures[name] = timer
        else:
            timers[name] = timer
        print(f"  {name}: ready", flush=True)
    # The solvers take turns, --repeats times: each ratio below pairs timings made seconds apart
    # (this machine's speed drifts by tens of percent within minutes).
    results = common.alternate(timers, repeats)
    if COMPILED in results:
        compiled = results[COMPILED]
        compiled["compile_seconds"] = compiled["first_call_seconds"] - compiled["seconds"]

    rows = []
    for name, result in results.items():
        timed = result["params"].shape[0]
        rate = timed / result["seconds"]
        disagreement = float(np.max(np.abs(result["params"] - exact[:timed])))
        compile_seconds = result.get("compile_seconds")
        rows.append({"solver": name, "B": batch, "timed_problems": timed, "problems_per_s": rate,
                     "seconds": result["seconds"], "evals_mean": result["evals_mean"],
                     "iterations_mean": result["iterations_mean"], "not_converged": result["not_converged"],
                     "max_abs_difference_to_nnls": disagreement, "agrees": disagreement <= AGREE,
                     "compile_seconds": compile_seconds,
                     "first_call_seconds": result.get("first_call_seconds"),
                     "graphs_after_first_call": result.get("graphs_after_first_call"),
                     "graphs_after_timed_calls": result.get("graphs_after_timed_calls")})  # fmt: skip
    print(f"\n### Part 2: B={batch} NNLS problems ({ROWS_B}x{COLUMNS_B}, x >= 0), float64, each solver to "
          f"max|P(x-g)-x| <= {TOL_B:g} (at most {MAX_ITER_B} iterations), history {HISTORY}\n")  # fmt: skip
    table = []
    for row in rows:
        timed = f"{row['timed_problems']}" + ("" if row["timed_problems"] == batch else " (scaled)")
        agrees = f"{row['max_abs_difference_to_nnls']:.1e}" + ("" if row["agrees"] else " (> tol)")
        compile_cell = "" if row["compile_seconds"] is None else f"{row['compile_seconds']:.1f}"
        table.append([row["solver"], timed, f"{row['problems_per_s']:.1f}", f"{row['seconds']:.3f}",
                      f"{row['evals_mean']:.1f}", f"{row['iterations_mean']:.1f}", row["not_converged"],
                      agrees, compile_cell])  # fmt: skip
    print(markdown(["solver", "timed problems", "problems/s", "solve s", "mean evals", "mean its",
                    "not converged", "max abs x - x_nnls", "compile s"], table))  # fmt: skip
    for name, failure in failures.items():
        print(f"\n{name}: {failure}")

    rates = {row["solver"]: row["problems_per_s"] for row in rows}
    anchors = [name for name in (SCIPY_LOOP, JAXOPT_VMAP) if name in results]
    ratios: dict[str, Any] = {}

    def paired(ours: str, anchor: str) -> float:
        """ours / anchor in problems/s, the median over the alternated rounds (the loop timed
        on fewer problems: its rate per round scaled by its own count)."""
        problems = results[ours]["params"].shape[0] / results[anchor]["params"].shape[0]
        return problems * common.paired_ratio(results[anchor], results[ours])

    if anchors:
        faster = max(anchors, key=lambda name: rates[name])
        ratios["faster_anchor"] = faster
        print(f"\nproblems/s, ours / anchor (above 1: ours faster; median of the alternated rounds' "
              f"ratios); faster anchor: {faster}\n")  # fmt: skip
        table = []
        for ours in (COMPILED, EAGER):
            if ours not in rates:
                continue
            ratios[ours] = {anchor: paired(ours, anchor) for anchor in anchors}
            cells = [ours, f"{ratios[ours][faster]:.2f}", *(f"{ratios[ours][a]:.2f}" for a in anchors)]
            table.append(cells)
        print(markdown(["ours", "vs faster anchor", *(f"vs {a}" for a in anchors)], table))
    agree = all(row["agrees"] for row in rows)
    print(f"\nall solvers agree with scipy.optimize.nnls to {AGREE:g}: {'yes' if agree else 'NO'} "
          f"(max disagreement {max(row['max_abs_difference_to_nnls'] for row in rows):.1e})")  # fmt: skip
    config = {"batch": batch, "rows": ROWS_B, "columns": COLUMNS_B, "tolerance_grad": TOL_B,
              "max_iter": MAX_ITER_B, "history_size": HISTORY, "seed": SEED, "dtype": "float64",
              "loop_max": loop_max, "repeats": repeats, "compiled": not no_compile,
              "jax": failures.get(JAXOPT_VMAP, "skipped (--no-jax)" if no_jax else "measured"),
              "agreement_tolerance": AGREE}  # fmt: skip
    return {"config": config, "rows": rows, "ratios": ratios, "failures": failures, "all_agree": agree}


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("convergence", "batched"), help="run one part only")
    parser.add_argument("--cap", type=int, default=2000, help="part 1: evaluation budget per solve")
    parser.add_argument("--batch", type=int, default=1024, help="part 2: number of problems B")
    parser.add_argument("--loop-max", type=int, default=64, help="part 2: time the scipy loop on this many")
    parser.add_argument(
        "--repeats", type=int, default=3, help="part 2: timed calls of each vectorised solver"
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="part 2: skip batched_minimize(compile=True)"
    )
    parser.add_argument("--no-jax", action="store_true", help="skip jaxopt")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "bounded.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()
    meta = {**common.machine(), "torchlbfgs_path": str(Path(torchlbfgs.__file__).parent), "git": git_state()}
    report: dict[str, Any] = {"meta": meta}
    if args.only in (None, "convergence"):
        report["convergence"] = convergence_part(args.cap, args.no_jax)
    if args.only in (None, "batched"):
        report["batched"] = batched_part(
            args.batch, args.loop_max, args.repeats, args.no_compile, args.no_jax
        )
    common.write_report(report, began, args.output)


if __name__ == "__main__":
    main()
