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

import difflib
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeGuard, TypeVar

import torch

__all__ = [
    "DEFAULT_TOLERANCE_CHANGE",
    "OPTION_ALIASES",
    "TORCH_OPTION_NAMES",
    "Tolerances",
    "TorchOptions",
    "checks_option_names",
    "reject_unknown_options",
    "require_choice",
    "require_count",
    "require_line_search",
    "require_positive",
    "require_step_options",
    "require_tolerance",
]

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


OPTION_ALIASES = {
    # torch.optim.LBFGS's names for the functional API's options
    "lr": "learning_rate",
    "max_eval": "max_evals",
    "line_search_fn": "line_search",
    # scipy.optimize (L-BFGS-B), jaxopt and optax
    "maxiter": "max_iter",
    "maxfun": "max_evals",
    "maxls": "max_ls",
    "maxcor": "history_size",
    "memory_size": "history_size",
    "history": "history_size",
    "gtol": "tolerance_grad",
    "tol": "tolerance_grad",
    "ftol": "tolerance_value",
    "stepsize": "learning_rate",
    "step_size": "learning_rate",
}
"""Names other libraries give the functional API's options: a misspelt option is pointed to ours."""


def reject_unknown_options(
    function: str, given: Iterable[str], accepted: Collection[str], positional: Collection[str] = ()
) -> None:
    """Raise ``TypeError`` naming ``function`` for every name of ``given`` not in ``accepted``,
    with the option it most likely means (another library's name for it, or the closest name),
    or else the list of its options (``accepted`` less the ``positional`` arguments).

    Examples:
        >>> reject_unknown_options("minimize", ["maxiter"], ["max_iter", "max_ls"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: minimize() got an unexpected keyword argument 'maxiter' (did you mean 'max_iter'?)
    """
    unknown = [name for name in given if name not in accepted]
    if not unknown:
        return
    notes, guessed = [], True
    for name in unknown:
        alias = OPTION_ALIASES.get(name)
        close = (
            [alias] if alias in accepted else difflib.get_close_matches(name, list(accepted), n=1, cutoff=0.6)
        )
        notes.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        guessed = guessed and bool(close)
    options = sorted(name for name in accepted if name not in positional)
    raise TypeError(
        f"{function}() got an unexpected keyword argument{'s' if len(unknown) > 1 else ''} {', '.join(notes)}"
        + ("" if guessed else f"; its options are {', '.join(options)}")
    )


Function = TypeVar("Function", bound=Callable[..., Any])


def checks_option_names(function: Function) -> Function:
    """``function`` with its keyword arguments' names checked first (:func:`reject_unknown_options`)."""
    parameters = inspect.signature(function).parameters.values()
    accepted = frozenset(p.name for p in parameters if p.kind is not p.VAR_KEYWORD)
    positional = frozenset(p.name for p in parameters if p.kind is not p.KEYWORD_ONLY)
    public = f"torchlbfgs.{function.__name__}"

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if not accepted.issuperset(kwargs):
            reject_unknown_options(public, kwargs, accepted, positional)
        return function(*args, **kwargs)

    return checked  # type: ignore[return-value]


def require_positive(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number > 0. A tensor (a
    per-problem value under ``vmap``, say) is not read: checking it would cost a host sync."""
    if isinstance(value, torch.Tensor):
        return
    if not _is_real(value) or not 0 < float(value) < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def require_tolerance(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a real number >= 0 (``inf`` allowed: the test
    then always holds). A tensor is not read, as in :func:`require_positive`."""
    if isinstance(value, torch.Tensor):
        return
    if not _is_real(value) or not float(value) >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


def require_step_options(
    learning_rate: object, tolerance_grad: object, tolerance_change: object, tolerance_value: object = None
) -> None:
    """The functional API's checks of its step size and tolerances (the adapter's are torch's);
    ``None`` is a tolerance left to its default (:class:`Tolerances`)."""
    require_positive("learning_rate", learning_rate)
    require_tolerance("tolerance_grad", tolerance_grad)
    for name, value in (("tolerance_change", tolerance_change), ("tolerance_value", tolerance_value)):
        if value is not None:
            require_tolerance(name, value)


DEFAULT_TOLERANCE_CHANGE = 1e-9
"""torch's ``tolerance_change``, the functional API's default when no tolerance of change is given."""


class Tolerances(NamedTuple):
    """The functional API's tests of change, from ``tolerance_change`` and ``tolerance_value``.

    * Neither given: torch's absolute tests, ``tolerance_change = 1e-9`` (value change, step,
      directional derivative), as :class:`torchlbfgs.LBFGS` and ``torch.optim.LBFGS`` have them.
    * ``tolerance_value`` given: L-BFGS-B's relative test of the decrease instead,
      ``(f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1) <= tolerance_value``, and the absolute tests
      only as far as ``tolerance_change`` asks (off unless given): then ``tolerance_grad`` is
      what decides, as scipy's ``gtol``.
    * Both given: both apply.

    The line search's own bracket tolerance is ``tolerance_change`` when given, else 1e-9.

    Examples:
        >>> Tolerances.of(None, None)
        Tolerances(change=1e-09, value=0.0, search=1e-09)
        >>> Tolerances.of(None, 2.2e-9)
        Tolerances(change=0.0, value=2.2e-09, search=1e-09)
    """

    change: float
    value: float
    search: float

    @classmethod
    def of(cls, tolerance_change: float | None, tolerance_value: float | None) -> Tolerances:
        if tolerance_change is None:
            change = DEFAULT_TOLERANCE_CHANGE if tolerance_value is None else 0.0
            return cls(change, 0.0 if tolerance_value is None else tolerance_value, DEFAULT_TOLERANCE_CHANGE)
        return cls(tolerance_change, 0.0 if tolerance_value is None else tolerance_value, tolerance_change)


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
    if _is_real(value):
        return float(value)
    raise TypeError(f"{name} must be a real number, got {value!r}")


def _is_real(value: object) -> TypeGuard[numbers.Real]:
    """A real Python or numpy number (``bool`` is not one here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return bool(torch.as_tensor(a) == torch.as_tensor(b))
    return bool(a == b)
