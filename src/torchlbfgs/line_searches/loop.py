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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["batch_view", "exits_early", "run_masked_loop", "trial_point"]

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


def run_masked_loop(
    step: Callable[[Carry], Carry],
    carry: Carry,
    is_done: Callable[[Carry], torch.Tensor],
    max_steps: int,
    early_exit: bool | None,
) -> Carry:
    """Apply ``step`` up to ``max_steps`` times; ``step`` must leave done problems unchanged."""
    check = exits_early(early_exit, is_done(carry))
    for _ in range(max_steps):
        if check and bool(batch_view(is_done(carry)).all()):  # sync-ok: where exits_early allows it
            break
        carry = step(carry)
    return carry


def trial_point(
    x: torch.Tensor, direction: torch.Tensor, t: torch.Tensor, running: torch.Tensor
) -> torch.Tensor:
    """``x + t d`` for running problems, ``x`` itself for finished ones.

    Finished problems are still evaluated inside a batch; evaluating them at their current,
    known-good point rather than at a stale trial step keeps overflow, NaN and subnormal
    arithmetic (slow on CPUs) out of work whose result is discarded anyway.
    """
    return torch.addcmul(x, direction, torch.where(running, t, torch.zeros_like(t)))
