"""Evaluations and iterations to convergence: torchlbfgs against torch, scipy and JAX on test problems.

The question: how many function+gradient evaluations (and iterations) does each L-BFGS
implementation need to reach ``max|g| <= 1e-6`` from the standard starting point, with at most
2000 evaluations (``--cap``), history 10, everything in float64?

Problems. Eight from Moré, Garbow & Hillstrom, "Testing unconstrained optimization software",
ACM TOMS 7 (1981), written here from the paper's definitions as ``f(x) = sum_i f_i(x)^2``
(the paper's problem numbers in brackets; known minima in ``KNOWN_MINIMUM``): extended
Rosenbrock [1, 21] with n=2 and n=100 from (-1.2, 1, -1.2, 1, ...), Beale [5] from (1, 1),
Powell singular [13] from (3, -1, 0, 1), Wood [14] from (-3, -1, -3, -1), Brown badly scaled
[4] from (1, 1), trigonometric [26] with n=50 from (1/n, ..., 1/n) (f* = 0 is the paper's
value; the function also has local minima with f > 0) and extended Powell singular [22] with
n=100 from (3, -1, 0, 1) repeated. Two more: a quadratic ``0.5 x'Ax - b'x`` with n=1000,
eigenvalues log-spaced over [1, 1e6] in a random orthogonal basis, b random (seed 0), from 0,
with f* at the solution of ``Ax = b`` (one step of iterative refinement); and an
L2-regularised logistic regression ``mean(softplus(Xw) - y Xw) + 1e-3 |w|^2`` (500 samples
and 20 features, standard normal, labels from a noisy linear model, seed 0), from 0, with f*
from Newton's method. Each objective is written once (``fun(x, data, ops)``) and runs on
torch tensors or, for the JAX solvers, on jax.numpy arrays through the ``Ops`` namespace.

Solvers, all from the same start with history 10:

* ``ours SW``, ``ours MT``, ``ours BT``: ``torchlbfgs.minimize(max_iter=cap, max_evals=cap,
  tolerance_grad=1e-6, tolerance_change=0)`` with ``line_search="strong_wolfe"``,
  ``"more_thuente"`` or ``"backtracking"``;
* ``ours LBFGS``: the adapter ``torchlbfgs.LBFGS([p], lr=1, max_iter=cap, max_eval=cap,
  tolerance_grad=1e-6, tolerance_change=0, line_search_fn="strong_wolfe")``, one ``step``;
* ``torch LBFGS``: ``torch.optim.LBFGS`` with the same options;
* ``scipy``: ``scipy.optimize.minimize(method="L-BFGS-B", jac=True)`` with ``maxcor=10,
  gtol=1e-6, ftol=0, maxiter=cap, maxfun=cap`` (gtol is a max-norm of the projected
  gradient: without bounds the same test); the objective is the torch function, called on
  ``torch.from_numpy(x)`` with an autograd gradient;
* if JAX is installed (``--no-jax`` skips it), float64 enabled: ``optax``:
  ``optax.lbfgs(memory_size=10)`` (default zoom line search) in a Python loop of two jitted
  functions, ``optax.value_and_grad_from_state`` (which reuses the value and gradient of the
  line search's last point, so it evaluates only at the start) and ``update``, stopped once
  ``max|g| <= 1e-6`` at the current point, once ``cap`` evaluations are spent (checked between
  iterations, so a line search may overshoot it), or once an update leaves x unchanged; and
  ``jaxopt``: ``jaxopt.LBFGS(maxiter=cap, tol=1e-6, history_size=10).run`` under ``jax.jit``
  (its test is the Euclidean norm ``|g|_2 <= tol``, which implies ours; it has no evaluation
  budget, only ``maxiter``).

How it is counted:

* evaluations: calls of the objective that this script counts itself, in every solver: a
  counter in the torch function (``minimize``), in the closure (the optimizers), in the scipy
  callback, and, in JAX, a ``jax.debug.callback`` inside the objective, which runs each time
  the compiled code evaluates it (value and gradient together are one evaluation). The
  solver's own count (``Result.n_evals``, the optimizer state's counter, scipy's ``nfev``,
  jaxopt's ``num_fun_eval``, for optax 1 + the sum of the zoom line search's
  ``num_linesearch_steps``) is kept in the JSON and any disagreement is printed;
* iterations: the solver's own count (``n_iter``, ``nit``, ``iter_num``; for optax the number
  of ``update`` calls);
* solved: ``max|g| <= 1e-6`` at the returned point, recomputed here with one float64 autograd
  gradient of the torch objective (not the solver's report), using at most ``cap``
  evaluations (the optimizers' ``max_eval`` and scipy's ``maxfun`` are checked between
  iterations too, so a run can end at cap + 1 or more). ``f - f*`` is the torch objective at
  the returned point minus the known or computed minimum;
* seconds: wall time of one solve, one thread. JAX compile time is excluded (jaxopt is
  compiled ahead of time; optax's two functions are warmed up by two iterations first) and
  reported in the JSON; the counting callback costs JAX some microseconds per evaluation.

The table has a block of rows per problem: ``evals/its`` (or ``FAIL(reason)``: ``cap`` = the
budget was spent or exceeded, ``claims conv`` = the solver reported convergence that the
independent gradient does not confirm, otherwise the solver's own stop reason), the
independent ``max|g|``, ``f - f*`` and seconds. Then, per solver: problems solved, median
evaluations over the problems it solved and over those every solver solved.

Run: ``.venv/bin/python bench/convergence.py`` (under two minutes on this project's 2-core
machine, about half of it compiling JAX); ``--cap``, ``--no-jax``, ``--output``. JSON goes to
``bench/results/convergence.json``.
One thread everywhere; the thread variables below are set only if not already set.
"""

