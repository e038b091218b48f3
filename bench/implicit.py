"""Hyperparameter gradients through B solves: implicit differentiation, torchlbfgs against jaxopt.

The problems are ``bench/batched.py``'s B logistic regressions (``batched.make_data``: d=32,
256 training samples each, uncentred features with scales over 10^±0.5, labels from a noisy
linear model), each with its own L2 strength ``lambda_i`` (log-uniform in [1e-3, 1]) and 256
held-out validation samples drawn from the same model (the same ``w_true`` and label shift).
The data and lambdas are drawn once in float32 and converted, so every dtype and library solves
the same problems. Inner and outer problems:

* inner: ``w*_i(lambda_i) = argmin_w mean BCE(X_i w, y_i) + 0.5 lambda_i |w|^2``, from w=0;
* outer: ``V(lambda) = sum_i mean BCE(Xval_i w*_i, yval_i)``; the hypergradient is
  ``dV/dlambda`` (shape (B,)), by implicit differentiation:
  ``dV/dlambda_i = -grad V_i(w*_i)' H_i^-1 w*_i``, one linear solve per problem.

Stopping, the same for every solver (``TOLERANCE`` per dtype): jaxopt stops on
``|g|_2 <= tol`` (its only test); ours gets ``tolerance_grad = tol / sqrt(d)`` on ``max|g|``,
which implies ``|g|_2 <= tol`` (never a looser test than jaxopt's), ``tolerance_change=0``, at
most ``MAX_ITER`` iterations; history 10 everywhere. float64: ``tol=1e-7``; float32:
``tol=1e-3``: tighter ones run ours into its precision-limit stop (``StopReason.PRECISION_LIMIT``,
a convergence) on part of the batch; jaxopt reaches them but the tables count, for every
solver, the problems not stopped by the gradient test and the largest ``|g|_2`` at the
returned solutions. The backward linear solves, ours and jaxopt's alike: conjugate gradients to
a relative residual of ``eps^(3/4)`` of the dtype (ours' default: 1.8e-12 in float64, 6.4e-6
in float32) with at most ``10 d`` iterations (ours' default, and ``jax.scipy``'s). jaxopt gets
that through ``implicit_diff_solve=partial(jaxopt.linear_solve.solve_cg, tol=..., maxiter=...)``
(its default, ``solve_normal_cg`` with ``tol=1e-5``, solves the normal equations, squaring the
condition number, to a looser tolerance: one extra row measures it as shipped).

Rows, per dtype (``--dtypes``; one thread everywhere):

* ours, solve alone: ``torchlbfgs.batched_minimize(loss, w0, lam, X, y)`` (``implicit_diff``
  off), eager and with ``compile=True`` (the first compiled call's time less the median of the
  timed calls is the compile time; Inductor's cache is a fresh temporary folder unless
  ``TORCHINDUCTOR_CACHE_DIR`` is set, so it is a cold compile);
* ours, solve + backward: ``lam`` requires grad, ``implicit_diff=torchlbfgs.ImplicitDiff(
  solver=...)`` with ``"cg"`` and ``"preconditioned_cg"``, then ``V.backward()``; eager and
  compiled (``compile=True`` compiles the solve's round; the backward runs eagerly in both).
  Timed apart in each call: the solve (``batched_minimize`` and V), the backward
  (``V.backward()``) and both. "backward / solve alone" divides the backward's median by the
  median of the solve-alone row of the same mode (issue target: <= 1.0). The backward's CG
  iterations per problem come from ``ImplicitDiff(on_solve=...)`` (median and max over the
  batch, last timed call). Within each mode the three rows are interleaved call by call
  (after an untimed call of each: the compile, or a warm-up on 4 problems), so a drift of this
  shared machine's speed hits them alike;
* jaxopt (if JAX is installed; ``--no-jax`` skips it), float64 enabled, ``solve_one`` running
  ``jaxopt.LBFGS(fun=loss, tol=tol, maxiter=MAX_ITER, history_size=10, implicit_diff=True,
  implicit_diff_solve=...)`` on one problem: solve alone ``jax.jit(jax.vmap(solve_one))``, and
  solve + hypergradient ``jax.jit(jax.grad(outer))`` with
  ``outer(lam) = sum(vmap(val_loss)(vmap(solve_one)(lam, X, y), Xval, yval))``; each compiled
  ahead of time (compile time reported apart), then the median of ``--jax-repeats`` (default
  1) calls with ``block_until_ready`` after a warm-up call (a warm-up over 10 s counts as the
  first timed call: in float64 at B=1024 each call takes minutes). Its backward alone: the
  same ``outer`` split into a jitted forward pass (returning ``jax.vjp``'s closure, the solve
  column) and a jitted backward pass (median of ``--repeats`` calls). The row of jaxopt's
  default linear solver is timed by that split only (its total is forward + backward).

Correctness, in the same run:

* an exact reference per problem in float64: Newton's method from ours' float64 solution until
  ``|g|_2 <= 1e-13``, then the formula above with the dense Hessian; checked itself against
  central finite differences of ``V_i`` (``--fd`` problems, step ``1e-4 lambda_i``, each point
  solved by Newton). "rel. error vs exact" is ``|h_i - ref_i| / |ref_i|`` (max and median over
  the problems): the backward's error and the inner solve's together. The latter dominates:
  ``dw*/dlambda`` taken at a ``w`` off ``w*`` by ``H^-1 g`` (up to ``|g| / lambda_min``);
* "backward rel. error at own w": the same against the formula with dense Hessians at the
  params the solve returned (what implicit differentiation computes at the point it is given):
  the backward's own error, CG and Hessian-vector products;
* ours against jaxopt's hypergradient directly (both errors of both).

Printed: a markdown table per dtype, then time ratios jaxopt s / ours s (above 1: ours faster),
same run. Run: ``.venv/bin/python bench/implicit.py`` (``--batch 1024 --repeats 5`` and both
dtypes by default; ``--quick`` for a smoke run of about a minute: B=64, 2 repeats, float64, no
compile unless ``--compile``; ``--no-compile``, ``--no-jax``, ``--jax-repeats``, ``--dtypes``,
``--tolerance float64=1e-8``, ``--fd``, ``--output``). JSON goes to ``bench/results/implicit.json``.
The thread variables are set only if not already set.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import common

common.use_one_thread()
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # a cold compile: Inductor reads this on import
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="implicit-bench-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import argparse  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import batched  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from bounded import markdown  # noqa: E402
from convergence import git_state  # noqa: E402

import torchlbfgs  # noqa: E402

D, HISTORY, SEED = batched.D, batched.HISTORY, batched.SEED
VAL_SAMPLES, LAM_RANGE, MAX_ITER = 256, (1e-3, 1.0), 1000
TOLERANCE = {"float64": 1e-7, "float32": 1e-3}  # |g|_2 (jaxopt); ours: max|g| <= this / sqrt(d)
CG_MAX_ITER = 10 * D
FD_STEP, NEWTON_GTOL = 1e-4, 1e-13
WARMUP_LIMIT = 10.0  # seconds: a jaxopt call this long is timed without a warm-up call first
DTYPES = {"float64": torch.float64, "float32": torch.float32}

SOLVE, CG, PCG = "solve alone", "solve + backward, cg", "solve + backward, preconditioned_cg"
JAXOPT_SOLVE, JAXOPT_GRAD = "jaxopt: solve alone", "jaxopt: solve + hypergradient (solve_cg)"
JAXOPT_DEFAULT = "jaxopt: solve + hypergradient (default solve_normal_cg, tol 1e-5)"
BACKWARD_SOLVERS = {CG: "cg", PCG: "preconditioned_cg"}


def cg_tolerance(dtype: str) -> float:
    """The backward solves' relative residual: eps^(3/4), ours' default."""
    return float(np.finfo(dtype).eps) ** 0.75


# ---------------------------------------------------------------------------------------- data


def make_problems(batch: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """``batched.make_data``'s problems (the same draws, checked), with per-problem validation
    data from the same model and lambdas; float32 arrays."""
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-0.5, 0.5, (batch, 1, D))
    X = (rng.standard_normal((batch, batched.SAMPLES, D)) + batched.FEATURE_MEAN) * scales
    w_true = rng.standard_normal((batch, D))
    logits = np.einsum("bnd,bd->bn", X, w_true)
    shift = np.median(logits, axis=1, keepdims=True)  # balanced classes
    logits -= shift
    noise = batched.LABEL_NOISE * logits.std(axis=1, keepdims=True) * rng.standard_normal(logits.shape)
    y = logits + noise > 0
    # validation: the same model (scales, w_true, shift, noise level), new samples
    X_val = (rng.standard_normal((batch, VAL_SAMPLES, D)) + batched.FEATURE_MEAN) * scales
    val_logits = np.einsum("bnd,bd->bn", X_val, w_true) - shift
    noise_scale = batched.LABEL_NOISE * logits.std(axis=1, keepdims=True)
    val_noise = noise_scale * rng.standard_normal(val_logits.shape)
    y_val = val_logits + val_noise > 0
    low, high = np.log10(LAM_RANGE)
    lam = 10.0 ** np.random.default_rng(seed + 1).uniform(low, high, batch)
    problems = {"lam": lam, "X": X, "y": y, "X_val": X_val, "y_val": y_val}
    problems = {name: value.astype(np.float32) for name, value in problems.items()}
    X_batched, y_batched = batched.make_data(batch, seed)
    assert np.array_equal(problems["X"], X_batched)
    assert np.array_equal(problems["y"], y_batched)
    return problems


def loss(w: torch.Tensor, lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The inner objective of one problem."""
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y) + 0.5 * lam * (w @ w)


