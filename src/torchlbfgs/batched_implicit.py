"""The backward pass of ``batched_minimize(..., implicit_diff=...)``: the batch's linear solves
as one conjugate-gradient run whose problems leave as they converge.

Implicit differentiation of B solutions solves :math:`H_i u_i = v_i` for each problem
(:mod:`torchlbfgs.implicit`). Under ``vmap`` (as for ``vmap(minimize)``) those conjugate
gradients run in lockstep, every problem until the slowest has converged. Here the batch
shrinks to the problems still iterating (:mod:`torchlbfgs.compaction`, as in the rounds of the
solve), so the work is about the sum of the iterations the problems need. The Hessian-vector
products are built for the current problems only: eagerly, one pullback of the batch's
gradient per compaction, each product then one backward pass through it; with ``compile``
(the solve's option), one ``torch.compile``-d iteration (products by reverse-over-reverse
autodiff, then the update) whose batch dimension is dynamic, so the shrinking batch reuses one
graph; on the CPU the iterations between two compactions run in one call of it, as a
``while_loop`` (:func:`~torchlbfgs.compaction.steps_until_shrink`). Each problem's iterates
are those it would have alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch._C._functorch import get_unwrapped, is_batchedtensor, is_functorch_wrapped_tensor

from torchlbfgs.compaction import (
    ActiveBatch,
    active_batch,
    call_with_counts,
    map_leaves,
    should_shrink,
    steps_until_shrink,
)
from torchlbfgs.compiled import CompiledStep
from torchlbfgs.direction import inv_hessian_product
from torchlbfgs.history import History
from torchlbfgs.implicit import (
    ConjugateGradients,
    ImplicitDiff,
    cg_iteration,
    cg_outcome,
    cg_start,
    conjugate_gradient,
    report_solve,
    solve_limits,
)
from torchlbfgs.line_searches.loop import stop_check_interval
from torchlbfgs.pytree import ravel_pytree

__all__ = ["BatchedAdjoint"]

PyTree = Any


class _Systems(NamedTuple):
    """The backward solve of the current problems (every leaf batched along dimension 0)."""

    cg: ConjugateGradients
    x: torch.Tensor  # the solutions, (B, n)
    free: torch.Tensor  # variables not at a bound, (B, n)
    memory: History  # the solves' final L-BFGS memory (the preconditioner)


Operator = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class BatchedAdjoint:
    """Solves the backward's systems of :func:`~torchlbfgs.batched_minimize` (an
    :class:`~torchlbfgs.implicit.Adjoint` for batches ``(B, n)``).

    ``fun(params, *data)`` is one problem's objective, ``template`` one problem's params (their
    layout), ``data`` the problems' args without autodiff and ``dims`` their batch dimensions
    (``None``: shared); ``compile``: the solve's option, applied to one CG iteration.
    """

    fun: Callable[..., torch.Tensor]
    template: PyTree
    data: tuple[Any, ...]
    dims: tuple[Any, ...]
    options: ImplicitDiff
    bounded: bool = False
    compile: bool | Mapping[str, Any] = False
    # compiled steps, made at their first use (not copied by dataclasses.replace)
    _compiled: list[Callable[..., ConjugateGradients]] = field(default_factory=list, init=False)
    _compiled_stretch: list[tuple[CompiledStep, Callable[..., ConjugateGradients]]] = field(
        default_factory=list, init=False
    )

    def solve(
        self, x: torch.Tensor, free: torch.Tensor, memory: list[torch.Tensor], v: torch.Tensor
    ) -> torch.Tensor:
        """:math:`u_i` with :math:`H_{i,FF} u_{i,F} = v_{i,F}` and zero off the free set, per row."""
        tolerance, max_iter = solve_limits(self.options, x)
        history = History(*memory)
        rhs = torch.where(free, v, 0.0)
        if _vmapped(v):
            # Under vmap (jacrev of batched_minimize vmaps the backward over cotangents): the
            # masked loop, which batches, as compaction's data-dependent shapes cannot.
            hessian_times, precondition = self._operators(x, free, history, self.data)
            u, report = conjugate_gradient(
                hessian_times, rhs, precondition=precondition, tolerance=tolerance, max_iter=max_iter
            )
        else:
            cg = cg_start(rhs, self._preconditioner(free, history), tolerance)
            # torch.func.grad's wrapped tensors are traced by no compile: eager iterations there
            compiled = self.compile is not False and not any(map(is_functorch_wrapped_tensor, (x, v)))
            u, report = self._compacting_solve(_Systems(cg, x, free, history), max_iter, compiled=compiled)
        report_solve(self.options, report, tolerance, max_iter)
        return u

    def _compacting_solve(
        self, systems: _Systems, max_iter: int, *, compiled: bool
    ) -> tuple[torch.Tensor, Any]:
        if compiled:
            # Distinct, contiguous leaves, as an iteration returns them (the start's direction is
            # its residual): a compiled iteration would guard on aliasing and compile again.
            systems = map_leaves(lambda leaf: leaf.clone(memory_format=torch.contiguous_format), systems)
        batch = active_batch(systems, self.data, self.dims, self.compile if compiled else False)
        check_every = stop_check_interval(None, systems.cg.done)
        # compiled where the flags are read every iteration: the iterations between two
        # compactions in one call (a while_loop), as the solve's rounds (torchlbfgs.batched)
        stretches = compiled and check_every == 1
        step = self._step(batch, compiled=compiled, stretches=stretches)
        k = 0
        while k < max_iter:
            if check_every is not None and k % check_every == 0:
                running = ~batch.state.cg.done
                keep = running.nonzero().squeeze(1)  # sync-ok: as often as stop_check_interval allows
                if keep.numel() == 0:
                    break
                if should_shrink(keep.numel(), running.numel()) and batch.can_shrink:
                    batch.shrink(keep)
                    step = self._step(batch, compiled=compiled, stretches=stretches)
            cg, k = step(batch.state, k, max_iter)
            batch.state = batch.state._replace(cg=cg)
        whole = batch.whole().cg
        return whole.u, cg_outcome(whole)

    def _step(
        self, batch: ActiveBatch[_Systems], *, compiled: bool, stretches: bool
    ) -> Callable[[_Systems, int, int], tuple[ConjugateGradients, int]]:
        """``step(systems, done, last)``: CG iterations of the current problems after ``done``,
        and the iterations done then: one, or (``stretches``) compiled, in one call, as many as
        run before the batch should shrink, every problem has converged or ``last``."""
        data = batch.args
        if stretches:
            run, iteration = self._compiled_iterations()
            stretch = _stretch_of(iteration, batch.can_shrink)

            def iterations(systems: _Systems, done: int, last: int) -> tuple[ConjugateGradients, int]:
                return call_with_counts(run, stretch, systems, done, last, self.template, *data)

            return iterations
        if compiled:
            iterate = self._compiled_iteration()
            return lambda systems, done, last: (iterate(systems, self.template, *data), done + 1)
        state = batch.state
        hessian_times, precondition = self._operators(state.x, state.free, state.memory, data)
        return lambda systems, done, last: (cg_iteration(systems.cg, hessian_times, precondition), done + 1)

    def _operators(
        self, x: torch.Tensor, free: torch.Tensor, memory: History, data: tuple[Any, ...]
    ) -> tuple[Operator, Operator]:
        """Eager Hessian products at ``x`` (the vector-Jacobian product of the batch's gradient,
        whose graph is built once here: each product is one backward pass through it) and the
        preconditioner."""
        gradient = torch.func.vmap(torch.func.grad(self.value_of_one), in_dims=(0, None, *self.dims))
        pullback = torch.func.vjp(lambda z: gradient(z, self.template, *data), x)[1]

        def hessian_times(p: torch.Tensor) -> torch.Tensor:
            product: torch.Tensor = pullback(p)[0]
            return product

        return self._on_free(hessian_times, free), self._preconditioner(free, memory)

    def _preconditioner(self, free: torch.Tensor, memory: History) -> Operator:
        return _preconditioner(self.options.solver, free, memory, bounded=self.bounded)

    def _on_free(self, operator: Operator, free: torch.Tensor) -> Operator:
        return _on_free(operator, free) if self.bounded else operator

    def _compiled_iterations(self) -> tuple[CompiledStep, Callable[..., ConjugateGradients]]:
        """The compiled stretch of CG iterations (:func:`_stretch_of`) and the iteration it repeats."""
        if not self._compiled_stretch:
            options = {} if self.compile is True else dict(self.compile)  # type: ignore[arg-type]
            iteration = _iteration_of(self.fun, self.dims, self.options.solver, bounded=self.bounded)
            run = CompiledStep("batched_minimize implicit CG iterations", self.fun, options, loops=True)
            self._compiled_stretch.append((run, iteration))
        return self._compiled_stretch[0]

    def _compiled_iteration(self) -> Callable[..., ConjugateGradients]:
        if not self._compiled:
            options = {} if self.compile is True else dict(self.compile)  # type: ignore[arg-type]
            iteration = _iteration_of(self.fun, self.dims, self.options.solver, bounded=self.bounded)
            run = CompiledStep("batched_minimize implicit CG iteration", self.fun, options)
            self._compiled.append(functools.partial(run, iteration))
        return self._compiled[0]

    def value_of_one(self, z: torch.Tensor, template: PyTree, *data: Any) -> torch.Tensor:
        """One problem's objective at the flat ``z`` (the layout rebuilt from ``template``, which
        a compiled iteration traces rather than closing over)."""
        return _value_of_one(self.fun, z, template, *data)


def _value_of_one(
    fun: Callable[..., torch.Tensor], z: torch.Tensor, template: PyTree, *data: Any
) -> torch.Tensor:
    value: torch.Tensor = fun(ravel_pytree(template)[1](z), *data)
    return value


def _on_free(operator: Operator, free: torch.Tensor) -> Operator:
    """``operator`` on the free variables, the identity on the others (which stay zero). Only
    with bounds: the masks around a compiled product double its cost (measured, B=1024)."""

    def restricted(p: torch.Tensor) -> torch.Tensor:
        return torch.where(free, operator(torch.where(free, p, 0.0)), p)

    return restricted


def _preconditioner(solver: str, free: torch.Tensor, memory: History, *, bounded: bool) -> Operator:
    """The final L-BFGS memories' :math:`H_k` on the free variables (``preconditioned_cg``)."""
    if solver != "preconditioned_cg":
        return _no_op
    apply_memory = torch.func.vmap(inv_hessian_product)

    def precondition(r: torch.Tensor) -> torch.Tensor:
        return apply_memory(memory, r)

    return _on_free(precondition, free) if bounded else precondition