from __future__ import annotations

import common

common.use_one_thread()

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import torchlbfgs  # noqa: E402

TOL, HISTORY, SEED, LAM = 1e-6, 10, 0, 1e-3
OURS_SW, OURS_MT, OURS_BT, OURS_ADAPTER = "ours SW", "ours MT", "ours BT", "ours LBFGS"
TORCH, SCIPY, OPTAX, JAXOPT = "torch LBFGS", "scipy", "optax", "jaxopt"
OURS = (OURS_SW, OURS_MT, OURS_BT, OURS_ADAPTER)

# Minimum values stated by Moré, Garbow & Hillstrom (1981) for the problems used here.
KNOWN_MINIMUM = {
    "rosenbrock": 0.0,
    "beale": 0.0,
    "powell_singular": 0.0,
    "wood": 0.0,
    "brown_badly_scaled": 0.0,
    "trigonometric": 0.0,
    "extended_powell": 0.0,
}

Array = Any  # a torch tensor or a jax array


# ------------------------------------------------------------------------------------ problems


class Ops(NamedTuple):
    """The array functions the objectives need, for one array library."""

    cos: Callable[[Array], Array]
    sin: Callable[[Array], Array]
    sum: Callable[[Array], Array]
    softplus: Callable[[Array], Array]


TORCH_OPS = Ops(torch.cos, torch.sin, torch.sum, lambda z: torch.logaddexp(z, torch.zeros_like(z)))
Objective = Callable[[Array, dict[str, Array], Ops], Array]


def sum_of_squares(ops: Ops, *residuals: Array) -> Array:
    """``sum_i f_i^2`` over all the residual arrays."""
    total = ops.sum(residuals[0] ** 2)
    for residual in residuals[1:]:
        total = total + ops.sum(residual**2)
    return total


def rosenbrock(x: Array, data: dict[str, Array], ops: Ops) -> Array:
    """MGH [1] (n=2) and [21]: f_{2i-1} = 10 (x_{2i} - x_{2i-1}^2), f_{2i} = 1 - x_{2i-1}."""
    odd, even = x[0::2], x[1::2]
    return sum_of_squares(ops, 10.0 * (even - odd**2), 1.0 - odd)


def beale(x: Array, data: dict[str, Array], ops: Ops) -> Array:
    """MGH [5]: f_i = y_i - x_1 (1 - x_2^i), y = (1.5, 2.25, 2.625)."""
    return sum_of_squares(ops, data["y"] - x[0] * (1.0 - x[1] ** data["i"]))


def powell(x: Array, data: dict[str, Array], ops: Ops) -> Array:
    """MGH [13] (n=4) and [22]: per block of four, x_1 + 10 x_2, 5^½ (x_3 - x_4),
    (x_2 - 2 x_3)^2, 10^½ (x_1 - x_4)^2."""
    a, b, c, d = x[0::4], x[1::4], x[2::4], x[3::4]
    return sum_of_squares(ops, a + 10.0 * b, 5**0.5 * (c - d), (b - 2.0 * c) ** 2, 10**0.5 * (a - d) ** 2)