def validation_losses(W: torch.Tensor, X_val: torch.Tensor, y_val: torch.Tensor) -> torch.Tensor:
    """Mean validation BCE of each problem at its params ``W`` (B, d): shape (B,)."""
    z = torch.einsum("bnd,bd->bn", X_val, W)
    return (torch.nn.functional.softplus(z) - y_val * z).mean(1)


def to_torch(problems: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(value).to(dtype) for name, value in problems.items()}


def relative_errors(found: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """The max and the median over problems of ``|found_i - reference_i| / |reference_i|``."""
    errors = np.abs(found - reference) / np.abs(reference)
    return float(errors.max()), float(np.median(errors))


def gradient_norms(params: np.ndarray, data: dict[str, torch.Tensor]) -> np.ndarray:
    """``|g|_2`` of each problem's loss at ``params``, in float64."""
    w = torch.from_numpy(np.asarray(params, np.float64))
    grads = torch.func.vmap(torch.func.grad(loss))(w, data["lam"], data["X"], data["y"])
    return grads.norm(dim=1).numpy()


# ------------------------------------------------------------------------------------ reference


def newton(
    w: torch.Tensor, data: dict[str, torch.Tensor], lam: torch.Tensor, steps: int = 20
) -> torch.Tensor:
    """Newton's method on every problem (float64, dense Hessians) until ``|g|_2 <= NEWTON_GTOL``."""
    grad = torch.func.vmap(torch.func.grad(loss))
    hessian = torch.func.vmap(torch.func.hessian(loss))
    for _ in range(steps):
        g = grad(w, lam, data["X"], data["y"])
        if float(g.norm(dim=1).max()) <= NEWTON_GTOL:
            return w
        w = w - torch.linalg.solve(hessian(w, lam, data["X"], data["y"]), g)
    raise RuntimeError(f"Newton did not reach |g| <= {NEWTON_GTOL:g} in {steps} steps")


def dense_hypergradient(w: torch.Tensor, data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit-function formula at ``w`` (float64, dense Hessians, one solve each):
    ``-grad V_i(w_i)' H_i(w_i)^-1 w_i`` (what implicit differentiation computes at the point it
    is given, exact or not), and the Hessians."""
    H = torch.func.vmap(torch.func.hessian(loss))(w, data["lam"], data["X"], data["y"])
    val_grad = torch.func.vmap(
        torch.func.grad(lambda w, X, y: validation_losses(w[None], X[None], y[None])[0])
    )(w, data["X_val"], data["y_val"])
    return -(torch.linalg.solve(H, val_grad) * w).sum(1), H


def reference(problems: dict[str, np.ndarray], fd_count: int) -> dict[str, Any]:
    """Exact float64 solutions and hypergradients, and their check by finite differences."""
    data = to_torch(problems, torch.float64)
    lam = data["lam"]
    start = torchlbfgs.batched_minimize(
        loss, torch.zeros(lam.shape[0], D, dtype=torch.float64), lam, data["X"], data["y"],
        max_iter=MAX_ITER, tolerance_grad=0.0, tolerance_change=0.0, history_size=HISTORY,
    ).params  # fmt: skip
    w = newton(start, data, lam)
    exact, H = dense_hypergradient(w, data)
    count = min(fd_count, lam.shape[0])
    step = FD_STEP * lam[:count]
    part = {name: value[:count] for name, value in data.items()}

    def validation_at(lam_points: torch.Tensor) -> torch.Tensor:
        return validation_losses(newton(w[:count], part, lam_points), part["X_val"], part["y_val"])

    fd = (validation_at(lam[:count] + step) - validation_at(lam[:count] - step)) / (2 * step)
    fd_error = relative_errors(fd.numpy(), exact[:count].numpy())[0]
    return {"params": w.numpy(), "hypergradient": exact.numpy(), "fd": fd.numpy(), "fd_count": count,
            "fd_relative_error": fd_error,
            "eigenvalues": torch.linalg.eigvalsh(H).numpy()}  # fmt: skip


# ----------------------------------------------------------------------------------------- ours


def ours_call(
    data: dict[str, torch.Tensor], dtype: str, compile: bool, backward: str | None, count: int | None = None
) -> dict[str, Any]:
    """One call: the solve, and with ``backward`` (a CG variant) V's backward; timed apart."""
    part = data if count is None else {name: value[:count] for name, value in data.items()}
    lam = part["lam"].clone().requires_grad_(backward is not None)
    reports: list[torchlbfgs.BackwardSolve] = []
    implicit: bool | torchlbfgs.ImplicitDiff = False
    if backward is not None:
        implicit = torchlbfgs.ImplicitDiff(
            solver=backward,  # type: ignore[arg-type]
            tolerance=cg_tolerance(dtype), max_iter=CG_MAX_ITER, on_solve=reports.append,
        )  # fmt: skip
    w0 = torch.zeros(lam.shape[0], D, dtype=lam.dtype)
    tolerance_grad = TOLERANCE[dtype] / D**0.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torchlbfgs.BackwardSolveWarning)
        start = time.perf_counter()
        result = torchlbfgs.batched_minimize(
            loss, w0, lam, part["X"], part["y"], max_iter=MAX_ITER, tolerance_grad=tolerance_grad,
            tolerance_change=0.0, history_size=HISTORY, compile=compile, implicit_diff=implicit,
        )  # fmt: skip
        outer = validation_losses(result.params, part["X_val"], part["y_val"]).sum()
        solved = time.perf_counter()
        if backward is not None:
            outer.backward()
        done = time.perf_counter()
    warned = sum(issubclass(w.category, torchlbfgs.BackwardSolveWarning) for w in caught)
    entry = {"solve": solved - start, "total": done - start, "result": result, "warnings": warned}
    if backward is not None:
        assert lam.grad is not None
        assert len(reports) == 1
        entry.update(backward=done - solved, hypergradient=lam.grad.double().numpy(), report=reports[0])
    return entry


