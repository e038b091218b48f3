"""The figures of the documentation, drawn from measurements (never by hand).

1. ``docs/assets/convergence.png``: f - f* against function evaluations on four
   Moré-Garbow-Hillstrom problems (the problems of ``convergence.py``), for ``minimize`` with
   strong Wolfe and with Moré-Thuente, ``torch.optim.LBFGS`` (strong Wolfe) and scipy's
   L-BFGS-B; float64, history 10, every evaluation recorded.
2. ``docs/assets/batched_throughput.png``: problems solved per second against batch size, from
   the JSON that ``batched.py`` writes (``bench/results/batched.json``; run it first).

Run: ``python bench/plots.py`` (about 10 seconds; needs matplotlib, in the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from convergence import TORCH_OPS, Problem, make_problems, value_and_grad
from scipy.optimize import minimize as scipy_minimize

import torchlbfgs

ASSETS = Path(__file__).resolve().parent.parent / "docs" / "assets"
PROBLEMS = ("rosenbrock n=100", "powell singular", "wood", "brown badly scaled")
CAP = 200


def recorded(problem: Problem) -> tuple[list[float], object]:
    """A float64 torch objective for ``problem`` that records every value it returns."""
    values: list[float] = []
    data = problem.torch_data()

    def fun(x: torch.Tensor) -> torch.Tensor:
        value = problem.fun(x, data, TORCH_OPS)
        values.append(float(value.detach()))
        return value

    return values, fun


def ours(problem: Problem, line_search: str) -> list[float]:
    values, fun = recorded(problem)
    x0 = torch.tensor(problem.x0, dtype=torch.float64)
    # grad_and_value evaluates fun once per evaluation: the recorded values are the evaluations
    torchlbfgs.minimize(fun, x0, line_search=line_search, tolerance_grad=1e-6, tolerance_change=0.0,
                        max_evals=CAP, max_iter=10 * CAP)  # fmt: skip
    return values


def torch_lbfgs(problem: Problem) -> list[float]:
    values, fun = recorded(problem)
    x = torch.nn.Parameter(torch.tensor(problem.x0, dtype=torch.float64))
    optimizer = torch.optim.LBFGS([x], max_iter=CAP, max_eval=CAP, history_size=10,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-6,
                                  tolerance_change=0.0)  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = fun(x)
        loss.backward()
        return loss

    optimizer.step(closure)
    return values


def scipy_lbfgsb(problem: Problem) -> list[float]:
    values: list[float] = []
    data = problem.torch_data()

    def fun_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = value_and_grad(problem, x, data)
        values.append(value)
        return value, grad

    scipy_minimize(fun_and_grad, problem.x0.copy(), jac=True, method="L-BFGS-B",
                   options={"maxcor": 10, "gtol": 1e-6, "ftol": 0.0, "maxfun": CAP})  # fmt: skip
    return values


def convergence_figure(path: Path) -> None:
    problems = {p.name: p for p in make_problems()}
    figure, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for axis, name in zip(axes.flat, PROBLEMS, strict=True):
        problem = problems[name]
        runs = {
            "torchlbfgs minimize, strong Wolfe": ours(problem, "strong_wolfe"),
            "torchlbfgs minimize, Moré-Thuente": ours(problem, "more_thuente"),
            "torch.optim.LBFGS, strong Wolfe": torch_lbfgs(problem),
            "scipy L-BFGS-B": scipy_lbfgsb(problem),
        }
        for (label, values), style in zip(runs.items(), ("-", "--", ":", "-."), strict=True):
            gap = np.maximum(np.asarray(values) - problem.f_star, 1e-30)
            axis.semilogy(np.arange(1, len(gap) + 1), gap, style, label=label)
        axis.set_title(name)
        axis.set_xlabel("function evaluations")
        axis.set_ylabel("f - f*")
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def throughput_figure(results: Path, path: Path) -> None:
    # the rows of rates (others hold the alternated ratios)
    rows = [row for row in json.loads(results.read_text())["rows"] if "problems_per_s" in row]
    figure, axis = plt.subplots(figsize=(8, 5))
    for solver in dict.fromkeys(row["solver"] for row in rows):
        points = sorted((row["B"], row["problems_per_s"]) for row in rows if row["solver"] == solver)
        axis.loglog(*zip(*points, strict=True), "o-", label=solver)
    axis.set_xlabel("batch size B (independent logistic regressions, d=32)")
    axis.set_ylabel("problems solved per second")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batched-json", type=Path, default=Path(__file__).parent / "results" / "batched.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    ASSETS.mkdir(parents=True, exist_ok=True)
    convergence_figure(ASSETS / "convergence.png")
    print(f"wrote {ASSETS / 'convergence.png'}")
    if not args.batched_json.exists():
        raise SystemExit(f"{args.batched_json} is missing: run `python bench/batched.py` first")
    throughput_figure(args.batched_json, ASSETS / "batched_throughput.png")
    print(f"wrote {ASSETS / 'batched_throughput.png'}")


if __name__ == "__main__":
    main()
