r"""Differentiate a solution: gradients of :math:`x^*(\theta)` by the implicit function theorem.

At a minimiser :math:`x^*(\theta)` of :math:`f(x, \theta)` the gradient vanishes for every
:math:`\theta`, :math:`\nabla_x f(x^*(\theta), \theta) = 0`; differentiating that identity
gives (Blondel et al. 2022, "Efficient and modular implicit differentiation", eq. 2)

.. math::
    \frac{\partial x^*}{\partial \theta} = -H^{-1} \frac{\partial^2 f}{\partial x\,\partial\theta},
    \qquad H = \nabla^2_{xx} f(x^*, \theta).

A reverse-mode pass with cotangent :math:`v` therefore needs one linear solve
:math:`H u = v` and one vector-Jacobian product of :math:`-u` with
:math:`g(\theta) = \nabla_x f(x^*, \theta)`. That is how the solution is joined to
:math:`\theta` here, without storing any iteration of the solve:

* :func:`implicit_solution` evaluates :math:`g` once at the solution, with autodiff tracking
  everything ``f`` depends on (its arguments and the tensors it closes over), and passes it
  through an ``autograd.Function`` whose output is :math:`x^*` itself and whose backward maps
  :math:`v` to :math:`-H^{-1} v` (its forward-mode rule maps a tangent :math:`\dot g` to
  :math:`-H^{-1}\dot g`). The chain rule then gives exactly
  :math:`v^\top \partial x^*/\partial\theta = -(H^{-1} v)^\top \partial g/\partial\theta`,
  with ``torch.autograd`` and with ``torch.func`` (``grad``, ``vjp``, ``jacrev``, ``jvp``,
  ``jacfwd``; the ``vmap`` rule is generated).
* :math:`H u = v` is solved matrix-free by conjugate gradients (Hestenes & Stiefel 1952) on
  Hessian-vector products (``torch.func.vjp`` of ``torch.func.grad``: the gradient's graph at
  :math:`x^*` is built once, and each product is one backward pass through it),
  optionally preconditioned by the solve's final L-BFGS inverse-Hessian approximation
  :math:`H_k` (N&W eq. 7.19), which is :math:`H^{-1}` along the recent steps.
* With bounds, a variable at a bound stays there: its derivative is the bound's (zero for a
  constant bound), and the free variables :math:`F` solve with the Hessian's free block,
  :math:`\partial x_F^* = -H_{FF}^{-1} \partial g_F` (the reduced problem L-BFGS-B converges
  on). :math:`g` is then evaluated at the solution with the bounds' values (and their
  autodiff) in the bound variables, so bounds that depend on :math:`\theta` are accounted for.

The derivative is that of the exact minimiser: it is right to the extent that the solve
converged, and meaningful at a strict local minimum (:math:`H` positive definite on the free
variables). Only first derivatives are provided (the backward is not itself differentiable).

Examples:
    >>> import torch, torchlbfgs
    >>> def ridge(w, lam, X, y):
    ...     return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * (w @ w)
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(20, 3, generator=g, dtype=torch.float64)
    >>> y = torch.randn(20, generator=g, dtype=torch.float64)
    >>> lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    >>> w = torchlbfgs.minimize(ridge, torch.zeros(3, dtype=torch.float64), lam, X, y,
    ...                         implicit_diff=True, tolerance_grad=1e-10, tolerance_change=0.0).params
    >>> w.sum().backward()
    >>> closed_form = lambda lam: torch.linalg.solve(X.T @ X + lam * torch.eye(3, dtype=X.dtype), X.T @ y)
    >>> exact = torch.func.grad(lambda lam: closed_form(lam).sum())(lam.detach())
    >>> bool(torch.allclose(lam.grad, exact))
    True
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import optree
import torch

from torchlbfgs.bounds import Bounds
from torchlbfgs.direction import inv_hessian_product
from torchlbfgs.history import History
from torchlbfgs.line_searches.loop import batch_view, stop_check_interval
from torchlbfgs.options import require_choice, require_count, require_tolerance

__all__ = [
    "Adjoint",
    "BackwardSolve",
    "BackwardSolveWarning",
    "ConjugateGradients",
    "ImplicitDiff",
    "cg_iteration",
    "cg_outcome",
    "cg_start",
    "conjugate_gradient",
    "implicit_solution",
    "join_solution",
    "report_solve",
    "solve_inputs",
    "solve_limits",
]

BackwardSolver = Literal["cg", "preconditioned_cg"]
BACKWARD_SOLVERS: tuple[BackwardSolver, ...] = ("cg", "preconditioned_cg")


class BackwardSolveWarning(RuntimeWarning):
    """The linear solve of a backward pass through a solution did not reach its tolerance.

    Examples:
        >>> import warnings, torch, torchlbfgs
        >>> theta = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
        >>> fun = lambda x, theta: ((x - theta) ** 2 * torch.tensor([1.0, 10.0, 100.0])).sum()
        >>> x = torchlbfgs.minimize(fun, torch.zeros(3, dtype=torch.float64), theta,
        ...                         implicit_diff=torchlbfgs.ImplicitDiff(solver="cg", max_iter=1)).params
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     x.sum().backward()
        >>> [w.category.__name__ for w in caught]
        ['BackwardSolveWarning']
    """


class BackwardSolve(NamedTuple):
    """How the linear solve :math:`H u = v` of one backward pass went (``ImplicitDiff.on_solve``).

    Under ``vmap`` each field holds the whole batch (read beneath the vmap wrapper).

    Attributes:
        converged: bool - the relative residual reached the tolerance (``False`` too where
            :math:`H` showed a direction of non-positive curvature: no strict minimum).
        iterations: int64 - conjugate-gradient iterations (Hessian-vector products) taken.
        residual: :math:`\\|H u - v\\| / \\|v\\|` as the iteration tracks it (0 for ``v = 0``).

    Examples:
        >>> import torch, torchlbfgs
        >>> reports = []
        >>> lam = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64, requires_grad=True)
        >>> fun = lambda x, lam: ((x - 1.0) ** 2).sum() + lam * (x ** 2).sum()
        >>> x = torchlbfgs.batched_minimize(fun, torch.zeros(3, 4, dtype=torch.float64), lam,
        ...     implicit_diff=torchlbfgs.ImplicitDiff(on_solve=reports.append)).params
        >>> x.sum().backward()                      # one batched solve for the three problems
        >>> reports[0].converged, reports[0].iterations
        (tensor([True, True, True]), tensor([1, 1, 1]))
    """

    converged: torch.Tensor
    iterations: torch.Tensor
    residual: torch.Tensor


@dataclass(frozen=True)
class ImplicitDiff:
    """Options of implicit differentiation (``implicit_diff=`` of :func:`~torchlbfgs.minimize`).

    ``implicit_diff=True`` means ``ImplicitDiff()``, the defaults below.

    Attributes:
        solver: ``"cg"`` (default): conjugate gradients; ``"preconditioned_cg"``: conjugate
            gradients preconditioned by the solve's final L-BFGS memory, which saved 5-15% of
            the iterations where we measured (``bench/implicit.py``, the tests' quartic) and
            pays where a Hessian-vector product costs much more than the ``4m`` vector
            operations of the two-loop recursion (not on small batched problems).
        tolerance: stop once :math:`\\|H u - v\\| \\le` ``tolerance`` :math:`\\|v\\|`;
            ``None``: :math:`\\epsilon^{3/4}` of the dtype (about ``2e-12`` in float64,
            ``6e-6`` in float32).
        max_iter: at most this many iterations (one Hessian-vector product each); ``None``:
            ``10 n`` for ``n`` parameters, as ``jax.scipy.sparse.linalg.cg``.
        on_solve: called with a :class:`BackwardSolve` after each backward solve (e.g.
            ``reports.append``). Whatever it is, a solve that misses its tolerance warns
            with :class:`BackwardSolveWarning`; both read the outcome on the host (one sync
            per backward pass on GPUs).

    Examples:
        >>> import torch, torchlbfgs
        >>> reports = []
        >>> options = torchlbfgs.ImplicitDiff(solver="cg", on_solve=reports.append)
        >>> theta = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> fun = lambda x, theta: ((x - theta) ** 2).sum() + (x ** 4).sum()
        >>> x = torchlbfgs.minimize(fun, torch.zeros(2, dtype=torch.float64), theta,
        ...                         implicit_diff=options).params
        >>> x.sum().backward()
        >>> bool(reports[0].converged), int(reports[0].iterations)  # H has 2 distinct eigenvalues
        (True, 2)
    """

    solver: BackwardSolver = "cg"
    tolerance: float | None = None
    max_iter: int | None = None
    on_solve: Callable[[BackwardSolve], None] | None = None

    def __post_init__(self) -> None:
        require_choice("ImplicitDiff.solver", self.solver, BACKWARD_SOLVERS)
        if self.tolerance is not None:
            require_tolerance("ImplicitDiff.tolerance", self.tolerance)
        if self.max_iter is not None:
            require_count("ImplicitDiff.max_iter", self.max_iter, 1)

    @staticmethod
    def of(option: bool | ImplicitDiff, *, value_and_grad: bool = False) -> ImplicitDiff | None:
        """The options an ``implicit_diff=`` argument asks for (``None``: no implicit
        differentiation), for a solve with the given ``value_and_grad``."""
        if option is False:
            return None
        if not (option is True or isinstance(option, ImplicitDiff)):
            raise TypeError(f"implicit_diff must be True, False or a torchlbfgs.ImplicitDiff, got {option!r}")
        if value_and_grad:
            raise ValueError(
                "implicit_diff needs value_and_grad=False: it differentiates fun itself (Hessian-vector "
                "products with torch.func), so fun must return the value only"
            )
        return ImplicitDiff() if option is True else option


@contextlib.contextmanager
def solve_inputs(implicit: ImplicitDiff | None, inputs: Any) -> Iterator[Any]:
    """``inputs`` (a pytree) for a solve: as they are, or, for a solve that implicit
    differentiation replaces, with every tensor detached (from autograd, ``torch.func.grad``
    levels and forward-mode tangents; ``vmap`` batching is kept) and under ``torch.no_grad``,
    so that no autodiff records the iterations (``no_grad`` also stops ``torch.func.grad``
    levels outside the solve, and closed-over tensors, while the solve's own
    ``torch.func.grad_and_value`` still works)."""
    if implicit is None:
        yield inputs
        return
    with torch.no_grad():
        yield optree.tree_map(
            lambda leaf: leaf.detach() if isinstance(leaf, torch.Tensor) else leaf, inputs, none_is_leaf=True
        )


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


class ConjugateGradients(NamedTuple):
    """Where a (batched) conjugate-gradient solve stands; every leaf has the problems' leading
    dimensions, so a batch can be indexed, compacted and reassembled leaf by leaf.

    Attributes:
        u: the solution so far; ``r``: the residual ``rhs - A u``; ``p``: the search direction;
        ``rz``: ``r . z`` with ``z`` the preconditioned residual.
        target: stop once ``|r| <= target`` (``tolerance |rhs|``); ``rhs_norm``: ``|rhs|``.
        done: stopped (converged, or no minimum); ``failed``: met non-positive curvature;
        ``iterations``: products taken.
    """

    u: torch.Tensor
    r: torch.Tensor
    p: torch.Tensor
    rz: torch.Tensor
    target: torch.Tensor
    rhs_norm: torch.Tensor
    done: torch.Tensor
    failed: torch.Tensor
    iterations: torch.Tensor


def cg_start(
    rhs: torch.Tensor, precondition: Callable[[torch.Tensor], torch.Tensor], tolerance: float
) -> ConjugateGradients:
    """Conjugate gradients for ``A u = rhs`` from ``u = 0``."""
    rhs_norm = torch.linalg.vector_norm(rhs, dim=-1)
    target = tolerance * rhs_norm
    z = precondition(rhs)
    done = rhs_norm <= target
    return ConjugateGradients(
        u=torch.zeros_like(rhs), r=rhs, p=z, rz=_dot(rhs, z), target=target, rhs_norm=rhs_norm,
        done=done, failed=torch.zeros_like(done),
        iterations=torch.zeros(done.shape, dtype=torch.int64, device=rhs.device),
    )  # fmt: skip


def cg_iteration(
    cg: ConjugateGradients,
    matvec: Callable[[torch.Tensor], torch.Tensor],
    precondition: Callable[[torch.Tensor], torch.Tensor],
) -> ConjugateGradients:
    """One iteration of (preconditioned) conjugate gradients (N&W Algorithm 5.3), branch-free:
    problems that are done stay as they are, and one that meets a direction of non-positive
    curvature stops where it is, failed."""
    hp = matvec(cg.p)
    curvature = _dot(cg.p, hp)
    no_minimum = ~cg.done & ~(curvature > 0)  # non-positive (or NaN) curvature along p
    moving = ~cg.done & ~no_minimum
    alpha = torch.where(moving, cg.rz / torch.where(moving, curvature, 1.0), 0.0)
    u = cg.u + alpha.unsqueeze(-1) * cg.p
    r = cg.r - alpha.unsqueeze(-1) * hp
    z = precondition(r)
    rz_next = _dot(r, z)
    beta = torch.where(moving, rz_next / torch.where(moving, cg.rz, 1.0), 0.0)
    return cg._replace(
        u=u, r=r, p=torch.where(moving.unsqueeze(-1), z + beta.unsqueeze(-1) * cg.p, cg.p),
        rz=torch.where(moving, rz_next, cg.rz),
        done=cg.done | no_minimum | (torch.linalg.vector_norm(r, dim=-1) <= cg.target),
        failed=cg.failed | no_minimum, iterations=cg.iterations + moving.long(),
    )  # fmt: skip


def cg_outcome(cg: ConjugateGradients) -> BackwardSolve:
    """The report of a finished solve."""
    residual_norm = torch.linalg.vector_norm(cg.r, dim=-1)
    has_rhs = cg.rhs_norm > 0
    residual = torch.where(has_rhs, residual_norm / torch.where(has_rhs, cg.rhs_norm, 1.0), 0.0)
    return BackwardSolve(~cg.failed & (residual_norm <= cg.target), cg.iterations, residual)


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    *,
    precondition: Callable[[torch.Tensor], torch.Tensor] | None = None,
    tolerance: float,
    max_iter: int,
) -> tuple[torch.Tensor, BackwardSolve]:
    """Solve ``matvec(u) = rhs`` for a symmetric positive-definite operator by (preconditioned)
    conjugate gradients (N&W Algorithm 5.3), branch-free.

    A problem that has converged, or meets a direction of non-positive curvature (then it
    stops where it is and reports ``converged=False``), is frozen by masks while the others go
    on, so the loop batches under ``vmap``; it ends once every problem has stopped, read on the
    host every iteration where that is free and every 16 iterations on other devices
    (:func:`~torchlbfgs.line_searches.loop.stop_check_interval`), or after ``max_iter``.

    Examples:
        >>> import torch
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> u, report = conjugate_gradient(lambda p: A @ p, b, tolerance=1e-12, max_iter=10)
        >>> bool(torch.allclose(A @ u, b)), int(report.iterations)
        (True, 2)
    """
    precondition = precondition or _identity
    cg = cg_start(rhs, precondition, tolerance)
    check_every = stop_check_interval(None, cg.done)
    for k in range(max_iter):
        checking = check_every is not None and k % check_every == 0
        if checking and bool(batch_view(cg.done).all()):  # sync-ok: as often as stop_check_interval allows
            break
        cg = cg_iteration(cg, matvec, precondition)
    return cg.u, cg_outcome(cg)


def _identity(r: torch.Tensor) -> torch.Tensor:
    return r


def solve_limits(options: ImplicitDiff, x: torch.Tensor) -> tuple[float, int]:
    """The tolerance and iteration cap of a backward solve for the iterate ``x`` (``(..., n)``)."""
    tolerance = torch.finfo(x.dtype).eps ** 0.75 if options.tolerance is None else options.tolerance
    return tolerance, 10 * x.shape[-1] if options.max_iter is None else options.max_iter


def report_solve(options: ImplicitDiff, report: BackwardSolve, tolerance: float, max_iter: int) -> None:
    """Hand a backward solve's outcome to ``on_solve``, and warn if any problem missed its tolerance."""
    if torch.compiler.is_compiling():
        return
    whole = BackwardSolve(*(batch_view(field) for field in report))
    if options.on_solve is not None:
        options.on_solve(whole)
    missed = ~whole.converged
    if bool(missed.any()):  # sync-ok: one read per backward pass, to warn
        worst = float(whole.residual[missed].max())  # sync-ok: the warning's text
        warnings.warn(
            f"torchlbfgs: the backward solve of implicit differentiation missed its tolerance "
            f"for {int(missed.sum())} of {missed.numel()} problem(s) (relative residual up to "
            f"{worst:.2e}, tolerance {tolerance:.2e}, at most {max_iter} iterations): their "
            "gradients are inexact. Raise ImplicitDiff(max_iter=...), loosen its tolerance, or "
            "check that the solution is a strict local minimum (Hessian positive definite).",
            BackwardSolveWarning,
            stacklevel=3,
        )


class Adjoint(Protocol):
    """The backward solve of :func:`join_solution`: :math:`u` with :math:`H_{FF} u_F = v_F` and
    :math:`u = 0` off the free set ``F``, at ``x`` (the solution) with the solve's final
    L-BFGS ``memory``."""

    def solve(
        self, x: torch.Tensor, free: torch.Tensor, memory: list[torch.Tensor], v: torch.Tensor
    ) -> torch.Tensor: ...


@dataclass(frozen=True, eq=False)
class _Adjoint:
    """What the backward pass needs besides tensors: the objective and the solve's options."""

    value_of: Callable[[torch.Tensor], torch.Tensor]  # x -> f(x, theta), closing over theta
    options: ImplicitDiff

    def solve(
        self, x: torch.Tensor, free: torch.Tensor, memory: list[torch.Tensor], v: torch.Tensor
    ) -> torch.Tensor:
        """:math:`u` with :math:`H_{FF} u_F = v_F` and :math:`u = 0` off the free set ``F``."""
        # H p as the vector-Jacobian product of the gradient (H is symmetric): the gradient's
        # graph at x is built once and reused by every product, which then costs one backward
        # pass through it (several times cheaper than torch.func.jvp of the gradient).
        gradient_vjp = torch.func.vjp(torch.func.grad(self.value_of), x)[1]

        def hessian_times(p: torch.Tensor) -> torch.Tensor:
            (product,) = gradient_vjp(torch.where(free, p, 0.0))
            return torch.where(free, product, p)

        precondition = None
        if self.options.solver == "preconditioned_cg":
            history = History(*memory)

            def precondition(r: torch.Tensor) -> torch.Tensor:
                return torch.where(free, inv_hessian_product(history, torch.where(free, r, 0.0)), r)

        tolerance, max_iter = solve_limits(self.options, x)
        u, report = conjugate_gradient(
            hessian_times, torch.where(free, v, 0.0), precondition=precondition, tolerance=tolerance,
            max_iter=max_iter,
        )  # fmt: skip
        report_solve(self.options, report, tolerance, max_iter)
        return u


class _Solution(torch.autograd.Function):
    """``x`` itself, joined to ``grad`` = :math:`\\nabla_x f(x, \\theta)` by the implicit
    function theorem: a cotangent ``v`` of the output becomes ``-H^-1 v`` for ``grad``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, grad: torch.Tensor, free: torch.Tensor, adjoint: Adjoint,
                *memory: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, _, free, adjoint, *memory = inputs
        ctx.adjoint = adjoint
        ctx.n_memory = len(memory)
        ctx.save_for_backward(x, free, *memory)
        ctx.save_for_forward(x, free, *memory)

    @staticmethod
    def backward(ctx: Any, cotangent: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, free, *memory = ctx.saved_tensors
        minus_u = -ctx.adjoint.solve(x, free, memory, cotangent)
        return (None, minus_u, None, None, *(None,) * ctx.n_memory)

    @staticmethod
    def jvp(ctx: Any, x_dot: Any, grad_dot: torch.Tensor | None, *rest: Any) -> torch.Tensor:
        x, free, *memory = ctx.saved_tensors
        if grad_dot is None:
            return torch.zeros_like(x)
        adjoint: Adjoint = ctx.adjoint
        return -adjoint.solve(x, free, memory, grad_dot)


def implicit_solution(
    value_of: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    memory: History,
    bounds: Bounds | None,
    options: ImplicitDiff,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The solution ``x`` of :math:`\\min f` (flat, found without autodiff) joined to what
    ``value_of`` (``x -> f(x)``) depends on by implicit differentiation, and :math:`f` there.

    Returns ``(solution, value)``: ``solution`` equals ``x`` and differentiates as the exact
    minimiser would (see the module docstring); ``value`` is :math:`f` at ``x``, whose
    derivative is then :math:`\\partial f/\\partial\\theta` (the envelope theorem). ``memory``
    is the solve's final L-BFGS memory (the preconditioner); ``bounds`` may carry autodiff.
    """
    return join_solution(torch.func.grad_and_value(value_of), x, memory, bounds, _Adjoint(value_of, options))


def join_solution(
    gradient_and_value: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    memory: History,
    bounds: Bounds | None,
    adjoint: Adjoint,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`implicit_solution` for any shape of ``x`` (one problem, or a batch ``(B, n)``):
    ``gradient_and_value(x)`` evaluates :math:`(\\nabla f, f)` with autodiff, and ``adjoint``
    solves the backward's linear systems."""
    x = x.detach()
    if bounds is None:
        free = torch.ones_like(x, dtype=torch.bool)
        point = x
    else:
        at_lower, at_upper = x <= bounds.lower.detach(), x >= bounds.upper.detach()
        free = ~(at_lower | at_upper)
        point = torch.where(at_lower, bounds.lower, torch.where(at_upper, bounds.upper, x))
    grad, value = gradient_and_value(point)
    solution: torch.Tensor = _Solution.apply(  # type: ignore[no-untyped-call]
        x, grad, free, adjoint, *(leaf.detach() for leaf in memory)
    )
    if bounds is not None:
        solution = torch.where(free, solution, point)
    return solution, value
