"""torchlbfgs: L-BFGS for PyTorch as pure functions over an immutable state pytree.

Examples:
    >>> import torch, torchlbfgs
    >>> fun = lambda p: (p["a"] - 1.0).pow(2).sum() + (p["b"] + 2.0).pow(2).sum()
    >>> params = {"a": torch.zeros(2), "b": torch.zeros(())}
    >>> state = torchlbfgs.init(fun, params)
    >>> for _ in range(3):
    ...     params, state = torchlbfgs.update(fun, params, state)
    >>> params["a"], params["b"], torchlbfgs.status_message(state.status)
    (tensor([1., 1.]), tensor(-2.), 'converged: max|gradient| <= tolerance_grad')
"""

from torchlbfgs.batched import batched_minimize
from torchlbfgs.direction import inv_hessian_product
from torchlbfgs.implicit import BackwardSolve, BackwardSolveWarning, ImplicitDiff
from torchlbfgs.line_searches import LineSearchResult, line_search
from torchlbfgs.minimize import Progress, Result, minimize, print_progress
from torchlbfgs.optim import LBFGS, to_torch_state_dict
from torchlbfgs.state import LBFGSState, StopReason, status_message
from torchlbfgs.update import init, update

__version__ = "0.1.0"

__all__ = [
    "LBFGS",
    "BackwardSolve",
    "BackwardSolveWarning",
    "ImplicitDiff",
    "LBFGSState",
    "LineSearchResult",
    "Progress",
    "Result",
    "StopReason",
    "__version__",
    "batched_minimize",
    "init",
    "inv_hessian_product",
    "line_search",
    "minimize",
    "print_progress",
    "status_message",
    "to_torch_state_dict",
    "update",
]
