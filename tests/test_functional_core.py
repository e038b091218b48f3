"""The functional contract of ``init`` and ``update``: purity, a state of fixed shapes, params as
any pytree, frozen stopped problems, clear errors, stop-reason messages, composition with
``torch.func.grad``."""

from __future__ import annotations

import inspect
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from assertions import bitwise_equal
from problems import Problem, logistic_regression, rosenbrock, spd_quadratic

import torchlbfgs
from torchlbfgs import LBFGSState, StopReason

Tensor = torch.Tensor
PyTree = Any

LINE_SEARCHES = ("strong_wolfe", "backtracking", None)
FLOAT_FIELDS = ("value", "grad", "s_history", "y_history", "rho", "gamma")


# --------------------------------------------------------------------------------------------
# Helpers


def leaves(tree: PyTree) -> list[Tensor]:
    """Tensor leaves of nested dicts/lists/tuples, dict entries in insertion order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in leaves(value)]
    if isinstance(tree, (list, tuple)):
        return [leaf for value in tree for leaf in leaves(value)]
    raise TypeError(f"unexpected node {type(tree).__name__}")


def snapshot(tree: PyTree) -> list[Tensor]:
    return [leaf.detach().clone() for leaf in leaves(tree)]


def assert_unchanged(tree: PyTree, saved: list[Tensor], what: str) -> None:
    current = leaves(tree)
    assert len(current) == len(saved), what
    for i, (leaf, copy) in enumerate(zip(current, saved, strict=True)):
        assert bitwise_equal(leaf.detach(), copy), f"{what}: leaf {i} was modified"


def assert_same_structure(actual: PyTree, expected: PyTree, where: str = "params") -> None:
    """Same containers (types, dict keys in order, lengths) and leaves of the same shape and dtype."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert actual.shape == expected.shape, where
        assert actual.dtype == expected.dtype, where
        return
    assert type(actual) is type(expected), where
    if isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            assert_same_structure(actual[key], expected[key], f"{where}[{key!r}]")
    else:
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_structure(a, e, f"{where}[{i}]")


def assert_states_bitwise_equal(actual: LBFGSState, expected: LBFGSState, what: str) -> None:
    for name, a, e in zip(LBFGSState._fields, actual, expected, strict=True):
        assert bitwise_equal(a, e), f"{what}: state.{name} differs"


def captured_tensors(fun: Callable[..., Any]) -> list[Tensor]:
    """The tensors a ``problems.py`` objective closes over."""
    captured = inspect.getclosurevars(fun).nonlocals.values()
    tensors = [value for value in captured if isinstance(value, torch.Tensor)]
    assert tensors, "the objective should capture data tensors"
    return tensors


def run(
    fun: Callable[..., Tensor], params: PyTree, n_updates: int, history_size: int = 10, **options: Any
) -> list[tuple[PyTree, LBFGSState]]:
    """``init`` then ``n_updates`` calls of ``update``; every (params, state) along the way."""
    state = torchlbfgs.init(fun, params, history_size=history_size)
    trajectory = [(params, state)]
    for _ in range(n_updates):
        params, state = torchlbfgs.update(fun, params, state, **options)
        trajectory.append((params, state))
    return trajectory


# --------------------------------------------------------------------------------------------
# Purity


def _purity_problem() -> Problem:
    # Ill-conditioned enough to run for well over a dozen iterations with any line search.
    return spd_quadratic(12, 1e3, seed=5)


def _as_dict(x: Tensor) -> dict[str, Tensor]:
    return {"a": x[:8].reshape(2, 4).clone(), "b": x[8:].clone()}


def _from_dict(p: dict[str, Tensor]) -> Tensor:
    return torch.cat([p["a"].reshape(-1), p["b"]])