def run_ours(
    data: dict[str, torch.Tensor], dtype: str, compile: bool, repeats: int
) -> dict[str, dict[str, Any]]:
    """The three rows of one mode, interleaved call by call after an untimed call of each."""
    cases = {SOLVE: None, **BACKWARD_SOLVERS}
    first: dict[str, float] = {}
    graphs = torch._dynamo.utils.counters["stats"]
    graphs_after_first: dict[str, int] = {}
    for name, backward in cases.items():
        if compile:  # the compile (full batch; the batch dimension is dynamic anyway)
            first[name] = ours_call(data, dtype, True, backward)["total"]
            graphs_after_first[name] = graphs["unique_graphs"]
        else:
            ours_call(data, dtype, False, backward, count=4)  # warm-up
    calls: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
    graphs_before = graphs["unique_graphs"]
    for _ in range(repeats):
        for name, backward in cases.items():
            calls[name].append(ours_call(data, dtype, compile, backward))
    graphs_during = graphs["unique_graphs"] - graphs_before
    rows = {}
    for name, timed in calls.items():
        last = timed[-1]
        result = last["result"]
        row: dict[str, Any] = {
            "solve_seconds": statistics.median(c["solve"] for c in timed),
            "total_seconds": statistics.median(c["total"] for c in timed),
            "params": result.params.detach().double().numpy(),
            "iterations_mean": float(result.n_iter.double().mean()),
            "iterations_max": int(result.n_iter.max()),
            "evals_mean": float(result.n_evals.double().mean()),
            "not_at_gtol": int((result.status != torchlbfgs.StopReason.GRADIENT_TOLERANCE.value).sum()),
            "stops": {torchlbfgs.StopReason(int(s)).name: int((result.status == s).sum())
                      for s in result.status.unique()},
        }  # fmt: skip
        if name != SOLVE:
            report = last["report"]
            iterations = report.iterations.numpy()
            row.update(
                backward_seconds=statistics.median(c["backward"] for c in timed),
                hypergradient=last["hypergradient"],
                cg_iterations_median=float(np.median(iterations)), cg_iterations_max=int(iterations.max()),
                cg_not_converged=int((~report.converged).sum()),
                cg_max_residual=float(report.residual.max()),
                backward_warnings=sum(c["warnings"] for c in timed),
            )  # fmt: skip
        if compile:
            # graphs: Dynamo's count in this process after the row's first call (cumulative), and
            # the graphs compiled during the mode's timed calls (0: no recompilation)
            row.update(first_call_seconds=first[name], compile_seconds=first[name] - row["total_seconds"],
                       graphs_after_first_call=graphs_after_first[name],
                       graphs_compiled_during_timed_calls=graphs_during)  # fmt: skip
        rows[name] = row
    return rows


