"""State-dict conversion for :class:`torchlbfgs.LBFGS`: flatten, validate, unflatten, migrate.

The optimizer's state is a pytree, :class:`OptimizerState`: the functional
:class:`~torchlbfgs.LBFGSState` plus the step whose curvature pair is still pending (see
:mod:`torchlbfgs.optim`). In a ``state_dict`` it is stored flat, one named leaf per field,
under the first parameter's index as ``torch.optim.LBFGS`` does::

    {"state": {0: {"value": ..., "grad": ..., "s_history": ..., ..., "has_pending": ...,
                   "format_version": 2}},
     "param_groups": [...]}

Every leaf is a tensor, except ``format_version`` (a Python int), so a checkpoint loads with
``torch.load(path, weights_only=True)``.

Format history: version 2 added the leaves ``sy_products`` and ``yy_products`` (the compact
representation's inner products; ``(0, 0)`` for the adapter, which uses the two-loop
recursion). Version 1 checkpoints load as they are: the two leaves are added, empty.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from torchlbfgs.history import History
from torchlbfgs.options import TORCH_OPTION_NAMES, TorchOptions
from torchlbfgs.sharded_checkpoint import join_per_parameter
from torchlbfgs.sharding import LOCAL, Reductions, is_dtensor
from torchlbfgs.state import LBFGSState, StopReason
from torchlbfgs.update import initial_state

__all__ = [
    "FORMAT_VERSION",
    "LoadedStateDict",
    "OptimizerState",
    "blank_state",
    "check_param_shapes",
    "extended_state",
    "is_torch_lbfgs_state",
    "load_state_dict_checked",
    "param_shapes",
    "state_from_leaves",
    "state_from_torch_lbfgs",
    "state_from_trusted_leaves",
    "state_to_leaves",
    "state_to_torch_lbfgs",
    "to_torch_state_dict",
]

FORMAT_VERSION = 2
_EMPTY_PRODUCTS_SINCE = {"sy_products", "yy_products"}  # the leaves version 2 added


class OptimizerState(NamedTuple):
    """The state of :class:`torchlbfgs.LBFGS` between ``step`` calls.

    Attributes:
        core: the :class:`~torchlbfgs.LBFGSState` at the start of the last iteration taken
            (its ``iteration`` and ``n_evals`` already count that iteration).
        pending_direction: ``(n,)`` - direction :math:`d` of the last iteration.
        pending_step: ``()`` - its step size :math:`t`; the params are at ``x + t d``.
        has_pending: ``()`` bool - whether a last iteration is pending: its curvature pair
            :math:`(t d, g_{new} - g)` enters the memory when the next ``step`` evaluates the
            closure, as in ``torch.optim.LBFGS``.
    """

    core: LBFGSState
    pending_direction: torch.Tensor
    pending_step: torch.Tensor
    has_pending: torch.Tensor


def blank_state(n: int, *, history_size: int, dtype: torch.dtype, device: torch.device) -> OptimizerState:
    """The state before any step: no pair, nothing pending, no evaluation counted (a first
    ``step`` overwrites its value and gradient)."""
    zero = torch.zeros((), dtype=dtype, device=device)
    core = initial_state(zero, torch.zeros(n, dtype=dtype, device=device), history_size=history_size)
    return OptimizerState(
        core._replace(n_evals=torch.zeros_like(core.n_evals)), torch.zeros_like(core.grad), zero,
        torch.tensor(False, device=device),
    )  # fmt: skip


def extended_state(state: OptimizerState, n: int) -> OptimizerState:
    """The state padded with zeros for parameters added after it was made (the pairs carry no
    information about the new coordinates); a pending step's pair is dropped."""
    core = state.core
    pad = n - core.grad.numel()

    def padded(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, pad))

    extended = core._replace(
        grad=padded(core.grad), s_history=padded(core.s_history), y_history=padded(core.y_history)
    )
    return OptimizerState(
        extended, padded(state.pending_direction), state.pending_step, torch.zeros_like(state.has_pending)
    )


