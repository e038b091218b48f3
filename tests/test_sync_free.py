"""On a GPU the functional core never waits for the device: no device-to-host reads.

``torch.cuda.set_sync_debug_mode("error")`` makes every synchronising call (``.item()``,
``bool(tensor)``, ``nonzero`` ...) raise. ``update`` (each line search) and an evaluation
round of a batched solve run under it, and give the CPU's results; skipped without CUDA. On
the CPU, the same code paths (``early_exit=False``, which is what ``None`` means on a GPU)
run with every host-reading method of ``torch.Tensor`` made to raise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import pytest
import torch
from problems import rosenbrock

import torchlbfgs
import torchlbfgs.scalars
import torchlbfgs.torch_schedule
from torchlbfgs.objective import flat_objective
from torchlbfgs.pytree import ravel_pytree
from torchlbfgs.rounds import RoundState, Settings, advance, start

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
HOST_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero", "numpy")


@contextmanager
def syncs_forbidden() -> Iterator[None]:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@needs_cuda
@pytest.mark.parametrize("line_search", ["strong_wolfe", "more_thuente", "backtracking", None], ids=str)
def test_update_makes_no_host_sync(line_search: str | None) -> None:
    options = {"line_search": line_search, "learning_rate": 1e-3 if line_search is None else 1.0}
    results = {}
    for device in ("cpu", "cuda"):
        x = torch.tensor([-1.2, 1.0, -1.2, 1.0], dtype=torch.float64, device=device)
        state = torchlbfgs.init(rosenbrock, x, history_size=3, check_finite=False)  # what None means on a GPU
        forbid: AbstractContextManager[None] = syncs_forbidden() if device == "cuda" else nullcontext()
        with forbid:
            for _ in range(8):  # wraps the history
                x, state = torchlbfgs.update(rosenbrock, x, state, **options)
        results[device] = (x.cpu(), state.n_evals.cpu(), state.status.cpu())
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], rtol=1e-12, atol=1e-12)
    assert torch.equal(results["cuda"][1], results["cpu"][1])
    assert torch.equal(results["cuda"][2], results["cpu"][2])


@needs_cuda
def test_batched_rounds_make_no_host_sync() -> None:
    settings = Settings(max_iter=20, history_size=4)
    generator = torch.Generator().manual_seed(0)
    starts = torch.randn(16, 4, generator=generator, dtype=torch.float64)

    def start_one(x: torch.Tensor) -> RoundState:
        return start(flat_objective(rosenbrock, ravel_pytree(x)[1]), x, settings)

    def advance_one(state: RoundState) -> RoundState:
        return advance(flat_objective(rosenbrock, ravel_pytree(state.x)[1]), state, settings)

    finals = {}
    for device in ("cpu", "cuda"):
        state = torch.func.vmap(start_one)(starts.to(device))
        forbid: AbstractContextManager[None] = syncs_forbidden() if device == "cuda" else nullcontext()
        with forbid:
            for _ in range(40):
                state = torch.func.vmap(advance_one)(state)
        finals[device] = state
    torch.testing.assert_close(finals["cuda"].x.cpu(), finals["cpu"].x, rtol=1e-12, atol=1e-12)
    assert torch.equal(finals["cuda"].lbfgs.n_evals.cpu(), finals["cpu"].lbfgs.n_evals)


@pytest.fixture
def host_reads_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(name: str):
        def read(*args: object, **kwargs: object) -> None:
            raise AssertionError(f"host read: Tensor.{name}")

        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))


@pytest.mark.parametrize("line_search", ["strong_wolfe", "more_thuente", "backtracking", None], ids=str)
def test_update_reads_nothing_on_the_host_without_early_exit(
    line_search: str | None, host_reads_raise: None
) -> None:
    x = torch.tensor([-1.2, 1.0, -1.2, 1.0], dtype=torch.float64)
    state = torchlbfgs.init(rosenbrock, x, history_size=3, check_finite=False)  # what None means on a GPU
    for _ in range(8):
        x, state = torchlbfgs.update(
            rosenbrock, x, state, line_search=line_search, early_exit=False,
            learning_rate=1e-3 if line_search is None else 1.0,
        )  # fmt: skip
    assert isinstance(state.value, torch.Tensor)


def test_rounds_read_nothing_on_the_host_without_early_exit(host_reads_raise: None) -> None:
    settings = Settings(max_iter=20, history_size=4, early_exit=False)
    starts = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def start_one(x: torch.Tensor) -> RoundState:
        return start(flat_objective(rosenbrock, ravel_pytree(x)[1]), x, settings)

    def advance_one(state: RoundState) -> RoundState:
        return advance(flat_objective(rosenbrock, ravel_pytree(state.x)[1]), state, settings)

    state = torch.func.vmap(start_one)(starts)
    for _ in range(40):
        state = torch.func.vmap(advance_one)(state)
    assert state.x.shape == (16, 4)


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"], ids=str)
def test_adapter_reads_the_host_as_its_schedule_says(
    line_search: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``torchlbfgs.LBFGS.step`` reads the device as :mod:`torchlbfgs.torch_schedule` says: once
    at the start of a step, once per closure evaluation, and per iteration once for the
    curvature test and once for g'd and max|d| (plus, after a search, once for max|g|). Every
    host-reading Tensor method is counted: none is called outside the schedule's reading
    function and the curvature test's read of s'y (``Numbers.value``), whose calls are
    one device sync each on a GPU (on the CPU the schedule reads its scalars one by one, which
    costs no sync). The strong-Wolfe search's square roots are taken on a
    tensor made on the host for the purpose (to round as torch's), which is no device read."""
    monkeypatch.setattr(torchlbfgs.scalars.Numbers, "sqrt", staticmethod(lambda a: a**0.5))
    # what a GPU gets: the two-loop recursion on the device (on CPUs it reads its inner products)
    monkeypatch.setattr(
        torchlbfgs.torch_schedule, "_two_loop_scalars", lambda device: torchlbfgs.scalars.TENSORS
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    inputs, targets = torch.randn(40, 6, dtype=torch.float64), torch.randn(40, 1, dtype=torch.float64)
    max_iter = 7
    optimizer = torchlbfgs.LBFGS(
        model.parameters(), lr=0.1 if line_search is None else 1.0, max_iter=max_iter, max_eval=100,
        history_size=3, line_search_fn=line_search, tolerance_grad=0.0, tolerance_change=0.0,
    )  # fmt: skip
    evaluations = 0

    def closure() -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        return loss

    reads = 0  # host-reading Tensor methods called outside the schedule's one reading function
    read_groups = 0  # calls of that function: one device sync each on a GPU
    inside_read = False
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(*args: object, _original=original, **kwargs: object) -> object:  # type: ignore[no-untyped-def]
            nonlocal reads
            reads += 0 if inside_read else 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def counted_group(reader: Callable[..., Any]) -> Callable[..., Any]:
        def reading(*scalars: torch.Tensor) -> Any:
            nonlocal read_groups, inside_read
            read_groups += 1
            inside_read = True
            try:
                return reader(*scalars)
            finally:
                inside_read = False

        return reading

    monkeypatch.setattr(torchlbfgs.torch_schedule, "_read", counted_group(torchlbfgs.torch_schedule._read))
    read_one = staticmethod(counted_group(torchlbfgs.scalars.Numbers.value))
    monkeypatch.setattr(torchlbfgs.scalars.Numbers, "value", read_one)
    for step in range(3):  # the history (3 pairs) fills and wraps
        reads, read_groups, evaluations = 0, 0, 0
        optimizer.step(closure)
        step_reads = read_groups
        assert reads == 0, f"step {step}: {reads} host reads outside the schedule's reading function"
        assert optimizer.stop_reason == torchlbfgs.StopReason.MAX_ITERATIONS  # ran all max_iter iterations
        # one per evaluation (the step's first included); per iteration the curvature test (none
        # on the very first, which reads |g|_1 instead) and g'd with max|d|
        expected = evaluations + 2 * max_iter
        if line_search is not None:
            expected += max_iter  # max|g| after each search
        assert step_reads == expected, f"step {step}: {step_reads} host reads, {expected} expected"
