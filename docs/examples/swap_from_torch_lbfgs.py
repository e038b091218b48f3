"""Swap ``torch.optim.LBFGS`` for ``torchlbfgs.LBFGS`` in the middle of training.

``torchlbfgs.LBFGS.load_state_dict`` accepts ``torch.optim.LBFGS``'s state dict and converts
it, curvature history included, so the swap loses nothing: from then on the new optimizer
takes exactly the iterates torch would have taken. This script trains a small MLP with torch
for a few steps, swaps a copy of the run to torchlbfgs, continues both side by side, and checks
after every step that the params are bit-for-bit equal and that both called the closure
equally often. (``torchlbfgs.to_torch_state_dict`` converts the other way.)

Run: ``python docs/examples/swap_from_torch_lbfgs.py``; exits non-zero if a claim fails.
"""

from __future__ import annotations

import copy
import sys

import torch

import torchlbfgs

OPTIONS = {"lr": 1.0, "max_iter": 5, "history_size": 5, "line_search_fn": "strong_wolfe"}
STEPS_WITH_TORCH = 4
STEPS_AFTER_SWAP = 6

torch.manual_seed(0)
inputs = torch.linspace(-3, 3, 200, dtype=torch.float64).unsqueeze(1)
targets = torch.sin(2 * inputs) + 0.3 * inputs
model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()


class Closure:
    """zero_grad, loss, backward, return loss; counts its calls."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer, self.calls = model, optimizer, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        self.optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(self.model(inputs), targets)
        loss.backward()
        return loss


# 1. Train with torch.optim.LBFGS.
torch_optimizer = torch.optim.LBFGS(model.parameters(), **OPTIONS)
torch_closure = Closure(model, torch_optimizer)
print("torch.optim.LBFGS:")
for step in range(STEPS_WITH_TORCH):
    loss = torch_optimizer.step(torch_closure)
    print(f"  step {step + 1:2d}  loss {loss.item():.10e}")

# 2. Swap: a copy of the model, a torchlbfgs.LBFGS over it, loading torch's state dict.
#    (Load right away: torch's state_dict() shares tensors that its next step modifies.)
swapped_model = copy.deepcopy(model)
ours = torchlbfgs.LBFGS(swapped_model.parameters(), **OPTIONS)
ours.load_state_dict(torch_optimizer.state_dict())
our_closure = Closure(swapped_model, ours)
torch_pairs = len(torch_optimizer.state_dict()["state"][0]["old_dirs"])
print(f"swapped to torchlbfgs.LBFGS with torch's {torch_pairs} curvature pairs")
if int(ours.state_dict()["state"][0]["n_pairs"]) != torch_pairs:
    sys.exit("FAILED: the curvature history was not carried over")

# 3. Continue both: torch from its own state, torchlbfgs from the converted one.
print("continuing both:")
for step in range(STEPS_WITH_TORCH, STEPS_WITH_TORCH + STEPS_AFTER_SWAP):
    torch_closure.calls = our_closure.calls = 0
    torch_loss = torch_optimizer.step(torch_closure)
    our_loss = ours.step(our_closure)
    same_params = all(
        torch.equal(p, q) for p, q in zip(model.parameters(), swapped_model.parameters(), strict=True)
    )
    print(
        f"  step {step + 1:2d}  loss {torch_loss.item():.10e} (torch) {our_loss.item():.10e} (torchlbfgs)"
        f"  closure calls {torch_closure.calls}/{our_closure.calls}  params identical: {same_params}"
    )
    if not (same_params and torch_closure.calls == our_closure.calls and torch.equal(torch_loss, our_loss)):
        sys.exit("FAILED: torchlbfgs.LBFGS left torch.optim.LBFGS's iterates after the swap")
print("OK: after the swap, torchlbfgs.LBFGS takes exactly torch.optim.LBFGS's iterates.")
