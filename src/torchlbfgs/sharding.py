"""Parameters sharded over processes: the flat vector each rank holds, and the all-reduces that
make the algorithm's reductions global.

A model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) or by hand with
``distribute_tensor`` holds ``DTensor`` parameters: each rank stores a shard (``Shard(d)``) or a
full copy (``Replicate()``) of each. L-BFGS never needs the whole vector: every operation on
it is elementwise (steps, differences, combinations of the memory's rows) except a few
reductions, inner products and max-norms. So each rank works on the concatenation of its local
pieces (``DTensor.to_local()``, which shares their storage), and every reduction becomes a
local one followed by one all-reduce of a few scalars over the mesh (the memory's inner
products with a vector all at once: :meth:`Reductions.inner`). The decisions taken
on the results (line search, stopping, curvature test) are then the same on every rank by
construction, and no rank ever holds more than its share of the iterate, gradient and history.

A replicated entry lives on every rank, but must count once: a rank contributes its
replicated pieces to a sum only if it is the mesh's first rank. A max needs no such care.

Examples:
    >>> import torch
    >>> from torchlbfgs.sharding import reductions_for
    >>> reductions_for([torch.ones(3)]) is LOCAL     # plain tensors: local reductions
    True
    >>> float(LOCAL.dot(torch.ones(3), torch.arange(3.0)))
    3.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from torchlbfgs.history import buffer_dot
from torchlbfgs.norms import max_abs
from torchlbfgs.scalars import Numbers, Scalars, Tensors

__all__ = [
    "LOCAL",
    "Reductions",
    "ShardedReductions",
    "dtensor_from_local",
    "dtensor_type",
    "is_dtensor",
    "local_reductions",
    "local_tensor",
    "reductions_for",
]


# DTensor's type, looked up once. A module global, not functools.cache: Dynamo traces this lookup
# in every compiled round that reads a parameter, and warns about a cached function there.
_DTENSOR: list[type | None] = []


def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor``, or ``None`` where torch has no distributed support."""
    if not _DTENSOR:
        if not dist.is_available():
            _DTENSOR.append(None)
        else:
            from torch.distributed.tensor import DTensor

            _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a ``DTensor`` (never where torch has no distributed support)."""
    dtensor = dtensor_type()
    return dtensor is not None and isinstance(value, dtensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own piece of ``tensor``: ``to_local()`` of a ``DTensor`` (sharing its
    storage, so writing into it writes the parameter), the tensor itself otherwise."""
    if is_dtensor(tensor):
        local: torch.Tensor = tensor.to_local()  # type: ignore[attr-defined]
        return local
    return tensor


def dtensor_from_local(
    local: torch.Tensor, mesh: Any, placements: Sequence[Any], shape: Sequence[int],
    stride: Sequence[int] | None = None,
) -> torch.Tensor:  # fmt: skip
    """The ``DTensor`` of global ``shape`` (and ``stride``; contiguous if not given) whose piece
    on this process is ``local``, differentiably (no check across processes)."""
    from torch.distributed.tensor import DTensor

    size = torch.Size(shape)
    strides = tuple(stride) if stride is not None else torch.empty(size, device="meta").stride()
    wrapped: torch.Tensor = DTensor.from_local(
        local, mesh, list(placements), run_check=False, shape=size, stride=strides
    )
    return wrapped