def wood(x: Array, data: dict[str, Array], ops: Ops) -> Array:
    """MGH [14]: 10 (x_2 - x_1^2), 1 - x_1, 90^½ (x_4 - x_3^2), 1 - x_3, 10^½ (x_2 + x_4 - 2),
    10^-½ (x_2 - x_4)."""
    x1, x2, x3, x4 = x[0], x[1], x[2], x[3]
    return sum_of_squares(
        ops, 10.0 * (x2 - x1**2), 1.0 - x1, 90**0.5 * (x4 - x3**2), 1.0 - x3,
        10**0.5 * (x2 + x4 - 2.0), 10**-0.5 * (x2 - x4),
    )  # fmt: skip


def brown_badly_scaled(x: Array, data: dict[str, Array], ops: Ops) -> Array:
    """MGH [4]: x_1 - 10^6, x_2 - 2·10^-6, x_1 x_2 - 2."""
    return sum_of_squares(ops, x[0] - 1e6, x[1] - 2e-6, x[0] * x[1] - 2.0)


def trigonometric(x: Array, data: dict[str, Array], ops: Ops) -> Array:
    """MGH [26]: f_i = n - sum_j cos x_j + i (1 - cos x_i) - sin x_i, i = 1..n."""
    cos = ops.cos(x)
    return sum_of_squares(ops, x.shape[0] - ops.sum(cos) + data["i"] * (1.0 - cos) - ops.sin(x))


def quadratic(x: Array, data: dict[str, Array], ops: Ops) -> Array:
    """``0.5 x'Ax - b'x``."""
    return 0.5 * ops.sum(x * (data["A"] @ x)) - ops.sum(data["b"] * x)


def logistic(x: Array, data: dict[str, Array], ops: Ops) -> Array:
    """``mean(softplus(Xw) - y Xw) + lambda |w|^2``."""
    z = data["X"] @ x
    return ops.sum(ops.softplus(z) - data["y"] * z) / z.shape[0] + LAM * ops.sum(x * x)


@dataclass(frozen=True)
class Problem:
    """One test problem: objective, data (numpy, converted per library), start and f*."""

    name: str
    fun: Objective
    x0: np.ndarray
    f_star: float
    source: str
    data: dict[str, np.ndarray] = field(default_factory=dict)

    def torch_data(self) -> dict[str, torch.Tensor]:
        return {key: torch.from_numpy(value) for key, value in self.data.items()}


