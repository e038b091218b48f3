"""Flatten a pytree of tensors into one real vector and back.

L-BFGS works on a single vector ``x`` in R^n. Users hold parameters as pytrees: a tensor, a
dict from ``model.named_parameters()``, nested tuples/lists/dicts of mixed shapes. This module
is the only place that knows about that structure; everything else sees flat vectors.

Complex leaves are stored as (real, imag) pairs, as ``torch.optim.LBFGS`` does, so the
optimizer minimises over R^{2k} for a k-element complex tensor.

``DTensor`` leaves (parameters sharded over processes, :mod:`torchlbfgs.sharding`) contribute
their local pieces: each process's flat vector is its share of the whole, and ``unravel``
wraps the pieces back into ``DTensor`` s of the same layout.

Examples:
    >>> import torch
    >>> from torchlbfgs.pytree import ravel_pytree
    >>> flat, unravel = ravel_pytree({"w": torch.ones(2, 2), "b": torch.zeros(3)})
    >>> flat.shape
    torch.Size([7])
    >>> unravel(flat)["w"].shape
    torch.Size([2, 2])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optree
import torch

from torchlbfgs.sharding import (
    LOCAL,
    Reductions,
    dtensor_from_local,
    is_dtensor,
    local_tensor,
    reductions_for,
)

__all__ = ["Unravel", "ravel_pytree"]

PyTree = Any


def _leaf_path(path: tuple[Any, ...]) -> str:
    return "params" + "".join(f"[{key!r}]" for key in path) if path else "params"


@dataclass(frozen=True)
class Unravel:
    """Inverse of :func:`ravel_pytree`: turns a flat vector back into the original pytree."""

    treedef: optree.PyTreeSpec
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    sizes: tuple[int, ...]
    """Number of real values each leaf occupies in the flat vector."""
    layouts: tuple[_DTensorLayout | None, ...] = ()
    """For each ``DTensor`` leaf, how its local piece (of shape ``shapes[i]``) makes it up."""
    reductions: Reductions = LOCAL
    """The reductions of the flat vector: across processes where some leaves are sharded."""

    @property
    def numel(self) -> int:
        """Length ``n`` of the flat vector."""
        return sum(self.sizes)

    def __call__(self, flat: torch.Tensor) -> PyTree:
        if len(self.sizes) == 1:
            chunks: Sequence[torch.Tensor] = (flat,)
        else:
            chunks = torch.split(flat, list(self.sizes))
        leaves = []
        for chunk, shape, dtype in zip(chunks, self.shapes, self.dtypes, strict=True):
            if dtype.is_complex:
                leaves.append(torch.view_as_complex(chunk.reshape(*shape, 2)))
            else:
                leaves.append(chunk.reshape(shape))
        if self.layouts:
            leaves = [
                leaf if layout is None else layout.wrap(leaf)
                for leaf, layout in zip(leaves, self.layouts, strict=True)
            ]
        return optree.tree_unflatten(self.treedef, leaves)


@dataclass(frozen=True)
class _DTensorLayout:
    """Where a ``DTensor``'s local piece sits in the whole: its mesh, placements, global shape
    and stride."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]

    @classmethod
    def of(cls, dtensor: Any) -> _DTensorLayout:
        return cls(dtensor.device_mesh, tuple(dtensor.placements), dtensor.shape, dtensor.stride())

    def wrap(self, local: torch.Tensor) -> torch.Tensor:
        """The ``DTensor`` whose piece on this process is ``local`` (differentiably)."""
        return dtensor_from_local(local, self.mesh, self.placements, self.shape, self.stride)


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype.to_real() if dtype.is_complex else dtype


def _as_real_vector(leaf: torch.Tensor) -> torch.Tensor:
    if isinstance(leaf, torch.nn.Parameter):
        # Parameters are state to the optimizer, not inputs to differentiate through: keeping
        # their autograd history would grow a graph across iterations.
        leaf = leaf.detach()
    leaf = local_tensor(leaf)
    if leaf.is_complex():
        leaf = torch.view_as_real(leaf.resolve_conj())
    return leaf.reshape(-1)


def ravel_pytree(params: PyTree) -> tuple[torch.Tensor, Unravel]:
    """Concatenate every leaf of ``params`` into one 1-D real tensor.

    Args:
        params: a tensor or any (optree) pytree of tensors. All leaves must be floating point
            or complex, share one real dtype (float32 or float64, say) and one device.

    Returns:
        ``(flat, unravel)`` where ``flat`` has ``n = sum of real sizes`` elements and
        ``unravel(flat)`` rebuilds the pytree with the original shapes and dtypes.

    Raises:
        TypeError: a leaf is not a tensor, is not floating/complex, or dtypes/devices differ.
        ValueError: the pytree has no leaves or no elements.
    """
    paths, leaves, treedef = optree.tree_flatten_with_path(params)
    if not leaves:
        raise ValueError("params is an empty pytree: L-BFGS needs at least one tensor")
    real_dtype: torch.dtype | None = None
    device: torch.device | None = None
    first_path = ""
    for path, leaf in zip(paths, leaves, strict=True):
        where = _leaf_path(path)
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{where} is a {type(leaf).__name__}; every leaf must be a tensor")
        if not (leaf.is_floating_point() or leaf.is_complex()):
            raise TypeError(f"{where} has dtype {leaf.dtype}; expected a floating or complex dtype")
        if real_dtype is None:
            real_dtype, device, first_path = _real_dtype(leaf.dtype), leaf.device, where
        elif _real_dtype(leaf.dtype) != real_dtype:
            raise TypeError(
                f"{where} has dtype {leaf.dtype} but {first_path} has {real_dtype}; "
                "all leaves must share one floating dtype"
            )
        elif leaf.device != device:
            raise TypeError(
                f"{where} is on {leaf.device} but {first_path} is on {device}; "
                "all leaves must be on one device"
            )
    layouts = tuple(_DTensorLayout.of(leaf) if is_dtensor(leaf) else None for leaf in leaves)
    sharded = any(layout is not None for layout in layouts)
    vectors = [_as_real_vector(leaf) for leaf in leaves]
    flat = vectors[0] if len(vectors) == 1 else torch.cat(vectors)
    if flat.numel() == 0 and not sharded:  # a process may hold no piece of sharded params
        raise ValueError("params has no elements: L-BFGS needs at least one scalar to optimize")
    unravel = Unravel(
        treedef=treedef,
        shapes=tuple(local_tensor(leaf).shape for leaf in leaves),
        dtypes=tuple(leaf.dtype for leaf in leaves),
        sizes=tuple(vector.numel() for vector in vectors),
        layouts=layouts if sharded else (),
        reductions=reductions_for(leaves) if sharded else LOCAL,
    )
    return flat, unravel
