"""Compaction: a batch of independent problems that goes on with those still running.

A vectorised loop over a batch (the rounds of :func:`~torchlbfgs.batched_minimize`, the
conjugate gradients of its backward pass) costs the batch size times the iterations of its
slowest problem if it keeps every problem to the end. Instead, the driver reads on the host
which problems still run and, once at most half of the current batch does, gathers their
states and data into a smaller batch and sets the others' results aside; the work is then
close to the sum of what the problems need. Each problem's iterates are unchanged.

Examples:
    >>> import torch
    >>> from typing import NamedTuple
    >>> class State(NamedTuple):
    ...     x: torch.Tensor
    >>> batch = ActiveBatch(State(torch.arange(4.0)), (torch.ones(4, 2),), (0,))
    >>> batch.shrink(torch.tensor([1, 3]))
    >>> batch.state = State(batch.state.x * 10)
    >>> batch.whole().x, batch.args[0].shape
    (tensor([ 0., 10.,  2., 30.]), torch.Size([2, 2]))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import optree
import torch

__all__ = ["ActiveBatch", "active_batch", "map_leaves", "should_shrink"]

State = TypeVar("State")


def map_leaves(function: Callable[..., torch.Tensor], *trees: Any) -> Any:
    """``function`` applied leaf by leaf to (nested) NamedTuples of tensors of one structure."""
    if isinstance(trees[0], tuple):
        return type(trees[0])(*(map_leaves(function, *leaves) for leaves in zip(*trees, strict=True)))
    return function(*trees)


def should_shrink(running: int, current: int) -> bool:
    """Go on with the ``running`` problems of a batch of ``current``? Once at most half run, and
    never below two problems: ``torch.compile`` specialises a batch of one."""
    return 2 <= running <= current // 2


def active_batch(
    state: State, args: tuple[Any, ...], dims: tuple[Any, ...], compile: bool | Mapping[str, Any]
) -> ActiveBatch[State]:
    """The :class:`ActiveBatch` of a loop whose step is compiled as ``compile`` says (a solve's
    option: ``False``, ``True`` or ``torch.compile`` arguments). Compiled, the loop runs on
    fresh views of ``args`` (:func:`fresh_views`) with the batch dimension marked dynamic, so
    that the shrinking batch reuses one graph; or, for ``{"dynamic": False}`` (which a mark
    would override), on static shapes with the batch kept whole, since a smaller batch would
    compile again."""
    if compile is False:
        return ActiveBatch(state, args, dims)
    args = fresh_views(args)
    static = isinstance(compile, Mapping) and compile.get("dynamic") is False
    if not static:
        mark_batch_dynamic(state, args, dims)
    return ActiveBatch(state, args, dims, keep_whole=static)


def fresh_views(tree: Any) -> Any:
    """The tensors of ``tree`` as new views of themselves (same storage, same autograd): Dynamo
    keeps ``mark_dynamic``'s marks on the tensor object, so a loop that marks these marks none
    of its caller's tensors, and one that compiles static shapes finds no marks left on them by
    an earlier dynamic solve (which ``dynamic=False`` would refuse)."""
    return optree.tree_map(
        lambda leaf: leaf.view(leaf.shape) if isinstance(leaf, torch.Tensor) else leaf, tree
    )


def mark_batch_dynamic(state: Any, args: tuple[Any, ...], dims: tuple[Any, ...]) -> None:
    """Mark the batch dimension of every leaf of ``state`` (dimension 0) and of the batched
    ``args`` (their ``dims``) dynamic for ``torch.compile``, so the shrinking batch reuses
    one graph (everything else stays specialised)."""
    map_leaves(lambda leaf: torch._dynamo.mark_dynamic(leaf, 0), state)
    for arg, dim in zip(args, dims, strict=True):
        if isinstance(dim, int):
            optree.tree_map(lambda t, dim=dim: torch._dynamo.mark_dynamic(t, dim), arg)


class ActiveBatch(Generic[State]):
    """The problems a loop still runs on (``state``, a NamedTuple of tensors batched along
    dimension 0, and ``args``, batched along ``dims``; ``None``: shared), and the state of
    those set aside. ``keep_whole``: never shrink (a loop compiled for static shapes)."""

    def __init__(
        self, state: State, args: tuple[Any, ...], dims: tuple[Any, ...], *, keep_whole: bool = False
    ) -> None:
        self.state, self.args, self.dims, self.keep_whole = state, args, dims, keep_whole
        self._all = state  # the whole batch, up to date except in the rows of `rows`
        self._rows: torch.Tensor | None = None  # rows of the whole batch in `state`; None: all

    @property
    def can_shrink(self) -> bool:
        """Whether the batch may shrink: not kept whole, and every arg batched along one
        dimension (or shared), as gathering needs."""
        return not self.keep_whole and all(dim is None or isinstance(dim, int) for dim in self.dims)

    def shrink(self, keep: torch.Tensor) -> None:
        """Go on with the problems at positions ``keep`` of the current batch."""
        self._all = self.whole()
        self._rows = keep if self._rows is None else self._rows[keep]
        self.state = map_leaves(lambda leaf: leaf.index_select(0, keep), self.state)
        self.args = tuple(
            arg if dim is None else optree.tree_map(lambda t, dim=dim: t.index_select(dim, keep), arg)
            for arg, dim in zip(self.args, self.dims, strict=True)
        )

    def whole(self) -> State:
        """The state of every problem of the original batch."""
        if self._rows is None:
            return self.state
        rows = self._rows
        whole: State = map_leaves(lambda all_, part: all_.index_copy(0, rows, part), self._all, self.state)
        return whole