# --------------------------------------------------------------------------------------- jaxopt


def run_jaxopt(
    problems: dict[str, np.ndarray], dtype: str, repeats: int, jax_repeats: int
) -> dict[str, dict[str, Any]] | str:
    """jaxopt's solve alone and solve + hypergradient (with our CG settings, and as shipped):
    ``jax_repeats`` timed calls of each solve, ``repeats`` of each backward pass alone."""
    imported = common.import_jax()
    if isinstance(imported, str):
        return imported
    jax, jnp, jaxopt, _ = imported

    def jloss(w: Any, lam: Any, X: Any, y: Any) -> Any:
        z = X @ w
        return jnp.mean(jax.nn.softplus(z) - y * z) + 0.5 * lam * (w @ w)

    def jvalidation(w: Any, X: Any, y: Any) -> Any:
        z = X @ w
        return jnp.mean(jax.nn.softplus(z) - y * z)

    def solver(linear_solve: Callable[..., Any] | None) -> Any:
        return jaxopt.LBFGS(fun=jloss, tol=TOLERANCE[dtype], maxiter=MAX_ITER, history_size=HISTORY,
                            implicit_diff=True, implicit_diff_solve=linear_solve)  # fmt: skip

    ours_cg = functools.partial(jaxopt.linear_solve.solve_cg, tol=cg_tolerance(dtype), maxiter=CG_MAX_ITER)

    def solve_one(lam: Any, X: Any, y: Any) -> tuple[Any, Any, Any, Any]:
        w, state = solver(ours_cg).run(jnp.zeros(D, X.dtype), lam, X, y)
        return w, state.iter_num, state.num_fun_eval, state.error

    def outer(linear_solve: Callable[..., Any] | None) -> Callable[..., Any]:
        def value(lam: Any, X: Any, y: Any, X_val: Any, y_val: Any) -> Any:
            def params(lam: Any, X: Any, y: Any) -> Any:
                return solver(linear_solve).run(jnp.zeros(D, X.dtype), lam, X, y).params

            W = jax.vmap(params)(lam, X, y)
            return jnp.sum(jax.vmap(jvalidation)(W, X_val, y_val))

        return value

    args = tuple(jax.device_put(problems[name].astype(dtype)) for name in ("lam", "X", "y", "X_val", "y_val"))

    def compiled(function: Callable[..., Any], *inputs: Any) -> tuple[Any, float]:
        start = time.perf_counter()
        done = jax.jit(function).lower(*inputs).compile()
        return done, time.perf_counter() - start

    def timed(call: Callable[[], Any], count: int) -> tuple[float, Any]:
        """The median of ``count`` timed calls after a warm-up call, and the last call's output. A
        warm-up over ``WARMUP_LIMIT`` seconds counts as the first timed call (jaxopt's float64
        solves take minutes at B=1024; such a call gains nothing from warming up)."""
        start = time.perf_counter()
        out = jax.block_until_ready(call())
        first = time.perf_counter() - start
        times = [first] if first > WARMUP_LIMIT else []
        while len(times) < count:
            start = time.perf_counter()
            out = jax.block_until_ready(call())
            times.append(time.perf_counter() - start)
        return statistics.median(times), out

    rows = {}
    solve, compile_seconds = compiled(jax.vmap(solve_one), *args[:3])
    seconds, out = timed(lambda: solve(*args[:3]), jax_repeats)
    w, iterations, evals, error = (np.asarray(o) for o in out)
    rows[JAXOPT_SOLVE] = {
        "solve_seconds": seconds, "total_seconds": seconds, "compile_seconds": compile_seconds,
        "params": w.astype(np.float64), "dtype_out": str(w.dtype),
        "iterations_mean": float(iterations.mean()), "iterations_max": int(iterations.max()),
        "evals_mean": float(evals.mean()), "not_at_gtol": int(np.sum(~(error <= TOLERANCE[dtype]))),
    }  # fmt: skip
    for name, linear_solve in ((JAXOPT_GRAD, ours_cg), (JAXOPT_DEFAULT, None)):
        value = outer(linear_solve)
        row: dict[str, Any] = {}
        if name == JAXOPT_GRAD:  # the hypergradient in one jitted call: the timed total
            grad, row["compile_seconds"] = compiled(jax.grad(value), *args)
            row["total_seconds"], hypergradient = timed(lambda grad=grad: grad(*args), jax_repeats)

        # the same split into a jitted forward pass (the solve, returning jax.vjp's closure) and a
        # jitted backward pass, to time the backward alone
        def forward(*inputs: Any, value: Callable[..., Any] = value) -> Any:
            return jax.vjp(lambda lam: value(lam, *inputs[1:]), inputs[0])[1]

        forward_compiled, forward_compile_seconds = compiled(forward, *args)
        row["solve_seconds"], vjp = timed(lambda f=forward_compiled: f(*args), 1)
        backward_compiled, backward_compile_seconds = compiled(
            lambda vjp: vjp(jnp.ones((), args[0].dtype))[0], vjp
        )
        row["backward_seconds"], split_hypergradient = timed(
            lambda b=backward_compiled, vjp=vjp: b(vjp), repeats
        )
        row["split_compile_seconds"] = forward_compile_seconds + backward_compile_seconds
        if name == JAXOPT_GRAD:
            difference = relative_errors(np.asarray(split_hypergradient), np.asarray(hypergradient))[0]
            row["split_relative_difference_to_grad"] = difference
        else:  # no jax.grad call: the total is the split's
            row["total_seconds"] = row["solve_seconds"] + row["backward_seconds"]
            row["total_from_split"], hypergradient = True, split_hypergradient
        hypergradient = np.asarray(hypergradient)
        row.update(hypergradient=hypergradient.astype(np.float64), dtype_out=str(hypergradient.dtype))
        rows[name] = row
    return rows


