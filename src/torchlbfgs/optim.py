"""``torchlbfgs.LBFGS``: a drop-in ``torch.optim.LBFGS``, as plumbing around the schedule.

The class moves data between the model and the algorithm and keeps torch.optim's conventions:
it presents the parameters (real views, complex ones as pairs) as one flat vector and the
closure as an evaluation (:class:`_ModelParameters`), runs torch's step schedule
(:func:`torchlbfgs.torch_schedule.torch_step`) over them, and keeps the state pytree
(:class:`~torchlbfgs.checkpoint.OptimizerState`) in ``self.state`` as named leaves, converted
to and from a ``state_dict`` by :mod:`torchlbfgs.checkpoint`. Hooks (step, state-dict and
load-state-dict, pre and post), learning-rate schedulers, ``add_param_group`` and entries of
the user's own in ``state`` behave as in ``torch.optim``.

Why the last step stopped is ``optimizer.stop_reason`` (a :class:`~torchlbfgs.StopReason`),
and ``optimizer.converged`` says whether it met a tolerance. torch's counters
``state[p]["n_iter"]`` and ``state[p]["func_evals"]`` read as ints from our leaves
``"iteration"`` and ``"n_evals"``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from copy import deepcopy
from typing import Any

import torch
from torch._compile import _disable_dynamo
from torch.optim import Optimizer

from torchlbfgs.bounds import Bounds, active_count, broadcast_bound
from torchlbfgs.checkpoint import (
    PARAM_SHAPES,
    OptimizerState,
    blank_state,
    extended_state,
    load_state_dict_checked,
    param_shapes,
    state_from_trusted_leaves,
    state_to_leaves,
    to_torch_state_dict,
)
from torchlbfgs.options import TORCH_OPTION_NAMES, TorchOptions
from torchlbfgs.sharded_checkpoint import split_per_parameter
from torchlbfgs.sharding import Reductions, local_tensor, reductions_for
from torchlbfgs.state import CONVERGED, StopReason
from torchlbfgs.torch_schedule import torch_step

__all__ = ["LBFGS", "to_torch_state_dict"]

# torch's names for two of our leaves, readable (as ints) from the optimizer's state
_TORCH_COUNTERS = {"n_iter": "iteration", "func_evals": "n_evals"}


def _real_view(tensor: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _flat_layout(params: list[torch.Tensor]) -> tuple[int, torch.dtype, torch.device]:
    """The flat real vector the parameters form on this process (of a ``DTensor``, its local
    piece: :mod:`torchlbfgs.sharding`): its length, dtype and device."""
    n = sum(local_tensor(p).numel() * (2 if p.is_complex() else 1) for p in params)
    return n, _real_view(params[0].detach()).dtype, params[0].device


class _Leaves(dict[str, Any]):
    """The state's named leaves, as kept in ``optimizer.state[first_param]``.

    torch's ``n_iter`` and ``func_evals`` read as ints from ``iteration`` and ``n_evals``; any
    other missing key says which leaves there are.
    """

    def __missing__(self, key: str) -> Any:
        if key in _TORCH_COUNTERS:
            return int(self[_TORCH_COUNTERS[key]])
        raise KeyError(
            f"{key!r}: torchlbfgs.LBFGS keeps the leaves {sorted(self)} (torch's 'n_iter' and "
            "'func_evals' read as 'iteration' and 'n_evals')"
        )


class _KeptState:
    """The state a step handed back, with the leaves it was stored as: the next step reuses it
    instead of rebuilding it from the leaves, as long as every leaf is still the same tensor
    (a leaf the user replaced, or a dict replaced by ``load_state_dict``, means rebuilding)."""

    def __init__(self, leaves: _Leaves, state: OptimizerState) -> None:
        self.leaves, self.values, self.state = leaves, tuple(leaves.values()), state

    def still_holds(self, leaves: Any, dtype: torch.dtype, device: torch.device) -> bool:
        grad = self.state.core.grad
        return (
            leaves is self.leaves
            and len(leaves) == len(self.values)
            and all(now is kept for now, kept in zip(leaves.values(), self.values, strict=True))
            and grad.dtype == dtype
            and grad.device == device
        )


class _ModelParameters:
    """The parameters as one flat real vector, and the closure as an evaluation (the
    :class:`~torchlbfgs.torch_schedule.Parameters` the schedule works on)."""

    def __init__(self, params: list[torch.Tensor], closure: Callable[[], Any]) -> None:
        self._params = params
        self._views = [_real_view(local_tensor(p.detach())) for p in params]
        self._sizes = [view.numel() for view in self._views]
        # One dense parameter (the common case): its flat view is the vector itself.
        self._flat = self._views[0].view(-1) if len(params) == 1 and self._views[0].is_contiguous() else None
        self._closure = closure

    def evaluate(self, into: torch.Tensor | None = None) -> tuple[Any, torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            loss = self._closure()
        reference = self._views[0]
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    "torchlbfgs.LBFGS.step: the closure must return the loss as a scalar (a one-element "
                    f"tensor or a number); it returned a tensor of shape {tuple(loss.shape)}. Reduce it, "
                    "e.g. with .sum() or .mean(), before backward()."
                )
            value = loss.detach()
            if value.dim() != 0 or value.dtype != reference.dtype or value.device != reference.device:
                value = value.reshape(()).to(dtype=reference.dtype, device=reference.device)
        elif isinstance(loss, (int, float)) and not isinstance(loss, bool):
            value = torch.full((), loss, dtype=reference.dtype, device=reference.device)
        else:
            raise TypeError(
                "torchlbfgs.LBFGS.step: the closure must return the loss (a scalar tensor or a number); "
                f"it returned {type(loss).__name__}"
            )
        return loss, value, self._flat_grad(into)

    def _flat_grad(self, into: torch.Tensor | None) -> torch.Tensor:
        grad = self._params[0].grad
        if len(self._params) == 1 and grad is not None and grad.layout == torch.strided:
            flat = _real_view(local_tensor(grad)).reshape(-1)  # one parameter: one copy
            return flat.clone() if into is None else into.copy_(flat)
        pieces = []
        for p, view in zip(self._params, self._views, strict=True):
            if p.grad is None:
                pieces.append(torch.zeros(view.numel(), dtype=view.dtype, device=view.device))
            else:
                grad = p.grad.to_dense() if p.grad.is_sparse else local_tensor(p.grad)
                pieces.append(_real_view(grad).reshape(-1))
        return torch.cat(pieces, out=into)  # a copy: a later closure may change p.grad in place

    def read(self, into: torch.Tensor | None = None) -> torch.Tensor:
        if self._flat is not None:
            return self._flat.clone() if into is None else into.copy_(self._flat)
        return torch.cat([view.reshape(-1) for view in self._views], out=into)

    def _chunks(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` cut into views shaped like the parameters."""
        if len(self._views) == 1:
            return [flat.view_as(self._views[0])]
        pieces = torch.split(flat, self._sizes)
        return [piece.view_as(view) for view, piece in zip(self._views, pieces, strict=True)]

    def write(self, flat: torch.Tensor) -> None:
        if self._flat is not None:
            self._flat.copy_(flat)
            return
        for view, chunk in zip(self._views, self._chunks(flat), strict=True):
            view.copy_(chunk)

    def write_step(self, x: torch.Tensor, direction: torch.Tensor, t: Any) -> None:
        t = float(t)  # a host number
        if self._flat is not None:
            torch.add(x, direction, alpha=t, out=self._flat)
            return
        for view, x_chunk, d_chunk in zip(self._views, self._chunks(x), self._chunks(direction), strict=True):
            torch.add(x_chunk, d_chunk, alpha=t, out=view)

    def project(self, bounds: Bounds) -> None:
        if self._flat is not None:
            torch.clamp(self._flat, bounds.lower, bounds.upper, out=self._flat)
            return
        pieces = zip(self._views, self._chunks(bounds.lower), self._chunks(bounds.upper), strict=True)
        for view, lower, upper in pieces:
            torch.clamp(view, lower, upper, out=view)


