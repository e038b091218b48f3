r"""Box constraints :math:`l \le x \le u` on the flat parameter vector.

Users give bounds per leaf of their params (:func:`flat_bounds`); the algorithm sees two flat
vectors, ``-inf``/``+inf`` where a side is unbounded. Everything here is elementwise and
branch-free, so it runs under ``torch.func.vmap`` and ``torch.compile``:

* :func:`project`: :math:`P(x) = \min(\max(x, l), u)`, the closest feasible point. Every point
  the solver evaluates or returns is projected, so no rounding ever leaves the box.
* :func:`projected_gradient`: :math:`P(x - g) - x`. It is zero exactly at the points that
  satisfy the first-order (KKT) conditions of the bounded problem; its max-norm is what
  ``tolerance_grad`` is tested against (L-BFGS-B's ``pgtol``, Byrd, Lu, Nocedal & Zhu 1995).
* :func:`max_step`: the largest :math:`t` with :math:`l \le x + t d \le u`.

Examples:
    >>> import torch
    >>> from torchlbfgs.bounds import Bounds, project, projected_gradient
    >>> box = Bounds(torch.zeros(2), torch.ones(2))
    >>> project(torch.tensor([-1.0, 0.5]), box)
    tensor([0.0000, 0.5000])
    >>> projected_gradient(torch.tensor([0.0, 0.5]), torch.tensor([3.0, 1.0]), box)  # the first is held by l
    tensor([ 0.0000, -0.5000])
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch
from torch._C._functorch import is_functorch_wrapped_tensor

from torchlbfgs.line_searches.loop import exits_early
from torchlbfgs.sharding import is_dtensor

__all__ = [
    "Bounds",
    "BoundsLike",
    "active_count",
    "broadcast_bound",
    "flat_bounds",
    "given_bounds",
    "infeasible",
    "leaf_bounds",
    "max_step",
    "no_bounds",
    "project",
    "projected_gradient",
]

PyTree = Any
BoundsLike = tuple[Any, Any] | None
"""What users pass as ``bounds=``: ``(lower, upper)``, each a float, a tensor broadcastable to
every leaf, ``None`` (unbounded on that side) or a pytree with the structure of the params
whose leaves are any of those; or ``None`` for no bounds at all."""


class Bounds(NamedTuple):
    """Flat lower and upper bounds, shaped like the flat params ``(n,)`` (``-inf``/``+inf``
    where a side is unbounded)."""

    lower: torch.Tensor
    upper: torch.Tensor


def broadcast_bound(bound: Any, leaf: torch.Tensor, fill: float, side: str, where: str) -> torch.Tensor:
    """One side's ``bound`` (a number, a tensor or ``None``) broadcast to ``leaf``'s shape and
    dtype (``fill`` where it is ``None``); ``ValueError`` naming ``where`` if it does not fit."""
    if bound is None:
        return torch.full(leaf.shape, fill, dtype=leaf.dtype, device=leaf.device)
    tensor = torch.as_tensor(bound, dtype=leaf.dtype, device=leaf.device)
    try:
        return torch.broadcast_to(tensor, leaf.shape)
    except RuntimeError:
        raise ValueError(
            f"{side} bound of {where} has shape {tuple(tensor.shape)}, which does not broadcast to "
            f"the leaf's shape {tuple(leaf.shape)}"
        ) from None


def _per_leaf(bound: Any, treespec: optree.PyTreeSpec, n_leaves: int, side: str) -> list[Any]:
    """One bound per leaf of the params: a shared bound, or a pytree flattened up to the params."""
    if bound is None or isinstance(bound, (int, float, torch.Tensor)):
        return [bound] * n_leaves
    try:
        return list(treespec.flatten_up_to(bound))
    except ValueError as error:
        raise ValueError(
            f"{side} bounds must be a float, a tensor or a pytree with the structure of the params "
            f"({treespec}); {error}"
        ) from None


def _path_name(path: tuple[Any, ...]) -> str:
    return "params" + "".join(f"[{key!r}]" for key in path)


def leaf_bounds(bounds: tuple[Any, Any], params: PyTree) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(leaf name, lower, upper)`` for each leaf of ``params``, each bound broadcast to the
    leaf's shape; ``ValueError`` naming the leaf where ``lower > upper`` when reading is free."""
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise TypeError(
            f"bounds must be a pair (lower, upper) (or None for no bounds), got {type(bounds).__name__}"
        )
    paths, leaves, treespec = optree.tree_flatten_with_path(params)
    lowers = _per_leaf(bounds[0], treespec, len(leaves), "lower")
    uppers = _per_leaf(bounds[1], treespec, len(leaves), "upper")
    out = []
    for path, leaf, lower, upper in zip(paths, leaves, lowers, uppers, strict=True):
        where = _path_name(path)
        if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
            raise TypeError(f"{where} is not a real floating-point tensor; bounds need real parameters")
        low = broadcast_bound(lower, leaf, -torch.inf, "lower", where)
        high = broadcast_bound(upper, leaf, torch.inf, "upper", where)
        if _can_read(low) and _can_read(high):
            crossed = ~(low <= high)
            if bool(crossed.any()):  # sync-ok: where reading is free
                index = tuple(int(i) for i in crossed.nonzero()[0])  # sync-ok: the error path
                raise ValueError(
                    f"bounds: lower > upper (or NaN) at {where}, index {index}: "
                    f"lower {float(low[index])}, upper {float(high[index])}"
                )
        out.append((where, low, high))
    return out


