"""Functional training loop: a small MLP fitted full-batch with torchlbfgs.init/update.

The model's parameters are a pytree (a dict from ``named_parameters``); the loss is a pure
function of it through ``torch.func.functional_call``. No optimizer object, no ``.grad``.
Run: ``python docs/examples/functional_mlp.py``
"""

import torch
from torch.func import functional_call

import torchlbfgs

torch.manual_seed(0)
inputs = torch.linspace(-3, 3, 200, dtype=torch.float64).unsqueeze(1)
targets = torch.sin(2 * inputs) + 0.3 * inputs
model = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).double()
params = {name: p.detach() for name, p in model.named_parameters()}


def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
    prediction = functional_call(model, params, (inputs,))
    return torch.mean((prediction - targets) ** 2)


state = torchlbfgs.init(loss, params, history_size=20)
initial = state.value
for iteration in range(300):
    params, state = torchlbfgs.update(loss, params, state, tolerance_grad=1e-9, tolerance_change=1e-12)
    if iteration % 50 == 0:
        iterations, evaluations = int(state.iteration), int(state.n_evals)
        print(f"iteration {iterations:4d}  evaluations {evaluations:4d}  loss {float(state.value):.3e}")
print("stopped:", torchlbfgs.status_message(state.status))
print(f"loss {float(initial):.3e} -> {float(state.value):.3e}")
assert state.value < 1e-3 * initial, "the MLP should fit the curve"
