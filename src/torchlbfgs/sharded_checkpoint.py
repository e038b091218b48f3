"""The state dict of an optimizer over sharded parameters: one ``DTensor`` per parameter and vector.

In memory, a process holds the concatenation of its pieces of every vector of the state
(gradient, pending direction, the ``(m, n)`` curvature history; :mod:`torchlbfgs.sharding`). A
flat vector of local pieces means nothing on another layout, so the state dict splits it by
parameter, each piece wrapped as a ``DTensor`` of that parameter's layout: the gradient and
the direction shaped and placed like the parameter, a history buffer ``(m, *shape)`` with the
parameter's ``Shard(d)`` moved to ``Shard(d + 1)``. The scalars (value, counters, ``rho``,
:math:`\\gamma`, the ring's head) are the same on every process and stay plain tensors, under
the first parameter's index with its vectors::

    {"state": {0: {"value": ..., "head": ..., "grad": DTensor, "s_history": DTensor, ...},
               1: {"grad": DTensor, "s_history": DTensor, "y_history": DTensor,
                   "pending_direction": DTensor},
               ...},
     "param_groups": [...]}

``torch.distributed.checkpoint`` then saves each process's shards and loads them onto any
other mesh size or placement (``get_optimizer_state_dict``/``set_optimizer_state_dict``), and
:func:`join_per_parameter` puts the pieces of this process back into its flat vectors, after
checking every leaf against its parameter.

Examples:
    >>> import torch
    >>> from torchlbfgs.sharded_checkpoint import VECTOR_LEAVES
    >>> VECTOR_LEAVES
    ('grad', 's_history', 'y_history', 'pending_direction')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from torchlbfgs.sharding import Reductions, dtensor_from_local, is_dtensor, local_tensor

__all__ = ["VECTOR_LEAVES", "join_per_parameter", "split_per_parameter"]

VECTOR_LEAVES = ("grad", "s_history", "y_history", "pending_direction")
_HISTORY = frozenset({"s_history", "y_history"})  # (m, n): one row per pair


def _real_size(p: torch.Tensor) -> int:
    return local_tensor(p).numel() * (2 if p.is_complex() else 1)


def _placements(p: torch.Tensor, rows: bool) -> list[Any]:
    """``p``'s placements, for a tensor with a leading dimension of history rows if ``rows``."""
    from torch.distributed.tensor import Shard

    placements = list(p.placements)  # type: ignore[attr-defined]
    if not rows:
        return placements
    return [Shard(placement.dim + 1) if placement.is_shard() else placement for placement in placements]


def _global_shape(p: torch.Tensor, rows: int | None) -> tuple[int, ...]:
    return tuple(p.shape) if rows is None else (rows, *p.shape)


def split_per_parameter(
    leaves: Mapping[str, Any], params: Sequence[torch.Tensor]
) -> dict[int, dict[str, Any]]:
    """The state dict entries, ``{index: leaves}``, of the flat state ``leaves`` (this process's
    pieces) of an optimizer over ``params``: the scalars under index 0, and every vector split
    into one new tensor per parameter: a ``DTensor`` of the parameter's mesh and placements for a
    ``DTensor`` parameter, a plain tensor for a plain one (every process holds it whole)."""
    entries: dict[int, dict[str, Any]] = {index: {} for index in range(len(params))}
    entries[0].update(
        (name, leaf.clone() if isinstance(leaf, torch.Tensor) else leaf)  # copies: loaders write into them
        for name, leaf in leaves.items()
        if name not in VECTOR_LEAVES
    )
    for name in VECTOR_LEAVES:
        flat: torch.Tensor = leaves[name]
        rows = flat.shape[0] if name in _HISTORY else None
        lead = () if rows is None else (rows,)
        start = 0
        for index, p in enumerate(params):
            size = _real_size(p)
            local_shape = tuple(local_tensor(p).shape)
            piece = flat[..., start : start + size]
            start += size
            if p.is_complex():
                piece = torch.view_as_complex(piece.reshape(*lead, *local_shape, 2))
            piece = piece.reshape(*lead, *local_shape).clone(memory_format=torch.contiguous_format)
            if is_dtensor(p):
                placements = _placements(p, rows is not None)
                piece = dtensor_from_local(piece, p.device_mesh, placements, _global_shape(p, rows))  # type: ignore[attr-defined]
            entries[index][name] = piece
    return entries


