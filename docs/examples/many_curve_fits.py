"""Thousands of independent curve fits in one batched run with ``torch.func.vmap(update)``.

Each of 2,000 noisy signals y(t) = a * exp(-b t) + c gets its own L-BFGS: its own history,
line search and convergence. Problems that have converged are frozen while the rest go on.
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


def make_loss(signal: torch.Tensor):
    def loss(theta: torch.Tensor) -> torch.Tensor:
        model = theta[0] * torch.exp(-theta[1] * times) + theta[2]
        return torch.mean((model - signal) ** 2)

    return loss


def init_one(theta, signal):
    return torchlbfgs.init(make_loss(signal), theta)


def update_one(theta, state, signal):
    return torchlbfgs.update(make_loss(signal), theta, state, tolerance_grad=1e-10, tolerance_change=1e-14)


theta = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64).expand(n_problems, 3).clone()
start = time.perf_counter()
state = torch.func.vmap(init_one)(theta, signals)
batched_update = torch.func.vmap(update_one)
for _ in range(100):
    theta, state = batched_update(theta, state, signals)
    if bool(state.stopped.all()):  # a host check between batched steps, outside vmap
        break
elapsed = time.perf_counter() - start

codes, counts = torch.unique(state.status, return_counts=True)
for code, count in zip(codes.tolist(), counts.tolist(), strict=True):
    print(f"{count:5d} problems: {torchlbfgs.status_message(code)}")
error = (theta - truth).abs().max(dim=0).values
print(f"{n_problems} fits in {elapsed:.1f} s; largest error in (a, b, c): {error.tolist()}")
print(f"iterations per problem: min {int(state.iteration.min())}, max {int(state.iteration.max())}")
assert bool(state.converged.all()), "every fit should converge"
assert bool((error < 0.1).all()), "the fits should recover the parameters to within the noise"