@pytest.mark.parametrize("line_search", LINE_SEARCHES, ids=str)
@pytest.mark.parametrize("structure", ["tensor", "dict"])
def test_init_and_update_are_pure(structure: str, line_search: str | None) -> None:
    """Nothing passed in is modified: params, state, tensors captured by ``fun``, nor any earlier
    output. With ``history_size=3`` and over 10 iterations the ring buffer wraps around."""
    problem = _purity_problem()
    captured = captured_tensors(problem.fun)
    captured_copies = [t.clone() for t in captured]
    if structure == "dict":
        params: PyTree = _as_dict(problem.x0)

        def fun(p: PyTree) -> Tensor:
            return problem.fun(_from_dict(p))
    else:
        params, fun = problem.x0.clone(), problem.fun

    saved_params = snapshot(params)
    state = torchlbfgs.init(fun, params, history_size=3)
    assert_unchanged(params, saved_params, "init: params")
    outputs = [(params, saved_params, state, snapshot(list(state)))]
    heads = [int(state.head)]
    for k in range(14):
        params, _, state, saved_state = outputs[-1]
        new_params, new_state = torchlbfgs.update(fun, params, state, line_search=line_search)
        assert_unchanged(params, outputs[-1][1], f"update {k}: params")
        assert_unchanged(list(state), saved_state, f"update {k}: state")
        assert_unchanged(captured, captured_copies, f"update {k}: tensors captured by fun")
        outputs.append((new_params, snapshot(new_params), new_state, snapshot(list(new_state))))
        heads.append(int(new_state.head))
    # No later call modified an earlier output.
    for k, (p, saved_p, s, saved_s) in enumerate(outputs):
        assert_unchanged(p, saved_p, f"output {k}: params")
        assert_unchanged(list(s), saved_s, f"output {k}: state")

    final_state = outputs[-1][2]
    assert final_state.status == StopReason.RUNNING, "the problem must keep running for the test to mean much"
    assert int(final_state.iteration) > 10
    assert int(final_state.n_pairs) == 3
    # The head went round the ring: after slot 2 it wrapped to slot 0 again, more than once.
    wraps = sum(1 for before, after in itertools.pairwise(heads) if after < before)
    assert wraps >= 2, f"heads {heads}"


# --------------------------------------------------------------------------------------------
# State stability


