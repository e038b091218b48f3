"""Choose the regularisation strength of 1,000 ridge regressions by gradient descent on their
validation losses, differentiating through ``torchlbfgs.batched_minimize``.

Each problem i fits weights w_i on its own training data with strength lam_i, and is scored on
its own validation data. The outer loop moves log(lam_i) down the gradient of the validation
loss at the fitted weights: ``implicit_diff=True`` makes the solution differentiable (implicit
function theorem), so ``.backward()`` runs one batched linear solve for all 1,000 problems and
stores nothing of the inner iterations. The script checks the hypergradient against ridge's
closed form and that every validation loss went down.
Run: ``python docs/examples/bilevel_ridge.py``
"""

import torch

import torchlbfgs

torch.manual_seed(0)
n_problems, n_train, n_valid, n_features = 1000, 20, 20, 8
true_w = torch.randn(n_problems, n_features, dtype=torch.float64)
noise = torch.rand(n_problems, 1, dtype=torch.float64) * 2  # how noisy each problem is


def make_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    X = torch.randn(n_problems, n, n_features, dtype=torch.float64)
    y = (X @ true_w.unsqueeze(-1)).squeeze(-1) + noise * torch.randn(n_problems, n, dtype=torch.float64)
    return X, y


X_train, y_train = make_data(n_train)
X_valid, y_valid = make_data(n_valid)


def training_loss(w: torch.Tensor, lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One problem's ridge objective; ``batched_minimize`` vmaps it over the problems."""
    return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * lam * (w @ w)


def validation_losses(w: torch.Tensor) -> torch.Tensor:
    return ((X_valid @ w.unsqueeze(-1)).squeeze(-1) - y_valid).pow(2).mean(-1)


log_lam = torch.full((n_problems,), -3.0, dtype=torch.float64, requires_grad=True)
outer = torch.optim.Adam([log_lam], lr=0.5)
w = torch.zeros(n_problems, n_features, dtype=torch.float64)
# Solve each problem to max|g| <= 1e-7 (and no other stopping test): the implicit gradient is
# that of the exact minimiser, so it is as accurate as the solution.
tolerances = {"tolerance_grad": 1e-7, "tolerance_change": 0.0}
for step in range(8):
    result = torchlbfgs.batched_minimize(
        training_loss, w, log_lam.exp(), X_train, y_train, implicit_diff=True, **tolerances
    )
    losses = validation_losses(result.params)
    if step == 0:
        first_losses = losses.detach()
    outer.zero_grad()
    losses.sum().backward()  # d(validation loss_i)/d(log lam_i), through the solutions
    outer.step()
    w = result.params.detach()  # warm start: the next solve begins at this one's solution
    print(f"step {step}: mean validation loss {float(losses.detach().mean()):.4f}")


# The hypergradient equals ridge's closed form, w*(lam) = (X'X/n + lam I)^-1 X'y/n.
def closed_form(lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    gram = X.mT @ X / X.shape[-2] + lam * torch.eye(n_features, dtype=X.dtype)
    return torch.linalg.solve(gram, X.mT @ y / X.shape[-2])


def validation_at(log_lam: torch.Tensor) -> torch.Tensor:
    lam = log_lam.exp()
    return validation_losses(torch.vmap(closed_form)(lam, X_train, y_train)).sum()


exact = torch.func.grad(validation_at)(log_lam.detach())
log_lam.grad = None
result = torchlbfgs.batched_minimize(
    training_loss, w, log_lam.exp(), X_train, y_train, implicit_diff=True, **tolerances
)
final_losses = validation_losses(result.params)
final_losses.sum().backward()
assert log_lam.grad is not None
error = float((log_lam.grad - exact).abs().max() / exact.abs().max())
print(f"hypergradient vs closed form: max relative error {error:.1e}")
assert error < 1e-5
improved = float((final_losses < first_losses).double().mean())
lam = log_lam.detach().exp()
print(
    f"validation loss went down for {improved:.1%} of the problems; "
    f"lam now ranges over [{float(lam.min()):.3g}, {float(lam.max()):.3g}]"
)
assert improved > 0.95
