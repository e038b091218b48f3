"""Evaluate the user's function and its gradient on the flat parameter vector.

Users write ``fun(params) -> scalar`` over their own pytree; the algorithm needs
``x -> (f(x), grad f(x))`` over the flat vector ``x``. This module builds that map, either with
``torch.func.grad_and_value`` (so it composes with ``vmap`` and ``torch.compile``) or, with
``value_and_grad=True``, from a user function that already returns ``(value, grad_pytree)``.
Parameters sharded over processes (``DTensor``) are differentiated with ``torch.autograd``,
which ``DTensor`` supports and ``torch.func`` does not; their value, if a ``DTensor``, is
gathered (every process gets the whole loss).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from torchlbfgs.pytree import Unravel, ravel_pytree
from torchlbfgs.sharding import is_dtensor

__all__ = ["FlatObjective", "flat_objective"]

FlatObjective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``x -> (f(x), grad f(x))`` on flat real vectors of shape ``(n,)``."""


def _check_scalar(value: Any) -> torch.Tensor:
    if is_dtensor(value):
        value = value.full_tensor()
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"fun must return a scalar tensor; it returned a {type(value).__name__}")
    if value.dim() != 0:
        raise ValueError(f"fun must return a scalar (0-d) tensor; it returned shape {tuple(value.shape)}")
    return value


# Errors torch.func raises for two everyday patterns that cannot run under its transforms, and
# what to write instead. torchlbfgs differentiates `fun` with torch.func.grad_and_value.
_AUTOGRAD_INSIDE = (
    "fun calls torch.autograd (torch.autograd.grad, .backward() or requires_grad_()) on tensors "
    "inside the function torchlbfgs differentiates with torch.func.grad_and_value, and torch.func "
    "cannot differentiate through that (the usual case: a PINN residual du/dx). Write the inner "
    "derivative with torch.func instead, e.g. du_dx = torch.func.vmap(torch.func.grad(u_of_one_x))(x) "
    "(or torch.func.jacrev), or compute the value and gradient yourself and pass value_and_grad=True "
    "(see the PINN recipe in the docs: docs/recipes.md)."
)
_BUFFER_MUTATION = (
    "fun updates a tensor in place that it did not receive as an argument: typically a BatchNorm "
    "layer in train mode updating its running_mean / running_var inside torch.func.functional_call. "
    "Put the model in eval mode (model.eval(): the running statistics are read, not written); or, "
    "to normalise with batch statistics, stop BatchNorm tracking them "
    "(torch.func.replace_all_batch_norm_modules_(model)), or hand functional_call copies made "
    "inside fun: functional_call(model, {**params, **{k: b.clone() for k, b in model.named_buffers()}}, x)."
)
_KNOWN_ERRORS = (
    ("call Tensor.requires_grad_()", _AUTOGRAD_INSIDE),
    ("appears to not have been used in the graph", _AUTOGRAD_INSIDE),
    ("does not require grad and does not have a grad_fn", _AUTOGRAD_INSIDE),
    ("would mutate a captured Tensor", _BUFFER_MUTATION),
)


def _explained(error: RuntimeError) -> RuntimeError | None:
    """``error`` with what to do instead, if it is one torch.func raises for a known pattern."""
    message = str(error)
    for marker, advice in _KNOWN_ERRORS:
        if marker in message:
            return RuntimeError(f"torchlbfgs: {advice}\n(torch said: {message.splitlines()[0]})")
    return None


def flat_objective(
    fun: Callable[..., Any], unravel: Unravel, *, value_and_grad: bool = False
) -> FlatObjective:
    """Wrap ``fun(params)`` as ``x -> (value, flat_grad)`` on the flat vector ``x``.

    Args:
        fun: ``fun(params) -> scalar tensor``, or with ``value_and_grad=True``
            ``fun(params) -> (scalar tensor, grad pytree shaped like params)``.
        unravel: the :class:`~torchlbfgs.pytree.Unravel` of the params.
        value_and_grad: ``fun`` computes its own gradient (e.g. a closure calling ``backward``).
    """
    n = unravel.numel
    if value_and_grad:

        def evaluate_with_own_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = fun(unravel(x))
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError("with value_and_grad=True, fun must return a (value, grad) pair")
            value, grad = out
            flat_grad, _ = ravel_pytree(grad)
            if flat_grad.shape != (n,):
                raise ValueError(
                    f"fun's gradient has {flat_grad.numel()} values; expected {n}, one per parameter"
                )
            return _check_scalar(value), flat_grad.to(x.dtype)

        return evaluate_with_own_grad

    def value_of_flat(x: torch.Tensor) -> torch.Tensor:
        return _check_scalar(fun(unravel(x)))

    if unravel.reductions.sharded:

        def evaluate_sharded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.enable_grad():
                local = x.detach().requires_grad_()
                value = value_of_flat(local)
                grad = None
                if value.requires_grad:  # else fun does not depend on the params
                    (grad,) = torch.autograd.grad(value, local, allow_unused=True)
            return value.detach(), torch.zeros_like(x) if grad is None else grad

        return evaluate_sharded

    grad_and_value = torch.func.grad_and_value(value_of_flat)

    def evaluate(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():  # traced: errors surface as torch.compile's
            grad, value = grad_and_value(x)
            return value, grad
        try:
            grad, value = grad_and_value(x)
        except RuntimeError as error:
            explained = _explained(error)
            if explained is None:
                raise
            raise explained from error
        return value, grad

    return evaluate