# --- the parameters' shapes, recorded in each saved parameter group ---------------------------

PARAM_SHAPES = "param_shapes"


def param_shapes(params: list[torch.Tensor]) -> list[list[int]]:
    """The shapes of a group's parameters, as saved in its ``param_shapes`` entry."""
    return [list(p.shape) for p in params]


def check_param_shapes(saved_group: Mapping[str, Any], params: list[torch.Tensor], index: int) -> None:
    """Refuse a checkpoint whose group ``index`` was saved for parameters of other shapes (a
    group saved without shapes, by torch or an older version, is not checked)."""
    saved = saved_group.get(PARAM_SHAPES)
    if saved is None:
        return
    if not isinstance(saved, list) or len(saved) != len(params):
        raise ValueError(
            f"param group {index} of the loaded state dict: {PARAM_SHAPES} should list {len(params)} "
            f"shapes, found {saved!r}"
        )
    for position, (shape, param) in enumerate(zip(saved, params, strict=True)):
        if not isinstance(shape, (list, tuple)) or not all(type(size) is int for size in shape):
            raise ValueError(
                f"param group {index}, parameter {position}: {PARAM_SHAPES} should hold a list of ints, "
                f"found {shape!r}"
            )
        if list(shape) != list(param.shape):
            raise ValueError(
                f"param group {index}, parameter {position}: the checkpoint was saved for shape "
                f"{tuple(shape)}, this optimizer's parameter has shape {tuple(param.shape)}"
            )


_FLOAT, _INT, _BOOL = "floating", "integer", "bool"


