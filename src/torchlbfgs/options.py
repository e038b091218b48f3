"""Every option check, in one place: the functional API's and the drop-in's.

The solvers (:func:`torchlbfgs.init`, :func:`torchlbfgs.update`, :func:`torchlbfgs.minimize`,
:func:`torchlbfgs.batched_minimize`) and the :class:`torchlbfgs.LBFGS` adapter check their
options where they are given, with the checks below, so that one kind of mistake gets one
message everywhere. Nothing here imports the rest of the package.

Examples:
    >>> from torchlbfgs.options import require_count
    >>> require_count("max_iter", 0, 0)
    >>> require_count("history_size", 0, 1)
    Traceback (most recent call last):
    ...
    ValueError: history_size must be a positive int, got 0
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TORCH_OPTION_NAMES", "TorchOptions", "require_choice", "require_count", "require_line_search"]

TORCH_OPTION_NAMES = (
    "lr",
    "max_iter",
    "max_eval",
    "tolerance_grad",
    "tolerance_change",
    "history_size",
    "line_search_fn",
)
"""``torch.optim.LBFGS``'s options, the keys of every parameter group it (and ours) saves."""


def require_count(name: str, value: object, minimum: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) of at least ``minimum`` (0 or 1)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be a {kind} int, got {value!r}")


def require_choice(name: str, value: object, choices: Collection[object]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def require_line_search(
    method: object, c1: float, c2: float, max_ls: int, methods: Collection[object]
) -> None:
    """Raise ``ValueError`` for a line search (one of ``methods``) or constants no search can honour."""
    require_choice("line_search", method, methods)
    if not 0 < c1 < c2 < 1:
        raise ValueError(f"line-search constants need 0 < c1 < c2 < 1; got c1={c1}, c2={c2}")
    if not isinstance(max_ls, int) or isinstance(max_ls, bool) or max_ls < 0:
        raise ValueError(f"max_ls must be >= 0, got {max_ls}")


@dataclass(frozen=True)
class TorchOptions:
    """``torch.optim.LBFGS``'s options, as its step schedule uses them."""

    lr: float
    max_iter: int
    max_eval: int
    tolerance_grad: float
    tolerance_change: float
    history_size: int
    line_search_fn: str | None

    @classmethod
    def of(cls, group: Mapping[str, Any], where: str = "") -> TorchOptions:
        """A parameter group's options, checked as torch checks them (same messages), plus what
        torch leaves unchecked; ``where`` prefixes the message (e.g. ``"param group 1: "``).
        A tensor ``lr`` is read on the host, as torch reads it."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"{where}Tensor lr must be 1-element")
        if not lr >= 0.0:
            raise ValueError(f"{where}Invalid learning rate: {lr}")
        require_count(f"{where}max_iter", group["max_iter"], 0)
        require_count(f"{where}max_eval", group["max_eval"], 0)
        require_count(f"{where}history_size", group["history_size"], 1)
        require_choice(f"{where}line_search_fn", group["line_search_fn"], (None, "strong_wolfe"))
        return cls(
            lr=float(lr), max_iter=group["max_iter"], max_eval=group["max_eval"],  # sync-ok: torch's lr read
            tolerance_grad=_real(f"{where}tolerance_grad", group["tolerance_grad"]),
            tolerance_change=_real(f"{where}tolerance_change", group["tolerance_change"]),
            history_size=group["history_size"], line_search_fn=group["line_search_fn"],
        )  # fmt: skip

    @classmethod
    def of_groups(cls, groups: list[dict[str, Any]]) -> TorchOptions:
        """The options of groups that form one problem: they must agree (one line search, one
        memory); then the first group's, checked."""
        first = groups[0]
        for index, group in enumerate(groups[1:], start=1):
            for option in TORCH_OPTION_NAMES:
                if option in group and option in first and not _same(group[option], first[option]):
                    raise ValueError(
                        f"param group {index} has {option}={group[option]!r} but group 0 has "
                        f"{option}={first[option]!r}: torchlbfgs.LBFGS optimizes all groups jointly, "
                        f"so {option!r} must be the same in every group"
                    )
        return cls.of(first)


def _real(name: str, value: object) -> float:
    """A tolerance as a float: a real number, or a one-element tensor read on the host (the
    comparisons torch makes with it accept both); anything else is a ``TypeError``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)  # sync-ok: an option, read once per step as torch reads it
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{name} must be a real number, got {value!r}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return bool(torch.as_tensor(a) == torch.as_tensor(b))
    return bool(a == b)