def value_and_grad(
    problem: Problem, x: np.ndarray, data: dict[str, torch.Tensor]
) -> tuple[float, np.ndarray]:
    """The torch objective and its autograd gradient at ``x``, in float64."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    value = problem.fun(xt, data, TORCH_OPS)
    (grad,) = torch.autograd.grad(value, xt)
    return float(value.detach()), grad.numpy()


def quadratic_problem(n: int = 1000, condition: float = 1e6) -> Problem:
    rng = np.random.default_rng(SEED)
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (basis * np.logspace(0, math.log10(condition), n)) @ basis.T
    A = (A + A.T) / 2
    b = rng.standard_normal(n)
    solution = np.linalg.solve(A, b)
    solution += np.linalg.solve(A, b - A @ solution)  # one step of iterative refinement
    data = {"A": A, "b": b}
    problem = Problem("quadratic n=1000 cond 1e6", quadratic, np.zeros(n), 0.0, "computed: f(A^-1 b)", data)
    return replace(problem, f_star=value_and_grad(problem, solution, problem.torch_data())[0])


def logistic_problem(samples: int = 500, features: int = 20) -> Problem:
    rng = np.random.default_rng(SEED)
    X = rng.standard_normal((samples, features))
    logits = X @ rng.standard_normal(features)
    y = (logits + 0.5 * rng.standard_normal(samples) > 0).astype(np.float64)
    w = np.zeros(features)
    for _ in range(50):  # Newton's method: the problem is smooth and strongly convex
        p = 1 / (1 + np.exp(-(X @ w)))
        grad = X.T @ (p - y) / samples + 2 * LAM * w
        hessian = (X.T * (p * (1 - p))) @ X / samples + 2 * LAM * np.eye(features)
        w = w - np.linalg.solve(hessian, grad)
    data = {"X": X, "y": y}
    problem = Problem("logistic 500x20 l2 1e-3", logistic, np.zeros(features), 0.0, "computed: Newton", data)
    return replace(problem, f_star=value_and_grad(problem, w, problem.torch_data())[0])


def make_problems() -> list[Problem]:
    mgh = "Moré, Garbow & Hillstrom (1981)"
    return [
        Problem("rosenbrock n=2", rosenbrock, np.array([-1.2, 1.0]), KNOWN_MINIMUM["rosenbrock"],
                f"{mgh} [1]"),
        Problem("rosenbrock n=100", rosenbrock, np.tile([-1.2, 1.0], 50), KNOWN_MINIMUM["rosenbrock"],
                f"{mgh} [21]"),
        Problem("beale", beale, np.array([1.0, 1.0]), KNOWN_MINIMUM["beale"], f"{mgh} [5]",
                {"y": np.array([1.5, 2.25, 2.625]), "i": np.arange(1.0, 4.0)}),
        Problem("powell singular", powell, np.array([3.0, -1.0, 0.0, 1.0]), KNOWN_MINIMUM["powell_singular"],
                f"{mgh} [13]"),
        Problem("wood", wood, np.array([-3.0, -1.0, -3.0, -1.0]), KNOWN_MINIMUM["wood"], f"{mgh} [14]"),
        Problem("brown badly scaled", brown_badly_scaled, np.array([1.0, 1.0]),
                KNOWN_MINIMUM["brown_badly_scaled"], f"{mgh} [4]"),
        Problem("trigonometric n=50", trigonometric, np.full(50, 1 / 50), KNOWN_MINIMUM["trigonometric"],
                f"{mgh} [26]", {"i": np.arange(1.0, 51.0)}),
        Problem("ext. powell n=100", powell, np.tile([3.0, -1.0, 0.0, 1.0], 25),
                KNOWN_MINIMUM["extended_powell"], f"{mgh} [22]"),
        quadratic_problem(),
        logistic_problem(),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------- solvers


class Counter:
    """Counts objective evaluations (``tick`` once per call)."""

    def __init__(self) -> None:
        self.count = 0

    def tick(self, *_: Any) -> None:
        self.count += 1


@dataclass
class Run:
    """What one solver returned on one problem."""

    x: np.ndarray
    evals: int  # counted by us
    iterations: int
    seconds: float
    stop: str  # the solver's own stop reason, short
    claims_converged: bool | None  # None: the solver does not say
    reported_evals: int | None
    compile_seconds: float | None = None


Solver = Callable[[Problem, int], Run]
STOP_NAMES = {
    torchlbfgs.StopReason.RUNNING: "running",
    torchlbfgs.StopReason.GRADIENT_TOLERANCE: "gtol",
    torchlbfgs.StopReason.VALUE_CHANGE_TOLERANCE: "value change",
    torchlbfgs.StopReason.STEP_TOLERANCE: "step tol",
    torchlbfgs.StopReason.DIRECTIONAL_DERIVATIVE_TOLERANCE: "no descent",
    torchlbfgs.StopReason.LINE_SEARCH_FAILED: "ls failed",
    torchlbfgs.StopReason.NON_FINITE: "non-finite",
    torchlbfgs.StopReason.MAX_EVALS: "cap",
    torchlbfgs.StopReason.MAX_ITERATIONS: "max_iter",
    torchlbfgs.StopReason.PRECISION_LIMIT: "precision",
    torchlbfgs.StopReason.INVALID_BOUNDS: "bad bounds",
}


def run_minimize(problem: Problem, cap: int, line_search: str, bounds: Any = None) -> Run:
    """``torchlbfgs.minimize`` from the problem's start (``bounds`` passed on; bench/bounded.py)."""
    data, calls = problem.torch_data(), Counter()

    def fun(x: torch.Tensor) -> torch.Tensor:
        calls.tick()
        value: torch.Tensor = problem.fun(x, data, TORCH_OPS)
        return value

    x0 = torch.from_numpy(problem.x0.copy())
    start = time.perf_counter()
    result = torchlbfgs.minimize(
        fun, x0, max_iter=cap, max_evals=cap, tolerance_grad=TOL, tolerance_change=0.0,
        history_size=HISTORY, line_search=line_search, bounds=bounds,  # type: ignore[arg-type]
    )  # fmt: skip
    seconds = time.perf_counter() - start
    status = torchlbfgs.StopReason(int(result.status))
    return Run(result.params.numpy().copy(), calls.count, int(result.n_iter), seconds, STOP_NAMES[status],
               bool(result.converged), int(result.n_evals))  # fmt: skip