@pytest.mark.parametrize("line_search", ["strong_wolfe", "backtracking"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_state_keeps_shapes_and_dtypes(dtype: torch.dtype, line_search: str) -> None:
    n, m = 100, 5
    x0 = torch.tensor([-1.2, 1.0] * (n // 2), dtype=dtype)
    # Documented shapes (LBFGSState docstring); every other field is a () int64 counter.
    float_shapes = {
        "value": (),
        "grad": (n,),
        "s_history": (m, n),
        "y_history": (m, n),
        "rho": (m,),
        "gamma": (),
        "sy_products": (0, 0),  # the default two-loop recursion keeps no products
        "yy_products": (0, 0),
    }
    trajectory = run(rosenbrock, x0, 50, history_size=m, line_search=line_search)
    for k, (params, state) in enumerate(trajectory):
        assert isinstance(state, LBFGSState)
        assert params.shape == (n,)
        assert params.dtype == dtype
        assert state.history_size == m
        for name, leaf in zip(LBFGSState._fields, state, strict=True):
            assert isinstance(leaf, torch.Tensor), f"iterate {k}: state.{name}"
            if name in float_shapes:
                assert leaf.shape == float_shapes[name], f"iterate {k}: state.{name}"
                assert leaf.dtype == dtype, f"iterate {k}: state.{name}"
            else:
                assert leaf.shape == (), f"iterate {k}: state.{name}"
                assert leaf.dtype == torch.int64, f"iterate {k}: state.{name}"
    final = trajectory[-1][1]
    assert final.status == StopReason.RUNNING, "Rosenbrock(100) must still be running after 50 updates"
    assert int(final.iteration) == 50


# --------------------------------------------------------------------------------------------
# Pytrees: the same iterates as the flat problem


@dataclass(frozen=True)
class PytreeCase:
    """``fun`` on a pytree and the same objective ``flat_fun`` on one real vector.

    ``to_flat``/``from_flat`` are written here by hand (complex entries as (real, imag) pairs).
    The leaf order need not be the library's: L-BFGS is equivariant under permutations of the
    coordinates, so any order gives the same iterates up to rounding.
    """

    params: PyTree
    fun: Callable[[PyTree], Tensor]
    flat_fun: Callable[[Tensor], Tensor]
    to_flat: Callable[[PyTree], Tensor]
    from_flat: Callable[[Tensor], PyTree]


def _nested_shapes() -> list[tuple[tuple[Any, ...], torch.dtype]]:
    f64, c128 = torch.float64, torch.complex128
    return [((), f64), ((2, 3), f64), ((4,), f64), ((3, 1), f64), ((2,), c128), ((1, 2, 2), f64)]


def _nested_from_leaves(ls: list[Tensor]) -> PyTree:
    return {"scalar": ls[0], "pair": (ls[1], [ls[2], {"deep": ls[3]}]), "z": ls[4], "last": [(ls[5],)]}


def _real_size(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * (2 if dtype.is_complex else 1)


def _flatten_leaves(tree: PyTree) -> Tensor:
    parts = [torch.view_as_real(t).reshape(-1) if t.is_complex() else t.reshape(-1) for t in leaves(tree)]
    return torch.cat(parts)


def _unflatten_leaves(x: Tensor, shapes: list[tuple[tuple[Any, ...], torch.dtype]]) -> list[Tensor]:
    out, offset = [], 0
    for shape, dtype in shapes:
        size = _real_size(shape, dtype)
        chunk = x[offset : offset + size]
        offset += size
        out.append(
            torch.view_as_complex(chunk.reshape(*shape, 2)) if dtype.is_complex else chunk.reshape(shape)
        )
    assert offset == x.numel()
    return out


def tensor_case() -> PytreeCase:
    problem = logistic_regression(60, 12, 0.1, seed=7)
    x0 = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).reshape(3, 4)
    return PytreeCase(
        params=x0,
        fun=lambda p: problem.fun(p.reshape(-1)),
        flat_fun=problem.fun,
        to_flat=lambda p: p.reshape(-1),
        from_flat=lambda x: x.reshape(3, 4),
    )


def nested_case() -> PytreeCase:
    shapes = _nested_shapes()
    n = sum(_real_size(shape, dtype) for shape, dtype in shapes)
    problem = logistic_regression(80, n, 0.1, seed=8)
    x0 = torch.linspace(-0.5, 0.5, n, dtype=torch.float64)
    return PytreeCase(
        params=_nested_from_leaves([t.clone() for t in _unflatten_leaves(x0, shapes)]),
        fun=lambda p: problem.fun(_flatten_leaves(p)),
        flat_fun=problem.fun,
        to_flat=_flatten_leaves,
        from_flat=lambda x: _nested_from_leaves(_unflatten_leaves(x, shapes)),
    )


def mlp_case() -> PytreeCase:
    torch.manual_seed(11)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    generator = torch.Generator().manual_seed(12)
    inputs = torch.randn(30, 3, generator=generator, dtype=torch.float64)
    targets = torch.randn(30, 2, generator=generator, dtype=torch.float64)
    params = dict(model.named_parameters())
    names = list(params)
    shapes = [tuple(p.shape) for p in params.values()]

    def fun(p: dict[str, Tensor]) -> Tensor:
        out = torch.func.functional_call(model, p, (inputs,))
        return ((out - targets) ** 2).mean()

    def from_flat(x: Tensor) -> dict[str, Tensor]:
        ls = _unflatten_leaves(x, [(shape, torch.float64) for shape in shapes])
        return dict(zip(names, ls, strict=True))

    return PytreeCase(
        params=params,
        fun=fun,
        flat_fun=lambda x: fun(from_flat(x)),
        to_flat=lambda p: torch.cat([p[name].reshape(-1) for name in names]),
        from_flat=from_flat,
    )


def _complex_target() -> Tensor:
    generator = torch.Generator().manual_seed(13)
    return torch.randn(2, 3, generator=generator, dtype=torch.complex128)


def complex_case() -> PytreeCase:
    c = _complex_target()
    c_real = torch.view_as_real(c).reshape(-1)

    def fun(z: Tensor) -> Tensor:
        diff = z - c
        return (diff.conj() * diff).real.sum()  # |z - c|^2

    return PytreeCase(
        params=torch.zeros(2, 3, dtype=torch.complex128),
        fun=fun,
        flat_fun=lambda x: ((x - c_real) ** 2).sum(),
        to_flat=lambda z: torch.view_as_real(z).reshape(-1),
        from_flat=lambda x: torch.view_as_complex(x.reshape(2, 3, 2)),
    )


PYTREE_CASES = {"tensor": tensor_case, "nested": nested_case, "mlp": mlp_case, "complex": complex_case}


@pytest.mark.parametrize("line_search", LINE_SEARCHES, ids=str)
@pytest.mark.parametrize("case_name", PYTREE_CASES)
def test_pytree_params_match_flat_problem(case_name: str, line_search: str | None) -> None:
    case = PYTREE_CASES[case_name]()
    params0 = case.params
    saved = snapshot(params0)
    x0 = case.to_flat(params0).detach().clone()
    # The hand-written flattening is a bijection, and fun and flat_fun agree.
    torch.testing.assert_close(case.to_flat(case.from_flat(x0)), x0, rtol=0, atol=0)
    torch.testing.assert_close(case.fun(params0), case.flat_fun(x0), rtol=1e-15, atol=0)

    n_updates = 10
    tree_run = run(case.fun, params0, n_updates, line_search=line_search)
    flat_run = run(case.flat_fun, x0, n_updates, line_search=line_search)
    for k, ((params, state), (x, flat_state)) in enumerate(zip(tree_run, flat_run, strict=True)):
        assert_same_structure(params, params0)
        for leaf in leaves(params):
            assert leaf.grad_fn is None, "new params must not carry an autograd graph"
        torch.testing.assert_close(case.to_flat(params), x, rtol=1e-12, atol=1e-12, msg=f"iterate {k}")
        torch.testing.assert_close(state.value, flat_state.value, rtol=1e-12, atol=1e-12)
        assert state.grad.shape == flat_state.grad.shape
        for name in ("iteration", "n_evals", "status"):
            assert torch.equal(getattr(state, name), getattr(flat_state, name)), f"iterate {k}: {name}"
    assert int(tree_run[-1][1].iteration) >= 2
    assert_unchanged(params0, saved, "the initial params")


def test_complex_params_converge_to_target() -> None:
    case, c = complex_case(), _complex_target()
    trajectory = run(case.fun, case.params, 5)
    z, state = trajectory[-1]
    assert z.dtype == torch.complex128
    assert z.shape == (2, 3)
    assert state.status == StopReason.GRADIENT_TOLERANCE
    # The gradient in real coordinates is 2 (Re, Im)(z - c); max|g| <= 1e-7 (the default
    # tolerance_grad) puts each real coordinate within 5e-8 of c's, so |z - c| <= 5e-8 * sqrt(2).
    assert float((z - c).abs().max()) <= 5e-8 * math.sqrt(2)


def test_nn_parameters_are_not_modified_and_outputs_are_plain_tensors() -> None:
    case = mlp_case()
    params0 = case.params
    assert all(isinstance(p, torch.nn.Parameter) for p in params0.values())
    saved = snapshot(params0)
    params, state = run(case.fun, params0, 3)[-1]
    assert_unchanged(params0, saved, "model parameters")
    for name, leaf in params.items():
        assert not isinstance(leaf, torch.nn.Parameter), name
        assert not leaf.requires_grad, name
    assert int(state.iteration) == 3


# --------------------------------------------------------------------------------------------
# Freezing of stopped problems


@pytest.mark.parametrize("line_search", LINE_SEARCHES, ids=str)
@pytest.mark.parametrize("max_evals", [None, 6], ids=["converge", "max_evals"])
def test_stopped_problem_is_frozen(line_search: str | None, max_evals: int | None) -> None:
    problem = spd_quadratic(6, 10.0, seed=0)
    options = {"line_search": line_search, "max_evals": max_evals}
    params, state = problem.x0, torchlbfgs.init(problem.fun, problem.x0)
    for _ in range(100):
        params, state = torchlbfgs.update(problem.fun, params, state, **options)
        if state.status != StopReason.RUNNING:
            break
    assert state.status != StopReason.RUNNING
    if max_evals is not None:
        assert state.status == StopReason.MAX_EVALS
    saved_params, saved_state = params.clone(), LBFGSState(*(leaf.clone() for leaf in state))
    # Further calls, including ones whose options would let the problem continue, change nothing.
    for more in (
        options,
        options,
        {"line_search": line_search, "tolerance_grad": 0.0, "tolerance_change": 0.0},
    ):
        params, state = torchlbfgs.update(problem.fun, params, state, **more)
        assert bitwise_equal(params, saved_params)
        assert_states_bitwise_equal(state, saved_state, "after the stop")
        assert int(state.n_evals) == int(saved_state.n_evals)


# --------------------------------------------------------------------------------------------
# Non-finite start


NON_FINITE_STARTS = {
    "nan value": (lambda x: torch.log(x).sum(), -torch.ones(3, dtype=torch.float64)),
    "inf value": (lambda x: (1.0 / x).sum(), torch.zeros(3, dtype=torch.float64)),
    "inf gradient": (lambda x: torch.sqrt(x).sum(), torch.zeros(3, dtype=torch.float64)),
}


@pytest.mark.parametrize("line_search", LINE_SEARCHES, ids=str)
@pytest.mark.parametrize("start", NON_FINITE_STARTS)
def test_non_finite_start_stops_at_init(start: str, line_search: str | None) -> None:
    """``init`` refuses a non-finite start where checking is free; unchecked (and always under
    ``vmap``, below) the state is failed from the start and ``update`` leaves it alone."""
    fun, x0 = NON_FINITE_STARTS[start]
    value = fun(x0)
    grad = torch.func.grad(fun)(x0)
    assert not (torch.isfinite(value) and torch.isfinite(grad).all())  # the premise

    with pytest.raises(ValueError, match="not finite"):  # eager on the CPU: a clear error
        torchlbfgs.init(fun, x0)
    state = torchlbfgs.init(fun, x0, check_finite=False)  # or, unchecked, a failed state
    assert state.status == StopReason.NON_FINITE
    assert bool(state.stopped)
    assert bool(state.failed)
    assert not bool(state.converged)
    assert int(state.n_evals) == 1
    saved_state = LBFGSState(*(leaf.clone() for leaf in state))
    params = x0
    for _ in range(3):
        params, state = torchlbfgs.update(fun, params, state, line_search=line_search)
        assert bitwise_equal(params, x0)
        assert_states_bitwise_equal(state, saved_state, "after a non-finite start")


# --------------------------------------------------------------------------------------------
# Errors


def _quadratic(p: PyTree) -> Tensor:
    return sum(((leaf.to(torch.float64)) ** 2).sum() for leaf in leaves(p))


def _init_error_cases() -> list[Any]:
    f32, f64 = torch.float32, torch.float64
    return [
        pytest.param({}, {}, ValueError, "params is an empty pytree", id="empty dict"),
        pytest.param([], {}, ValueError, "params is an empty pytree", id="empty list"),
        pytest.param(torch.zeros(0), {}, ValueError, "params has no elements", id="no elements"),
        pytest.param(
            {"w": torch.zeros(2), "n": torch.zeros(2, dtype=torch.int64)},
            {},
            TypeError,
            "params['n'] has dtype torch.int64; expected a floating or complex dtype",
            id="integer leaf",
        ),
        pytest.param(
            [torch.zeros(2, dtype=f32), torch.zeros(2, dtype=f64)],
            {},
            TypeError,
            "all leaves must share one floating dtype",
            id="mixed float32/float64",
        ),
        pytest.param(
            torch.zeros(2), {"history_size": 0}, ValueError, "history_size must be a positive int", id="m=0"
        ),
        pytest.param(
            torch.zeros(2), {"history_size": -3}, ValueError, "history_size must be a positive int", id="m<0"
        ),
    ]


@pytest.mark.parametrize(("params", "kwargs", "error", "message"), _init_error_cases())
def test_init_errors(params: PyTree, kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        torchlbfgs.init(_quadratic, params, **kwargs)


@pytest.mark.parametrize(
    "bad_fun",
    [lambda x: x**2, lambda x: (x**2).sum().reshape(1)],
    ids=["vector output", "shape (1,) output"],
)
def test_non_scalar_fun_output(bad_fun: Callable[[Tensor], Tensor]) -> None:
    x = torch.ones(3, dtype=torch.float64)
    message = re.escape("fun must return a scalar (0-d) tensor")
    with pytest.raises(ValueError, match=message):
        torchlbfgs.init(bad_fun, x)
    state = torchlbfgs.init(_quadratic, x)
    with pytest.raises(ValueError, match=message):
        torchlbfgs.update(bad_fun, x, state)


def _update_error_cases() -> list[Any]:
    return [
        pytest.param({"line_search": "armijo"}, "line_search must be one of", id="unknown line_search"),
        pytest.param(
            {"curvature_rule": "powell"}, "curvature_rule must be one of", id="unknown curvature_rule"
        ),
        pytest.param({"c1": 0.9, "c2": 0.9}, "need 0 < c1 < c2 < 1", id="c1 == c2"),
        pytest.param({"c1": 0.5, "c2": 0.1}, "need 0 < c1 < c2 < 1", id="c1 > c2"),
        pytest.param(
            {"c1": 0.5, "c2": 0.1, "line_search": None}, "need 0 < c1 < c2 < 1", id="c1 > c2, no search"
        ),
    ]


@pytest.mark.parametrize(("kwargs", "message"), _update_error_cases())
def test_update_option_errors(kwargs: dict[str, Any], message: str) -> None:
    x = torch.ones(3, dtype=torch.float64)
    state = torchlbfgs.init(_quadratic, x)
    with pytest.raises(ValueError, match=re.escape(message)):
        torchlbfgs.update(_quadratic, x, state, **kwargs)


def test_state_of_another_problem_is_rejected() -> None:
    state = torchlbfgs.init(_quadratic, torch.ones(3, dtype=torch.float64))
    other = {"a": torch.ones(2, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}
    with pytest.raises(ValueError, match=re.escape("was the state made by init() for these params?")):
        torchlbfgs.update(_quadratic, other, state)


# --------------------------------------------------------------------------------------------
# Stop-reason messages


@pytest.mark.parametrize("code", list(StopReason), ids=lambda c: c.name)
def test_status_message_for_every_code(code: StopReason) -> None:
    message = torchlbfgs.status_message(code)
    assert isinstance(message, str)
    assert message
    # Any spelling of the code gives the same text.
    assert torchlbfgs.status_message(int(code)) == message
    assert torchlbfgs.status_message(torch.tensor(int(code))) == message
    assert torchlbfgs.status_message(torch.tensor([int(code)])) == message
    # The text agrees with the state's own classification of the code.
    state = torchlbfgs.init(_quadratic, torch.ones(2, dtype=torch.float64))._replace(
        status=torch.tensor(int(code))
    )
    assert message.startswith("running") == (not bool(state.stopped))
    assert message.startswith("converged") == bool(state.converged)
    assert message.startswith("failed") == bool(state.failed)


def test_status_messages_are_distinct() -> None:
    messages = [torchlbfgs.status_message(code) for code in StopReason]
    assert len(set(messages)) == len(messages)


@pytest.mark.parametrize("code", [len(StopReason), 99, -1])
def test_status_message_unknown_code(code: int) -> None:
    with pytest.raises(ValueError, match="unknown stop-reason code"):
        torchlbfgs.status_message(code)
    with pytest.raises(ValueError, match="unknown stop-reason code"):
        torchlbfgs.status_message(torch.tensor(code))


def test_status_message_rejects_several_codes() -> None:
    with pytest.raises(ValueError, match="takes one code"):
        torchlbfgs.status_message(torch.tensor([1, 2]))


# --------------------------------------------------------------------------------------------
# Composition with torch.func.grad


def _grad_problem() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(21)
    m = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    a = m @ m.T + 4 * torch.eye(4, dtype=torch.float64)
    b = torch.randn(4, generator=generator, dtype=torch.float64)
    return a, b


def _solve_loss(b: Tensor, a: Tensor, line_search: str | None, early_exit: bool | None) -> Tensor:
    """``|x_3|^2`` after three L-BFGS updates on ``0.5 x'Ax - b'x`` from 0 (b captured by fun)."""

    def fun(x: Tensor) -> Tensor:
        return 0.5 * x @ (a @ x) - b @ x

    x = torch.zeros(4, dtype=torch.float64)
    state = torchlbfgs.init(fun, x)
    for _ in range(3):
        x, state = torchlbfgs.update(fun, x, state, line_search=line_search, early_exit=early_exit)
    return (x**2).sum()


# Reverse-mode gradients through the searches: every step of a masked search evaluates
# interpolation formulas on degenerate data too (e.g. the still-empty zoom bracket, 0/0); the
# unused branch must stay finite or torch.where's backward turns 0 * NaN into NaN.
@pytest.mark.parametrize(
    ("line_search", "early_exit"),
    [
        pytest.param("backtracking", None, id="backtracking"),
        pytest.param(None, None, id="fixed-step"),
        pytest.param("strong_wolfe", None, id="strong_wolfe"),
        pytest.param("strong_wolfe", True, id="strong_wolfe-early_exit"),
    ],
)
def test_func_grad_through_updates_matches_finite_differences(
    line_search: str | None, early_exit: bool | None
) -> None:
    a, b = _grad_problem()
    loss = lambda b: _solve_loss(b, a, line_search, early_exit)  # noqa: E731
    grad = torch.func.grad(loss)(b)
    h = 1e-6
    finite_differences = torch.stack(
        [(loss(b + h * e) - loss(b - h * e)) / (2 * h) for e in torch.eye(4, dtype=torch.float64)]
    )
    torch.testing.assert_close(grad, finite_differences, rtol=1e-6, atol=1e-9)


def test_non_finite_start_under_vmap_is_a_status_not_an_error() -> None:
    starts = torch.tensor([[1.0, 2.0], [-1.0, 2.0], [3.0, 0.5]], dtype=torch.float64)  # row 1: log(-1)
    states = torch.func.vmap(lambda x: torchlbfgs.init(lambda v: torch.log(v).sum(), x))(starts)
    assert states.status.tolist() == [StopReason.RUNNING, StopReason.NON_FINITE, StopReason.RUNNING]