def _iteration_of(
    fun: Callable[..., torch.Tensor], dims: tuple[Any, ...], solver: str, *, bounded: bool
) -> Callable[..., ConjugateGradients]:
    """One CG iteration of a batch, Hessian products included, as one function to compile (it
    closes over the user's ``fun`` and plain options only, so a later solve with the same
    ``fun`` finds the compiled graph in Dynamo's cache)."""

    def product_one(x: torch.Tensor, p: torch.Tensor, template: PyTree, *data: Any) -> torch.Tensor:
        # reverse-over-reverse: forward mode meets symbolic batch sizes badly in Dynamo
        gradient = torch.func.grad(_value_of_one, argnums=1)
        (product,) = torch.func.vjp(lambda z: gradient(fun, z, template, *data), x)[1](p)
        return product  # type: ignore[no-any-return]

    products = torch.func.vmap(product_one, in_dims=(0, 0, None, *dims))

    def iteration(systems: _Systems, template: PyTree, *data: Any) -> ConjugateGradients:
        def hessian_times(p: torch.Tensor) -> torch.Tensor:
            return products(systems.x, p, template, *data)

        free = systems.free
        precondition = _preconditioner(solver, free, systems.memory, bounded=bounded)
        return cg_iteration(
            systems.cg, _on_free(hessian_times, free) if bounded else hessian_times, precondition
        )

    return iteration


def _stretch_of(
    iteration: Callable[..., ConjugateGradients], shrinkable: bool
) -> Callable[..., tuple[ConjugateGradients, torch.Tensor]]:
    """CG iterations of a batch until it should shrink, its problems converged or ``last``
    (:func:`~torchlbfgs.compaction.steps_until_shrink`), as one function to compile."""

    def stretch(
        systems: _Systems, count: torch.Tensor, last: torch.Tensor, template: PyTree, *data: Any
    ) -> tuple[ConjugateGradients, torch.Tensor]:
        def step(cg: ConjugateGradients) -> ConjugateGradients:
            return iteration(systems._replace(cg=cg), template, *data)

        return steps_until_shrink(step, systems.cg, count, last, _not_done, shrinkable=shrinkable)

    return stretch


def _not_done(cg: ConjugateGradients) -> torch.Tensor:
    return ~cg.done


def _vmapped(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is batched by ``vmap`` beneath any other ``torch.func`` wrappers."""
    while is_functorch_wrapped_tensor(tensor):
        if is_batchedtensor(tensor):
            return True
        tensor = get_unwrapped(tensor)
    return False


def _no_op(r: torch.Tensor) -> torch.Tensor:
    return r
