"""``torch.optim.LBFGS``'s step schedule over the L-BFGS iteration, decided on the host.

One ``step(closure)`` of torch's optimizer evaluates the closure once, returns at once if the
gradient is already small, and otherwise runs up to ``max_iter`` iterations, each:

1. the curvature pair of the previous iteration, :math:`s = t d`, :math:`y = g - g_{prev}`,
   enters the memory if :math:`s^\\top y > 10^{-10}` (so the last iteration of a step is
   *pending* until the next step has evaluated the closure at its end point);
2. the direction :math:`d = -H g` (:func:`~torchlbfgs.direction.inv_hessian_product`, the
   two-loop recursion rounded as torch's), and :math:`d = -g` on the very first iteration;
3. the first trial step: :math:`\\min(1, 1/|g|_1)\\,\\mathrm{lr}` on the very first iteration,
   ``lr`` after; stop if :math:`g^\\top d > -\\mathrm{tolerance\\_change}`;
4. the strong-Wolfe search (:meth:`~torchlbfgs.line_searches.strong_wolfe.StrongWolfe.search_on_host`,
   the functional core's decisions taken on Python numbers), or a fixed step that evaluates the
   closure at the new point, except on the step's last iteration, where it moves without
   evaluating;
5. stop when ``max_iter`` iterations ran, the ``max_eval`` budget is used up (checked between
   iterations), :math:`\\max|g| \\le` ``tolerance_grad``, :math:`\\max|t d| \\le`
   ``tolerance_change`` or :math:`|f - f_{prev}| <` ``tolerance_change``.

:func:`torch_step` runs one such step on the parameters behind a :class:`Parameters` and
returns the new :class:`~torchlbfgs.checkpoint.OptimizerState`; the
:class:`torchlbfgs.LBFGS` adapter around it is plumbing. The state's ``status`` tells why the
step stopped (:class:`~torchlbfgs.StopReason`; convergence reasons first when several hold).

What is read where torch reads it: the parameters are read after each closure call and moved
from there (a closure that changes them in place, e.g. clamping, is honoured as torch honours
it), and the strong-Wolfe search moves from the parameters as they are when it starts.

Host reads (device syncs on a GPU, fewer than torch's): one per closure evaluation (its
value with ``max|g|``, or with :math:`g^\\top d` in the search), one per iteration for the
curvature test and one for :math:`g^\\top d` and :math:`\\max|d|`, one after each search for
:math:`\\max|g|`, one at the start of each step. On a CPU, where a read costs no sync, the
two-loop recursion also reads its inner products, as torch's does (fewer, cheaper kernels;
the same bits); on a GPU they stay on the device.

Failures: a closure that raises leaves the parameters and the state at the start of the inner
iteration it was called in (an iteration boundary, everything finite; the next ``step``
continues from there). A search that finds no point with a finite loss and gradient leaves
the parameters where it started and stops with ``NON_FINITE`` (and a warning); so does a fixed
step that lands on a non-finite loss.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import numpy
import torch

from torchlbfgs.bounded_direction import bounded_direction
from torchlbfgs.bounds import Bounds, max_step, project, projected_gradient
from torchlbfgs.checkpoint import OptimizerState
from torchlbfgs.direction import compact_form, slots_newest_first, two_loop_recursion
from torchlbfgs.history import History, accept_curvature_pair, has_products, write_pair
from torchlbfgs.line_searches.method import NO_BUDGET
from torchlbfgs.line_searches.strong_wolfe import HostSearchResult, StrongWolfe
from torchlbfgs.options import TorchOptions
from torchlbfgs.scalars import NUMBERS, TENSORS, Scalars
from torchlbfgs.sharding import LOCAL, Reductions
from torchlbfgs.state import LBFGSState, StopReason
from torchlbfgs.stopping import stop_reason

__all__ = ["Parameters", "TorchOptions", "torch_step"]

# torch.optim.LBFGS calls its strong-Wolfe search with its default constants, whatever the
# optimizer's own tolerance_change.
_TORCH_SEARCH: dict[str, Any] = {"c1": 1e-4, "c2": 0.9, "tolerance_change": 1e-9}


class Parameters(Protocol):
    """The parameters as one flat real vector, and the closure that evaluates them."""

    def evaluate(self, into: torch.Tensor | None = None) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Call the closure: ``(loss as returned, value as a 0-d tensor, flat gradient)``; the
        gradient is a copy that later calls do not change (written into ``into`` if given)."""
        ...

    def read(self, into: torch.Tensor | None = None) -> torch.Tensor:
        """A copy of the parameters, flat (written into ``into`` if given, and returned)."""
        ...

    def write(self, flat: torch.Tensor) -> None:
        """Set the parameters to ``flat``."""
        ...

    def write_step(self, x: torch.Tensor, direction: torch.Tensor, t: Any) -> None:
        """Set the parameters to ``x + t * direction`` (rounded as torch's ``p.add_(d, alpha=t)``;
        ``t`` is a host number)."""
        ...

    def project(self, bounds: Bounds) -> None:
        """Clamp the parameters into the box, in place."""
        ...


