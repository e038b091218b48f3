"""Compiled steps that keep a Dynamo cache of their own for each user function.

Dynamo keeps the graphs it compiles on the code object of the compiled function, and counts
them against a limit per code object (``torch._dynamo.config.recompile_limit``, 8); beyond it,
a ``fullgraph=True`` compile fails with ``FailOnRecompileLimitHit``. The steps
:func:`~torchlbfgs.batched_minimize` compiles are built afresh for each solve (closures over
that solve's loss and options), and one of them is a ``torch.func.vmap`` wrapper, whose code
is functorch's and shared by every vmapped function compiled in the process. Compiled as they
are, the ninth distinct loss of a process (the user's own compiled vmaps counting too) failed.

Here a step is compiled as a *trampoline* ``run(step, *args) -> step(*args)``, one per kind of
step and user function, each with a code object of its own: Dynamo traces through the step it
is given (guarding on it as it guarded on the closures before), so a later solve with the same
function finds its graphs, and different functions never share a limit. A trampoline that
reaches the limit anyway (one function compiled in more than ``recompile_limit`` distinct
ways) is replaced by a fresh one, which compiles again instead of failing.

Examples:
    >>> import torch
    >>> def step(x):
    ...     return x * 2
    >>> run = compiled_step("example", step, {"backend": "eager"})
    >>> run(step, torch.ones(2))
    tensor([2., 2.])
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["compiled_step"]

_RECOMPILE_LIMIT_HIT: tuple[type[BaseException], ...] = tuple(
    error
    for name in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")  # the latter: torch < 2.6
    if isinstance(error := getattr(torch._dynamo.exc, name, None), type)
)

_trampolines: dict[tuple[Any, ...], Callable[..., Any]] = {}


def _run(step: Callable[..., Any], *args: Any) -> Any:
    return step(*args)


def _fresh_trampoline() -> Callable[..., Any]:
    """``_run`` with a code object of its own (Dynamo's cache lives on the code object)."""
    return types.FunctionType(_run.__code__.replace(), _run.__globals__, _run.__name__)


def user_code(fun: Any) -> Any:
    """What identifies a user function across calls: its code (a bound method's is its
    function's; also through a ``functools.partial`` or a wrapper that records ``__wrapped__``),
    or the type of a callable object. Two functions with one code share a trampoline; Dynamo's
    guards tell them apart."""
    seen: set[int] = set()
    while id(fun) not in seen:
        seen.add(id(fun))
        if isinstance(fun, functools.partial):
            fun = fun.func
        elif hasattr(fun, "__wrapped__"):
            fun = fun.__wrapped__
    return getattr(fun, "__code__", type(fun))


def _options_key(options: Mapping[str, Any]) -> str:
    return repr(sorted(options.items()))


def compiled_step(kind: str, fun: Any, options: Mapping[str, Any]) -> Callable[..., Any]:
    """``run(step, *args) -> step(*args)``, ``torch.compile``-d (``fullgraph=True`` and
    ``options``) with the Dynamo cache of the step ``kind`` for the user function ``fun``.
    ``step`` may be a new closure at each call; what it closes over is guarded."""
    key = (kind, user_code(fun), _options_key(options))

    def run(step: Callable[..., Any], *args: Any) -> Any:
        try:
            return _trampoline(key, options)(step, *args)
        except _RECOMPILE_LIMIT_HIT:  # raised while compiling, before anything ran
            del _trampolines[key]
            return _trampoline(key, options)(step, *args)

    return run


def _trampoline(key: tuple[Any, ...], options: Mapping[str, Any]) -> Callable[..., Any]:
    if key not in _trampolines:
        _trampolines[key] = torch.compile(_fresh_trampoline(), fullgraph=True, **options)
    return _trampolines[key]
