"""Compiled steps that keep a Dynamo cache of their own for each user function.

Dynamo keeps the graphs it compiles on the code object of the compiled function, and counts
them against a limit per code object (``torch._dynamo.config.recompile_limit``, 8); beyond it,
a ``fullgraph=True`` compile fails with ``FailOnRecompileLimitHit`` (pytorch/pytorch#167504).
The steps :func:`~torchlbfgs.batched_minimize` compiles are built afresh for each solve
(closures over that solve's loss and options), and one of them is a ``torch.func.vmap``
wrapper, whose code is functorch's and shared by every vmapped function compiled in the
process. Compiled as they are, the ninth distinct loss of a process (the user's own compiled
vmaps counting too) failed.

Here a step is compiled as a *trampoline* ``run(step, *args) -> step(*args)``, one per kind of
step and user function, each with a code object of its own: Dynamo traces through the step it
is given (guarding on it as it guarded on the closures before), so a later solve with the same
function finds its graphs, and different functions never share a limit. A function compiled in
more distinct ways than ``recompile_limit`` (e.g. as many combinations of line search, dtype
and history size) gets room for one more graph at a time, with a warning for each, rather than
a failure: after Dynamo's failure the whole process runs as if its frame hook were left
installed (measured with torch 2.13: every Python call half again as slow, and a function's
arguments held until it returns, even after ``torch._dynamo.reset()``).

A step that loops on the device (a ``while_loop``, ``loops=True``) is compiled with that
loop marked cacheable for Inductor: unmarked, Inductor's FX graph cache and AOTAutograd's cache
bypass any graph with a ``while_loop`` ("Can't cache HigherOrderOperator", torch 2.13), and a
fresh process compiles it from scratch (27 s against 8.5 s for the rounds of a logistic
regression at B = 1024). The caches' keys cover the loop's subgraphs: their code is hashed
with the graph module that holds them.

Examples:
    >>> import torch
    >>> def step(x):
    ...     return x * 2
    >>> run = CompiledStep("example", step, {"backend": "eager"})
    >>> run(step, torch.ones(2))
    tensor([2., 2.])
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["CompiledStep", "graphs_compiled"]

_RECOMPILE_LIMIT_HIT: tuple[type[BaseException], ...] = tuple(
    error
    for name in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")  # the latter: torch < 2.6
    if isinstance(error := getattr(torch._dynamo.exc, name, None), type)
)

_LIMIT_NAME = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"

_Key = tuple[str, Any, str]
_trampolines: dict[_Key, Callable[..., Any]] = {}


def _run(step: Callable[..., Any], *args: Any) -> Any:
    return step(*args)


def _fresh_trampoline(name: str) -> Callable[..., Any]:
    """``_run`` with a code object of its own (Dynamo's cache lives on the code object), named
    ``name``: Dynamo keeps what it learnt about a function's inputs (which sizes changed between
    calls, and so are compiled dynamic) by file, line and name, and the trampolines of different
    steps, whose inputs differ, must not share it."""
    code = _run.__code__.replace(co_name=name)
    if sys.version_info >= (3, 11):
        code = code.replace(co_qualname=name)
    return types.FunctionType(code, _run.__globals__, name)


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


def _described(code: Any) -> str:
    """A user function's code (or a callable object's type) as ``name (file:line)``."""
    if isinstance(code, types.CodeType):
        name = getattr(code, "co_qualname", code.co_name)
        return f"{name} ({os.path.basename(code.co_filename)}:{code.co_firstlineno})"
    return f"{getattr(code, '__qualname__', repr(code))}"


def graphs_compiled() -> int:
    """How many graphs Dynamo has compiled in this process."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _cache_entries(compiled: Any) -> int:
    """The graphs Dynamo holds for a compiled trampoline (by Dynamo's debugging API, which
    ``torch._dynamo.reset()`` empties with the cache; 0 where the API is missing: no room is
    then made, and a refused graph starts a fresh cache)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return len(_debug_get_cache_entry_list(compiled._torchdynamo_orig_callable.__code__))
    except (ImportError, AttributeError):
        return 0


_WHILE_LOOP = "torch.ops.higher_order.while_loop"  # how Inductor names the operator


def _while_loops_cacheable() -> contextlib.AbstractContextManager[Any]:
    """Inductor's config with ``while_loop`` graphs cacheable, where this torch has the switch."""
    config = torch._inductor.config
    marked = getattr(config, "unsafe_marked_cacheable_functions", None)
    if marked is None or _WHILE_LOOP in marked:
        return contextlib.nullcontext()
    patched: contextlib.AbstractContextManager[Any] = config.patch(
        unsafe_marked_cacheable_functions={**marked, _WHILE_LOOP: torch.__version__}
    )
    return patched


def _recompile_limit() -> int:
    limit: int = getattr(torch._dynamo.config, _LIMIT_NAME)
    return limit


class CompiledStep:
    """``run(step, *args) -> step(*args)``, ``torch.compile``-d (``fullgraph=True`` and
    ``options``) in the Dynamo cache of the step ``kind`` for the user function ``fun``.
    ``step`` may be a new closure at each call; what it closes over is guarded. ``loops``:
    the step holds a ``while_loop``, which Inductor's caches are then allowed to keep.

    Attributes:
        compiled_before: whether this process has compiled this step for this function (and
            these options) before this object was made: its first call then most likely finds
            its graph and compiles nothing.
    """

    def __init__(self, kind: str, fun: Any, options: Mapping[str, Any], *, loops: bool = False) -> None:
        self.key: _Key = (kind, user_code(fun), repr(sorted(options.items())))
        self.options = options
        self._config = _while_loops_cacheable if loops else contextlib.nullcontext
        self.compiled_before = self.key in _trampolines
        self._limit = _recompile_limit()

    def __call__(self, step: Callable[..., Any], *args: Any) -> Any:
        with self._config():
            return self._call(step, *args)

    def _call(self, step: Callable[..., Any], *args: Any) -> Any:
        trampoline = self._trampoline()
        graphs = _cache_entries(trampoline)
        try:
            if graphs < self._limit:
                result = trampoline(step, *args)
            else:  # room for one more graph, should this call need one
                with torch._dynamo.config.patch(_LIMIT_NAME, graphs + 1):
                    result = trampoline(step, *args)
        except _RECOMPILE_LIMIT_HIT:  # raised while compiling, before anything ran: a cap this
            # room does not lift (accumulated_recompile_limit); a fresh code object has its own
            _trampolines.pop(self.key, None)
            trampoline, graphs = self._trampoline(), 0
            result = trampoline(step, *args)
        after = _cache_entries(trampoline)
        if after > max(graphs, self._limit):
            self._warn_beyond_limit(after)
        return result

    def _trampoline(self) -> Callable[..., Any]:
        if self.key not in _trampolines:
            kind, code, _ = self.key
            name = f"{kind} of {_described(code)}"
            _trampolines[self.key] = torch.compile(_fresh_trampoline(name), fullgraph=True, **self.options)
        return _trampolines[self.key]

    def _warn_beyond_limit(self, graphs: int) -> None:
        kind, code, _ = self.key
        name = getattr(code, "co_name", getattr(code, "__name__", repr(code)))
        warnings.warn(
            f"torchlbfgs: {kind}: {graphs} graphs compiled for {name!r} in this process, more than "
            f"torch._dynamo.config.recompile_limit ({self._limit}); each combination of options, "
            'dtypes or shapes that needs a graph of its own compiles once (TORCH_LOGS="recompiles" '
            "shows what differed).",
            stacklevel=2,
        )