class _Memory:
    """The curvature memory as the step uses it: the ring's head and pair count tracked on the
    host (the state's tensors get them as the step hands a state back, :meth:`settled`), and
    the buffers' rows (views) and ``rho`` as the two-loop recursion reads them, made once per
    step (accepted pairs are written into the buffers in place, row by row)."""

    def __init__(
        self, history: History, head: int, n_pairs: int, ops: Scalars, reductions: Reductions
    ) -> None:
        self.head, self.n_pairs, self.size = head, n_pairs, history.s_history.shape[0]
        self.ops, self.reductions = reductions.scalars(ops), reductions
        if has_products(history):
            raise ValueError("torch_step: a memory that keeps inner products is not written row by row")
        self.buffers = (history.s_history, history.y_history, history.rho)
        self.s_rows, self.y_rows, self.rho_rows = (buffer.unbind(0) for buffer in self.buffers)
        self._read_rho(history.rho)
        # Over processes, the direction is the compact representation's (Byrd, Nocedal &
        # Schnabel 1994): its inner products with g are one all-reduce, where the two-loop
        # recursion's 2m products each wait on the one before. It keeps S'Y and Y'Y for that.
        self.products: tuple[torch.Tensor, torch.Tensor] | None = None
        if reductions.sharded:
            zeros = history.s_history.new_zeros(self.size, self.size)
            self.products = zeros, zeros.clone()
            # Pair by pair, oldest first, as :meth:`push` made them: a state loaded from a
            # checkpoint then continues bit for bit as the run that saved it.
            for age in range(n_pairs):
                self._add_products((head - n_pairs + age) % self.size, history)

    def _read_rho(self, rho: torch.Tensor) -> None:
        self.rho = list(self.ops.values(rho))
        self.rho_version = rho._version  # in-place writes count up; ours are tracked in push

    @classmethod
    def for_step(
        cls, reuse: dict[str, Any], history: History, head: int, n_pairs: int, ops: Scalars,
        reductions: Reductions,
    ) -> _Memory:  # fmt: skip
        """The memory of the previous step (kept in ``reuse``) if it views these very buffers,
        else a new one, kept there for the next step."""
        memory = reuse.get("memory")
        buffers = (history.s_history, history.y_history, history.rho)
        if (
            not isinstance(memory, cls)
            or memory.ops is not reductions.scalars(ops)
            or any(a is not b for a, b in zip(memory.buffers, buffers, strict=True))
        ):
            memory = reuse["memory"] = cls(history, head, n_pairs, ops, reductions)
        elif history.rho._version != memory.rho_version:  # written into by someone else since
            memory._read_rho(history.rho)
        memory.head, memory.n_pairs = head, n_pairs
        return memory

    def push(self, core: LBFGSState, s: torch.Tensor, y: torch.Tensor, ys: torch.Tensor) -> LBFGSState:
        """Write an accepted pair into the head row (:func:`~torchlbfgs.history.write_pair`)."""
        slot = self.head
        rows = self.s_rows[slot], self.y_rows[slot], self.rho_rows[slot]
        gamma = write_pair(rows, s, y, ys, dot=self.reductions.dot)
        self.rho[slot], self.rho_version = self.ops.value(rows[2]), self.buffers[2]._version
        if self.products is not None:
            self._add_products(slot, core.history)
        self.head, self.n_pairs = (slot + 1) % self.size, min(self.n_pairs + 1, self.size)
        return core._replace(gamma=gamma)

    def _add_products(self, slot: int, history: History) -> None:
        """The row and column of S'Y and Y'Y of the pair in ``slot`` (one all-reduce)."""
        sy, yy = self.products  # type: ignore[misc]
        m, s, y = self.size, history.s_history[slot], history.y_history[slot]
        new = self.reductions.inner([history.s_history, history.y_history], torch.stack([y, s]))
        sy[:, slot], sy[slot, :] = new[:m, 0], new[m:, 1]  # S y and Y s (s_i'y and s'y_j)
        yy[:, slot] = yy[slot, :] = new[m:, 0]  # Y y

    def direction(self, core: LBFGSState, negative_grad: torch.Tensor) -> torch.Tensor:
        """:math:`-H g` from ``-g``: the two-loop recursion as torch's (worked on in place), or
        over processes the compact representation with its products in one all-reduce."""
        if self.products is not None:
            history = self.settled(core).history._replace(
                sy_products=self.products[0], yy_products=self.products[1]
            )
            buffers = [history.s_history, history.y_history]
            products = self.reductions.inner(buffers, negative_grad.unsqueeze(0)).squeeze(1)  # S'v, Y'v
            return compact_form(history, negative_grad, (products[: self.size], products[self.size :]))
        slots = slots_newest_first(self.head, self.n_pairs, self.size)
        rows, rho = (self.s_rows, self.y_rows), self.rho
        return two_loop_recursion(*rows, rho, core.gamma, negative_grad, slots, ops=self.ops, overwrite=True)

    def settled(self, core: LBFGSState) -> LBFGSState:
        """``core`` with the ring's head and count as tracked here."""
        return core._replace(
            head=torch.full_like(core.head, self.head), n_pairs=torch.full_like(core.n_pairs, self.n_pairs)
        )


