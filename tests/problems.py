"""Test problems in torch, with independent reference data where it exists.

Moré, Garbow & Hillstrom (1981), "Testing unconstrained optimization software", give the
functions and standard starting points used here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Problem:
    name: str
    fun: Callable[[Tensor], Tensor]
    x0: Tensor
    solution: Tensor | None = None  # known minimiser, when there is a closed form


def rosenbrock(x: Tensor) -> Tensor:
    return (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2).sum()


def beale(x: Tensor) -> Tensor:
    a, b = x[0], x[1]
    return (1.5 - a + a * b) ** 2 + (2.25 - a + a * b**2) ** 2 + (2.625 - a + a * b**3) ** 2


def wood(x: Tensor) -> Tensor:
    x1, x2, x3, x4 = x[0], x[1], x[2], x[3]
    return (
        100 * (x1**2 - x2) ** 2
        + (x1 - 1) ** 2
        + (x3 - 1) ** 2
        + 90 * (x3**2 - x4) ** 2
        + 10.1 * ((x2 - 1) ** 2 + (x4 - 1) ** 2)
        + 19.8 * (x2 - 1) * (x4 - 1)
    )


def powell_singular(x: Tensor) -> Tensor:
    x = x.reshape(-1, 4)
    x1, x2, x3, x4 = x[:, 0], x[:, 1], x[:, 2], x[:, 3]
    return ((x1 + 10 * x2) ** 2 + 5 * (x3 - x4) ** 2 + (x2 - 2 * x3) ** 4 + 10 * (x1 - x4) ** 4).sum()


def spd_quadratic(n: int, condition: float, seed: int, dtype: torch.dtype = torch.float64) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    eigenvalues = torch.logspace(0, torch.log10(torch.tensor(condition)).item(), n, dtype=torch.float64)
    a = (q * eigenvalues) @ q.T
    a = (a + a.T) / 2
    b = torch.randn(n, generator=generator, dtype=torch.float64)
    a, b = a.to(dtype), b.to(dtype)

    def fun(x: Tensor) -> Tensor:
        return 0.5 * x @ (a @ x) - b @ x

    solution = torch.linalg.solve(a.double(), b.double()).to(dtype)
    return Problem(f"quadratic(n={n}, cond={condition:g})", fun, torch.zeros(n, dtype=dtype), solution)


def logistic_regression(
    n_samples: int, n_features: int, lam: float, seed: int, dtype: torch.dtype = torch.float64
) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n_samples, n_features, generator=generator, dtype=torch.float64)
    true_w = torch.randn(n_features, generator=generator, dtype=torch.float64)
    noise = torch.rand(n_samples, generator=generator, dtype=torch.float64)
    labels = (torch.sigmoid(features @ true_w) > noise).to(torch.float64)
    features, labels = features.to(dtype), labels.to(dtype)

    def fun(w: Tensor) -> Tensor:
        logits = features @ w
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels) + 0.5 * lam * (w @ w)

    return Problem(f"logistic(d={n_features})", fun, torch.zeros(n_features, dtype=dtype))


def classic_problems(dtype: torch.dtype = torch.float64) -> list[Problem]:
    """The set every solver test runs over (MGH standard starting points)."""

    def tensor(*values: float) -> Tensor:
        return torch.tensor(values, dtype=dtype)

    rosen_100_start = torch.tensor([-1.2, 1.0] * 50, dtype=dtype)
    return [
        Problem("rosenbrock2", rosenbrock, tensor(-1.2, 1.0), tensor(1.0, 1.0)),
        Problem("rosenbrock100", rosenbrock, rosen_100_start, torch.ones(100, dtype=dtype)),
        Problem("beale", beale, tensor(1.0, 1.0), tensor(3.0, 0.5)),
        Problem("wood", wood, tensor(-3.0, -1.0, -3.0, -1.0), tensor(1.0, 1.0, 1.0, 1.0)),
        Problem("powell_singular", powell_singular, tensor(3.0, -1.0, 0.0, 1.0), torch.zeros(4, dtype=dtype)),
        spd_quadratic(30, 1e3, seed=0, dtype=dtype),
        logistic_regression(200, 10, 1e-2, seed=1, dtype=dtype),
    ]