# ------------------------------------------------------------------------------------------ run


def run_dtype(
    problems: dict[str, np.ndarray], ref: dict[str, Any], dtype: str, args: argparse.Namespace
) -> dict[str, Any]:
    data = to_torch(problems, DTYPES[dtype])
    data64 = to_torch(problems, torch.float64)
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    rows: dict[str, dict[str, Any]] = {}
    for mode in modes:
        print(f"  {dtype}, ours {mode} ...", flush=True)
        for name, row in run_ours(data, dtype, mode == "compiled", args.repeats).items():
            rows[f"ours {mode}: {name}"] = {"library": "ours", "mode": mode, "case": name, **row}
    failure = None
    if not args.no_jax:
        print(f"  {dtype}, jaxopt ...", flush=True)
        try:
            jax_rows = run_jaxopt(problems, dtype, args.repeats, args.jax_repeats)
        except Exception as error:  # a crash is a result too
            jax_rows = f"raised {type(error).__name__}: {error}"[:300]
        if isinstance(jax_rows, str):
            failure = jax_rows
        else:
            for name, row in jax_rows.items():
                rows[name] = {"library": "jaxopt", "mode": "jit", "case": name, **row}

    for mode in modes:  # backward / solve alone, within the mode
        alone = rows[f"ours {mode}: {SOLVE}"]["total_seconds"]
        for name in BACKWARD_SOLVERS:
            row = rows[f"ours {mode}: {name}"]
            row["backward_over_solve_alone"] = row["backward_seconds"] / alone
    if JAXOPT_SOLVE in rows:
        alone = rows[JAXOPT_SOLVE]["total_seconds"]
        for name in (JAXOPT_GRAD, JAXOPT_DEFAULT):
            rows[name]["backward_over_solve_alone"] = rows[name]["backward_seconds"] / alone
    for row in rows.values():
        # the backward's own error: against the formula with dense Hessians at the returned params
        # (jaxopt's hypergradient rows: at its solve-alone row's params, the same deterministic solve)
        own = row.get("params", rows[JAXOPT_SOLVE]["params"] if row["library"] == "jaxopt" else None)
        if "hypergradient" in row and own is not None:
            dense = dense_hypergradient(torch.from_numpy(own), data64)[0].numpy()
            errors = relative_errors(row["hypergradient"], dense)
            row["backward_error"], row["backward_error_median"] = errors
    for row in rows.values():
        if "params" in row:
            row["max_gradient_norm"] = float(gradient_norms(row.pop("params"), data64).max())
        if "hypergradient" in row:
            errors = relative_errors(row["hypergradient"], ref["hypergradient"])
            row["relative_error_vs_exact"], row["relative_error_vs_exact_median"] = errors
            if JAXOPT_GRAD in rows and row["library"] == "ours":
                errors = relative_errors(row["hypergradient"], rows[JAXOPT_GRAD]["hypergradient"])
                row["relative_difference_vs_jaxopt"], row["relative_difference_vs_jaxopt_median"] = errors

    # time ratios, jaxopt / ours (above 1: ours faster)
    ratios: dict[str, Any] = {}
    if JAXOPT_SOLVE in rows:
        for key, row in rows.items():
            if row["library"] != "ours":
                continue
            anchor = JAXOPT_SOLVE if row["case"] == SOLVE else JAXOPT_GRAD
            ratio = rows[anchor]["total_seconds"] / row["total_seconds"]
            ratios[key] = {"anchor": anchor, "jaxopt_over_ours": ratio}

    print_tables(dtype, args.batch, rows, ratios, failure)
    for row in rows.values():
        row.pop("hypergradient", None)
    return {"rows": rows, "ratios": ratios, "jaxopt_failure": failure}


