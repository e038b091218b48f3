"""A fixed-length loop whose finished problems are masked, with an optional early exit.

The line searches are state machines that evaluate the function once per step. Running
``max_steps`` steps with masking is branch-free: it works under ``vmap`` (each problem stops
on its own) and ``torch.compile``, and never reads a tensor on the host. Its price is that
function evaluations continue after every problem has finished; they change nothing.

Exiting early when all problems are done saves those evaluations but must read a flag on the
host. ``early_exit=None`` (the default) does so only where that read is free: eager CPU
tensors, outside ``torch.compile``; ``True`` reads it anywhere (a device sync on GPUs);
``False`` never does. Under ``torch.func.vmap`` the flag read is that of the whole batch,
taken beneath the vmap wrapper: the loop stops once *every* problem is done, while each
problem still stops on its own through the masks. Results are identical in every mode; only
the number of calls to ``fun`` differs.

Under ``torch.compile`` the loop becomes a ``while_loop`` whose condition stays on the device:
it stops once the problem is done without a host read, and the graph holds one copy of
``step`` rather than ``max_steps`` (the default ``max_ls=25`` compiles in seconds, not
minutes). ``while_loop`` has no batching rule, so a compiled ``vmap`` keeps the masked loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import optree
import torch
from torch._C._functorch import get_unwrapped, is_batchedtensor, is_functorch_wrapped_tensor
from torch._higher_order_ops import while_loop
from torch._subclasses.fake_tensor import FakeTensor

__all__ = [
    "DEVICE_CHECK_EVERY",
    "batch_view",
    "exits_early",
    "run_masked_loop",
    "stop_check_interval",
    "trial_point",
]

Carry = TypeVar("Carry")


def batch_view(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` beneath any ``torch.func`` wrappers: under ``vmap``, the whole batch."""
    while is_functorch_wrapped_tensor(tensor):
        tensor = get_unwrapped(tensor)
    return tensor


def exits_early(early_exit: bool | None, flag: torch.Tensor) -> bool:
    """Resolve the ``early_exit`` option for a loop whose done-flag looks like ``flag``."""
    if early_exit is not None:
        return early_exit
    if torch.compiler.is_compiling():
        return False
    flag = batch_view(flag)
    return flag.device.type == "cpu" and not isinstance(flag, FakeTensor)


DEVICE_CHECK_EVERY = 16
"""Off the CPU, a solve reads its stop flags (one device sync) every this many rounds (or
iterations of a loop that uses :func:`stop_check_interval`)."""


def stop_check_interval(early_exit: bool | None, flag: torch.Tensor) -> int | None:
    """Every how many rounds a solve reads on the host whether all problems have stopped.

    Every round where the read is free (eager CPU tensors, or ``early_exit=True``); every
    :data:`DEVICE_CHECK_EVERY` rounds on other devices; never under ``torch.compile`` or with
    ``early_exit=False`` (then all :func:`~torchlbfgs.rounds.max_rounds` rounds run).
    """
    if exits_early(early_exit, flag):
        return 1
    if early_exit is False or torch.compiler.is_compiling():
        return None
    return DEVICE_CHECK_EVERY


def run_masked_loop(
    step: Callable[[Carry], Carry],
    carry: Carry,
    is_done: Callable[[Carry], torch.Tensor],
    max_steps: int,
    early_exit: bool | None,
) -> Carry:
    """Apply ``step`` up to ``max_steps`` times; ``step`` must leave done problems unchanged."""
    if torch.compiler.is_compiling() and not any(map(is_batchedtensor, optree.tree_leaves(carry))):  # type: ignore[arg-type]
        return _device_side_loop(step, carry, is_done, max_steps)
    check = exits_early(early_exit, is_done(carry))
    for _ in range(max_steps):
        if check and bool(batch_view(is_done(carry)).all()):  # sync-ok: where exits_early allows it
            break
        carry = step(carry)
    return carry


def _device_side_loop(
    step: Callable[[Carry], Carry], carry: Carry, is_done: Callable[[Carry], torch.Tensor], max_steps: int
) -> Carry:
    """The loop as a ``while_loop`` (compiled graphs): one traced ``step``, stopped on the device."""
    leaves: list[torch.Tensor]
    leaves, treedef = optree.tree_flatten(carry)  # type: ignore[arg-type]
    # while_loop refuses carried tensors that alias each other or the outputs: fresh copies.
    start = tuple(leaf.clone() for leaf in leaves)
    first = torch.zeros((), dtype=torch.int64, device=leaves[0].device)

    def unflatten(flat: tuple[torch.Tensor, ...]) -> Carry:
        return optree.tree_unflatten(treedef, list(flat))  # type: ignore[return-value]

    def running(count: torch.Tensor, *flat: torch.Tensor) -> torch.Tensor:
        return (count < max_steps) & ~is_done(unflatten(flat)).all()

    def body(count: torch.Tensor, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        after: list[torch.Tensor] = optree.tree_leaves(step(unflatten(flat)))  # type: ignore[arg-type]
        return (count + 1, *(leaf.clone() for leaf in after))

    _, *end = while_loop(running, body, (first, *start))  # type: ignore[no-untyped-call]
    return unflatten(tuple(end))


def trial_point(
    x: torch.Tensor, direction: torch.Tensor, t: torch.Tensor, running: torch.Tensor,
    bounds: Any = None,
) -> torch.Tensor:  # fmt: skip
    """``x + t d`` for running problems, ``x`` itself for finished ones; projected onto
    ``bounds`` (a :class:`~torchlbfgs.bounds.Bounds`) if given, so that no rounding of
    ``x + t d`` takes a trial point out of the box.

    Finished problems are still evaluated inside a batch; evaluating them at their current,
    known-good point rather than at a stale trial step keeps overflow, NaN and subnormal
    arithmetic (slow on CPUs) out of work whose result is discarded anyway.
    """
    point = torch.addcmul(x, direction, torch.where(running, t, torch.zeros_like(t)))
    return point if bounds is None else torch.clamp(point, bounds.lower, bounds.upper)
