"""The functional API's options as users meet them: names, values, and tolerances that mean what
they say (issue 14). References: scipy's L-BFGS-B, float64 solves, f's measured rounding."""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import scipy.optimize
import torch
from torch import Tensor

import torchlbfgs
from torchlbfgs import StopReason
from torchlbfgs.options import Tolerances
from torchlbfgs.state import CONVERGED


def _quadratic(x: Tensor) -> Tensor:
    return ((x - 1.0) ** 2).sum()


def _solvers() -> dict[str, Callable[..., Any]]:
    x0 = torch.zeros(2, dtype=torch.float64)
    return {
        "minimize": lambda **kw: torchlbfgs.minimize(_quadratic, x0, **kw),
        "batched_minimize": lambda **kw: torchlbfgs.batched_minimize(_quadratic, x0.expand(3, 2), **kw),
        "update": lambda **kw: torchlbfgs.update(_quadratic, x0, torchlbfgs.init(_quadratic, x0), **kw),
    }


# ---- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["minimize", "batched_minimize", "update"])
@pytest.mark.parametrize(
    ("given", "meant"),
    [
        ("maxiter", "max_iter"),  # scipy's name
        ("lr", "learning_rate"),  # torch's names
        ("line_search_fn", "line_search"),
        ("max_eval", "max_evals"),
        ("ftol", "tolerance_value"),
        ("tolerance_gard", "tolerance_grad"),  # a typo
    ],
)
def test_an_unknown_option_is_a_type_error_that_names_the_function_and_the_option_meant(
    solver: str, given: str, meant: str
) -> None:
    with pytest.raises(TypeError) as raised:
        _solvers()[solver](**{given: 5})
    message = str(raised.value)
    assert f"torchlbfgs.{solver}()" in message
    assert f"{given!r}" in message
    if solver == "update" and given == "maxiter":  # one iteration has no max_iter: its options
        assert "its options are" in message
        assert "max_ls" in message
    else:
        assert f"did you mean {meant!r}" in message


def test_init_checks_its_option_names_too() -> None:
    with pytest.raises(TypeError, match=r"torchlbfgs\.init\(\).*'history'.*did you mean 'history_size'"):
        torchlbfgs.init(_quadratic, torch.zeros(2), history=5)


def test_an_unguessable_option_lists_the_functions_options() -> None:
    with pytest.raises(TypeError) as raised:
        torchlbfgs.minimize(_quadratic, torch.zeros(2), zzzzzz=1)
    message = str(raised.value)
    assert "'zzzzzz'; its options are" in message
    assert "tolerance_value" in message
    assert "history_size" in message
    assert "params0" not in message  # positional arguments are not options


def test_the_functional_api_names_one_option_one_way() -> None:
    """One vocabulary: every option the solvers share has the same name and default in each
    (the table in docs/options.md), and the drop-in keeps torch's."""
    import inspect

    signatures = {
        name: inspect.signature(fn).parameters
        for name, fn in [
            ("minimize", torchlbfgs.minimize),
            ("update", torchlbfgs.update),
            ("init", torchlbfgs.init),
        ]
    }
    shared = set(signatures["minimize"]) & (set(signatures["update"]) | set(signatures["init"]))
    assert {"history_size", "learning_rate", "line_search", "max_evals", "tolerance_value"} <= shared
    for name in shared - {"fun"}:
        defaults = {api: params[name].default for api, params in signatures.items() if name in params}
        assert len(set(map(repr, defaults.values()))) == 1, (name, defaults)
    batched_options = set(torchlbfgs.batched.SETTINGS_NAMES)
    assert set(signatures["minimize"]) - {"fun", "params0", "args"} <= batched_options
    torch_names = set(inspect.signature(torchlbfgs.LBFGS).parameters) - {"params", "lower", "upper"}
    assert torch_names == set(inspect.signature(torch.optim.LBFGS).parameters) - {"params"}