def _leaf_specs(n: int, m: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Expected shape and dtype kind of every leaf, for ``n`` parameters and history ``m``."""
    return {
        "value": ((), _FLOAT),
        "grad": ((n,), _FLOAT),
        "s_history": ((m, n), _FLOAT),
        "y_history": ((m, n), _FLOAT),
        "rho": ((m,), _FLOAT),
        "gamma": ((), _FLOAT),
        "head": ((), _INT),
        "n_pairs": ((), _INT),
        "sy_products": ((0, 0), _FLOAT),
        "yy_products": ((0, 0), _FLOAT),
        "iteration": ((), _INT),
        "n_evals": ((), _INT),
        "status": ((), _INT),
        "pending_direction": ((n,), _FLOAT),
        "pending_step": ((), _FLOAT),
        "has_pending": ((), _BOOL),
    }


def state_to_leaves(state: OptimizerState) -> dict[str, Any]:
    """Flatten the state pytree into named leaves (the ``state_dict`` entry)."""
    return {
        **state.core._asdict(),
        "pending_direction": state.pending_direction,
        "pending_step": state.pending_step,
        "has_pending": state.has_pending,
        "format_version": FORMAT_VERSION,
    }


def _kind(tensor: torch.Tensor) -> str:
    if tensor.dtype == torch.bool:
        return _BOOL
    return _FLOAT if tensor.is_floating_point() else _INT if not tensor.is_complex() else "complex"


def state_from_leaves(
    leaves: Mapping[str, Any], *, n: int, history_size: int, dtype: torch.dtype, device: torch.device
) -> OptimizerState:
    """Validate named leaves and rebuild the state on ``device``, floats cast to ``dtype``.

    Raises:
        ValueError: a leaf is missing or unexpected, has the wrong shape, dtype kind or
            range, or holds NaN/Inf; the message names the leaf, what was expected and what
            was found.
        TypeError: a leaf is not a tensor.
    """
    if not isinstance(leaves, Mapping):
        raise TypeError(f"optimizer state must be a dict of named leaves, got {type(leaves).__name__}")
    if leaves.get("format_version") == 1 and not _EMPTY_PRODUCTS_SINCE & set(leaves):
        empty = torch.zeros(0, 0)
        leaves = {**leaves, "sy_products": empty, "yy_products": empty, "format_version": FORMAT_VERSION}
    specs = _leaf_specs(n, history_size)
    expected_keys = set(specs) | {"format_version"}
    missing = sorted(expected_keys - set(leaves))
    unexpected = sorted(set(leaves) - expected_keys, key=str)
    if missing:
        raise ValueError(f"optimizer state is missing {missing}; expected the leaves {sorted(expected_keys)}")
    if unexpected:
        raise ValueError(
            f"optimizer state has unexpected keys {unexpected}; expected {sorted(expected_keys)}"
        )
    version = leaves["format_version"]
    if type(version) is not int or version != FORMAT_VERSION:
        raise ValueError(f"format_version: expected {FORMAT_VERSION}, found {version!r}")

    converted: dict[str, torch.Tensor] = {}
    for name, (shape, kind) in specs.items():
        leaf = leaves[name]
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor of shape {shape}, found {type(leaf).__name__}")
        if tuple(leaf.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, found {tuple(leaf.shape)}")
        if _kind(leaf) != kind:
            article = "an" if kind[0] in "aeiou" else "a"
            raise ValueError(f"{name}: expected {article} {kind} tensor, found dtype {leaf.dtype}")
        if kind == _FLOAT:
            if not bool(torch.isfinite(leaf).all()):
                raise ValueError(f"{name}: expected finite values, found NaN or Inf")
            converted[name] = leaf.detach().to(device=device, dtype=dtype, copy=True)
        else:
            converted[name] = leaf.detach().to(device=device, dtype=leaf.dtype, copy=True)

    def check_range(name: str, low: int, high: int) -> None:
        found = int(converted[name])
        if not low <= found <= high:
            raise ValueError(f"{name}: expected an integer in [{low}, {high}], found {found}")

    int64_max = torch.iinfo(torch.int64).max
    check_range("head", 0, history_size - 1)
    check_range("n_pairs", 0, history_size)
    check_range("iteration", 0, int64_max)
    check_range("n_evals", 0, int64_max)
    check_range("status", 0, max(StopReason))
    for name in ("head", "n_pairs", "iteration", "n_evals", "status"):
        converted[name] = converted[name].to(torch.int64)
    core = LBFGSState(**{field: converted[field] for field in LBFGSState._fields})
    return OptimizerState(
        core=core,
        pending_direction=converted["pending_direction"],
        pending_step=converted["pending_step"],
        has_pending=converted["has_pending"],
    )


def state_from_trusted_leaves(
    leaves: Mapping[str, Any], *, dtype: torch.dtype, device: torch.device
) -> OptimizerState:
    """Rebuild the state from leaves this package wrote (no validation), on ``device`` with
    floating leaves in ``dtype`` (a no-op when they already are)."""

    def moved(name: str) -> torch.Tensor:
        leaf: torch.Tensor = leaves[name]
        floating = leaf.is_floating_point()
        if leaf.device == device and (leaf.dtype == dtype or not floating):
            return leaf  # as every step finds them: no call into torch
        return leaf.to(device=device, dtype=dtype) if floating else leaf.to(device=device)

    core = LBFGSState(**{field: moved(field) for field in LBFGSState._fields})
    return OptimizerState(core, moved("pending_direction"), moved("pending_step"), moved("has_pending"))


# --- torch.optim.LBFGS's format --------------------------------------------------------------

_TORCH_KEYS = {
    "func_evals",
    "n_iter",
    "d",
    "t",
    "old_dirs",
    "old_stps",
    "ro",
    "H_diag",
    "prev_flat_grad",
    "prev_loss",
}


def is_torch_lbfgs_state(leaves: Mapping[str, Any]) -> bool:
    """Whether a per-parameter state entry was written by ``torch.optim.LBFGS``."""
    return "func_evals" in leaves and "n_iter" in leaves and "format_version" not in leaves


def _as_float_tensor(value: Any, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"torch LBFGS state {name!r}: expected a scalar, found shape {tuple(value.shape)}"
            )
        return value.detach().reshape(()).to(device=device, dtype=dtype)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=dtype, device=device)
    raise TypeError(f"torch LBFGS state {name!r}: expected a number, found {type(value).__name__}")


def state_from_torch_lbfgs(
    torch_state: Mapping[str, Any], *, n: int, history_size: int, dtype: torch.dtype, device: torch.device
) -> dict[str, Any]:
    """Convert a ``torch.optim.LBFGS`` state entry into our named leaves.

    torch keeps its pairs in Python lists (``old_stps``/``old_dirs``/``ro``, oldest first),
    the scaling in ``H_diag``, and the last step ``(d, t)`` whose pair it adds at the next
    ``step`` from ``prev_flat_grad``: exactly our pending step. When torch kept more pairs
    than ``history_size`` the newest ``history_size`` are kept. The result still goes through
    :func:`state_from_leaves` validation.
    """
    unexpected = sorted(set(torch_state) - _TORCH_KEYS - {"al"})
    if unexpected:
        raise ValueError(f"torch LBFGS state has unexpected keys {unexpected}")
    n_evals, n_iter = torch_state["func_evals"], torch_state["n_iter"]
    for name, count in (("func_evals", n_evals), ("n_iter", n_iter)):
        if type(count) is not int or count < 0:
            raise ValueError(f"torch LBFGS state {name!r}: expected a non-negative int, found {count!r}")

    def counter(value: int) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.int64, device=device)

    if "d" not in torch_state:  # torch has taken no iteration yet: no history, nothing pending
        blank = blank_state(n, history_size=history_size, dtype=dtype, device=device)
        core = blank.core._replace(iteration=counter(n_iter), n_evals=counter(n_evals))
        return state_to_leaves(blank._replace(core=core))

    missing = sorted(_TORCH_KEYS - set(torch_state))
    if missing:
        raise ValueError(f"torch LBFGS state is missing {missing}")
    old_stps, old_dirs, ro = torch_state["old_stps"], torch_state["old_dirs"], torch_state["ro"]
    if not (isinstance(old_stps, list) and isinstance(old_dirs, list) and isinstance(ro, list)):
        raise TypeError("torch LBFGS state: 'old_stps', 'old_dirs' and 'ro' must be lists")
    if not len(old_stps) == len(old_dirs) == len(ro):
        raise ValueError(
            f"torch LBFGS state: 'old_stps', 'old_dirs', 'ro' have lengths "
            f"{len(old_stps)}, {len(old_dirs)}, {len(ro)}; expected equal lengths"
        )
    keep = min(len(old_stps), history_size)
    first = len(old_stps) - keep

    def vector(value: Any, name: str) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or value.shape != (n,):
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"torch LBFGS state {name}: expected a tensor of shape ({n},), found {found}")
        return value.detach().to(device=device, dtype=dtype)

    s_history = torch.zeros(history_size, n, dtype=dtype, device=device)
    y_history = torch.zeros_like(s_history)
    rho = torch.zeros(history_size, dtype=dtype, device=device)
    for slot in range(keep):
        s_history[slot] = vector(old_stps[first + slot], f"'old_stps'[{first + slot}]")
        y_history[slot] = vector(old_dirs[first + slot], f"'old_dirs'[{first + slot}]")
        rho[slot] = _as_float_tensor(ro[first + slot], f"ro[{first + slot}]", dtype, device)
    core = LBFGSState(
        value=_as_float_tensor(torch_state["prev_loss"], "prev_loss", dtype, device),
        grad=vector(torch_state["prev_flat_grad"], "'prev_flat_grad'"),
        s_history=s_history,
        y_history=y_history,
        rho=rho,
        gamma=_as_float_tensor(torch_state["H_diag"], "H_diag", dtype, device),
        head=counter(keep % history_size),
        n_pairs=counter(keep),
        sy_products=torch.zeros(0, 0, dtype=dtype, device=device),
        yy_products=torch.zeros(0, 0, dtype=dtype, device=device),
        iteration=counter(n_iter),
        n_evals=counter(n_evals),
        status=counter(int(StopReason.RUNNING)),
    )
    return state_to_leaves(
        OptimizerState(
            core=core,
            pending_direction=vector(torch_state["d"], "'d'"),
            pending_step=_as_float_tensor(torch_state["t"], "t", dtype, device),
            has_pending=torch.tensor(True, device=device),
        )
    )


def _chronological(history: History) -> list[int]:
    m = history.s_history.shape[0]
    head, n_pairs = int(history.head), int(history.n_pairs)
    return [(head - n_pairs + i) % m for i in range(n_pairs)]


def state_to_torch_lbfgs(state: OptimizerState, *, history_size: int) -> dict[str, Any]:
    """The ``torch.optim.LBFGS`` state entry equivalent to ``state`` (the inverse of
    :func:`state_from_torch_lbfgs`): continuing with torch from it takes the same steps."""
    core = state.core
    slots = _chronological(core.history)
    converted: dict[str, Any] = {"func_evals": int(core.n_evals), "n_iter": int(core.iteration)}
    if int(core.iteration) == 0 and not bool(state.has_pending):
        return converted
    pending = bool(state.has_pending)
    step = float(state.pending_step) if pending else 0.0
    loss = float(core.value)
    converted.update(
        d=state.pending_direction.clone() if pending else torch.zeros_like(core.grad),
        t=step if math.isfinite(step) else 0.0,
        old_dirs=[core.y_history[slot].clone() for slot in slots],
        old_stps=[core.s_history[slot].clone() for slot in slots],
        ro=[core.rho[slot].clone() for slot in slots],
        H_diag=core.gamma.clone(),
        prev_flat_grad=core.grad.clone(),
        prev_loss=loss,
        al=[None] * history_size,
    )
    return converted


def to_torch_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Convert a :class:`~torchlbfgs.LBFGS` state dict into ``torch.optim.LBFGS``'s format.

    The result loads into a ``torch.optim.LBFGS`` over the same parameters (one group), which
    then continues exactly as this optimizer would.

    Args:
        state_dict: what :meth:`LBFGS.state_dict <torchlbfgs.LBFGS.state_dict>` returned.

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
    if any(
        is_dtensor(leaf)
        for entry in state_dict["state"].values()
        if isinstance(entry, Mapping)
        for leaf in entry.values()
    ):
        raise ValueError(
            "to_torch_state_dict: the state is of parameters sharded over processes (DTensor leaves); "
            "torch.optim.LBFGS cannot step on sharded parameters (it flattens them with view(-1))"
        )
    converted_state: dict[Any, Any] = {}
    for index, leaves in state_dict["state"].items():
        if not isinstance(leaves, Mapping) or "grad" not in leaves:
            converted_state[index] = leaves  # an entry of the user's, kept as torch keeps it
            continue
        grad = leaves["grad"]
        state = state_from_leaves(
            leaves, n=grad.numel(), history_size=history_size, dtype=grad.dtype, device=grad.device
        )
        converted_state[index] = state_to_torch_lbfgs(state, history_size=history_size)
    torch_groups = [{k: v for k, v in group.items() if k not in (PARAM_SHAPES,)} for group in groups]
    return {**state_dict, "state": converted_state, "param_groups": torch_groups}


class LoadedStateDict(NamedTuple):
    """A state dict checked against an optimizer: what to assign, once nothing was refused.

    Attributes:
        groups: the saved groups' options (without ``params`` and ``param_shapes``), one per
            parameter group.
        state: the validated state, or ``None`` if the state dict holds none.
        other_entries: ``state`` entries that belong to no parameter (a user's), as saved.
    """

    groups: list[dict[str, Any]]
    state: OptimizerState | None
    other_entries: dict[Any, Any]


def load_state_dict_checked(
    state_dict: Any, groups: list[dict[str, Any]], *, dtype: torch.dtype, device: torch.device, n: int,
    reductions: Reductions = LOCAL,
) -> LoadedStateDict:  # fmt: skip
    """Check a whole state dict (ours or ``torch.optim.LBFGS``'s) against the optimizer's
    parameter ``groups`` (``n`` real values in all) and convert it; nothing is assigned here.
    With parameters sharded over processes (``reductions``), the state is one entry per
    parameter (:mod:`torchlbfgs.sharded_checkpoint`).

    Raises:
        ValueError: the groups or a leaf do not fit, naming which and why.
        TypeError: an entry has the wrong type.
    """
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        found = sorted(map(str, state_dict)) if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise ValueError(f"expected a state dict with keys 'param_groups' and 'state', found {found}")
    saved_groups = state_dict["param_groups"]
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups) if isinstance(saved_groups, list) else '?'} "
            f"parameter groups; this optimizer has {len(groups)}"
        )
    for index, (saved, group) in enumerate(zip(saved_groups, groups, strict=True)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
            raise ValueError(f"param group {index} of the loaded state dict has no 'params' list")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {index} of the loaded state dict has {len(saved['params'])} parameters; "
                f"this optimizer's has {len(group['params'])}"
            )
        missing = [option for option in TORCH_OPTION_NAMES if option not in saved]
        if missing:
            raise ValueError(
                f"param group {index} of the loaded state dict has no {missing}: it was not written by "
                f"an L-BFGS optimizer (its options are {sorted(k for k in saved if k != 'params')})"
            )
        check_param_shapes(saved, group["params"], index)
    history_size = TorchOptions.of_groups(saved_groups).history_size
    if history_size != groups[0]["history_size"]:
        raise ValueError(
            f"history_size: the checkpoint has {history_size}, this optimizer has "
            f"{groups[0]['history_size']}; create the optimizer with the same history_size"
        )

    saved_state = state_dict["state"]
    if not isinstance(saved_state, dict):
        raise TypeError(f"state_dict['state'] must be a dict, found {type(saved_state).__name__}")
    saved_ids = [index for saved in saved_groups for index in saved["params"]]
    index_of_first = saved_ids[0]
    others = {key: value for key, value in saved_state.items() if key not in saved_ids}
    options = [
        {k: v for k, v in saved.items() if k not in ("params", PARAM_SHAPES)} for saved in saved_groups
    ]
    if reductions.sharded:
        joined = None
        if any(key in saved_state for key in saved_ids):
            params = [p for group in groups for p in group["params"]]
            leaves = join_per_parameter(
                saved_state, saved_ids, params, history_size=history_size, reductions=reductions
            )
            joined = state_from_leaves(leaves, n=n, history_size=history_size, dtype=dtype, device=device)
        return LoadedStateDict(options, joined, others)
    first = saved_state.get(index_of_first)
    if isinstance(first, Mapping) and any(is_dtensor(leaf) for leaf in first.values()):
        raise ValueError(
            "the checkpoint was saved for sharded parameters (its leaves are DTensors), this optimizer's "
            "are unsharded; load it onto parameters sharded over processes (a mesh of any size)"
        )
    other_params = sorted((set(saved_state) & set(saved_ids)) - {index_of_first}, key=str)
    if other_params:
        raise ValueError(
            f"state_dict['state'] has entries for parameters {other_params}; L-BFGS keeps its whole "
            f"state under the first parameter ({index_of_first!r})"
        )
    validated: OptimizerState | None = None
    if index_of_first in saved_state:
        leaves = saved_state[index_of_first]
        if not isinstance(leaves, Mapping):
            raise TypeError(f"optimizer state must be a dict of named leaves, found {type(leaves).__name__}")
        if is_torch_lbfgs_state(leaves):
            leaves = state_from_torch_lbfgs(
                leaves, n=n, history_size=history_size, dtype=dtype, device=device
            )
        validated = state_from_leaves(leaves, n=n, history_size=history_size, dtype=dtype, device=device)
    return LoadedStateDict(options, validated, others)