def run_optimizer(problem: Problem, cap: int, optimizer_class: type[torch.optim.Optimizer]) -> Run:
    """One ``step`` of ``torchlbfgs.LBFGS`` or ``torch.optim.LBFGS``, counting closure calls."""
    data, calls = problem.torch_data(), Counter()
    p = torch.tensor(problem.x0, dtype=torch.float64, requires_grad=True)
    optimizer = optimizer_class(
        [p], lr=1, max_iter=cap, max_eval=cap, tolerance_grad=TOL, tolerance_change=0,
        history_size=HISTORY, line_search_fn="strong_wolfe",
    )  # type: ignore[call-arg]  # fmt: skip

    def closure() -> torch.Tensor:
        calls.tick()
        optimizer.zero_grad()
        value: torch.Tensor = problem.fun(p, data, TORCH_OPS)
        value.backward()
        return value

    start = time.perf_counter()
    optimizer.step(closure)  # type: ignore[arg-type]  # torch's stub wants a float closure
    seconds = time.perf_counter() - start
    state = optimizer.state[p]
    ours = isinstance(optimizer, torchlbfgs.LBFGS)
    iterations = int(state["iteration"] if ours else state["n_iter"])
    reported = int(state["n_evals"] if ours else state["func_evals"])
    stop = "cap" if calls.count >= cap else "max_iter" if iterations >= cap else "stopped"
    return Run(p.detach().numpy().copy(), calls.count, iterations, seconds, stop, None, reported)


def run_scipy(problem: Problem, cap: int, bounds: Any = None) -> Run:
    """scipy's L-BFGS-B from the problem's start (``bounds``: a ``scipy.optimize.Bounds``)."""
    import scipy.optimize

    data, calls = problem.torch_data(), Counter()

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        calls.tick()
        return value_and_grad(problem, x, data)

    options = {"maxcor": HISTORY, "gtol": TOL, "ftol": 0.0, "maxiter": cap, "maxfun": cap}
    start = time.perf_counter()
    found = scipy.optimize.minimize(
        fun, problem.x0.copy(), jac=True, method="L-BFGS-B", bounds=bounds, options=options
    )
    seconds = time.perf_counter() - start
    message = str(found.message)
    stops = {"PROJECTED GRADIENT": "gtol", "REDUCTION OF F": "ftol", "EVALUATIONS": "cap",
             "ITERATIONS": "max_iter", "ABNORMAL": "ls failed"}  # fmt: skip
    stop = next((short for key, short in stops.items() if key in message), message[:20])
    return Run(
        np.asarray(found.x), calls.count, int(found.nit), seconds, stop, stop == "gtol", int(found.nfev)
    )