class Reductions:
    """The reductions of one process's vectors: inner product, sum of magnitudes, extremes."""

    sharded = False

    def dot(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.dot(u, v)

    def abs_sum(self, u: torch.Tensor) -> torch.Tensor:
        return u.abs().sum()

    def aminmax(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest and the largest entry (NaN if any entry is NaN)."""
        low, high = torch.aminmax(u)
        return low, high

    def max_abs(self, u: torch.Tensor) -> torch.Tensor:
        """:math:`\\max_i |u_i|` (NaN if any entry is NaN)."""
        return max_abs(u)

    def all(self, flag: torch.Tensor) -> torch.Tensor:
        """Where ``flag`` (bools, this process's) is true on every process, held by every one."""
        return flag

    def buffer_dot(self, buffer: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """The ``m`` inner products of an ``(m, n)`` history buffer's rows with ``vector``."""
        return buffer_dot(buffer, vector)

    def inner(self, blocks: Sequence[torch.Tensor], vectors: torch.Tensor) -> torch.Tensor:
        """Every inner product of the rows of ``blocks`` (each ``(k_i, n)``, stacked in order)
        with ``vectors`` ``(j, n)``: ``(sum k_i, j)``, at once (one all-reduce where sharded;
        the blocks are not concatenated, which would copy them)."""
        return torch.cat([rows @ vectors.mT for rows in blocks])

    def scalars(self, base: Scalars) -> Scalars:
        """``base`` (the two-loop recursion's scalar kind) with inner products this object's."""
        return base


LOCAL = Reductions()


def local_reductions() -> Reductions:
    """:data:`LOCAL`, as a dataclass field's ``default_factory`` (``torch.compile`` builds such
    objects inside traced code, and can read a global but not a plain default object)."""
    return LOCAL


class _ShardedNumbers(Numbers):
    def __init__(self, reductions: Reductions) -> None:
        self._reductions = reductions

    def dot(self, u: torch.Tensor, v: torch.Tensor) -> Any:  # type: ignore[override]
        return super().value(self._reductions.dot(u, v))

    def scaled_dot(self, u: torch.Tensor, v: torch.Tensor, c: Any) -> Any:  # type: ignore[override]
        return self.dot(u, v) * c


class _ShardedTensors(Tensors):
    def __init__(self, reductions: Reductions) -> None:
        self._reductions = reductions

    def dot(self, u: torch.Tensor, v: torch.Tensor) -> Any:  # type: ignore[override]
        return self._reductions.dot(u, v)


class ShardedReductions(Reductions):
    """Reductions over vectors sharded across ``group``: each rank holds the concatenation of its
    local pieces, of which the ``owned`` ranges count in sums (``None``: all of it)."""

    sharded = True

    def __init__(self, group: Any, owned: Sequence[tuple[int, int]] | None) -> None:
        self.group, self.owned = group, None if owned is None else list(owned)
        self._scalars: dict[type, Scalars] = {}

    def _owned_sum(
        self, term: Callable[[int, int], torch.Tensor], n: int, zero: torch.Tensor
    ) -> torch.Tensor:
        """``term(start, stop)`` summed over the owned ranges of a length-``n`` local vector."""
        total = zero
        for start, stop in [(0, n)] if self.owned is None else self.owned:
            total = total + term(start, stop)
        return total

    def _all_reduce(self, local: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        dist.all_reduce(local, op=op, group=self.group)
        return local

    def dot(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        local = self._owned_sum(lambda a, b: torch.dot(u[a:b], v[a:b]), u.shape[-1], u.new_zeros(()))
        return self._all_reduce(local)

    def abs_sum(self, u: torch.Tensor) -> torch.Tensor:
        local = self._owned_sum(lambda a, b: u[a:b].abs().sum(), u.shape[-1], u.new_zeros(()))
        return self._all_reduce(local)

    def inner(self, blocks: Sequence[torch.Tensor], vectors: torch.Tensor) -> torch.Tensor:
        n, zero = vectors.shape[-1], vectors.new_zeros(())
        pieces = [
            self._owned_sum(lambda a, b, rows=rows: rows[:, a:b] @ vectors[:, a:b].mT, n, zero)  # type: ignore[misc]
            for rows in blocks
        ]
        return self._all_reduce(torch.cat(pieces))

    def aminmax(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if u.numel():
            low, high = torch.aminmax(u)
            nan = torch.isnan(low) | torch.isnan(high)
        else:  # a rank may hold no entry of any parameter
            low, high, nan = u.new_full((), torch.inf), u.new_full((), -torch.inf), torch.tensor(False)
        # one all-reduce (max) of -low, high and a NaN flag: a max over ranks may drop NaN
        local = torch.stack([-low, high, nan.to(u.dtype)]).nan_to_num(
            nan=0.0, posinf=torch.inf, neginf=-torch.inf
        )
        low, high, any_nan = self._all_reduce(local, dist.ReduceOp.MAX).unbind(0)
        nan_or = torch.where(any_nan > 0, torch.nan, 0.0).to(u.dtype)
        return -low + nan_or, high + nan_or

    def max_abs(self, u: torch.Tensor) -> torch.Tensor:
        low, high = self.aminmax(u)
        return torch.maximum(high, -low)

    def all(self, flag: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(flag.to(torch.int64), dist.ReduceOp.MIN) > 0

    def buffer_dot(self, buffer: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        return self.inner([buffer], vector.unsqueeze(0)).squeeze(-1)

    def scalars(self, base: Scalars) -> Scalars:
        kind = type(base)
        if kind not in self._scalars:
            sharded = _ShardedNumbers(self) if isinstance(base, Numbers) else _ShardedTensors(self)
            self._scalars[kind] = sharded
        return self._scalars[kind]


def reductions_for(params: Sequence[torch.Tensor]) -> Reductions:
    """The reductions for the flat vector of ``params``' local pieces: :data:`LOCAL` unless some
    are ``DTensor`` s, which must then all live on one 1-D device mesh with ``Shard`` or
    ``Replicate`` placements (a plain tensor among them counts as replicated)."""
    if not any(is_dtensor(p) for p in params):
        return LOCAL
    meshes = {p.device_mesh for p in params if is_dtensor(p)}  # type: ignore[attr-defined]
    if len(meshes) != 1:
        raise ValueError(
            f"torchlbfgs: the parameters live on {len(meshes)} different device meshes; sharded "
            "parameters must all be DTensors of one mesh"
        )
    (mesh,) = meshes
    if mesh.ndim != 1:
        raise ValueError(
            f"torchlbfgs: sharded parameters on a {mesh.ndim}-D device mesh are not supported; "
            "use a 1-D mesh (as fully_shard's default)"
        )
    first_rank = mesh.get_local_rank() == 0
    owned: list[tuple[int, int]] = []
    start = 0
    for index, p in enumerate(params):
        size = local_tensor(p).numel() * (2 if p.is_complex() else 1)
        placements = p.placements if is_dtensor(p) else ()  # type: ignore[attr-defined]
        if any(not (placement.is_shard() or placement.is_replicate()) for placement in placements):
            raise ValueError(
                f"torchlbfgs: parameter {index} has placements {placements}; only Shard and "
                "Replicate are supported (redistribute a Partial tensor first)"
            )
        replicated = not placements or placements[0].is_replicate()
        if (not replicated or first_rank) and size:
            if owned and owned[-1][1] == start:
                owned[-1] = (owned[-1][0], start + size)  # one range for adjacent pieces
            else:
                owned.append((start, start + size))
        start += size
    whole = owned == [(0, start)] or start == 0
    return ShardedReductions(mesh.get_group(), None if whole else owned)