def _group_bounds(group: Mapping[str, Any], index: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """A group's ``lower``/``upper`` options as one (lower, upper) pair of tensors shaped like
    each parameter, or ``None`` when the group has neither; ``ValueError``/``TypeError`` naming
    the group and parameter for a bound that does not fit or crosses the other."""
    lower, upper = group.get("lower"), group.get("upper")
    if lower is None and upper is None:
        return None
    params = group["params"]
    sides = []
    for name, value in (("lower", lower), ("upper", upper)):
        if isinstance(value, (list, tuple)):
            if len(value) != len(params):
                raise ValueError(
                    f"param group {index}: {name} has {len(value)} entries but the group has "
                    f"{len(params)} parameters (give a float, or one tensor per parameter)"
                )
            sides.append(list(value))
        else:
            sides.append([value] * len(params))
    pairs = []
    for position, (p, low, high) in enumerate(zip(params, *sides, strict=True)):
        where = f"param group {index}, parameter {position}"
        if p.is_complex():
            raise TypeError(f"{where}: bounds need real parameters, this one is complex")
        per_side = []
        for name, value, fill in (("lower", low, -torch.inf), ("upper", high, torch.inf)):
            if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor, type(None))):
                raise TypeError(
                    f"{where}: {name} must be a float, a tensor or None, got {type(value).__name__}"
                )
            per_side.append(broadcast_bound(value, p.detach(), fill, name, where))
        if not bool((per_side[0] <= per_side[1]).all()):  # sync-ok: options, checked on the host
            raise ValueError(
                f"{where}: lower > upper (or NaN) somewhere; every lower bound must be <= its upper"
            )
        pairs.append((per_side[0], per_side[1]))
    return pairs