def jax_solvers() -> dict[str, Solver] | str:
    """The optax and jaxopt solvers, or why they are unavailable."""
    imported = common.import_jax()
    if isinstance(imported, str):
        return imported
    jax, jnp, jaxopt, optax = imported
    ops = Ops(jnp.cos, jnp.sin, jnp.sum, lambda z: jnp.logaddexp(z, 0.0))

    def counted(problem: Problem, calls: Counter) -> Callable[[Array, dict[str, Array]], Array]:
        def fun(x: Array, data: dict[str, Array]) -> Array:
            jax.debug.callback(calls.tick)  # runs once per evaluation of the compiled code
            return problem.fun(x, data, ops)

        return fun

    def run_optax(problem: Problem, cap: int) -> Run:
        calls = Counter()
        fun = counted(problem, calls)
        data = {key: jnp.asarray(value) for key, value in problem.data.items()}
        solver = optax.lbfgs(memory_size=HISTORY)
        from_state = optax.value_and_grad_from_state(fun)

        @jax.jit
        def evaluate(x: Array, state: Any, data: dict[str, Array]) -> tuple[Array, Array, Array]:
            value, grad = from_state(x, data, state=state)  # evaluates only if the state has no value
            return value, grad, jnp.max(jnp.abs(grad))

        @jax.jit
        def update(
            x: Array, state: Any, value: Array, grad: Array, data: dict[str, Array]
        ) -> tuple[Array, Any]:
            updates, state = solver.update(grad, state, x, value=value, grad=grad, value_fn=fun, data=data)
            return optax.apply_updates(x, updates), state

        def solve(max_updates: int) -> tuple[Array, int, str, int]:
            x = jnp.asarray(problem.x0)
            state, iterations, reported = solver.init(x), 0, 1
            while True:
                value, grad, grad_max = evaluate(x, state, data)
                if float(grad_max) <= TOL:
                    return x, iterations, "gtol", reported
                if not (math.isfinite(float(grad_max)) and math.isfinite(float(value))):
                    return x, iterations, "non-finite", reported
                if calls.count >= cap or iterations >= max_updates:
                    return x, iterations, "cap", reported
                x_new, state = update(x, state, value, grad, data)
                iterations += 1
                reported += int(optax.tree.get(state, "num_linesearch_steps"))
                if bool(jnp.all(x_new == x)):
                    return x_new, iterations, "stalled", reported
                x = x_new

        start = time.perf_counter()
        solve(max_updates=2)  # compiles both functions
        compile_seconds = time.perf_counter() - start
        calls.count = 0
        start = time.perf_counter()
        x, iterations, stop, reported = solve(max_updates=cap)
        seconds = time.perf_counter() - start
        return Run(np.asarray(x), calls.count, iterations, seconds, stop, stop == "gtol", reported,
                   compile_seconds)  # fmt: skip

    def run_jaxopt(problem: Problem, cap: int) -> Run:
        calls = Counter()
        data = {key: jnp.asarray(value) for key, value in problem.data.items()}
        solver = jaxopt.LBFGS(fun=counted(problem, calls), maxiter=cap, tol=TOL, history_size=HISTORY)
        x0 = jnp.asarray(problem.x0)
        start = time.perf_counter()
        compiled = jax.jit(solver.run).lower(x0, data).compile()
        compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        x, state = jax.block_until_ready(compiled(x0, data))
        seconds = time.perf_counter() - start
        iterations = int(state.iter_num)
        claims = bool(state.error <= TOL)
        stop = "gtol" if claims else "max_iter" if iterations >= cap else "stopped"
        return Run(np.asarray(x), calls.count, iterations, seconds, stop, claims, int(state.num_fun_eval),
                   compile_seconds)  # fmt: skip

    return {OPTAX: run_optax, JAXOPT: run_jaxopt}


def torch_solvers() -> dict[str, Solver]:
    return {
        OURS_SW: functools.partial(run_minimize, line_search="strong_wolfe"),
        OURS_MT: functools.partial(run_minimize, line_search="more_thuente"),
        OURS_BT: functools.partial(run_minimize, line_search="backtracking"),
        OURS_ADAPTER: functools.partial(run_optimizer, optimizer_class=torchlbfgs.LBFGS),
        TORCH: functools.partial(run_optimizer, optimizer_class=torch.optim.LBFGS),
        SCIPY: run_scipy,
    }


# -------------------------------------------------------------------------------------- judging


def judge(problem: Problem, run: Run, cap: int) -> dict[str, Any]:
    """Check ``run`` with an independent float64 torch gradient; the row of the JSON."""
    value, grad = value_and_grad(problem, run.x, problem.torch_data())
    grad_max = float(np.max(np.abs(grad)))
    gradient_ok = grad_max <= TOL  # False for NaN
    solved = gradient_ok and run.evals <= cap
    if solved:
        reason = None
    elif gradient_ok:
        reason = "cap"  # converged, but with more evaluations than the budget
    elif run.claims_converged:
        reason = "claims conv"
    else:
        reason = run.stop
    row = {key: value for key, value in asdict(run).items() if key != "x"}
    row.update(solved=solved, fail_reason=reason, grad_max=grad_max, value=value,
               f_minus_f_star=value - problem.f_star)  # fmt: skip
    return row


def cells(row: dict[str, Any]) -> list[str]:
    """The table's four cells for one (problem, solver)."""
    if "error" in row:
        return ["FAIL(error)", "", "", ""]
    first = f"{row['evals']}/{row['iterations']}" if row["solved"] else f"FAIL({row['fail_reason']})"
    return [first, f"{row['grad_max']:.1e}", f"{row['f_minus_f_star']:.1e}", f"{row['seconds']:.3f}"]


