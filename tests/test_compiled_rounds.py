"""A compiled solve runs its rounds on the device between the host's actions.

Compiled, and where the stop flags are read every round (the CPU), ``batched_minimize`` runs the
rounds between two things the host must do (shrink the batch, call back, move the progress
bar, stop) as one ``while_loop`` in one call of the compiled graph
(:func:`torchlbfgs.compaction.steps_until_shrink`). These tests hold the loop's stopping rule to
the host's, the solve to the eager one, callback for callback, and count the calls; and they
check what makes such a step cheap to compile again: Inductor's caches keep graphs that hold a
``while_loop`` (and tell two loops apart by their bodies), and the trampolines of different
steps do not share what Dynamo learns about their inputs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchlbfgs
from torchlbfgs.batched import _BarPace
from torchlbfgs.compaction import steps_until_shrink
from torchlbfgs.compiled import CompiledStep


class Countdown(NamedTuple):
    left: torch.Tensor  # steps each problem still runs
    ticks: torch.Tensor  # steps each problem has taken


def _tick(state: Countdown) -> Countdown:
    running = state.left > 0
    return Countdown(torch.where(running, state.left - 1, 0), state.ticks + running.long())


def _running(state: Countdown) -> torch.Tensor:
    return state.left > 0


def _host_loop(lifetimes: list[int], count: int, last: int, shrinkable: bool) -> tuple[list[int], int]:
    """The rule the device loop must follow, as the host applies it between rounds: one step,
    then go on while ``count < last``, some problem runs, and the batch need not shrink
    (2 <= running <= half)."""
    left, batch, first = list(lifetimes), len(lifetimes), count
    while count < last:
        running = sum(steps > 0 for steps in left)
        if count > first and (running == 0 or (shrinkable and 2 <= running <= batch // 2)):
            break
        left, count = [max(steps - 1, 0) for steps in left], count + 1
    return left, count


def _countdown(lifetimes: list[int]) -> Countdown:
    left = torch.tensor(lifetimes)
    return Countdown(left, torch.zeros_like(left))


@settings(max_examples=60, deadline=None)
@given(
    lifetimes=st.lists(st.integers(0, 9), min_size=1, max_size=9),
    count=st.integers(0, 3),
    extra=st.integers(0, 12),
    shrinkable=st.booleans(),
)
def test_the_device_loop_stops_where_the_host_would_act(
    lifetimes: list[int], count: int, extra: int, shrinkable: bool
) -> None:
    last = count + extra
    state, end = steps_until_shrink(
        _tick, _countdown(lifetimes), torch.tensor(count), torch.tensor(last), _running, shrinkable=shrinkable
    )
    left, expected_end = _host_loop(lifetimes, count, last, shrinkable)
    assert int(end) == expected_end
    assert state.left.tolist() == left
    assert state.ticks.tolist() == [a - b for a, b in zip(lifetimes, left, strict=True)]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_the_device_loop_compiles_to_one_graph_with_a_dynamic_batch(backend: str) -> None:
    """Compiled (fullgraph), the loop stops where the host would, for batches of several sizes
    with one graph."""
    from torch._dynamo.utils import counters

    def stretch(state: Countdown, count: torch.Tensor, last: torch.Tensor) -> tuple[Countdown, torch.Tensor]:
        return steps_until_shrink(_tick, state, count, last, _running, shrinkable=True)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(stretch, fullgraph=True, backend=backend)
    for lifetimes in ([5, 1, 7, 2, 9, 3], [4, 4, 4, 1, 0, 6, 2, 8], [3, 8, 8]):
        state = _countdown(lifetimes)
        for leaf in state:
            torch._dynamo.mark_dynamic(leaf, 0)
        got, end = compiled(state, torch.tensor(1), torch.tensor(20))
        left, expected_end = _host_loop(lifetimes, 1, 20, True)
        assert (got.left.tolist(), int(end)) == (left, expected_end)
    assert counters["stats"]["unique_graphs"] == 1


def _logistic(w: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = features @ w
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels) + 1e-2 * (w @ w)


def _host_actions(running_after: list[int], batch: int, callback_every: int) -> int:
    """How many times the compiled driver calls its compiled rounds, derived from how many
    problems run after each round of an eager solve: the first round alone (it compiles), then
    a call that runs up to the next round at which the host must act: a callback is due, the
    batch should shrink (2 <= running <= half of it), or no problem runs."""
    calls, current, done = 1, batch, 1
    while done < len(running_after) and running_after[done - 1] > 0:
        running = running_after[done - 1]
        if 2 <= running <= current // 2:
            current = running
        calls += 1
        done += 1
        while done < len(running_after) and done % callback_every != 0:
            running = running_after[done - 1]
            if running == 0 or 2 <= running <= current // 2:
                break
            done += 1
    return calls


def test_a_compiled_solve_calls_its_graph_once_per_host_action_and_matches_the_eager_solve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The compiled solve (``aot_eager``) gives the eager solve's iterates, callback for
    callback, with one call of the compiled rounds per host action rather than one per round."""
    generator = torch.Generator().manual_seed(3)
    batch = 12
    features = torch.randn(batch, 20, 3, generator=generator, dtype=torch.float64)
    features = features * torch.logspace(-1, 1, batch, dtype=torch.float64).view(-1, 1, 1)
    labels = (torch.rand(batch, 20, generator=generator, dtype=torch.float64) > 0.5).double()
    start = torch.zeros(batch, 3, dtype=torch.float64)
    options: dict[str, Any] = {
        "max_iter": 40,
        "history_size": 4,
        "tolerance_grad": 1e-13,
        "tolerance_change": 0.0,
    }

    def solve(
        compile: Any, every: int
    ) -> tuple[torchlbfgs.Result, list[tuple[int, torch.Tensor, torch.Tensor]]]:
        seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

        def callback(progress: torchlbfgs.Progress) -> None:
            seen.append((progress.rounds, progress.status.clone(), progress.value.clone()))

        result = torchlbfgs.batched_minimize(
            _logistic, start, features, labels, compile=compile, callback=callback, callback_every=every,
            **options,
        )  # fmt: skip
        return result, seen

    _, each_round = solve(False, 1)
    running_after = [int((status == 0).sum()) for _, status, _ in each_round]
    assert running_after.index(0) > 0  # problems stop at different rounds: the batch shrinks
    assert len(set(running_after)) > 3

    calls = 0
    call = CompiledStep.__call__

    def counted(self: CompiledStep, *args: Any) -> Any:
        nonlocal calls
        calls += 1
        return call(self, *args)

    monkeypatch.setattr(CompiledStep, "__call__", counted)
    every = 7
    eager, eager_seen = solve(False, every)
    calls = 0
    compiled, compiled_seen = solve({"backend": "aot_eager"}, every)
    assert calls == _host_actions(running_after, batch, every) < len(running_after) // 3
    assert [rounds for rounds, _, _ in compiled_seen] == [rounds for rounds, _, _ in eager_seen]
    for (_, status, value), (_, eager_status, eager_value) in zip(compiled_seen, eager_seen, strict=True):
        assert torch.equal(status, eager_status)
        torch.testing.assert_close(value, eager_value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(compiled.params, eager.params, rtol=1e-12, atol=1e-12)
    assert torch.equal(compiled.n_evals, eager.n_evals)
    assert torch.equal(compiled.n_iter, eager.n_iter)
    assert torch.equal(compiled.status, eager.status)


def test_the_progress_bar_of_a_compiled_solve_moves_about_every_fifth_of_a_second() -> None:
    """Between two readings of the bar the compiled rounds run on the device; the stretch starts
    at one round and at most doubles, towards about 0.2 s of rounds."""
    pace = _BarPace(enabled=True)
    assert pace.next(5) == 6
    pace.ran(1, pace.clock() - 0.001)  # 1 ms a round: room for 200, but at most twice 1
    assert pace.next(6) == 8
    pace.ran(2, pace.clock() - 0.002)
    assert pace.next(8) == 12
    pace.ran(4, pace.clock() - 1.0)  # 0.25 s a round: one round at a time
    assert pace.next(12) == 13
    assert _BarPace(enabled=False).next(3) > 10**9  # no bar: no stop for it


def test_trampolines_of_different_steps_do_not_share_what_dynamo_learns_of_their_inputs() -> None:
    """Dynamo keeps, by code file, line and name, which input sizes changed between calls, and
    compiles those dimensions dynamic from then on. Each trampoline has a name of its own, so a
    step whose input is not the size another step's was compiles static (here, before the names,
    the second step compiled its input's size dynamic)."""
    shapes: list[list[Any]] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        shapes.append([tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in example_inputs])
        return gm.forward

    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    def triple(x: torch.Tensor) -> torch.Tensor:
        return x * 3

    torch._dynamo.reset()
    assert torch.equal(
        CompiledStep("kind a", double, {"backend": recording_backend})(double, torch.ones(3)),
        torch.full((3,), 2.0),
    )
    assert torch.equal(
        CompiledStep("kind b", triple, {"backend": recording_backend})(triple, torch.ones(5)),
        torch.full((5,), 3.0),
    )
    assert shapes == [[(3,)], [(5,)]]  # static sizes, no symbolic size among the inputs


def test_inductor_keeps_a_looping_step_in_its_cache_and_tells_loops_apart_by_their_bodies(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step holding a ``while_loop`` (``loops=True``) is kept by Inductor's FX graph cache: a
    fresh Dynamo finds it there rather than compiling again (unmarked, the cache bypasses it).
    Two loops that differ only in their body's operation get each their own entry."""
    from torch._dynamo.utils import counters
    from torch._higher_order_ops import while_loop

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))

    def looped(operation: Any) -> Any:
        def step(x: torch.Tensor) -> torch.Tensor:
            def body(count: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return count + 1, operation(x)

            return while_loop(lambda count, x: count < 3, body, (torch.tensor(0), x))[1]  # type: ignore[no-untyped-call]

        return step

    x = torch.linspace(0.1, 1.0, 4)

    def compile_afresh(operation: Any, *, loops: bool) -> torch.Tensor:
        torch._dynamo.reset()
        step = looped(operation)
        result: torch.Tensor = CompiledStep("looping test", operation, {}, loops=loops)(step, x)
        return result

    counters.clear()
    assert torch.allclose(compile_afresh(torch.sin, loops=True), x.sin().sin().sin())
    assert counters["inductor"]["fxgraph_cache_bypass"] == 0
    assert counters["inductor"]["fxgraph_cache_miss"] == 1
    assert torch.allclose(compile_afresh(torch.sin, loops=True), x.sin().sin().sin())
    assert counters["inductor"]["fxgraph_cache_hit"] == 1
    assert torch.allclose(compile_afresh(torch.cos, loops=True), x.cos().cos().cos())  # not sin's entry
    assert counters["inductor"]["fxgraph_cache_miss"] == 2
    counters.clear()
    assert torch.allclose(compile_afresh(torch.sin, loops=False), x.sin().sin().sin())
    assert counters["inductor"]["fxgraph_cache_bypass"] == 1  # what the mark is for


def test_a_compiled_backward_runs_its_conjugate_gradients_between_compactions_in_one_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The backward's CG iterations, compiled (``aot_eager``), run on the device between two
    compactions: as many calls of the compiled iterations as the batch has sizes, and the
    hyperparameter gradients of the eager backward."""
    from test_implicit import TIGHT, _ridge_batch, ridge

    import torchlbfgs.batched_implicit as batched_implicit

    batch = 12
    Xs, ys, lams = _ridge_batch(5, batch=batch)  # backward solves of 1 to 6 iterations
    w0 = torch.zeros(batch, Xs.shape[-1], dtype=torch.float64)
    weights = torch.linspace(1.0, 2.0, Xs.shape[-1], dtype=torch.float64)

    def hypergradient(compile: Any) -> torch.Tensor:
        leaf = lams.clone().requires_grad_()
        params = torchlbfgs.batched_minimize(
            ridge, w0, leaf, Xs, ys, implicit_diff=True, compile=compile, **TIGHT
        )
        (gradient,) = torch.autograd.grad((params.params * weights).sum(), leaf)
        return gradient

    sizes: list[int] = []  # the batch each eager CG iteration works on
    iterate = batched_implicit.cg_iteration

    def counting(cg: Any, *rest: Any) -> Any:
        sizes.append(cg.u.shape[0])
        return iterate(cg, *rest)

    monkeypatch.setattr(batched_implicit, "cg_iteration", counting)
    eager = hypergradient(False)
    monkeypatch.setattr(batched_implicit, "cg_iteration", iterate)
    assert len(set(sizes)) >= 3  # the batch shrank at least twice

    calls: dict[str, int] = {}
    call = CompiledStep.__call__

    def counted(self: CompiledStep, *args: Any) -> Any:
        calls[self.key[0]] = calls.get(self.key[0], 0) + 1
        return call(self, *args)

    monkeypatch.setattr(CompiledStep, "__call__", counted)
    compiled = hypergradient({"backend": "aot_eager"})
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)
    assert calls["batched_minimize implicit CG iterations"] == len(set(sizes)) < len(sizes)
