"""``batched_minimize`` over a batch sharded across processes.

A batch too large for one device, or solved too slowly by one, is spread over ranks the
``DTensor`` way: ``params0`` (and each batched argument) ``Shard``-ed along its batch
dimension on a 1-D device mesh. The problems are independent, so each rank solves its own
rows as an ordinary batch (its own rounds and compaction) and nothing is communicated during
the solve; the :class:`~torchlbfgs.Result` comes back sharded the same way, every field a
``DTensor`` ``Shard(0)`` over the batch.

Examples:
    >>> import torch
    >>> batch_sharding(torch.zeros(4, 2), (), (0,)) is None   # plain tensors: one process
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optree
import torch

from torchlbfgs.sharding import dtensor_from_local, is_dtensor, local_tensor

__all__ = ["BatchSharding", "batch_sharding"]


def _leaves(tree: Any) -> list[Any]:
    return optree.tree_leaves(tree, none_is_leaf=False)


@dataclass(frozen=True)
class BatchSharding:
    """How a batch is spread: the mesh, and the whole batch's size."""

    mesh: Any
    size: int

    def local(self, *inputs: Any) -> tuple[Any, ...]:
        """Every ``DTensor`` in ``inputs`` (pytrees) as this rank's piece (a replicated one: the
        whole)."""
        return tuple(optree.tree_map(local_tensor, tree) for tree in inputs)

    def sharded(self, tree: Any) -> Any:
        """This rank's rows of a result (batch first) as ``Shard(0)`` DTensors of the whole batch."""
        from torch.distributed.tensor import Shard

        def shard(leaf: torch.Tensor) -> torch.Tensor:
            return dtensor_from_local(leaf.contiguous(), self.mesh, [Shard(0)], (self.size, *leaf.shape[1:]))

        return optree.tree_map(shard, tree)


def batch_sharding(params0: Any, args: tuple[Any, ...], dims: tuple[Any, ...]) -> BatchSharding | None:
    """The sharding of a ``batched_minimize`` batch (``dims``: ``in_dims`` of ``(params0, *args)``),
    or ``None`` for plain tensors. ``params0``'s leaves must be DTensors ``Shard``-ed along their
    batch dimension on one 1-D mesh; a batched argument is sharded the same way (or plain, then
    already this rank's rows); a shared one (``None`` in ``in_dims``) is plain or ``Replicate``."""
    inputs = (params0, *args)
    if not any(is_dtensor(leaf) for leaf in _leaves(inputs)):
        return None
    meshes, size = set(), None
    for position, (tree, dim) in enumerate(zip(inputs, dims, strict=True)):
        where = "params0" if position == 0 else f"args[{position - 1}]"
        for leaf in _leaves(tree):
            if not is_dtensor(leaf):
                if position == 0:
                    raise ValueError(
                        f"batched_minimize: {where} mixes DTensors and plain tensors; shard every leaf of "
                        "params0 along its batch dimension"
                    )
                continue
            meshes.add(leaf.device_mesh)
            placements = tuple(leaf.placements)
            if dim is None:
                if not all(p.is_replicate() for p in placements):
                    raise ValueError(
                        f"batched_minimize: {where} is shared (in_dims None) but placed {placements}; "
                        "a shared DTensor must be Replicate()"
                    )
                continue
            if (
                not isinstance(dim, int)
                or len(placements) != 1
                or not placements[0].is_shard(dim % leaf.ndim)
            ):
                raise ValueError(
                    f"batched_minimize: {where} is placed {placements}; a batch spread over processes needs "
                    f"Shard({dim}) (its in_dims entry) on a 1-D mesh"
                )
            if position == 0:
                if size is not None and leaf.shape[dim] != size:
                    raise ValueError(
                        f"batched_minimize: params0's leaves hold {size} and {leaf.shape[dim]} problems"
                    )
                size = leaf.shape[dim]
    if size is None:
        raise ValueError("batched_minimize: DTensor args need params0 sharded along its batch dimension too")
    if len(meshes) != 1:
        raise ValueError(f"batched_minimize: the DTensor inputs live on {len(meshes)} device meshes, not one")
    (mesh,) = meshes
    if mesh.ndim != 1:
        raise ValueError(
            f"batched_minimize: a batch over a {mesh.ndim}-D device mesh is not supported (use a 1-D mesh)"
        )
    return BatchSharding(mesh, int(size))