class LBFGS(Optimizer):
    """L-BFGS with the constructor, ``step(closure)`` and results of ``torch.optim.LBFGS``.

    Differences that only add abilities: several parameter groups are optimized jointly as
    one problem (their options must agree); ``state_dict()`` is the flattened functional
    state, validated on load (the parameters' shapes included), movable across devices and
    dtypes, and convertible to and from ``torch.optim.LBFGS``'s format; a closure that raises
    leaves params and state at the start of the inner iteration it was called in;
    :attr:`stop_reason` says why the last step stopped.

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
        lower: lower bounds on the parameters (L-BFGS-B), a group option: a float for every
            parameter of the group, or a list with one tensor per parameter (broadcastable to
            it); ``None`` or ``-inf``: unbounded. Groups may differ in their bounds.
        upper: upper bounds, as ``lower``. With bounds the step keeps torch's schedule and
            options, with L-BFGS-B's direction and every point in the box (parameters
            outside it are projected onto it first; see :mod:`torchlbfgs.torch_schedule`),
            and ``tolerance_grad`` tests the projected gradient. Without bounds (the default)
            nothing changes, not even the state dict's groups.

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
        >>> bool(closure() < first_loss), optimizer.converged
        (True, True)
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
        *,
        lower: float | list[torch.Tensor] | None = None,
        upper: float | list[torch.Tensor] | None = None,
    ) -> None:
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        defaults: dict[str, Any] = {
            "lr": lr,
            "max_iter": max_iter,
            "max_eval": max_eval,
            "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change,
            "history_size": history_size,
            "line_search_fn": line_search_fn,
        }
        # The bounds are options only where given: a bounds-free optimizer's groups (and state
        # dicts) are torch's.
        defaults.update(
            {name: value for name, value in (("lower", lower), ("upper", upper)) if value is not None}
        )
        TorchOptions.of(defaults)  # the same checks as each step makes
        super().__init__(params, defaults)

    # --- parameter groups ---------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add parameters to the problem (allowed after steps).

        The new parameters join the flat vector after the existing ones. Curvature pairs
        already in memory are extended with zeros for them (they carry no information about
        the new coordinates), and a pending step's pair is dropped; counters continue.
        """
        super().add_param_group(param_group)  # torch's own checks first
        try:
            TorchOptions.of(self.param_groups[-1], f"param group {len(self.param_groups) - 1}: ")
            TorchOptions.of_groups(self.param_groups)
            _group_bounds(self.param_groups[-1], len(self.param_groups) - 1)
        except (ValueError, TypeError):
            self.param_groups.pop()  # never a half-added group
            raise
        leaves = self.state.get(self._params[0]) if hasattr(self, "state") else None
        self.__dict__.pop("_reuse", None)  # views of buffers the extended state replaces
        if leaves:
            grad = leaves["grad"]
            stored = state_from_trusted_leaves(leaves, dtype=grad.dtype, device=grad.device)
            self._store(extended_state(stored, _flat_layout(self._params)[0]))

    @property
    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    # --- state ---------------------------------------------------------------------------------

    def _stored_state(self, params: list[torch.Tensor], history_size: int) -> OptimizerState:
        n, dtype, device = _flat_layout(params)
        leaves = self.state.get(params[0])
        kept: _KeptState | None = getattr(self, "_kept", None)
        if kept is not None and kept.still_holds(leaves, dtype, device):
            return kept.state  # the state the last step handed back, its leaves untouched since
        if not leaves:
            return blank_state(n, history_size=history_size, dtype=dtype, device=device)
        if leaves["grad"].numel() != n:
            raise RuntimeError(
                f"the optimizer state is for {leaves['grad'].numel()} parameters but the param groups now "
                f"hold {n}; add parameters with add_param_group, not by editing param_groups"
            )
        return state_from_trusted_leaves(leaves, dtype=dtype, device=device)

    def _take_state(self, params: list[torch.Tensor], history_size: int) -> OptimizerState:
        state = self._stored_state(params, history_size)
        self.state.pop(params[0], None)
        self._kept: _KeptState | None = None  # the step owns the state now, and frees as it goes
        return state

    def _store(self, state: OptimizerState) -> None:
        params = self._params
        for p in params[1:]:
            self.state.pop(p, None)
        leaves = _Leaves(state_to_leaves(state))
        self.state[params[0]] = leaves
        self._kept = _KeptState(leaves, state)

    @property
    def stop_reason(self) -> StopReason | None:
        """Why the last ``step`` stopped (``None`` before the first): a met tolerance
        (``GRADIENT_TOLERANCE``, ``STEP_TOLERANCE``, ``VALUE_CHANGE_TOLERANCE``,
        ``DIRECTIONAL_DERIVATIVE_TOLERANCE``), a used-up budget (``MAX_ITERATIONS``,
        ``MAX_EVALS``) or ``NON_FINITE``. A host read."""
        leaves = self.state.get(self._params[0])
        return StopReason(int(leaves["status"])) if leaves else None

    @property
    def converged(self) -> bool:
        """Whether the last ``step`` stopped because it met a tolerance (see :attr:`stop_reason`)."""
        return self.stop_reason in CONVERGED

    @property
    def n_active_bounds(self) -> int:
        """How many parameter entries sit on one of their group's bounds (``lower``/``upper``);
        0 without bounds. A host read."""
        bounds = self._bounds()
        if bounds is None:
            return 0
        flat = _ModelParameters(self._params, closure=lambda: None).read()
        return int(active_count(flat, bounds))  # sync-ok: a property read by the user

    # --- the step ------------------------------------------------------------------------------

    @property
    def _step_reuse(self) -> dict[str, Any]:
        """What one step leaves for the next to reuse (:func:`~torchlbfgs.torch_schedule.torch_step`);
        not part of the state (dropped by pickling, copying and loading)."""
        reuse: dict[str, Any] = self.__dict__.setdefault("_reuse", {})
        return reuse

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

        Inside a ``torch.compile``d function the step runs eagerly, as torch's does.
        """
        if torch.compiler.is_compiling():
            return self._step_outside_compile(closure)
        return self._step(closure)

    @torch.no_grad()
    def _step(self, closure: Callable[[], Any]) -> Any:
        params = self._params
        options = self._options()
        if closure is None and not self.state.get(params[0]) and self._all_grads_zero():
            self._store(self._stored_state(params, options.history_size))
            return None
        if closure is None or not callable(closure):
            raise ValueError(
                "torchlbfgs.LBFGS.step needs a closure that re-evaluates the model and returns the loss"
            )
        model = _ModelParameters(params, closure)
        had_state = bool(self.state.get(params[0]))

        def keep(state: OptimizerState, *, unchanged: bool) -> None:
            if had_state or not unchanged:  # an optimizer without state stays without
                self._store(state)

        # The step owns the state while it runs (and hands it back through `keep` on every way
        # out): what it no longer needs is freed as it goes, as torch's step frees it, so the
        # state is passed on, not held in a variable here.
        bounds = self._bounds()
        reductions = self._reductions(params)
        if bounds is not None and reductions.sharded:
            raise ValueError(
                "torchlbfgs.LBFGS: bounds (lower/upper) are not supported with parameters sharded over "
                "processes (DTensor); nothing was changed"
            )
        return torch_step(
            model, self._take_state(params, options.history_size), options, keep=keep, reuse=self._step_reuse,
            bounds=bounds, reductions=reductions,
        )  # fmt: skip

    def _reductions(self, params: list[torch.Tensor]) -> Reductions:
        """How the step reduces the flat vector (:mod:`torchlbfgs.sharding`), made once per set
        of parameters."""
        cached = self.__dict__.get("_cached_reductions")
        if (
            cached is not None
            and len(cached[0]) == len(params)
            and all(a is b for a, b in zip(cached[0], params, strict=True))
        ):
            reductions: Reductions = cached[1]
            return reductions
        reductions = reductions_for(params)
        self.__dict__["_cached_reductions"] = (list(params), reductions)
        return reductions

    def _bounds(self) -> Bounds | None:
        """The groups' bounds as flat vectors like the parameters (``None`` if no group has any);
        made again only when a group's ``lower``/``upper`` changed (or a tensor in them was
        written to)."""
        key = tuple(
            _option_key(group.get(name)) for group in self.param_groups for name in ("lower", "upper")
        )
        cached = self.__dict__.get("_flat_bounds")
        if cached is not None and cached[0] == key:
            bounds: Bounds | None = cached[1]
            return bounds
        per_group = [_group_bounds(group, index) for index, group in enumerate(self.param_groups)]
        bounds = None
        if any(pairs is not None for pairs in per_group):
            lowers, uppers = [], []
            for group, pairs in zip(self.param_groups, per_group, strict=True):
                for index, p in enumerate(group["params"]):
                    low, high = pairs[index] if pairs is not None else _unbounded(p)
                    lowers.append(low.reshape(-1))
                    uppers.append(high.reshape(-1))
            bounds = Bounds(torch.cat(lowers), torch.cat(uppers))
        self.__dict__["_flat_bounds"] = (key, bounds)
        return bounds

    def _options(self) -> TorchOptions:
        """The groups' options, checked (:meth:`TorchOptions.of_groups`); the last step's while
        every group holds the very same values (a scheduler that sets ``lr`` makes a new check;
        a tensor option is checked every time, as it may change in place)."""
        values = tuple(tuple(group.get(name) for name in TORCH_OPTION_NAMES) for group in self.param_groups)
        if any(isinstance(value, torch.Tensor) for group in values for value in group):
            return TorchOptions.of_groups(self.param_groups)
        cached = self.__dict__.get("_checked_options")
        if cached is not None and cached[0] == values:
            options: TorchOptions = cached[1]
            return options
        options = TorchOptions.of_groups(self.param_groups)
        self.__dict__["_checked_options"] = (values, options)
        return options

    # Left out of compiled graphs only while compiling: outside, disabling dynamo around each
    # step would cost every frame of the step (measured: 2-3% of a step at n = 1e3), and
    # torch.compiler.disable would import torch._dynamo with torchlbfgs (over a second).
    _step_outside_compile = _disable_dynamo(_step)

    def _all_grads_zero(self) -> bool:
        return all(p.grad is not None and not bool(local_tensor(p.grad).any()) for p in self._params)

    # --- state_dict ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's format, with this optimizer's state as named leaves (see
        :mod:`torchlbfgs.checkpoint`) and each group's parameter shapes. The tensors are copies:
        later steps, which update the history buffers in place, do not change a state dict
        already taken. Entries of the user's own in ``state`` are kept as they are."""
        state_dict = super().state_dict()
        params = self._params
        sharded = self._reductions(params).sharded and bool(self.state.get(params[0]))
        state_dict["state"] = {
            index: _copied(entry)
            for index, entry in state_dict["state"].items()
            if not (sharded and index == 0)
        }
        if sharded:  # one DTensor per parameter and vector (torchlbfgs.sharded_checkpoint)
            state_dict["state"].update(split_per_parameter(self.state[params[0]], params))
        for saved, group in zip(state_dict["param_groups"], self.param_groups, strict=True):
            saved[PARAM_SHAPES] = param_shapes(group["params"])
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` or from ``torch.optim.LBFGS``.

        Load-state-dict pre-hooks run first, on the state dict as given (and may replace it),
        as in torch. Then every leaf is validated (presence, shape, dtype kind, ranges,
        finiteness, history size, parameter count and shapes) before anything is assigned;
        floating leaves move to the parameters' device and real dtype, integer counters stay
        int64. A mismatch raises ``ValueError`` (or ``TypeError`` for non-tensors) naming the
        leaf, and leaves the optimizer exactly as it was. Top-level keys other than ``state``
        and ``param_groups``, and ``state`` entries that belong to no parameter, are
        accepted as torch accepts them.
        """
        self.__dict__.pop("_reuse", None)  # views of buffers the loaded state replaces
        state_dict = dict(state_dict) if isinstance(state_dict, Mapping) else state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            replaced = pre_hook(self, state_dict)
            if replaced is not None:
                state_dict = replaced
        params = self._params
        n, dtype, device = _flat_layout(params)
        loaded = load_state_dict_checked(
            state_dict,
            self.param_groups,
            dtype=dtype,
            device=device,
            n=n,
            reductions=self._reductions(params),
        )

        # Everything is checked: assign (the groups' options as torch does, then the state).
        for group, options in zip(self.param_groups, loaded.groups, strict=True):
            kept = {"params": group["params"]}
            # A checkpoint without bounds keeps this optimizer's (its parameters are projected
            # into them by the next step); one with bounds brings its own.
            for name in ("param_names", "lower", "upper"):
                if name in group and name not in options:
                    kept[name] = group[name]
            group.clear()
            group.update(deepcopy(options), **kept)
        self.state = defaultdict(dict)
        for key, value in loaded.other_entries.items():
            self.state[key] = deepcopy(value)  # the user's own entry, kept as torch keeps it
        if loaded.state is not None:
            self._store(loaded.state)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _option_key(value: Any) -> tuple[Any, ...]:
    """What identifies a bound option's current value: the object, and the version counters of
    its tensors (in-place writes count up)."""
    tensors = value if isinstance(value, (list, tuple)) else [value]
    return (id(value), *(t._version for t in tensors if isinstance(t, torch.Tensor)))


def _unbounded(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    infinite = torch.full(p.shape, torch.inf, dtype=p.dtype, device=p.device)
    return -infinite, infinite


def _copied(entry: Any) -> Any:
    """A state entry with its tensors copied (a plain dict for our leaves); others as they are."""
    if isinstance(entry, Mapping):
        return {name: _copied(leaf) for name, leaf in entry.items()}
    return entry.clone() if isinstance(entry, torch.Tensor) else entry
