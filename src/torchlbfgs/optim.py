"""``torchlbfgs.LBFGS``: a drop-in ``torch.optim.LBFGS`` over the functional core.

The class only moves data between the model and the pure functions: it gathers the
parameters into a flat vector, evaluates the closure as the line search asks, and keeps the
state pytree (:class:`~torchlbfgs.checkpoint.OptimizerState`) in ``self.state`` as named
leaves. The iteration itself is :func:`~torchlbfgs.update.propose`, the line search and
:func:`~torchlbfgs.update.accept`, exactly as in :func:`torchlbfgs.update`.

To match ``torch.optim.LBFGS`` call for call, the last iteration of each ``step`` is left
*pending*: its curvature pair is added when the next ``step`` evaluates the closure at the
new point (torch does the same, and with ``line_search_fn=None`` it does not evaluate the
closure after its last iteration at all).

Host reads (device syncs on a GPU): **one per inner iteration**, which answers together
whether to stop (the stopping rules), where the ring buffer's pairs are (so the two-loop
recursion reads only the stored pairs, as views) and whether the next iteration searches.
To make that one read enough, the next iteration's direction is computed before it, on the
bet that the new pair entered the memory; when the curvature test refused the pair (rare),
the direction is recomputed and read again. The number of closure evaluations is counted on
the host. The strong-Wolfe search adds one read per closure evaluation, plus one before the
first: whether to call the closure again, which only the host can decide. Each ``step``
adds three reads at its start (the gradient and finiteness tests, the pending pair, the first
direction) and, when its last iteration evaluated the closure, one at its end (was that point
finite?).

Non-finite values: a ``step`` whose closure returns NaN or Inf at the current parameters
raises ``ValueError`` and changes nothing, except where the previous ``step`` ended with a
fixed step it did not evaluate (torch's rule for the last iteration): then the parameters go
back to that step's origin (up to the rounding of ``x + t d - t d``) and the step reports
``NON_FINITE`` as below. When the line search finds no point with a finite
loss and gradient along the direction, the parameters go back to the last finite point, the
state records the stop reason ``NON_FINITE`` and a ``RuntimeWarning`` says so; the next
``step`` starts again from there. (``torch.optim.LBFGS`` moves to the non-finite point, or,
with strong Wolfe, can fail with an ``IndexError``.)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch.optim import Optimizer

from torchlbfgs.checkpoint import (
    OptimizerState,
    is_torch_lbfgs_state,
    state_from_leaves,
    state_from_torch_lbfgs,
    state_from_trusted_leaves,
    state_to_leaves,
    state_to_torch_lbfgs,
)
from torchlbfgs.direction import slots_newest_first
from torchlbfgs.line_searches import search_along
from torchlbfgs.line_searches.result import FlatLineSearchResult
from torchlbfgs.state import LBFGSState, StopReason
from torchlbfgs.update import Proposal, accept, initial_state, propose

__all__ = ["LBFGS", "to_torch_state_dict"]

# torch.optim.LBFGS calls its strong-Wolfe search with the default tolerance, whatever the
# optimizer's own tolerance_change.
_TORCH_LINE_SEARCH_TOLERANCE = 1e-9
_SHARED_OPTIONS = (
    "lr",
    "max_iter",
    "max_eval",
    "tolerance_grad",
    "tolerance_change",
    "history_size",
    "line_search_fn",
)


def _real_view(tensor: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _real_numel(param: torch.Tensor) -> int:
    return 2 * param.numel() if param.is_complex() else param.numel()


class LBFGS(Optimizer):
    """L-BFGS with the constructor, ``step(closure)`` and results of ``torch.optim.LBFGS``.

    Differences that only add abilities: several parameter groups are optimized jointly as
    one problem (their options must agree); ``state_dict()`` is the flattened functional
    state, validated on load, movable across devices and dtypes, and convertible to and from
    ``torch.optim.LBFGS``'s format; a closure that raises leaves params and state untouched.

    Args:
        params: parameters or parameter groups to optimize.
        lr: step length (the first trial step of each line search).
        max_iter: maximal number of iterations per ``step``.
        max_eval: maximal number of closure evaluations per ``step``
            (default ``max_iter * 5 // 4``), checked between iterations as torch does.
        tolerance_grad: stop when ``max|g| <= tolerance_grad``.
        tolerance_change: stop when the value or the step changes by less than this.
        history_size: number of curvature pairs kept.
        line_search_fn: ``None`` (fixed step ``lr``) or ``"strong_wolfe"``.

    Examples:
        >>> import torch, torchlbfgs
        >>> model = torch.nn.Linear(3, 1).double()
        >>> inputs, targets = torch.randn(50, 3).double(), torch.randn(50, 1).double()
        >>> optimizer = torchlbfgs.LBFGS(model.parameters(), line_search_fn="strong_wolfe")
        >>> def closure():
        ...     optimizer.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(inputs), targets)
        ...     loss.backward()
        ...     return loss
        >>> first_loss = optimizer.step(closure)
        >>> bool(closure() < first_loss)
        True
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
    ) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        if line_search_fn not in (None, "strong_wolfe"):
            raise ValueError(f"line_search_fn must be None or 'strong_wolfe', got {line_search_fn!r}")
        if not isinstance(history_size, int) or history_size < 1:
            raise ValueError(f"history_size must be a positive int, got {history_size!r}")
        defaults = {
            "lr": lr,
            "max_iter": max_iter,
            "max_eval": max_eval,
            "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change,
            "history_size": history_size,
            "line_search_fn": line_search_fn,
        }
        super().__init__(params, defaults)
        self._check_options_agree(self.param_groups)

    # --- parameter groups ---------------------------------------------------------------------

    @staticmethod
    def _check_options_agree(groups: list[dict[str, Any]]) -> None:
        """All groups form one problem with one line search, so their options must agree."""
        first = groups[0]
        for index, group in enumerate(groups[1:], start=1):
            for option in _SHARED_OPTIONS:
                if option in group and option in first and not _same(group[option], first[option]):
                    raise ValueError(
                        f"param group {index} has {option}={group[option]!r} but group 0 has "
                        f"{option}={first[option]!r}: torchlbfgs.LBFGS optimizes all groups jointly, "
                        f"so {option!r} must be the same in every group"
                    )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add parameters to the problem (allowed after steps).

        The new parameters join the flat vector after the existing ones. Curvature pairs
        already in memory are extended with zeros for them (they carry no information about
        the new coordinates), and a pending step's pair is dropped; counters continue.
        """
        if hasattr(self, "param_groups") and self.param_groups:
            candidate = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
            self._check_options_agree([self.param_groups[0], candidate])
        super().add_param_group(param_group)
        leaves = self.state.get(self._params[0]) if hasattr(self, "state") else None
        if leaves:
            grad = leaves["grad"]
            stored = state_from_trusted_leaves(leaves, dtype=grad.dtype, device=grad.device)
            self._store(_extend(stored, sum(_real_numel(p) for p in self._params)))

    @property
    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _options(self) -> dict[str, Any]:
        self._check_options_agree(self.param_groups)
        return {option: self.param_groups[0][option] for option in _SHARED_OPTIONS}

    # --- moving data between the model and flat vectors ----------------------------------------

    def _flat_params(self) -> torch.Tensor:
        return torch.cat([_real_view(p.detach()).reshape(-1) for p in self._params])

    def _flat_grad(self) -> torch.Tensor:
        views = []
        for p in self._params:
            if p.grad is None:
                views.append(p.new_zeros(_real_numel(p), dtype=_real_view(p.detach()).dtype))
                continue
            grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
            views.append(_real_view(grad).reshape(-1))
        return torch.cat(views)

    def _write_params(self, flat: torch.Tensor) -> None:
        offset = 0
        for p in self._params:
            target = _real_view(p.detach())
            target.copy_(flat[offset : offset + target.numel()].view_as(target))
            offset += target.numel()

    # --- state ---------------------------------------------------------------------------------

    def _stored_state(self, n: int, dtype: torch.dtype, device: torch.device) -> OptimizerState | None:
        leaves = self.state.get(self._params[0]) if self._params else None
        if not leaves:
            return None
        if leaves["grad"].numel() != n:
            raise RuntimeError(
                f"the optimizer state is for {leaves['grad'].numel()} parameters but the param groups now "
                f"hold {n}; add parameters with add_param_group, not by editing param_groups"
            )
        return state_from_trusted_leaves(leaves, dtype=dtype, device=device)

    def _store(self, state: OptimizerState) -> None:
        params = self._params
        for p in params[1:]:
            self.state.pop(p, None)
        self.state[params[0]] = state_to_leaves(state)

    # --- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> Any:  # type: ignore[override]
        """Run up to ``max_iter`` L-BFGS iterations; return the closure's first loss.

        Args:
            closure: re-evaluates the model and returns the loss; it is called with
                gradients enabled and must call ``backward()``.

        ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` initialises a fresh
        optimizer by setting every gradient to zero and calling ``step(closure=None)``; on an
        optimizer without state, with all gradients zero, that call only stores the state of
        "no step taken yet" (nothing is evaluated or moved, and the next real step behaves
        exactly as a first step). Any other call without a closure raises ``ValueError``.
        """
        if closure is None and not self.state and self._all_grads_zero():
            self._store(self._blank_state())
            return None
        if closure is None or not callable(closure):
            raise ValueError(
                "torchlbfgs.LBFGS.step needs a closure that re-evaluates the model and returns the loss"
            )
        closure = torch.enable_grad()(closure)
        x_before = self._flat_params()
        undo = _UndoLog()
        try:
            loss, new_state = self._iterate(closure, x_before, undo)
        except BaseException:
            self._write_params(x_before)
            undo.roll_back()  # the pairs written in place this step; nothing else was stored
            raise
        self._store(new_state)
        return loss

    def _all_grads_zero(self) -> bool:
        return all(p.grad is not None and not bool(p.grad.any()) for p in self._params)

    def _blank_state(self) -> OptimizerState:
        """The state before any step: what a first ``step`` starts from (no pair, no pending step,
        no evaluation counted; the first step's evaluation overwrites value and gradient)."""
        x = self._flat_params()
        core = initial_state(torch.zeros((), dtype=x.dtype, device=x.device), torch.zeros_like(x),
                             history_size=self.param_groups[0]["history_size"])  # fmt: skip
        return OptimizerState(
            core._replace(n_evals=torch.zeros_like(core.n_evals)), torch.zeros_like(x),
            torch.zeros((), dtype=x.dtype, device=x.device), torch.tensor(False, device=x.device),
        )  # fmt: skip

    def _evaluate(
        self, closure: Callable[[], Any], dtype: torch.dtype
    ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        loss = closure()
        value = torch.as_tensor(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        return loss, value.to(dtype=dtype, device=self._params[0].device).reshape(()), self._flat_grad()

    def _iterate(
        self, closure: Callable[[], Any], x: torch.Tensor, undo: _UndoLog
    ) -> tuple[Any, OptimizerState]:
        options = self._options()
        lr, max_iter, max_eval = options["lr"], options["max_iter"], options["max_eval"]
        tolerance_grad, tolerance_change = options["tolerance_grad"], options["tolerance_change"]
        line_search = options["line_search_fn"]
        if isinstance(lr, torch.Tensor):
            lr = lr.item()
        running = torch.tensor(int(StopReason.RUNNING), device=x.device)

        orig_loss, value, grad = self._evaluate(closure, x.dtype)
        stored = self._stored_state(x.numel(), x.dtype, x.device)
        if stored is None:
            stored = OptimizerState(
                # the two-loop recursion: torch's rounding, step for step
                core=initial_state(value, grad, history_size=options["history_size"]),
                pending_direction=torch.zeros_like(x),
                pending_step=torch.zeros_like(value),
                has_pending=torch.tensor(False, device=x.device),
            )
            core = stored.core
        else:
            core = stored.core._replace(n_evals=stored.core.n_evals + 1)
        # host read (once per step): torch returns before touching its state when the gradient
        # is already small
        finite = torch.isfinite(value) & torch.isfinite(grad).all()
        grad_small, has_pending, start_finite = torch.stack(
            (grad.abs().amax() <= tolerance_grad, stored.has_pending, finite)
        ).tolist()
        if not start_finite and has_pending:
            # The last step of the previous call moved without evaluating the closure (torch's
            # fixed-step rule) and landed where the loss is not finite: go back to its origin.
            self._write_params(torch.addcmul(x, stored.pending_direction, stored.pending_step, value=-1))
            return orig_loss, self._failed_non_finite(core, counts_iteration=False)  # counted before
        if not start_finite:
            raise ValueError(
                "torchlbfgs.LBFGS.step: the closure returned a non-finite loss or gradient at the current "
                "parameters (NaN or Inf); nothing was changed. Check the model and data, or restart "
                "from finite parameters."
            )
        if grad_small:
            return orig_loss, stored._replace(core=core)

        if has_pending:
            # The pending step's closure evaluation is the one just made: complete its iteration.
            pending = Proposal(
                direction=stored.pending_direction,
                step_size=stored.pending_step,
                searching=torch.tensor(True, device=x.device),
                attempted=torch.tensor(False, device=x.device),
                status=running,
            )
            fresh = FlatLineSearchResult(
                stored.pending_step, value, grad, torch.ones_like(core.n_evals), pending.searching
            )
            undo.record(stored.core)
            _, core = accept(
                x, stored.core, pending, fresh, in_place=True, line_search=None,
                tolerance_grad=tolerance_grad, tolerance_change=tolerance_change, curvature_rule="absolute",
                stop_when_stalled=False,
            )  # fmt: skip
        core = core._replace(value=value, grad=grad, status=running)

        closure_calls = 0  # counted on the host: the line search evaluates through `objective`

        def objective(trial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal closure_calls
            closure_calls += 1
            self._write_params(trial)
            _, trial_value, trial_grad = self._evaluate(closure, x.dtype)
            return trial_value, trial_grad

        def plan(core: LBFGSState, ring: _Ring) -> Proposal:
            return propose(
                core, learning_rate=lr, tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
                slots=ring.slots,
            )  # fmt: skip

        ring = _Ring.of(core)  # host read (once per step): where the pairs are
        proposal = plan(core, ring)
        searching = bool(proposal.searching)  # host read: the first iteration's
        current_evals = 1
        for n_iter in range(1, max_iter + 1):
            if not searching:  # no descent left: torch stops before moving
                return orig_loss, self._pending(core, proposal, proposal.step_size, evals=0)
            calls_before = closure_calls
            found: FlatLineSearchResult | None = None
            if line_search == "strong_wolfe" or n_iter != max_iter:
                found = search_along(
                    line_search, objective, x, proposal.direction, core.value, core.grad,
                    proposal.step_size, active=proposal.searching, max_evals=None, c1=1e-4, c2=0.9,
                    tolerance_change=_TORCH_LINE_SEARCH_TOLERANCE, max_ls=max(max_eval - current_evals, 0),
                    # strong Wolfe reads whether to evaluate again; the fixed step evaluates once
                    early_exit=line_search is not None,
                )  # fmt: skip
                step_size = found.step_size
            else:  # torch takes its last fixed step without evaluating the closure there
                step_size = proposal.step_size
            x_new = torch.addcmul(x, proposal.direction, step_size)
            self._write_params(x_new)
            evals = closure_calls - calls_before
            current_evals += evals
            if found is None or n_iter == max_iter or current_evals >= max_eval:
                if found is not None and not bool(_is_finite(found)):  # host read: once per step
                    return orig_loss, self._failed_non_finite(core, x, evals)
                return orig_loss, self._pending(core, proposal, step_size, evals)
            undo.record(core)
            _, next_core = accept(
                x, core, proposal, found, in_place=True, line_search=line_search,
                tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
                curvature_rule="absolute", stop_when_stalled=False,
            )  # fmt: skip
            # Plan the next iteration before reading anything, betting that the pair entered the
            # memory (it nearly always does): then one host read per iteration answers "stop?",
            # "where are the pairs?" and "search?". A refused pair costs a second plan and read.
            ring_if_kept = ring.after_push()
            next_proposal = plan(next_core, ring_if_kept)
            status, head, n_pairs, searching = torch.stack((
                next_core.status, next_core.head, next_core.n_pairs, next_proposal.searching.long(),
            )).tolist()  # fmt: skip
            if status == StopReason.NON_FINITE:
                undo.undo_last()
                return orig_loss, self._failed_non_finite(core, x, evals)
            if status != StopReason.RUNNING:
                undo.undo_last()  # the last iteration stays pending: its pair comes next step
                return orig_loss, self._pending(core, proposal, step_size, evals)
            ring = _Ring(head, n_pairs, ring.size)
            if ring != ring_if_kept:
                next_proposal = plan(next_core, ring)
                searching = bool(next_proposal.searching)
            core, x, proposal = next_core, x_new, next_proposal
        raise AssertionError("unreachable: the last iteration always stops")  # pragma: no cover

    def _failed_non_finite(
        self,
        core: LBFGSState,
        x: torch.Tensor | None = None,
        evals: int = 0,
        *,
        counts_iteration: bool = True,
    ) -> OptimizerState:
        """The line search found no point with a finite loss and gradient along the direction:
        put the params back at ``x``, the last finite point (unless the caller did), and report
        it (stop reason ``NON_FINITE`` in the state, and a warning). The next ``step`` starts
        again from there."""
        if x is not None:
            self._write_params(x)
        warnings.warn(
            "torchlbfgs.LBFGS: the closure returned a non-finite loss or gradient at every point the "
            "line search tried; the parameters were left at the last finite point (stop reason "
            "NON_FINITE). A smaller lr or a line search (line_search_fn='strong_wolfe') may help.",
            RuntimeWarning,
            stacklevel=4,
        )
        failed = core._replace(
            iteration=core.iteration + int(counts_iteration),
            n_evals=core.n_evals + evals,
            status=torch.full_like(core.status, StopReason.NON_FINITE.value),
        )
        no_step = torch.zeros_like(core.value)
        return OptimizerState(
            failed, torch.zeros_like(core.grad), no_step, torch.zeros_like(core.status, dtype=torch.bool)
        )

    @staticmethod
    def _pending(core: LBFGSState, proposal: Proposal, step_size: torch.Tensor, evals: int) -> OptimizerState:
        """The state after a step whose last iteration (``proposal``, ``step_size``) is pending."""
        counted = core._replace(iteration=core.iteration + 1, n_evals=core.n_evals + evals)
        return OptimizerState(counted, proposal.direction, step_size, torch.ones_like(proposal.searching))

    # --- state_dict ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's format, with this optimizer's state as named leaves (see
        :mod:`torchlbfgs.checkpoint`). The tensors are copies: later steps, which update the
        history buffers in place, do not change a state dict already taken."""
        state_dict = super().state_dict()
        state_dict["state"] = {
            index: {
                name: leaf.clone() if isinstance(leaf, torch.Tensor) else leaf
                for name, leaf in leaves.items()
            }
            for index, leaves in state_dict["state"].items()
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` or from ``torch.optim.LBFGS``.

        Every leaf is validated (presence, shape, dtype kind, ranges, finiteness, history
        size, parameter count) before anything is assigned; floating leaves move to the
        parameters' device and real dtype, integer counters stay int64. A mismatch raises
        ``ValueError`` (or ``TypeError`` for non-tensors) naming the leaf, and leaves the
        optimizer exactly as it was.
        """
        if not isinstance(state_dict, dict) or set(state_dict) != {"state", "param_groups"}:
            found = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"expected a state dict with keys ['param_groups', 'state'], found {found}")
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups) if isinstance(saved_groups, list) else '?'} "
                f"parameter groups; this optimizer has {len(self.param_groups)}"
            )
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
                raise ValueError(f"param group {index} of the loaded state dict has no 'params' list")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {index} of the loaded state dict has {len(saved['params'])} parameters; "
                    f"this optimizer's has {len(group['params'])}"
                )
            missing = [option for option in _SHARED_OPTIONS if option not in saved]
            if missing:
                raise ValueError(
                    f"param group {index} of the loaded state dict has no {missing}: it was not written by "
                    f"an L-BFGS optimizer (its options are {sorted(k for k in saved if k != 'params')})"
                )
        self._check_options_agree(saved_groups)
        history_size = saved_groups[0]["history_size"]
        if history_size != self.param_groups[0]["history_size"]:
            raise ValueError(
                f"history_size: the checkpoint has {history_size}, this optimizer has "
                f"{self.param_groups[0]['history_size']}; create the optimizer with the same history_size"
            )

        params = self._params
        n = sum(_real_numel(p) for p in params)
        dtype = _real_view(params[0].detach()).dtype
        device = params[0].device
        saved_state = state_dict["state"]
        if not isinstance(saved_state, dict):
            raise TypeError(f"state_dict['state'] must be a dict, found {type(saved_state).__name__}")
        index_of_first = saved_groups[0]["params"][0]
        extra = sorted(set(saved_state) - {index_of_first}, key=str)
        if extra:
            raise ValueError(
                f"state_dict['state'] has entries for parameters {extra}; L-BFGS keeps its whole state "
                f"under the first parameter ({index_of_first!r})"
            )
        validated: OptimizerState | None = None
        if index_of_first in saved_state:
            leaves = saved_state[index_of_first]
            if not isinstance(leaves, dict):
                raise TypeError(
                    f"optimizer state must be a dict of named leaves, found {type(leaves).__name__}"
                )
            if is_torch_lbfgs_state(leaves):
                leaves = state_from_torch_lbfgs(
                    leaves, n=n, history_size=history_size, dtype=dtype, device=device
                )
            validated = state_from_leaves(leaves, n=n, history_size=history_size, dtype=dtype, device=device)
        # torch's own loading would cast integer counters to the params' dtype: restore the
        # groups' hyper-parameters through it, then set the validated state ourselves.
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        if validated is not None:
            self._store(validated)


def _is_finite(found: FlatLineSearchResult) -> torch.Tensor:
    return torch.isfinite(found.value) & torch.isfinite(found.grad).all()


class _Ring(NamedTuple):
    """Where the ring buffer's pairs are, known on the host: the newest pair sits in slot
    ``head - 1`` and ``n_pairs`` slots hold pairs (see :class:`~torchlbfgs.LBFGSState`)."""

    head: int
    n_pairs: int
    size: int

    @classmethod
    def of(cls, core: LBFGSState) -> _Ring:
        head, n_pairs = torch.stack((core.head, core.n_pairs)).tolist()
        return cls(head, n_pairs, core.history_size)

    @property
    def slots(self) -> list[int]:
        """Slots holding pairs, newest first."""
        return slots_newest_first(self.head, self.n_pairs, self.size)

    def after_push(self) -> _Ring:
        """The ring after one more pair is written."""
        return _Ring((self.head + 1) % self.size, min(self.n_pairs + 1, self.size), self.size)


class _UndoLog:
    """History rows a step overwrote in place, so that a failing step can put them back."""

    def __init__(self) -> None:
        self._entries: list[tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]] = []

    def record(self, core: LBFGSState) -> None:
        """Remember the row that the next in-place push into ``core`` will overwrite."""
        slot = core.head.reshape(1).clone()
        buffers = [core.s_history, core.y_history, core.rho]
        self._entries.append((buffers, slot, [buffer.index_select(0, slot) for buffer in buffers]))

    def undo_last(self) -> None:
        buffers, slot, rows = self._entries.pop()
        for buffer, row in zip(buffers, rows, strict=True):
            buffer.index_copy_(0, slot, row)

    def roll_back(self) -> None:
        while self._entries:
            self.undo_last()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return bool(torch.as_tensor(a) == torch.as_tensor(b))
    return bool(a == b)


def _extend(state: OptimizerState, n: int) -> OptimizerState:
    """Pad the state with zeros for parameters added after it was made; drop the pending pair."""
    core = state.core
    pad = n - core.grad.numel()

    def padded(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, pad))

    extended = LBFGSState(
        **{
            **core._asdict(),
            "grad": padded(core.grad),
            "s_history": padded(core.s_history),
            "y_history": padded(core.y_history),
        }
    )
    return OptimizerState(
        extended, padded(state.pending_direction), state.pending_step, torch.zeros_like(state.has_pending)
    )


def to_torch_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Convert a :class:`LBFGS` state dict into ``torch.optim.LBFGS``'s format.

    The result loads into a ``torch.optim.LBFGS`` over the same parameters (one group), which
    then continues exactly as this optimizer would.

    Args:
        state_dict: what :meth:`LBFGS.state_dict` returned.

    Returns:
        a state dict in torch's format (pairs as lists, oldest first).

    Examples:
        >>> import torch, torchlbfgs
        >>> w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        >>> ours = torchlbfgs.LBFGS([w], history_size=5)
        >>> def closure():
        ...     ours.zero_grad()
        ...     loss = ((w - 1.0) ** 2).sum()
        ...     loss.backward()
        ...     return loss
        >>> _ = ours.step(closure)
        >>> theirs = torch.optim.LBFGS([w], history_size=5)
        >>> theirs.load_state_dict(torchlbfgs.to_torch_state_dict(ours.state_dict()))
        >>> sorted(theirs.state_dict()["state"][0])[:4]
        ['H_diag', 'al', 'd', 'func_evals']
    """
    groups = state_dict["param_groups"]
    history_size = groups[0]["history_size"]
    converted_state = {}
    for index, leaves in state_dict["state"].items():
        grad = leaves["grad"]
        state = state_from_leaves(
            leaves, n=grad.numel(), history_size=history_size, dtype=grad.dtype, device=grad.device
        )
        converted_state[index] = state_to_torch_lbfgs(state, history_size=history_size)
    return {"state": converted_state, "param_groups": [dict(group) for group in groups]}