# ---- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["minimize", "batched_minimize", "update"])
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("learning_rate", 0.0),
        ("learning_rate", -1.0),
        ("learning_rate", float("nan")),
        ("learning_rate", float("inf")),
        ("tolerance_grad", -1e-7),
        ("tolerance_change", -1e-9),
        ("tolerance_value", float("nan")),
        ("learning_rate", "0.1"),
    ],
)
def test_invalid_values_are_rejected_as_the_adapter_rejects_them(
    solver: str, option: str, value: Any
) -> None:
    with pytest.raises(ValueError, match=option):
        _solvers()[solver](**{option: value})


def test_a_per_problem_learning_rate_under_vmap_is_not_read() -> None:
    """A tensor option (a hyper-parameter sweep under vmap) is passed on unchecked: reading it
    would be a host sync, and impossible under vmap."""
    rates = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)

    def solve(rate: Tensor) -> Tensor:
        return torchlbfgs.minimize(_quadratic, torch.zeros(2, dtype=torch.float64), learning_rate=rate).params

    swept = torch.func.vmap(solve)(rates)
    for rate, params in zip(rates, swept, strict=True):
        torch.testing.assert_close(params, solve(rate), rtol=0, atol=0)


# ---- tolerances -------------------------------------------------------------------------------


def _poisson_glm(dtype: torch.dtype, n_samples: int, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n_samples, 5, generator=generator, dtype=torch.float64) * 0.5
    weights = torch.randn(5, generator=generator, dtype=torch.float64) * 0.5
    counts = torch.poisson(torch.exp(features @ weights), generator=generator)
    return features.to(dtype), counts.to(dtype)


def _negative_log_likelihood(w: Tensor, features: Tensor, counts: Tensor) -> Tensor:
    z = features @ w
    return (torch.exp(z) - counts * z).sum()


