"""Why an iteration stops: one table of stop reasons, in priority order, for every driver.

:func:`torchlbfgs.update.accept` (the functional core, on tensors) and torch's step schedule
(:mod:`torchlbfgs.torch_schedule`, on host numbers) name the conditions that hold after a step
and get the reason from :func:`stop_reason`: the first condition of the table that holds
wins. A failure is reported before a met tolerance, a met tolerance before a used-up budget
(the budgets in torch's order of tests). A new criterion is one more row here.

Examples:
    >>> from torchlbfgs.scalars import NUMBERS
    >>> from torchlbfgs.stopping import stop_reason
    >>> stop_reason(NUMBERS, grad_small=True, out_of_iterations=True).name
    'GRADIENT_TOLERANCE'
"""

from __future__ import annotations

from typing import Any

import torch

from torchlbfgs.scalars import NUMBERS, Scalars
from torchlbfgs.state import StopReason

__all__ = ["PRECISION_FACTOR", "STOP_CONDITIONS", "at_precision_limit", "stop_reason"]

PRECISION_FACTOR = 1000.0
"""A failed search counts as :attr:`~torchlbfgs.StopReason.PRECISION_LIMIT` when the direction
promises a decrease :math:`-g^\\top d` of at most this many rounding units of :math:`|f|`
(``eps * max(|f|, tiny)``): a sum of many terms carries rounding errors of that size, so no
trial point can show a decrease the search could accept."""

STOP_CONDITIONS: tuple[tuple[str, StopReason], ...] = (
    ("non_finite", StopReason.NON_FINITE),  # the value or gradient at the new point
    ("search_failed_at_precision", StopReason.PRECISION_LIMIT),  # no acceptable step, none visible
    ("failed_out_of_evals", StopReason.MAX_EVALS),  # no acceptable step, and no budget left
    ("search_failed", StopReason.LINE_SEARCH_FAILED),  # no acceptable step
    ("grad_small", StopReason.GRADIENT_TOLERANCE),
    ("step_small", StopReason.STEP_TOLERANCE),
    ("value_small", StopReason.VALUE_CHANGE_TOLERANCE),
    ("out_of_iterations", StopReason.MAX_ITERATIONS),
    ("out_of_evals", StopReason.MAX_EVALS),
)
_NAMES = {name for name, _ in STOP_CONDITIONS}


def at_precision_limit(value: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """Whether the decrease ``-slope`` (:math:`-g^\\top d`) the direction promises is within
    :data:`PRECISION_FACTOR` rounding units of ``value``: no decrease along it can be seen."""
    finfo = torch.finfo(value.dtype)
    rounding = finfo.eps * torch.clamp(value.abs(), min=finfo.tiny)
    return -slope <= PRECISION_FACTOR * rounding


def stop_reason(ops: Scalars, otherwise: Any = StopReason.RUNNING, **conditions: Any) -> Any:
    """The reason of the first condition of :data:`STOP_CONDITIONS` that holds, else ``otherwise``.

    Conditions are booleans of ``ops``' kind (:mod:`torchlbfgs.scalars`); those not given do
    not hold. With tensors the result is an int64 tensor of codes (branch-free); with host
    numbers a :class:`~torchlbfgs.StopReason`.
    """
    unknown = set(conditions) - _NAMES
    if unknown:
        raise TypeError(f"stop_reason: unknown conditions {sorted(unknown)}; known: {sorted(_NAMES)}")
    if ops is NUMBERS:  # decided on the host: the first that holds
        held = (reason for name, reason in STOP_CONDITIONS if conditions.get(name, False))
        return next(held, StopReason(otherwise))
    status = otherwise
    for name, reason in reversed(STOP_CONDITIONS):
        if name in conditions:
            status = ops.where(conditions[name], reason.value, status)
    return status
