"""Compaction: a batch of independent problems that goes on with those still running.

A vectorised loop over a batch (the rounds of :func:`~torchlbfgs.batched_minimize`, the
conjugate gradients of its backward pass) costs the batch size times the iterations of its
slowest problem if it keeps every problem to the end. Instead, the driver reads on the host
which problems still run and, once at most half of the current batch does, gathers their
states and data into a smaller batch and sets the others' results aside; the work is then
close to the sum of what the problems need. Each problem's iterates are unchanged.

A compiled loop that reads its stop flags every step runs the steps between two things the host
must do (shrink the batch, call back, stop) as one ``while_loop`` inside the compiled graph
(:func:`steps_until_shrink`): one call of the compiled function, with its guards and wrappers,
for tens of steps instead of one each.

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
from torch._higher_order_ops import while_loop

__all__ = [
    "ActiveBatch",
    "active_batch",
    "call_with_counts",
    "map_leaves",
    "should_shrink",
    "steps_until_shrink",
]

State = TypeVar("State")


def map_leaves(function: Callable[..., torch.Tensor], *trees: Any) -> Any:
    """``function`` applied leaf by leaf to (nested) NamedTuples of tensors of one structure."""
    if isinstance(trees[0], tuple):
        return type(trees[0])(*(map_leaves(function, *leaves) for leaves in zip(*trees, strict=True)))
    return function(*trees)


Count = TypeVar("Count", int, torch.Tensor)


def should_shrink(running: Count, current: Count | int) -> Count | bool:
    """Go on with the ``running`` problems of a batch of ``current``? Once at most half run, and
    never below two problems: ``torch.compile`` specialises a batch of one. Counts on the host
    (ints) or on the device (tensors, inside a compiled loop)."""
    return (running >= 2) & (running <= current // 2)


def steps_until_shrink(
    step: Callable[[State], State],
    state: State,
    count: torch.Tensor,
    last: torch.Tensor,
    running: Callable[[State], torch.Tensor],
    *,
    shrinkable: bool,
) -> tuple[State, torch.Tensor]:
    """``step`` applied to the batch ``state`` (a NamedTuple of tensors batched along dimension 0)
    once, then while ``count < last``, some problem is ``running`` and, where the batch may
    shrink (``shrinkable``), it should not yet (:func:`should_shrink`); the state and the count
    then. ``step`` must leave stopped problems as they are. The first step is unconditional (if
    ``count < last``): the host calls after it has acted, so each call makes progress.

    Written for ``torch.compile``: one ``while_loop``, whose condition Inductor's loop reads on
    the host at each step (free on the CPU, a sync elsewhere). Each call of a compiled function
    costs its guards and AOTAutograd's wrappers (0.4-0.5 ms at B = 1024 for a round of
    :func:`~torchlbfgs.batched_minimize`, a tenth of an evaluation of the batch); one call for
    all the steps between two host actions costs them once. Eagerly the same loop runs in
    Python, one host read per step.

    Examples:
        >>> import torch
        >>> from typing import NamedTuple
        >>> class Countdown(NamedTuple):
        ...     left: torch.Tensor
        >>> def tick(state):
        ...     return Countdown(torch.where(state.left > 0, state.left - 1, state.left))
        >>> state, count = steps_until_shrink(
        ...     tick, Countdown(torch.tensor([1, 2, 5, 6])), torch.tensor(0), torch.tensor(100),
        ...     lambda state: state.left > 0, shrinkable=True)
        >>> state.left, count  # after two steps only two of the four run: time to shrink
        (tensor([0, 0, 3, 4]), tensor(2))
        >>> steps_until_shrink(tick, state, count, torch.tensor(100), lambda state: state.left > 0,
        ...                    shrinkable=True)  # called again, it steps at least once
        (Countdown(left=tensor([0, 0, 2, 3])), tensor(3))
    """
    leaves: list[torch.Tensor]
    leaves, treedef = optree.tree_flatten(state)  # type: ignore[arg-type]
    current = leaves[0].shape[0]

    def unflatten(flat: tuple[torch.Tensor, ...]) -> State:
        return optree.tree_unflatten(treedef, list(flat))  # type: ignore[return-value]

    first = count.clone()  # not the carried tensor itself: while_loop refuses aliases

    def goes_on(count: torch.Tensor, *flat: torch.Tensor) -> torch.Tensor:
        still = running(unflatten(flat)).sum()
        more = still > 0
        if shrinkable:
            more = more & ~should_shrink(still, current)
        return (count < last) & ((count == first) | more)

    def body(count: torch.Tensor, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        after: list[torch.Tensor] = optree.tree_leaves(step(unflatten(flat)))  # type: ignore[arg-type]
        # while_loop refuses outputs that alias its inputs, and wants the inputs' strides back
        return (count + 1, *(leaf.clone(memory_format=torch.contiguous_format) for leaf in after))

    if not torch.compiler.is_compiling():  # while_loop would compile itself, with no use here
        carried = (count, *leaves)
        while bool(goes_on(*carried)):  # sync-ok: an eager call reads the flags every step
            carried = body(*carried)
        count, *end = carried
    else:
        count, *end = while_loop(goes_on, body, (count, *leaves))  # type: ignore[no-untyped-call]
    return unflatten(tuple(end)), count


def call_with_counts(
    run: Callable[..., tuple[Any, torch.Tensor]], stretch: Callable[..., Any], state: Any,
    done: int, last: int, *rest: Any,
) -> tuple[Any, int]:  # fmt: skip
    """``run(stretch, state, count, last, *rest)``, a compiled ``stretch`` that calls
    :func:`steps_until_shrink`, with the step counts on the host: ``done`` and ``last`` go in as
    0-d tensors on the device of ``state``'s leaves (values a graph does not specialise on), and
    the count comes back as an int (a host read: for loops that read their stop flags every step anyway)."""
    device = optree.tree_leaves(state)[0].device
    count, end = (torch.tensor(n, device=device) for n in (done, last))
    after, count = run(stretch, state, count, end, *rest)
    return after, int(count)  # sync-ok: where the stop flags are read every step


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