def _read(*scalars: torch.Tensor) -> list[Any]:
    """Several 0-d tensors in one host read, as host numbers that round as the tensors would
    (:mod:`torchlbfgs.scalars`): numpy scalars of their precision (float32 or float64)."""
    dtype = scalars[0].dtype
    if not scalars[0].is_cpu:  # one device sync for all of them
        stacked = torch.stack([s if s.dtype == dtype else s.to(dtype) for s in scalars])
        return list(stacked.cpu().numpy())  # sync-ok: the adapter decides on the host, as torch's
    kind = numpy.float32 if dtype == torch.float32 else numpy.float64
    return [kind(s.item()) for s in scalars]  # sync-ok: on the CPU a read is no sync


def _read_with_max_abs(
    scalar: torch.Tensor | None, vector: torch.Tensor, reductions: Reductions
) -> list[Any]:
    """``scalar`` (if any) and ``max|vector|`` (NaN if any entry is) in one host read: the
    vector's extremes are read and the larger magnitude taken on the host."""
    low, high = reductions.aminmax(vector)
    *read, low, high = _read(*((scalar,) if scalar is not None else ()), low, high)
    return [*read, NUMBERS.maximum(-low, high)]


def _two_loop_scalars(device: torch.device) -> Scalars:
    """The two-loop recursion's inner products are read as torch reads them where that is
    free (CPU: fewer, cheaper kernels); elsewhere they stay on the device (no sync)."""
    return NUMBERS if device.type == "cpu" else TENSORS


