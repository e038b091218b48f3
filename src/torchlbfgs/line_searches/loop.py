"""A fixed-length loop whose finished problems are masked, with an optional early exit.

The line searches are state machines that evaluate the function once per step. Running
``max_steps`` steps with masking is branch-free: it works under ``vmap`` (each problem stops
on its own) and ``torch.compile``, and never reads a tensor on the host. Its price is that
function evaluations continue after every problem has finished; they change nothing.

Exiting early when all problems are done saves those evaluations but must read a flag on the
host. ``early_exit=None`` (the default) does so only where that read is free: eager CPU
tensors, outside ``vmap``/``grad`` transforms and ``torch.compile``. Results are identical
either way; only the number of calls to ``fun`` differs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch._C._functorch import is_functorch_wrapped_tensor

__all__ = ["exits_early", "run_masked_loop", "trial_point"]

Carry = TypeVar("Carry")


def exits_early(early_exit: bool | None, flag: torch.Tensor) -> bool:
    """Resolve the ``early_exit`` option for a loop whose done-flag looks like ``flag``."""
    if early_exit is not None:
        return early_exit
    traced = torch.compiler.is_compiling() or is_functorch_wrapped_tensor(flag)
    return not traced and flag.device.type == "cpu"


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
        if check and bool(is_done(carry).all()):  # sync-ok: only where exits_early allows it
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