def join_per_parameter(
    saved_state: Mapping[Any, Any],
    saved_ids: Sequence[Any],
    params: Sequence[torch.Tensor],
    *,
    history_size: int,
    reductions: Reductions,
) -> dict[str, Any]:
    """The flat leaves of this process (as :func:`split_per_parameter` took them apart) from the
    state dict entries ``saved_state`` of the parameters saved as ``saved_ids`` and now
    ``params``. A ``DTensor`` leaf saved with other placements on the same mesh is redistributed
    to the parameter's.

    Raises:
        ValueError: an entry or leaf is missing, not a ``DTensor`` where the parameter is one,
            has another global shape or mesh, or (on any process: the processes decide
            together) holds NaN or Inf; the message names the entry and the leaf.
        TypeError: a leaf is not a tensor.
    """
    first = saved_state.get(saved_ids[0])
    if not isinstance(first, Mapping):
        raise ValueError(
            f"state[{saved_ids[0]!r}] is missing or not a dict: the state of sharded parameters keeps "
            "its scalars (value, counters, rho, ...) under the first parameter's index"
        )
    leaves = {name: leaf for name, leaf in first.items() if name not in VECTOR_LEAVES}
    for name in VECTOR_LEAVES:
        rows = history_size if name in _HISTORY else None
        pieces = []
        for key, p in zip(saved_ids, params, strict=True):
            entry = saved_state.get(key)
            where = f"state[{key!r}][{name!r}]"
            if not isinstance(entry, Mapping) or name not in entry:
                raise ValueError(
                    f"{where} is missing: the state of sharded parameters keeps each parameter's "
                    f"vectors {list(VECTOR_LEAVES)} under that parameter's own index"
                )
            leaf = entry[name]
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(f"{where}: expected a tensor, found {type(leaf).__name__}")
            shape = _global_shape(p, rows)
            if tuple(leaf.shape) != shape:
                raise ValueError(
                    f"{where}: expected shape {shape} (the parameter's), found {tuple(leaf.shape)}"
                )
            if is_dtensor(p):
                if not is_dtensor(leaf):
                    raise ValueError(
                        f"{where}: the parameter is a DTensor and this leaf a plain tensor; load the state "
                        "saved by an optimizer over sharded parameters (torch.distributed.checkpoint)"
                    )
                if leaf.device_mesh != p.device_mesh:  # type: ignore[attr-defined]
                    raise ValueError(
                        f"{where}: a DTensor on mesh {leaf.device_mesh}, the parameter's is "  # type: ignore[attr-defined]
                        f"{p.device_mesh}; load through torch.distributed.checkpoint to reshard"  # type: ignore[attr-defined]
                    )
                placements = _placements(p, rows is not None)
                if list(leaf.placements) != placements:  # type: ignore[attr-defined]
                    leaf = leaf.redistribute(p.device_mesh, placements)  # type: ignore[attr-defined]
            local = local_tensor(leaf)
            if p.is_complex() and local.is_complex():
                local = torch.view_as_real(local.resolve_conj())
            lead = () if rows is None else (rows,)
            pieces.append(local.reshape(*lead, -1) if local.numel() else local.new_zeros(*lead, 0))
        leaves[name] = torch.cat(pieces, dim=-1)
    finite = reductions.all(torch.stack([torch.isfinite(leaves[name]).all() for name in VECTOR_LEAVES]))
    if not bool(finite.all()):  # sync-ok: loading a checkpoint
        flags = finite.tolist()  # sync-ok: the error path
        names = [name for name, ok in zip(VECTOR_LEAVES, flags, strict=True) if not ok]
        raise ValueError(f"{names}: expected finite values, found NaN or Inf (on this process or another)")
    return leaves