def summarise(names: list[str], problems: list[str], rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per solver: problems solved, median evaluations over those and over the common ones."""
    solved = {name: [p for p in problems if rows[f"{p}|{name}"].get("solved")] for name in names}
    common = [p for p in problems if all(p in solved[name] for name in names)]
    summary: dict[str, Any] = {"common_problems": common, "solvers": {}}
    for name in names:
        evals = [rows[f"{p}|{name}"]["evals"] for p in solved[name]]
        common_evals = [rows[f"{p}|{name}"]["evals"] for p in common]
        summary["solvers"][name] = {
            "solved": len(solved[name]),
            "of": len(problems),
            "median_evals_solved": statistics.median(evals) if evals else None,
            "median_evals_common": statistics.median(common_evals) if common_evals else None,
            "seconds_total": sum(rows[f"{p}|{name}"].get("seconds", 0.0) for p in problems),
        }
    return summary


def row_notes(label: str, row: dict[str, Any], cap: int) -> list[str]:
    """False convergence claims, count mismatches and budget overruns of one run."""
    if "error" in row:
        return [f"{label}: raised {row['error']}"]
    notes = []
    if row["claims_converged"] and row["grad_max"] > TOL:
        notes.append(f"{label}: reports convergence ({row['stop']}) but the independent max|g| is "
                     f"{row['grad_max']:.2e}")  # fmt: skip
    if row["reported_evals"] is not None and row["reported_evals"] != row["evals"]:
        notes.append(
            f"{label}: counted {row['evals']} evaluations, the solver reports {row['reported_evals']}"
        )
    if row["evals"] > cap:
        notes.append(f"{label}: {row['evals']} evaluations, over the cap of {cap}")
    return notes


def adapter_note(problem: str, ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """A note if the adapter and ``torch.optim.LBFGS`` did not take the same steps."""
    if "error" in ours or "error" in theirs:
        return []
    difference = ours.get("x_difference_to_torch", float("nan"))
    counts, torch_counts = (ours["evals"], ours["iterations"]), (theirs["evals"], theirs["iterations"])
    if counts == torch_counts and difference <= 1e-9:
        return []
    return [f"{problem}: {OURS_ADAPTER} and {TORCH} differ: {counts[0]}/{counts[1]} vs {torch_counts[0]}/"
            f"{torch_counts[1]} evals/its, final x by {difference:.1e} (max, relative)"]  # fmt: skip


def surprises(names: list[str], problems: list[str], rows: dict[str, dict[str, Any]], cap: int) -> list[str]:
    """Things worth a look: false convergence claims, count mismatches, ours failing where an
    anchor succeeds, and the adapter disagreeing with torch.optim.LBFGS."""
    notes = []
    anchors = [name for name in names if name not in OURS]
    for p in problems:
        for name in names:
            notes += row_notes(f"{p}, {name}", rows[f"{p}|{name}"], cap)
        winners = [a for a in anchors if rows[f"{p}|{a}"].get("solved")]
        for name in (name for name in OURS if name in names and winners):
            row = rows[f"{p}|{name}"]
            if not row.get("solved"):
                verb = "solves" if len(winners) == 1 else "solve"
                notes.append(f"{p}: {name} fails (stop: {row.get('stop')}, max|g| "
                             f"{row.get('grad_max', float('nan')):.2e}, {row.get('evals')} evals) "
                             f"where {', '.join(winners)} {verb} it")  # fmt: skip
        if OURS_ADAPTER in names and TORCH in names:
            notes += adapter_note(p, rows[f"{p}|{OURS_ADAPTER}"], rows[f"{p}|{TORCH}"])
    return notes


# ------------------------------------------------------------------------------------------ main


def versions() -> dict[str, Any]:
    """Machine and versions, where torchlbfgs was imported from, and the git state."""
    return {**common.machine(), "torchlbfgs_path": str(Path(torchlbfgs.__file__).parent), "git": git_state()}


def git_state() -> dict[str, Any]:
    """The commit measured and the files changed since (torchlbfgs may be edited in place)."""
    root = Path(__file__).resolve().parent.parent

    def git(*arguments: str) -> str:
        found = subprocess.run(["git", *arguments], cwd=root, capture_output=True, text=True, check=False)
        return found.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "changed": git("status", "--porcelain").splitlines()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, default=2000, help="evaluation budget per solve")
    parser.add_argument("--no-jax", action="store_true", help="skip the JAX solvers (optax, jaxopt)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "convergence.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    began, meta = time.perf_counter(), versions()  # the git state before the runs

    solvers = torch_solvers()
    jax = "skipped (--no-jax)" if args.no_jax else jax_solvers()
    if isinstance(jax, dict):
        solvers.update(jax)
    jax_note = jax if isinstance(jax, str) else "measured"
    names = list(solvers)
    problems = make_problems()

    width, label_width = 15, 28
    print(f"evals/its to max|g| <= {TOL:g} (cap {args.cap} evaluations), float64, history {HISTORY}; "
          f"FAIL(reason) when not solved")  # fmt: skip
    print(f"{'problem':<{label_width}}" + "".join(f"{name:>{width}}" for name in names))
    # warm-up: first calls load code paths (the JAX solvers compile apart)
    for name in [name for name in names if name not in (OPTAX, JAXOPT)]:
        solvers[name](problems[0], 3)
    rows: dict[str, dict[str, Any]] = {}
    for problem in problems:
        block: list[list[str]] = []
        final: dict[str, np.ndarray] = {}
        for name, solver in solvers.items():
            try:
                run = solver(problem, args.cap)
                row, final[name] = judge(problem, run, args.cap), run.x
            except Exception as error:  # a crash is a result too
                row = {"error": f"{type(error).__name__}: {error}"[:300], "solved": False}
            rows[f"{problem.name}|{name}"] = {"problem": problem.name, "solver": name, **row}
            block.append(cells(row))
        if OURS_ADAPTER in final and TORCH in final:  # the adapter should take torch's steps
            scale = 1 + np.max(np.abs(final[TORCH]))
            difference = np.max(np.abs(final[OURS_ADAPTER] - final[TORCH])) / scale
            rows[f"{problem.name}|{OURS_ADAPTER}"]["x_difference_to_torch"] = float(difference)
        labels = (
            problem.name,
            "  max|g| (independent)",
            f"  f - f* (f* = {problem.f_star:.6g})",
            "  seconds",
        )
        for line, label in enumerate(labels):
            print(f"{label:<{label_width}}" + "".join(f"{cell[line]:>{width}}" for cell in block), flush=True)
    if jax_note != "measured":
        print(f"JAX solvers (optax, jaxopt): {jax_note}")

    problem_names = [problem.name for problem in problems]
    summary = summarise(names, problem_names, rows)
    common = summary["common_problems"]
    print(f"\nsummary (median evals over the {len(common)} problems every solver solved: "
          f"{', '.join(common) or 'none'})")  # fmt: skip
    print(f"{'solver':<14}{'solved':>8}{'median evals (solved)':>24}{'median evals (common)':>24}"
          f"{'total s':>10}")  # fmt: skip
    for name, entry in summary["solvers"].items():
        median_solved, median_common = entry["median_evals_solved"], entry["median_evals_common"]
        print(f"{name:<14}{entry['solved']:>5}/{entry['of']:<2}"
              f"{'-' if median_solved is None else f'{median_solved:g}':>24}"
              f"{'-' if median_common is None else f'{median_common:g}':>24}"
              f"{entry['seconds_total']:>10.2f}")  # fmt: skip
    notes = surprises(names, problem_names, rows, args.cap)
    print("\nnotes:" if notes else "\nnotes: none")
    for note in notes:
        print(f"- {note}")
    runtime = time.perf_counter() - began
    print(f"\nruntime {runtime:.1f} s")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    config = {"tolerance_grad": TOL, "cap": args.cap, "history_size": HISTORY, "seed": SEED,
              "dtype": "float64", "logistic_lambda": LAM, "jax": jax_note, "solvers": names}  # fmt: skip
    described = [{"name": p.name, "n": int(p.x0.size), "f_star": p.f_star, "source": p.source,
                  "x0_head": p.x0[:4].tolist()} for p in problems]  # fmt: skip
    report = {"meta": meta, "config": config, "problems": described, "rows": list(rows.values()),
              "summary": summary, "notes": notes, "runtime_seconds": runtime}  # fmt: skip
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