def cell(value: Any, format: str) -> str:
    return "-" if value is None else format.format(value)


def pair(row: dict[str, Any], key: str) -> str:
    return "-" if key not in row else f"{row[key]:.1e} / {row[key + '_median']:.1e}"


def print_tables(
    dtype: str, batch: int, rows: dict[str, dict[str, Any]], ratios: dict[str, Any], failure: str | None
) -> None:
    tol = TOLERANCE[dtype]
    print(f"\n### B={batch} logistic regressions, {dtype}: |g|_2 <= {tol:g} (ours max|g| <= "
          f"{tol / D**0.5:.2g}), backward CG to {cg_tolerance(dtype):.1e} relative residual, "
          f"at most {CG_MAX_ITER} iterations\n")  # fmt: skip
    table = []
    for name, row in rows.items():
        cg = None
        if "cg_iterations_median" in row:
            cg = f"{row['cg_iterations_median']:g} / {row['cg_iterations_max']}"
            cg += f" ({row['cg_not_converged']} missed)" if row["cg_not_converged"] else ""
        its = None
        if "iterations_mean" in row:
            its = f"{row['iterations_mean']:.1f} / {row['iterations_max']}"
        backward = cell(row.get("backward_seconds"), "{:.3f}")
        table.append([name, cell(row.get("solve_seconds"), "{:.3f}"), backward, f"{row['total_seconds']:.3f}",
                      cell(row.get("backward_over_solve_alone"), "{:.2f}"), cg or "-", its or "-",
                      cell(row.get("not_at_gtol"), "{}"), cell(row.get("max_gradient_norm"), "{:.1e}"),
                      pair(row, "backward_error"), pair(row, "relative_error_vs_exact"),
                      pair(row, "relative_difference_vs_jaxopt"),
                      cell(row.get("compile_seconds"), "{:.1f}")])  # fmt: skip
    print(markdown(["row", "solve s", "backward s", "solve + backward s", "backward / solve alone",
                    "backward CG its median / max", "L-BFGS its mean / max", "not at gtol", "max |g|_2",
                    "backward rel. error at own w, max / median", "rel. error vs exact, max / median",
                    "rel. difference vs jaxopt, max / median", "compile s"],
                   table))  # fmt: skip
    if ratios:
        print("\ntime ratios jaxopt / ours (above 1: ours faster), same run:\n")
        table = [[name, r["anchor"], f"{r['jaxopt_over_ours']:.2f}"] for name, r in ratios.items()]
        print(markdown(["ours", "against", "jaxopt s / ours s"], table))
    if failure:
        print(f"\njaxopt: {failure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="number of problems B (default 1024)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row, median (default 5)")
    parser.add_argument("--jax-repeats", type=int, default=1,
                        help="timed calls of each jaxopt solve (minutes at B=1024, float64)")  # fmt: skip
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=None,
                        help="default: float64 float32")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: B=64, 2 repeats, float64, no compile (unless given)")  # fmt: skip
    parser.add_argument("--no-compile", action="store_true", help="skip batched_minimize(compile=True)")
    parser.add_argument("--compile", action="store_true", help="with --quick: compile all the same")
    parser.add_argument("--no-jax", action="store_true", help="skip jaxopt")
    parser.add_argument("--tolerance", nargs="+", default=[], metavar="DTYPE=TOL",
                        help=f"the inner solves' |g|_2 tolerance (default {TOLERANCE})")  # fmt: skip
    parser.add_argument("--fd", type=int, default=4, help="problems checked by finite differences")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "implicit.json")
    args = parser.parse_args()
    quick = {"batch": 64, "repeats": 2, "dtypes": ["float64"]}
    full = {"batch": 1024, "repeats": 5, "dtypes": ["float64", "float32"]}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick and not args.compile:
        args.no_compile = True
    for setting in args.tolerance:
        dtype, value = setting.split("=")
        TOLERANCE[dtype] = float(value)
    torch.set_num_threads(1)
    began = time.perf_counter()

    problems = make_problems(args.batch)
    print("reference (float64 Newton, finite differences) ...", flush=True)
    ref = reference(problems, args.fd)
    eigenvalues = ref.pop("eigenvalues")
    condition = eigenvalues[:, -1] / eigenvalues[:, 0]
    print(f"  finite differences on {ref['fd_count']} problems against the exact hypergradient: max relative "
          f"error {ref['fd_relative_error']:.1e}; Hessian condition numbers at w*: median "
          f"{np.median(condition):.0f}, max {condition.max():.0f}")  # fmt: skip
    meta = {**common.machine(), "torchlbfgs_path": str(Path(torchlbfgs.__file__).parent), "git": git_state()}
    config = {
        "batch": args.batch, "d": D, "samples": batched.SAMPLES, "validation_samples": VAL_SAMPLES,
        "lambda_range": LAM_RANGE, "tolerance_l2": TOLERANCE,
        "ours_tolerance_grad_max": {dtype: tol / D**0.5 for dtype, tol in TOLERANCE.items()},
        "max_iter": MAX_ITER, "history_size": HISTORY,
        "cg_tolerance": {dtype: cg_tolerance(dtype) for dtype in args.dtypes}, "cg_max_iter": CG_MAX_ITER,
        "repeats": args.repeats, "dtypes": args.dtypes, "compiled": not args.no_compile,
        "jax": not args.no_jax, "seed": SEED,
    }  # fmt: skip
    checks = {
        "fd_count": ref["fd_count"], "fd_relative_error": ref["fd_relative_error"],
        "condition_median": float(np.median(condition)), "condition_max": float(condition.max()),
    }  # fmt: skip
    report: dict[str, Any] = {"meta": meta, "config": config, "reference": checks}
    report["dtypes"] = {dtype: run_dtype(problems, ref, dtype, args) for dtype in args.dtypes}
    common.write_report(report, began, args.output)


if __name__ == "__main__":
    main()
