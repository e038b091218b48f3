"""Line searches along a descent direction: strong Wolfe, Moré–Thuente, backtracking Armijo, or none.

Each is a pure function of tensors that evaluates ``fun`` once per step of a fixed-length,
masked loop, and reports its outcome as data (:class:`LineSearchResult`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch

from torchlbfgs.line_searches.backtracking import Backtracking
from torchlbfgs.line_searches.fixed import FixedStep
from torchlbfgs.line_searches.method import SearchMethod, SearchOrigin, run_search
from torchlbfgs.line_searches.more_thuente import MoreThuente
from torchlbfgs.line_searches.result import FlatLineSearchResult, LineSearchResult
from torchlbfgs.line_searches.strong_wolfe import StrongWolfe
from torchlbfgs.objective import FlatObjective, flat_objective
from torchlbfgs.options import require_line_search
from torchlbfgs.pytree import ravel_pytree
from torchlbfgs.sharding import LOCAL, Reductions

if TYPE_CHECKING:
    from torchlbfgs.bounds import Bounds

__all__ = [
    "LINE_SEARCHES",
    "LineSearch",
    "LineSearchResult",
    "line_search",
    "search_along",
    "search_method",
]

LineSearch = Literal["strong_wolfe", "more_thuente", "backtracking"] | None
LINE_SEARCHES: tuple[LineSearch, ...] = ("strong_wolfe", "more_thuente", "backtracking", None)


def search_method(
    method: LineSearch, *, c1: float, c2: float, tolerance_change: float, max_ls: int,
    reductions: Reductions = LOCAL,
) -> SearchMethod[Any]:  # fmt: skip
    """The state machine of the line search named ``method``, with its constants (and the
    vectors' ``reductions``, :mod:`torchlbfgs.sharding`)."""
    if method is None:
        return FixedStep(reductions=reductions)
    limits: dict[str, Any] = dict(tolerance_change=tolerance_change, max_ls=max_ls, reductions=reductions)
    if method == "strong_wolfe":
        return StrongWolfe(c1=c1, c2=c2, **limits)
    if method == "more_thuente":
        return MoreThuente(c1=c1, c2=c2, **limits)
    if method == "backtracking":
        return Backtracking(c1=c1, **limits)
    raise ValueError(f"line_search must be one of {LINE_SEARCHES}, got {method!r}")


def search_along(
    method: LineSearch,
    objective: FlatObjective,
    x: torch.Tensor,
    direction: torch.Tensor,
    value: torch.Tensor,
    grad: torch.Tensor,
    step_size: torch.Tensor,
    *,
    active: torch.Tensor,
    max_evals: int | torch.Tensor | None,
    c1: float,
    c2: float,
    tolerance_change: float,
    max_ls: int,
    early_exit: bool | None,
    max_step: torch.Tensor | None = None,
    bounds: Bounds | None = None,
    reductions: Reductions = LOCAL,
) -> FlatLineSearchResult:
    """Run the line search ``method`` on flat vectors (the form ``update`` uses); no trial
    step beyond ``max_step``, trial points projected onto ``bounds`` (if given)."""
    return run_search(
        search_method(
            method, c1=c1, c2=c2, tolerance_change=tolerance_change, max_ls=max_ls, reductions=reductions
        ),
        objective, x, SearchOrigin(direction, value, grad, max_step), step_size,
        active=active, max_evals=max_evals, early_exit=early_exit, bounds=bounds,
    )  # fmt: skip


def check_line_search_options(method: LineSearch, c1: float, c2: float, max_ls: int) -> None:
    """Raise ``ValueError`` for options no line search can honour (see :mod:`torchlbfgs.options`)."""
    require_line_search(method, c1, c2, max_ls, LINE_SEARCHES)


def line_search(
    fun: Callable[..., Any],
    params: Any,
    direction: Any,
    value: torch.Tensor,
    grad: Any,
    *,
    method: LineSearch = "strong_wolfe",
    step_size: float | torch.Tensor = 1.0,
    c1: float = 1e-4,
    c2: float = 0.9,
    tolerance_change: float = 1e-9,
    max_ls: int = 25,
    max_evals: int | torch.Tensor | None = None,
    value_and_grad: bool = False,
    early_exit: bool | None = None,
) -> LineSearchResult:
    r"""Search for a step along ``direction`` from ``params``.

    Methods:

    * ``"strong_wolfe"``: bracketing and zoom with cubic interpolation; the same decisions as
      ``torch.optim.lbfgs._strong_wolfe`` (including its limit of ``max_ls`` iterations after
      the first evaluation), plus a hard cap ``max_evals``.
    * ``"more_thuente"``: the safeguarded interval search of Moré & Thuente (1994), MINPACK-2's
      ``dcsrch`` as in L-BFGS-B, for the same strong Wolfe conditions; at most ``max_ls + 1``
      evaluations (see :mod:`torchlbfgs.line_searches.more_thuente`).
    * ``"backtracking"``: shrink the step until the Armijo condition
      :math:`f(x + t d) \le f(x) + c_1 t g^\top d` holds.
    * ``None``: evaluate once at ``params + step_size * direction`` and accept.

    Args:
        fun: ``fun(params) -> scalar tensor`` (or ``(value, grad)`` with ``value_and_grad``).
        params: the starting point, a pytree of tensors.
        direction: a descent direction, a pytree shaped like ``params``.
        value: ``fun(params)``.
        grad: the gradient of ``fun`` at ``params``, shaped like ``params``.
        method: ``"strong_wolfe"``, ``"more_thuente"``, ``"backtracking"`` or ``None``.
        step_size: the first trial step.
        c1: sufficient-decrease constant, ``0 < c1 < c2``.
        c2: curvature constant, ``c1 < c2 < 1``.
        tolerance_change: the search stops when the step interval times ``max|d|`` falls
            below this.
        max_ls: iteration limit of the search (torch's ``max_ls``; ``"more_thuente"`` and
            ``"backtracking"`` evaluate at most ``max_ls + 1`` times).
        max_evals: at most this many evaluations (an int or an integer tensor, e.g. what is
            left of a solver's budget); ``None`` for no cap beyond ``max_ls``.
        value_and_grad: ``fun`` returns ``(value, grad_pytree)`` itself.
        early_exit: stop calling ``fun`` once the search is done; see
            :mod:`torchlbfgs.line_searches.loop`. ``None`` decides automatically.

    Returns:
        a :class:`LineSearchResult`; failure is reported in ``success``, never raised.

    Examples:
        >>> import torch, torchlbfgs
        >>> fun = lambda x: ((x - 3.0) ** 2).sum()
        >>> x = torch.zeros(2, dtype=torch.float64)
        >>> g = torch.func.grad(fun)(x)
        >>> result = torchlbfgs.line_search(fun, x, -g, fun(x), g, step_size=1.0)
        >>> bool(result.success), float(result.step_size), int(result.n_evals)
        (True, 0.5, 2)
    """
    check_line_search_options(method, c1, c2, max_ls)
    x, unravel = ravel_pytree(params)
    flat_direction, direction_unravel = ravel_pytree(direction)
    flat_grad, grad_unravel = ravel_pytree(grad)
    for name, other in (("direction", direction_unravel), ("grad", grad_unravel)):
        if other.treedef != unravel.treedef or other.shapes != unravel.shapes:
            raise ValueError(f"{name} must have the structure and shapes of params")
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        raise ValueError("value must be a scalar tensor, fun(params)")
    objective = flat_objective(fun, unravel, value_and_grad=value_and_grad)
    flat = search_along(
        method, objective, x, flat_direction.to(x.dtype), value.to(x.dtype), flat_grad.to(x.dtype),
        torch.as_tensor(step_size, dtype=x.dtype, device=x.device),
        active=torch.ones((), dtype=torch.bool, device=x.device), max_evals=max_evals,
        c1=c1, c2=c2, tolerance_change=tolerance_change, max_ls=max_ls, early_exit=early_exit,
        reductions=unravel.reductions,
    )  # fmt: skip
    return LineSearchResult(flat.step_size, flat.value, unravel(flat.grad), flat.n_evals, flat.success)