def flat_bounds(bounds: BoundsLike, params: PyTree) -> Bounds | None:
    """``bounds=(lower, upper)`` as flat vectors in the layout of ``ravel_pytree(params)``.

    Raises ``ValueError`` naming the leaf where ``lower > upper`` when reading that is free
    (eager CPU tensors, outside ``vmap`` and ``torch.compile``); elsewhere the problem ends
    with status ``INVALID_BOUNDS`` (:func:`infeasible`).

    Examples:
        >>> import torch
        >>> from torchlbfgs.bounds import flat_bounds
        >>> flat_bounds((0.0, {"a": None, "b": 2.0}), {"a": torch.ones(2), "b": torch.ones(1)})
        Bounds(lower=tensor([0., 0., 0.]), upper=tensor([inf, inf, 2.]))
    """
    if bounds is None:
        return None
    if any(is_dtensor(leaf) for leaf in optree.tree_leaves(params)):
        raise ValueError(
            "torchlbfgs: bounds are not supported with parameters sharded over processes (DTensor): "
            "L-BFGS-B's Cauchy point orders the breakpoints of every coordinate, across all shards"
        )
    per_leaf = leaf_bounds(bounds, params)
    lower = torch.cat([low.reshape(-1) for _, low, _ in per_leaf])
    upper = torch.cat([high.reshape(-1) for _, _, high in per_leaf])
    return Bounds(lower, upper)


def _can_read(tensor: torch.Tensor) -> bool:
    return exits_early(None, tensor) and not is_functorch_wrapped_tensor(tensor)


def no_bounds(like: torch.Tensor) -> Bounds:
    """ "No bounds" as a state holds it: empty vectors (``torch.func.vmap`` returns only
    tensors, so a state cannot hold ``None``); built from ``like`` to batch like it."""
    empty = torch.zeros_like(like).reshape(-1)[:0]
    return Bounds(empty, empty.clone())


def given_bounds(bounds: Bounds | None) -> Bounds | None:
    """``bounds``, or ``None`` for :func:`no_bounds` (decided on the shape, never a value)."""
    return None if bounds is None or bounds.lower.shape[-1] == 0 else bounds  # (n,) with n >= 1 when given


def infeasible(bounds: Bounds) -> torch.Tensor:
    """Whether some ``lower > upper`` (or a bound is NaN): no point satisfies the bounds."""
    return ~(bounds.lower <= bounds.upper).all()


def project(x: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """:math:`P(x)`, the point of the box closest to ``x``."""
    return torch.clamp(x, bounds.lower, bounds.upper)


def projected_gradient(x: torch.Tensor, grad: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """:math:`P(x - g) - x`: minus the gradient, with the components that would leave the box
    cut at the bounds (zero where a bound holds a variable that the gradient pushes out)."""
    return project(x - grad, bounds) - x


def max_step(x: torch.Tensor, direction: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """The largest :math:`t \\ge 0` with :math:`l \\le x + t d \\le u` (``inf`` if no bound is
    in the way; 0 if ``d`` leaves the box at once)."""
    room = torch.where(
        direction > 0, bounds.upper - x, torch.where(direction < 0, bounds.lower - x, torch.inf)
    )
    ratios = torch.where(direction != 0, room / direction, torch.inf)
    return torch.clamp(ratios.amin(-1), min=0.0)


def active_count(x: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """How many variables sit on a bound (int64)."""
    return ((x == bounds.lower) | (x == bounds.upper)).sum(-1)