def test_tolerance_value_given_lets_the_gradient_tolerance_decide_as_scipys_gtol() -> None:
    """A maximum-likelihood fit (a sum over 5000 samples, so |f| is large and the Hessian
    too): with torch's absolute tests (the default) the directional-derivative test stops it
    far above the gradient tolerance asked for; with ``tolerance_value`` given (here 0: the
    value test off) the gradient tolerance decides, and the fit is scipy's at the same gtol."""
    features, counts = _poisson_glm(torch.float64, 5000, seed=0)
    start = torch.zeros(5, dtype=torch.float64)

    def fun(w: Tensor) -> Tensor:
        return _negative_log_likelihood(w, features, counts)

    default = torchlbfgs.minimize(fun, start, tolerance_grad=1e-8)
    assert StopReason(int(default.status)) == StopReason.DIRECTIONAL_DERIVATIVE_TOLERANCE
    assert float(default.grad_norm) > 1e-6  # stopped far from the tolerance asked for

    asked = torchlbfgs.minimize(fun, start, tolerance_grad=1e-8, tolerance_value=0.0)
    assert StopReason(int(asked.status)) == StopReason.GRADIENT_TOLERANCE
    true_grad = torch.func.grad(fun)(asked.params)
    assert float(true_grad.abs().max()) <= 1e-8

    reference = scipy.optimize.minimize(
        lambda w: float(fun(torch.tensor(w))),
        np.zeros(5),
        jac=lambda w: torch.func.grad(fun)(torch.tensor(w)).numpy(),
        method="L-BFGS-B",
        options={"gtol": 1e-8, "ftol": 0.0},
    )
    assert np.abs(reference.jac).max() <= 1e-8
    np.testing.assert_allclose(asked.params.numpy(), reference.x, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("line_search", ["strong_wolfe", "more_thuente", "backtracking"])
def test_tolerance_value_is_l_bfgs_b_relative_decrease(line_search: str) -> None:
    """One iteration stops with VALUE_CHANGE_TOLERANCE exactly when its relative decrease
    ``(f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1)``, computed here from the values, is at most
    ``tolerance_value``."""
    features, counts = _poisson_glm(torch.float64, 200, seed=1)

    def fun(w: Tensor) -> Tensor:
        return _negative_log_likelihood(w, features, counts)

    x, state = torch.zeros(5, dtype=torch.float64), None
    state = torchlbfgs.init(fun, x)
    for _ in range(3):
        x, state = torchlbfgs.update(fun, x, state, line_search=line_search, tolerance_value=0.0)
    _, off_state = torchlbfgs.update(fun, x, state, line_search=line_search, tolerance_value=0.0)
    assert StopReason(int(off_state.status)) == StopReason.RUNNING
    before, after = float(state.value), float(off_state.value)
    relative = (before - after) / max(abs(before), abs(after), 1.0)
    assert relative > 0
    for tolerance, expected in [
        (relative * 1.01, StopReason.VALUE_CHANGE_TOLERANCE),
        (relative * 0.99, StopReason.RUNNING),
    ]:
        _, new_state = torchlbfgs.update(fun, x, state, line_search=line_search, tolerance_value=tolerance)
        assert StopReason(int(new_state.status)) == expected, (tolerance, relative)
        assert float(new_state.value) == after  # the same step either way


def test_tolerances_resolve_as_documented() -> None:
    assert Tolerances.of(None, None) == Tolerances(1e-9, 0.0, 1e-9)  # torch's absolute tests
    assert Tolerances.of(None, 2.2e-9) == Tolerances(0.0, 2.2e-9, 1e-9)  # L-BFGS-B's ftol instead
    assert Tolerances.of(1e-6, 2.2e-9) == Tolerances(1e-6, 2.2e-9, 1e-6)  # both
    assert Tolerances.of(0.0, None) == Tolerances(0.0, 0.0, 0.0)  # as before: all absolute tests off


def _resolution(fun: Callable[[Tensor], Tensor], x: Tensor) -> float:
    """The smallest change of f that can be seen at x: the spacing of f's dtype at f(x), or the
    standard deviation of f over points a few ulps from x if its rounding noise is larger."""
    generator = torch.Generator().manual_seed(0)
    eps = torch.finfo(x.dtype).eps
    values = [
        float(fun(x * (1 + 4 * eps * torch.randn(x.shape, generator=generator, dtype=x.dtype))))
        for _ in range(64)
    ]
    return max(float(np.std(values)), eps * abs(float(fun(x))))


def test_float32_fits_at_the_rounding_floor_stop_with_precision_limit_and_count_as_converged() -> None:
    """64 Poisson-GLM fits in float32 with the default tolerances: many end where no decrease
    can be seen at float32's precision. They stop with PRECISION_LIMIT (converged), never
    LINE_SEARCH_FAILED, and each one really is at the floor: the decrease its last direction
    promises (the Newton decrease g'H^-1 g / 2, computed in float64) is within f's resolution
    there (its dtype's spacing, or its measured rounding noise)."""
    data = [_poisson_glm(torch.float32, 2000, seed) for seed in range(64)]
    features = torch.stack([f for f, _ in data])
    counts = torch.stack([c for _, c in data])
    result = torchlbfgs.batched_minimize(_negative_log_likelihood, torch.zeros(64, 5), features, counts)
    statuses = collections.Counter(StopReason(int(code)) for code in result.status)
    assert StopReason.LINE_SEARCH_FAILED not in statuses, statuses
    assert statuses[StopReason.PRECISION_LIMIT] >= 5, statuses  # the case this test is about
    assert bool(result.converged.all())
    reference = torchlbfgs.batched_minimize(
        _negative_log_likelihood, torch.zeros(64, 5, dtype=torch.float64), features.double(), counts.double(),
        tolerance_grad=1e-10, tolerance_value=0.0,
    )  # fmt: skip
    for i in range(64):
        if StopReason(int(result.status[i])) != StopReason.PRECISION_LIMIT:
            continue

        def fun(w: Tensor, i: int = i) -> Tensor:
            return _negative_log_likelihood(w, features[i], counts[i])

        w = result.params[i]
        x, c = features[i].double(), counts[i].double()  # the same fit in float64, closed form:
        rates = torch.exp(x @ w.double())
        grad, hessian = x.T @ (rates - c), x.T @ (rates.unsqueeze(1) * x)
        newton_decrease = 0.5 * float(grad @ torch.linalg.solve(hessian, grad))  # what a step can still gain
        assert newton_decrease <= 10 * _resolution(fun, w), (i, newton_decrease)
        np.testing.assert_allclose(w.double().numpy(), reference.params[i].numpy(), rtol=0, atol=2e-3)


@pytest.mark.parametrize("promise", [1e-2, 1e-8])
def test_a_real_failure_is_still_line_search_failed(promise: float) -> None:
    """A gradient that points the wrong way (a bug in a hand-written gradient), scaled so that
    the first direction promises a decrease of ``promise * |f|``: far above f's rounding
    (2.2e-16 |f|) even at 1e-8, yet no step finds a decrease. That is a failure, not the floor."""
    features, counts = _poisson_glm(torch.float64, 200, seed=2)
    start = torch.full((5,), 0.1, dtype=torch.float64)
    grad, value = torch.func.grad_and_value(_negative_log_likelihood)(start, features, counts)
    scale = (promise * abs(float(value))) ** 0.5 / float(grad.norm())  # -g'd = scale^2 |g|^2 at the start

    def wrong(w: Tensor) -> tuple[Tensor, Tensor]:
        value = _negative_log_likelihood(w, features, counts)
        return value, -scale * torch.func.grad(_negative_log_likelihood)(w, features, counts)

    result = torchlbfgs.minimize(wrong, start, value_and_grad=True)
    assert StopReason(int(result.status)) == StopReason.LINE_SEARCH_FAILED
    assert StopReason.LINE_SEARCH_FAILED not in CONVERGED
    assert not bool(result.converged)


# ---- errors of everyday patterns that torch.func cannot run -------------------------------------


def _pinn_net() -> tuple[torch.nn.Module, dict[str, Tensor]]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    return net, {name: p.detach() for name, p in net.named_parameters()}


@pytest.mark.parametrize("inputs_require_grad", ["inside fun", "outside fun"])
def test_torch_autograd_grad_inside_the_loss_says_how_to_write_it(inputs_require_grad: str) -> None:
    """The usual PINN residual written with torch.autograd.grad: torch.func cannot run it, and
    the error says what to write instead (torch.func, or value_and_grad=True)."""
    net, params = _pinn_net()
    points = torch.linspace(0, 1, 20, dtype=torch.float64).unsqueeze(1)
    outside = points.clone().requires_grad_(True)

    def residual(p: dict[str, Tensor]) -> Tensor:
        x = points.clone().requires_grad_(True) if inputs_require_grad == "inside fun" else outside
        u = torch.func.functional_call(net, p, (x,))
        du_dx = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        return ((du_dx - torch.cos(x)) ** 2).mean()

    with pytest.raises(RuntimeError, match=r"torch\.func\.grad.*value_and_grad=True") as raised:
        torchlbfgs.minimize(residual, params, max_iter=2)
    assert isinstance(raised.value.__cause__, RuntimeError)  # torch's own error stays attached


def test_the_pinn_residual_written_with_torch_func_solves() -> None:
    """What the message above recommends works: du/dx with torch.func; u' = cos fitted on [0, 1]."""
    net, params = _pinn_net()
    points = torch.linspace(0, 1, 20, dtype=torch.float64)

    def residual(p: dict[str, Tensor]) -> Tensor:
        def u(x: Tensor) -> Tensor:
            return torch.func.functional_call(net, p, (x.reshape(1, 1),)).squeeze()

        du_dx = torch.func.vmap(torch.func.grad(u))(points)
        boundary = u(torch.zeros((), dtype=torch.float64)) ** 2  # u(0) = 0: u = sin
        return ((du_dx - torch.cos(points)) ** 2).mean() + boundary

    result = torchlbfgs.minimize(residual, params, max_iter=500, tolerance_grad=1e-9)
    fitted = torch.func.functional_call(net, result.params, (points.unsqueeze(1),)).squeeze(1)
    torch.testing.assert_close(fitted, torch.sin(points), atol=1e-3, rtol=0)


def test_batchnorm_in_train_mode_says_what_to_do() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1)
    ).double()
    params = {name: p.detach() for name, p in model.named_parameters()}
    inputs = torch.randn(32, 3, dtype=torch.float64)

    def loss(p: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(model, p, (inputs,)).pow(2).mean()

    with pytest.raises(RuntimeError, match=r"BatchNorm.*model\.eval\(\).*replace_all_batch_norm_modules_"):
        torchlbfgs.minimize(loss, params, max_iter=2)
    with pytest.raises(RuntimeError, match=r"BatchNorm.*model\.eval\(\)"):
        torchlbfgs.batched_minimize(
            lambda p: loss(p), {k: v.expand(2, *v.shape) for k, v in params.items()}, max_iter=2
        )
    model.eval()  # the first remedy the message gives
    assert bool(torchlbfgs.minimize(loss, params, max_iter=50).value < loss(params))


# ---- progress -----------------------------------------------------------------------------------


def _slow_quartic(x: Tensor) -> Tensor:
    return ((x - 1.0) ** 4).sum()


def test_progress_bar_shows_rounds_running_problems_and_values(capsys: pytest.CaptureFixture[str]) -> None:
    starts = torch.linspace(0, 2, 12, dtype=torch.float64).reshape(6, 2)
    result = torchlbfgs.batched_minimize(_slow_quartic, starts, progress=True)
    shown = capsys.readouterr().err.replace("\r", "\n")
    rounds = int(max(result.n_evals))  # a round per evaluation, the start's included
    last = [line for line in shown.splitlines() if "batched_minimize" in line][-1]
    assert f"{rounds}/{rounds}" in last  # the bar ends at the rounds run (its total was the bound)
    assert "0 running" in last
    assert f"{float(result.value.min()):.6g}" in last
    assert f"{float(result.value.max()):.6g}" in last


def test_without_tqdm_progress_is_plain_lines(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    starts = torch.linspace(0, 2, 12, dtype=torch.float64).reshape(6, 2)
    torchlbfgs.batched_minimize(_slow_quartic, starts, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("batched_minimize: round 0/")
    assert "not evaluated yet" in lines[0]  # batched_minimize's first round evaluates the starts
    assert "6 running" in lines[0]  # every reading is a line: while they all ran,
    assert "0 running" in lines[-1]  # and at the end

    torchlbfgs.minimize(_slow_quartic, starts[0], progress=True)
    assert "minimize:" in capsys.readouterr().err


@pytest.mark.parametrize("progress", [False, None])  # None: stderr is not a terminal here
def test_no_progress_bar_unless_asked_or_on_a_terminal(
    progress: bool | None, capsys: pytest.CaptureFixture[str]
) -> None:
    torchlbfgs.batched_minimize(_slow_quartic, torch.zeros(3, 2), progress=progress)
    torchlbfgs.minimize(_slow_quartic, torch.zeros(2), progress=progress)
    assert capsys.readouterr().err == ""


def test_callbacks_see_the_same_with_a_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    seen: dict[bool, list[tuple[int, list[float]]]] = {True: [], False: []}
    for progress in (True, False):
        torchlbfgs.batched_minimize(
            _slow_quartic, torch.zeros(4, 2, dtype=torch.float64), progress=progress, callback_every=3,
            callback=lambda p, progress=progress: seen[progress].append((p.rounds, p.value.tolist())),
        )  # fmt: skip
    capsys.readouterr()
    assert seen[True] == seen[False]
    assert len(seen[True]) > 2


def test_no_progress_bar_inside_vmap(capsys: pytest.CaptureFixture[str]) -> None:
    """Inside vmap there is no host to draw on: minimize runs as without it."""
    starts = torch.zeros(3, 2, dtype=torch.float64)
    shown = torch.func.vmap(lambda x: torchlbfgs.minimize(_slow_quartic, x, progress=True).params)(starts)
    assert capsys.readouterr().err == ""
    torch.testing.assert_close(
        shown, torch.func.vmap(lambda x: torchlbfgs.minimize(_slow_quartic, x).params)(starts)
    )


def test_progress_must_be_a_bool_or_none() -> None:
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        torchlbfgs.minimize(_slow_quartic, torch.zeros(2), progress="yes")
