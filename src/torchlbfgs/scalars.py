"""Scalar arithmetic written once, for two kinds of scalars: 0-d tensors and Python numbers.

A line search decides with a handful of scalars per evaluation (values, directional
derivatives, trial steps) and selects between a few vectors (gradients at the ends of its
bracket). Its decision logic is written against the small interface below, so that the same
code runs

* on **0-d tensors** (:data:`TENSORS`): every selection is a ``torch.where`` that computes
  both sides, nothing branches on a value, and the search batches under ``vmap`` and
  compiles whole; this is what the functional core uses;
* on **host numbers** (:data:`NUMBERS`): numpy scalars of the tensors' dtype where torch's
  own code holds tensors (read from the device), Python floats where it holds Python numbers,
  and bools; selections are decided on the host and return
  the chosen object itself (a reference, not a copy, for vectors), as ``torch.optim.LBFGS``
  decides; this is what the :class:`torchlbfgs.LBFGS` adapter uses, one host read per
  evaluation. numpy's promotion rules for a Python float meeting a float32 scalar (NEP 50:
  the result stays float32) are torch's for a Python float meeting a float32 tensor, and
  :meth:`Numbers.divide` rounds a Python number over a tensor as torch does, so the two kinds
  round alike in float32 as in float64.

Arithmetic operators (``+``, ``*``, ``<``, ``abs``) are shared by both kinds and used as they
are; only what differs is here. On Python floats, a selection's discarded side is still
computed, so every operation here must be total: no exception on ``inf``, ``nan`` or an
overflow (hence :meth:`square` instead of ``**``, and :meth:`sqrt` of a negative is ``nan``).

Examples:
    >>> import torch
    >>> from torchlbfgs.scalars import NUMBERS, TENSORS
    >>> def clipped(ops, t, lower, upper):
    ...     return ops.minimum(ops.maximum(t, lower), upper)
    >>> three, zero, one = torch.tensor(3.0), torch.tensor(0.0), torch.tensor(1.0)
    >>> clipped(NUMBERS, 3.0, 0.0, 1.0), clipped(TENSORS, three, zero, one)
    (1.0, tensor(1.))
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy
import torch

__all__ = ["NUMBERS", "TENSORS", "Numbers", "Scalars", "Tensors", "host_number", "quiet_overflow"]


class Tensors:
    """0-d (or batched) tensors: branch-free selections with ``torch.where``."""

    @staticmethod
    def when(condition: Any, compute: Callable[[], Any], otherwise: Any) -> Any:
        """A value that is only used where ``condition`` holds: computed for every problem
        (the callers' selections mask it), since nothing may branch on a tensor."""
        return compute()

    @staticmethod
    def where(condition: Any, if_true: Any, if_false: Any) -> Any:
        return torch.where(condition, if_true, if_false)

    @staticmethod
    def both(a: Any, b: Any) -> Any:
        return a & b

    @staticmethod
    def either(a: Any, b: Any) -> Any:
        return a | b

    @staticmethod
    def negate(a: Any) -> Any:
        return ~a

    @staticmethod
    def minimum(a: Any, b: Any) -> Any:
        return torch.minimum(a, b)

    @staticmethod
    def maximum(a: Any, b: Any) -> Any:
        return torch.maximum(a, b)

    @staticmethod
    def square(a: Any) -> Any:
        return a**2

    @staticmethod
    def sqrt(a: Any) -> Any:
        return torch.sqrt(a)

    @staticmethod
    def isfinite(a: Any) -> Any:
        return torch.isfinite(a)

    @staticmethod
    def pair(first: Any, second: Any) -> Any:
        """Two values (or vectors) as one, indexable by 0 and 1: a stacked tensor."""
        return torch.stack((first, second))

    @staticmethod
    def divide(a: Any, b: Any) -> Any:
        return a / b

    @staticmethod
    def dot(u: torch.Tensor, v: torch.Tensor) -> Any:
        """``u'v`` as a scalar of this kind."""
        return torch.dot(u, v)

    def scaled_dot(self, u: torch.Tensor, v: torch.Tensor, c: Any) -> Any:
        """``u'v * c`` (``c`` a scalar of this kind), rounded as ``torch.optim.LBFGS``'s
        ``u.dot(v) * c`` (through :meth:`dot`, so a kind that reduces otherwise keeps it)."""
        return self.dot(u, v) * c

    @staticmethod
    def value(scalar: torch.Tensor) -> Any:
        """A 0-d tensor as a scalar of this kind (itself, here)."""
        return scalar

    @staticmethod
    def values(vector: torch.Tensor) -> Any:
        """The entries of a short vector as scalars of this kind (views, here)."""
        return vector.unbind(0)

    @staticmethod
    def add_scaled(q: torch.Tensor, v: torch.Tensor, c: Any, *, in_place: bool) -> torch.Tensor:
        """``q + c v``, rounded once (as ``torch.optim.LBFGS``'s ``q.add_(v, alpha=c)``)."""
        return q.addcmul_(v, c) if in_place else torch.addcmul(q, v, c)

    @staticmethod
    def sub_scaled(q: torch.Tensor, v: torch.Tensor, c: Any, *, in_place: bool) -> torch.Tensor:
        """``q - c v``, rounded once."""
        return q.addcmul_(v, c, value=-1) if in_place else torch.addcmul(q, v, c, value=-1)


class Numbers:
    """Host numbers (numpy scalars, Python floats, ints and bools): selections decided on the
    host, returning references. Run the arithmetic under :func:`quiet_overflow`."""

    @staticmethod
    def when(condition: Any, compute: Callable[[], Any], otherwise: Any) -> Any:
        """A value that is only used where ``condition`` holds: computed only then."""
        return compute() if condition else otherwise

    @staticmethod
    def where(condition: Any, if_true: Any, if_false: Any) -> Any:
        return if_true if condition else if_false

    @staticmethod
    def both(a: Any, b: Any) -> Any:
        return bool(a and b)

    @staticmethod
    def either(a: Any, b: Any) -> Any:
        return bool(a or b)

    @staticmethod
    def negate(a: Any) -> Any:
        return not a

    @staticmethod
    def minimum(a: Any, b: Any) -> Any:
        """``min`` that propagates NaN from either side, as ``torch.minimum`` does."""
        return a if (a <= b or a != a) else b

    @staticmethod
    def maximum(a: Any, b: Any) -> Any:
        """``max`` that propagates NaN from either side, as ``torch.maximum`` does."""
        return a if (a >= b or a != a) else b

    @staticmethod
    def square(a: Any) -> Any:
        return a * a  # a ** 2 raises OverflowError for |a| > 1e154; a * a is inf, as in torch

    @staticmethod
    def sqrt(a: Any) -> Any:
        """The square root as ``torch.sqrt`` rounds it on a tensor of ``a``'s precision, which is
        not always the correctly rounded one (``math.sqrt``'s; one unit in the last place
        apart, seen on CPUs): torch's line search takes it on tensors, and parity with it is
        bitwise."""
        single = isinstance(a, numpy.float32)
        if not a >= 0:
            return numpy.float32(math.nan) if single else math.nan
        on_host = torch.full((), float(a), dtype=torch.float32 if single else torch.float64)
        root = on_host.sqrt_().item()  # sync-ok: a CPU tensor made here
        return numpy.float32(root) if single else root

    @staticmethod
    def isfinite(a: Any) -> Any:
        return math.isfinite(a)

    @staticmethod
    def pair(first: Any, second: Any) -> Any:
        """Two values (or vectors) as one, indexable by 0 and 1: a tuple of references."""
        return (first, second)

    @staticmethod
    def divide(a: Any, b: Any) -> Any:
        """``a / b``, rounded as torch rounds it when ``a`` is a Python number and ``b`` a
        tensor (here: a numpy scalar): ``reciprocal(b) * a``, not a true division."""
        if isinstance(b, numpy.floating) and not isinstance(a, numpy.floating):
            return numpy.reciprocal(b) * a
        return a / b

    @staticmethod
    def dot(u: torch.Tensor, v: torch.Tensor) -> Any:
        """``u'v`` read as a host number (a device sync off the CPU)."""
        return host_number(torch.dot(u, v))

    @staticmethod
    def scaled_dot(u: torch.Tensor, v: torch.Tensor, c: Any) -> Any:
        """``u'v * c`` read as a host number (a device sync off the CPU); ``c`` a host number of
        the vectors' precision. The product of a Python float and a float32 scalar stays
        float32 (NEP 50), so no float32 scalar is made for ``u'v`` itself: it is exact in either
        form, and the two-loop recursion makes 2m of these per iteration."""
        return torch.dot(u, v).item() * c  # sync-ok: host numbers are this kind's point (the adapter)

    @staticmethod
    def value(scalar: torch.Tensor) -> Any:
        """A 0-d tensor read as a host number (a device sync off the CPU)."""
        return host_number(scalar)

    @staticmethod
    def values(vector: torch.Tensor) -> Any:
        """The entries of a short vector as host numbers (one read)."""
        entries = vector.tolist()  # sync-ok: host numbers are this kind's point (the adapter)
        return [numpy.float32(e) for e in entries] if vector.dtype == torch.float32 else entries

    @staticmethod
    def add_scaled(q: torch.Tensor, v: torch.Tensor, c: Any, *, in_place: bool) -> torch.Tensor:
        """``q + c v``, rounded once (as ``torch.optim.LBFGS``'s ``q.add_(v, alpha=c)``)."""
        return q.add_(v, alpha=float(c)) if in_place else torch.add(q, v, alpha=float(c))

    @staticmethod
    def sub_scaled(q: torch.Tensor, v: torch.Tensor, c: Any, *, in_place: bool) -> torch.Tensor:
        """``q - c v``, rounded once."""
        return q.add_(v, alpha=-float(c)) if in_place else torch.add(q, v, alpha=-float(c))


def host_number(scalar: torch.Tensor) -> Any:
    """A 0-d tensor read as a host number that rounds as the tensor would (numpy float32 for
    float32, a Python float or int otherwise)."""
    value = scalar.item()  # sync-ok: host numbers are this kind's point (the adapter)
    return numpy.float32(value) if scalar.dtype is torch.float32 else value


Scalars = Tensors | Numbers
TENSORS = Tensors()
NUMBERS = Numbers()


@contextlib.contextmanager
def quiet_overflow() -> Iterator[None]:
    """numpy scalars warn where tensors overflow to ``inf`` or make ``nan`` silently; the
    decisions expect (and mask) those values, so the warnings are noise."""
    with numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
        yield
