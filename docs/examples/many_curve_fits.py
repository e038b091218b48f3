"""Thousands of independent curve fits in one batched run with ``torchlbfgs.batched_minimize``.

Each of 2,000 noisy signals y(t) = a * exp(-b t) + c gets its own L-BFGS: its own history,
line search and convergence. The batch advances one evaluation per problem per round, a problem
that has converged is frozen and leaves the batch, and each fit is the one ``minimize`` gives
when it is solved by itself.
Run: ``python docs/examples/many_curve_fits.py``
"""

import time

import torch

import torchlbfgs

torch.manual_seed(0)
n_problems, n_samples = 2000, 64
times = torch.linspace(0, 4, n_samples, dtype=torch.float64)
amplitude = torch.rand(n_problems) * 2 + 0.5
rate = torch.rand(n_problems) * 1.5 + 0.3
offset = torch.randn(n_problems) * 0.2
truth = torch.stack([amplitude, rate, offset], dim=1).double()
signals = truth[:, :1] * torch.exp(-truth[:, 1:2] * times) + truth[:, 2:]
signals = signals + 0.01 * torch.randn_like(signals)


def loss(theta: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    """Mean squared error of one fit; ``batched_minimize`` vmaps it over the problems."""
    model = theta[0] * torch.exp(-theta[1] * times) + theta[2]
    return torch.mean((model - signal) ** 2)


options = {"tolerance_grad": 1e-10, "tolerance_change": 1e-14, "max_iter": 100}
theta0 = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64).expand(n_problems, 3).clone()
start = time.perf_counter()
result = torchlbfgs.batched_minimize(loss, theta0, signals, **options)
elapsed = time.perf_counter() - start

codes, counts = torch.unique(result.status, return_counts=True)
for code, count in zip(codes.tolist(), counts.tolist(), strict=True):
    print(f"{count:5d} problems: {torchlbfgs.status_message(code)}")
error = (result.params - truth).abs().max(dim=0).values
print(f"{n_problems} fits in {elapsed:.1f} s; largest error in (a, b, c): {error.tolist()}")
print(
    f"iterations per problem: min {int(result.n_iter.min())}, max {int(result.n_iter.max())}; "
    f"evaluations: mean {float(result.n_evals.double().mean()):.1f}, max {int(result.n_evals.max())}"
)
assert bool(result.converged.all()), "every fit should converge"
assert bool((error < 0.1).all()), "the fits should recover the parameters to within the noise"

# Any one fit is what solving that problem alone gives.
for i in (0, 1234):
    alone = torchlbfgs.minimize(lambda theta, i=i: loss(theta, signals[i]), theta0[i], **options)
    torch.testing.assert_close(alone.params, result.params[i], rtol=1e-10, atol=1e-12)
    assert int(alone.n_evals) == int(result.n_evals[i])
print("fits 0 and 1234 agree with solving them alone")