def _scalar(value: Any, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    number = value.item() if isinstance(value, numpy.generic) else value  # sync-ok: numpy, no tensor
    return torch.full((), number, dtype=dtype or like.dtype, device=like.device)


def _finite(*values: Any) -> bool:
    return all(math.isfinite(value) for value in values)


def _warn_non_finite() -> None:
    warnings.warn(
        "torchlbfgs.LBFGS: the closure returned a non-finite loss or gradient at every point the "
        "line search tried; the parameters were left at the last finite point (stop reason "
        "NON_FINITE). A smaller lr or a line search (line_search_fn='strong_wolfe') may help.",
        RuntimeWarning,
        stacklevel=4,
    )


class _Rollback:
    """Where a closure that raises sends everything back: the state at the start of the inner
    iteration it was called in (or what makes it), and the parameters there (``None``: as they
    are, nothing was moved yet)."""

    def __init__(self, state: OptimizerState) -> None:
        self.saved: OptimizerState | tuple[LBFGSState, int, int, _Memory] = state
        self.point: torch.Tensor | None = None

    def state(self) -> OptimizerState:
        if isinstance(self.saved, OptimizerState):
            return self.saved
        core, iterations, evals, memory = self.saved
        return _ended(memory.settled(core), iterations, evals, status=StopReason.RUNNING, pending=None)


def torch_step(
    params: Parameters,
    stored: OptimizerState,
    options: TorchOptions,
    *,
    keep: Callable[..., None],
    reuse: dict[str, Any] | None = None,
    bounds: Bounds | None = None,
    reductions: Reductions = LOCAL,
) -> Any:
    """Run one ``torch.optim.LBFGS.step`` from ``stored``; return the closure's first loss.

    The new state is handed to ``keep(state, unchanged=...)`` on every way out (``unchanged``:
    the step failed before it changed anything, and ``state`` is ``stored`` itself). The
    state's buffers are updated in place, so the caller holds no other reference to ``stored``
    (the step frees what it no longer needs as it goes, as torch's does). When the closure
    raises, the parameters go back to the start of the inner iteration it was called in,
    ``keep`` receives the state there, and the exception propagates.

    ``reuse`` is a dict the caller keeps from step to step: the step leaves there what the next
    one may reuse while the state's buffers are the same tensors (their rows as views, and
    ``rho`` as host numbers), instead of making it again.

    ``bounds`` (flat, like the parameters) makes the step L-BFGS-B's on the same schedule: the
    parameters are projected into the box before the first evaluation, the direction is
    :func:`~torchlbfgs.bounded_direction.bounded_direction`, no step goes beyond the box (the
    first trial and the search's extrapolation are capped at
    :func:`~torchlbfgs.bounds.max_step`, and every point the closure sees is projected), and
    ``tolerance_grad`` tests the projected gradient. The curvature pair stays torch's
    :math:`s = t d`, which differs from the step taken only by that projection's rounding.

    ``reductions`` take the step's inner products and extremes: the parameters' own
    (:data:`~torchlbfgs.sharding.LOCAL`), or all-reduced over processes for parameters sharded
    across them (:mod:`torchlbfgs.sharding`; not with bounds).
    """
    rollback = _Rollback(stored)
    del stored  # from here on only the rollback (and the step) hold it
    try:
        loss, state = _step(params, rollback, options, {} if reuse is None else reuse, bounds, reductions)
    except BaseException:
        if rollback.point is None:  # nothing was moved or changed yet
            keep(rollback.state(), unchanged=True)
        else:
            params.write(rollback.point)
            keep(rollback.state(), unchanged=False)
        raise
    keep(state, unchanged=False)
    return loss


def _step(
    params: Parameters,
    rollback: _Rollback,
    options: TorchOptions,
    reuse: dict[str, Any],
    bounds: Bounds | None,
    reductions: Reductions,
) -> tuple[Any, OptimizerState]:
    stored = rollback.state()
    moved_into_box = bounds is not None and _project_start(params, bounds)
    loss, value, grad = params.evaluate()
    core = stored.core
    x, tested = None, grad  # what tolerance_grad tests: with bounds, the projected gradient
    if bounds is not None:
        x = params.read()
        tested = projected_gradient(x, grad, bounds)
    low, high = reductions.aminmax(tested)
    f, low, high, head, n_pairs, iteration, pending = _read(
        value, low, high, core.head, core.n_pairs, core.iteration, stored.has_pending
    )  # once per step
    grad_max, fresh = NUMBERS.maximum(-low, high), iteration == 0
    pending = pending and not moved_into_box  # t d is no longer the step from the last point
    evals = 1
    if not _finite(f, grad_max):
        if not pending:
            raise ValueError(
                "torchlbfgs.LBFGS.step: the closure returned a non-finite loss or gradient at the current "
                "parameters (NaN or Inf); nothing was changed. Check the model and data, or restart "
                "from finite parameters."
            )
        # The previous step's last move was not evaluated (torch's fixed-step rule) and landed
        # where the loss is not finite: go back to where it started (up to rounding).
        params.write(torch.addcmul(params.read(), stored.pending_direction, stored.pending_step, value=-1))
        _warn_non_finite()
        return loss, _ended(core, 0, evals, status=StopReason.NON_FINITE, pending=None)
    if grad_max <= options.tolerance_grad:  # torch returns before touching its state
        return loss, stored._replace(core=_counted(core, StopReason.GRADIENT_TOLERANCE, 0, evals))

    if options.max_iter == 0:  # torch evaluates, and does nothing else
        return loss, stored._replace(core=_counted(core, StopReason.MAX_ITERATIONS, 0, evals))

    memory = _Memory.for_step(
        reuse, core.history, int(head), int(n_pairs), _two_loop_scalars(grad.device), reductions
    )
    direction: torch.Tensor = stored.pending_direction
    t: Any = stored.pending_step
    del stored  # its gradient and direction go as soon as the iteration no longer needs them
    if x is None:
        x = params.read()  # after the closure: a change it made to the parameters counts
    iterations, current_evals = 0, 1
    rollback.point = x
    # Vectors this step made itself (not the stored state's, which others may hold) are worked
    # on in place once dead: for large n a fresh vector costs more in page faults than in
    # arithmetic. The previous direction becomes s, the previous gradient y, s the next direction.
    own_direction = own_previous_grad = False
    for n_iter in range(1, options.max_iter + 1):
        iterations += 1
        spare = spare_grad = None
        if pending and not fresh:  # the previous iteration's curvature pair
            s = torch.mul(direction, t, out=direction if own_direction else None)
            reuse_grad = own_previous_grad and core.grad is not grad  # a search may not have moved
            y = torch.sub(grad, core.grad, out=core.grad if reuse_grad else None)
            ys, curvature_ok = accept_curvature_pair(s, y, None, "absolute", NUMBERS, dot=reductions.dot)
            if curvature_ok:  # torch's s'y > 1e-10
                core = memory.push(core, s, y, ys)
            spare, spare_grad = s if own_direction else None, y if reuse_grad else None
            del s, y  # copied into the memory: not kept through the two-loop recursion
        core = core._replace(value=value, grad=grad)
        rollback.saved, rollback.point = (core, iterations - 1, evals, memory), x
        own_previous_grad = True  # every gradient after the step's first evaluation is its own
        # steepest descent on the very first iteration, else -H g:
        if bounds is not None:  # L-BFGS-B's direction (from an empty memory too)
            direction = bounded_direction(x, grad, memory.settled(core).history, bounds)
        else:
            direction = torch.neg(grad, out=spare)
            if not fresh:  # the two-loop recursion from -g in place, as torch's
                direction = memory.direction(core, direction)
        own_direction = True
        pending = True
        t = options.lr
        if fresh:
            t = min(1.0, _read(torch.reciprocal(reductions.abs_sum(grad)))[0]) * options.lr
        fresh = False
        limit = None
        if bounds is not None:  # never beyond the box
            limit = _read(max_step(x, direction, bounds))[0]
            t = min(t, limit)
        gtd, direction_max = _read_with_max_abs(reductions.dot(grad, direction), direction, reductions)
        status = StopReason.RUNNING
        if gtd > -options.tolerance_change:  # no descent left: torch stops before moving
            status = StopReason.DIRECTIONAL_DERIVATIVE_TOLERANCE
            break

        evaluated = True
        if options.line_search_fn == "strong_wolfe":
            budget = options.max_eval - current_evals
            found = _strong_wolfe(
                params, x, direction, f, grad, gtd, direction_max, t, budget, spare_grad, limit, bounds,
                reductions,
            )  # fmt: skip
            t, f_new, new_grad, search_evals = found.step_size, found.value, found.grad, found.n_evals
            _move(params, x, direction, t, bounds)  # torch moves from where the search started
            (new_grad_max,) = _read_with_max_abs(None, _tested_gradient(params, new_grad, bounds), reductions)
            new_value = value if new_grad is grad else _scalar(f_new, value)
        elif n_iter < options.max_iter:
            _move(params, x, direction, t, bounds)
            _, new_value, new_grad = params.evaluate(into=spare_grad)
            search_evals = 1
            f_new, new_grad_max = _read_with_max_abs(
                new_value, _tested_gradient(params, new_grad, bounds), reductions
            )
        else:  # torch's last fixed step moves without evaluating the closure
            _move(params, x, direction, t, bounds)
            evaluated, search_evals = False, 0
            f_new, new_grad_max = f, math.inf
        evals += search_evals
        current_evals += search_evals
        if evaluated and not _finite(f_new, new_grad_max):
            params.write(x)  # back to the last finite point
            _warn_non_finite()
            settled = memory.settled(core)
            return loss, _ended(settled, iterations, evals, status=StopReason.NON_FINITE, pending=None)
        status = stop_reason(
            NUMBERS,
            grad_small=evaluated and new_grad_max <= options.tolerance_grad,
            step_small=abs(t) * direction_max <= options.tolerance_change,
            value_small=evaluated and abs(float(f_new) - float(f)) < options.tolerance_change,
            out_of_evals=current_evals >= options.max_eval,
            out_of_iterations=n_iter == options.max_iter,
        )
        if status != StopReason.RUNNING:
            break
        f, value, grad = f_new, new_value, new_grad
        x = params.read(into=x)  # the rollback point moves with it, as the next iteration starts
    return loss, _ended(memory.settled(core), iterations, evals, status=status, pending=(direction, t))


def _project_start(params: Parameters, bounds: Bounds) -> bool:
    """Project the parameters into the box (a start outside it, or parameters the user or a
    loaded checkpoint moved out); whether that moved them (a host read)."""
    start = params.read()
    inside = project(start, bounds)
    if torch.equal(inside, start):  # sync-ok: once per step, bounded problems only
        return False
    params.write(inside)
    return True


def _move(
    params: Parameters, x: torch.Tensor, direction: torch.Tensor, t: Any, bounds: Bounds | None
) -> None:
    """Set the parameters to ``x + t d``, projected into the box if there is one."""
    params.write_step(x, direction, t)
    if bounds is not None:
        params.project(bounds)


def _tested_gradient(params: Parameters, grad: torch.Tensor, bounds: Bounds | None) -> torch.Tensor:
    """What ``tolerance_grad`` tests: the gradient, or with bounds the projected gradient at
    the parameters."""
    return grad if bounds is None else projected_gradient(params.read(), grad, bounds)


def _strong_wolfe(
    params: Parameters, x: torch.Tensor, direction: torch.Tensor, value: Any, grad: torch.Tensor,
    gtd: Any, direction_max: Any, t: Any, max_ls: int, spare_grad: torch.Tensor | None,
    max_step: Any = None, bounds: Bounds | None = None, reductions: Reductions = LOCAL,
) -> HostSearchResult:  # fmt: skip
    """torch's ``_strong_wolfe`` from ``x`` along ``direction`` (its ``max_ls`` is what is
    left of the step's evaluation budget), with the functional core's decisions; the first
    trial's gradient goes into ``spare_grad`` if given (a dead vector of the step's own). With
    bounds, no trial beyond ``max_step`` and every trial point projected into the box."""
    spare = [spare_grad]

    def evaluate(step: Any) -> tuple[Any, torch.Tensor, Any]:
        _move(params, x, direction, step, bounds)
        _, trial_value, trial_grad = params.evaluate(into=spare.pop() if spare else None)
        trial_f, trial_gtd = _read(trial_value, reductions.dot(trial_grad, direction))
        return float(trial_f), trial_grad, trial_gtd

    # Values as Python floats, derivatives in the gradient's precision: torch's search mixes
    # them so (`float(closure())` against `g.dot(d)`), and so do we, to round as it rounds.
    search = _torch_search(max(max_ls, 0))
    return search.search_on_host(evaluate, float(value), grad, gtd, direction_max, t, NO_BUDGET, max_step)


@functools.lru_cache(maxsize=64)
def _torch_search(max_ls: int) -> StrongWolfe:
    """torch's strong-Wolfe search with at most ``max_ls`` iterations (made once per limit: a
    step asks for one per iteration, with what is left of its evaluation budget)."""
    return StrongWolfe(max_ls=max_ls, **_TORCH_SEARCH)


def _counted(core: LBFGSState, status: StopReason, iterations: int, evals: int) -> LBFGSState:
    return core._replace(
        iteration=core.iteration + iterations,
        n_evals=core.n_evals + evals,
        status=_scalar(status.value, core.status),
    )


def _ended(
    core: LBFGSState, iterations: int, evals: int, *, status: StopReason,
    pending: tuple[torch.Tensor, Any] | None,
) -> OptimizerState:  # fmt: skip
    """The state after a step (or at an iteration boundary), with its last iteration pending
    (``(direction, t)``) or not."""
    counted = _counted(core, status, iterations, evals)
    if pending is None:
        no_step = torch.zeros_like(core.value)
        return OptimizerState(
            counted, torch.zeros_like(core.grad), no_step, _scalar(False, no_step, torch.bool)
        )
    direction, t = pending
    step = t if isinstance(t, torch.Tensor) else _scalar(t, core.value)
    return OptimizerState(counted, direction, step, _scalar(True, step, torch.bool))
