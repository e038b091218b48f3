"""torch.compile traces the functional core whole: no graph breaks (fullgraph=True).

Dynamo's trace is what fullgraph checks; the ``aot_eager`` backend also runs AOTAutograd's
functionalisation over the graph without paying for Inductor's code generation, which keeps
these tests to seconds. Under compile a line search is one device-side ``while_loop``; under a
compiled ``vmap`` the masked loops run all their trips (no host reads).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import torchlbfgs


def _logistic(w: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = features @ w
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels) + 1e-2 * (w @ w)


def _data(batch: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch, 12, 3, generator=generator, dtype=dtype)
    labels = (torch.rand(batch, 12, generator=generator, dtype=dtype) > 0.5).to(dtype)
    return features, labels


def test_vmapped_solve_compiles_without_graph_breaks() -> None:
    """The whole solve, rounds unrolled (max_iter * (max_ls + 1) of them): the start, the
    driver and one round. Each further round would trace the same code again (the round is
    branch-free), ten seconds each; a round that takes its own output, round after round, is
    ``test_batched_minimize_compiles_its_round_once``'s (30 iterations, one graph).
    Dynamo alone (backend "eager": graph breaks are Dynamo's to find); AOTAutograd on a round is
    that test's too."""
    features, labels = _data(3)

    def solve(features: torch.Tensor, labels: torch.Tensor) -> torchlbfgs.Result:
        start = torch.zeros(3, 3, dtype=torch.float64)
        return torchlbfgs.batched_minimize(
            _logistic, start, features, labels, max_iter=1, max_ls=0, history_size=2
        )

    torch._dynamo.reset()
    compiled = torch.compile(solve, fullgraph=True, backend="eager")(features, labels)
    eager = solve(features, labels)
    torch.testing.assert_close(compiled.params, eager.params, rtol=1e-12, atol=1e-12)
    assert torch.equal(compiled.status, eager.status)
    assert torch.equal(compiled.n_evals, eager.n_evals)
    assert compiled.n_iter.tolist() == eager.n_iter.tolist() == [1, 1, 1]


# One compiled `update` per line search, each also covering one more part: AOTAutograd once
# (strong Wolfe; the other graphs are Dynamo's to check: a second AOT pass exercises no other AOT
# path), and the compact direction once (with backtracking: direction and search are traced
# independently of each other). The AOT case runs in float32: a 0-d float64 CPU input (the
# unbatched state's scalars) makes torch's pass that turns Python floats into tensors restart
# Dynamo's analysis once, which would double its time.
@pytest.mark.parametrize(
    ("line_search", "direction", "backend", "dtype"),
    [
        ("strong_wolfe", "two_loop", "aot_eager", torch.float32),
        ("more_thuente", "two_loop", "eager", torch.float64),
        ("backtracking", "compact", "eager", torch.float64),
    ],
    ids=lambda value: getattr(value, "__name__", str(value).removeprefix("torch.")),
)
def test_update_compiles_whole_its_line_search_one_device_side_loop(
    line_search: str, direction: str, backend: str, dtype: torch.dtype
) -> None:
    """``update`` on pytree params compiles to one graph (fullgraph: no graph breaks), in which
    the line search is one ``while_loop`` (one traced trial, stopped on the device), not
    ``max_ls + 1`` unrolled copies: the default ``max_ls=25`` then compiles quickly. The
    compiled steps equal the eager ones, including a search that tries more than one step (the
    Rosenbrock term in ``b``)."""
    features, labels = _data(1, dtype)

    def fun(params: dict[str, torch.Tensor]) -> torch.Tensor:
        b = params["b"]
        rosenbrock = 100 * (b[1] - b[0] ** 2) ** 2 + (1 - b[0]) ** 2
        return _logistic(params["w"], features[0], labels[0]) + rosenbrock

    params = {"w": torch.zeros(3, dtype=dtype), "b": torch.tensor([-1.2, 1.0], dtype=dtype)}
    state = torchlbfgs.init(fun, params, history_size=3, direction=direction)  # type: ignore[arg-type]

    def step(params: dict[str, torch.Tensor], state: torchlbfgs.LBFGSState):
        return torchlbfgs.update(fun, params, state, line_search=line_search)  # type: ignore[arg-type]

    graphs: list[torch.fx.GraphModule] = []
    compile_graph = torch._dynamo.lookup_backend(backend)

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return compile_graph(gm, example_inputs)

    torch._dynamo.reset()
    compiled_step = torch.compile(step, fullgraph=True, backend=recording_backend)
    eager_params, eager_state = params, state
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    for _ in range(4):
        params, state = compiled_step(params, state)
        eager_params, eager_state = step(eager_params, eager_state)
        for name in params:
            torch.testing.assert_close(params[name], eager_params[name], rtol=tolerance, atol=tolerance)
        assert torch.equal(state.n_evals, eager_state.n_evals)
        assert torch.equal(state.status, eager_state.status)
    # one evaluation at init and one per iteration, unless a search tried more than one step
    assert int(eager_state.n_evals) > int(eager_state.iteration) + 1
    assert len(graphs) == 1
    loops = [node for node in graphs[0].graph.nodes if node.target is torch.ops.higher_order.while_loop]
    assert len(loops) == 1


def test_compiled_vmapped_step_compiles_once() -> None:
    """vmap(init) must give real batched leaves (no shared stride-0 counters): otherwise the
    step's outputs differ in strides from its first inputs and the graph compiles again."""
    from torch._dynamo.utils import counters

    features, labels = _data(4)

    def one_step(w: torch.Tensor, state: torchlbfgs.LBFGSState, features: torch.Tensor, labels: torch.Tensor):
        return torchlbfgs.update(lambda v: _logistic(v, features, labels), w, state, max_ls=2)

    def one_init(w: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torchlbfgs.LBFGSState:
        return torchlbfgs.init(lambda v: _logistic(v, features, labels), w, history_size=3)

    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(torch.func.vmap(one_step), fullgraph=True, backend="eager")
    w = torch.zeros(4, 3, dtype=torch.float64)
    state = torch.func.vmap(one_init)(w, features, labels)
    for _ in range(3):
        w, state = step(w, state, features, labels)
    assert counters["stats"]["unique_graphs"] == 1


def test_batched_minimize_compiles_its_round_once(capsys: pytest.CaptureFixture[str]) -> None:
    """``compile=`` compiles one evaluation round (fullgraph) and reuses it for every round; the
    result is the eager one. Every evaluation is the compiled round's, the start's included
    (an eager evaluation of the batch cost 5% of a compiled solve). With ``progress=True`` a
    line says when compiling starts and how long it took; tracing the round raises no warning
    (Dynamo's, e.g. on a cached function, would reach every user who compiles)."""
    import re
    import warnings

    from torch._dynamo.utils import counters

    eager_calls = 0

    def counted_logistic(w: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        nonlocal eager_calls
        if not torch.compiler.is_compiling():  # traced: constant False, no side effect
            eager_calls += 1  # under vmap, one call evaluates the whole batch
        return _logistic(w, features, labels)

    features, labels = _data(5)
    start = torch.zeros(5, 3, dtype=torch.float64)
    options = {"max_iter": 30, "history_size": 4, "tolerance_grad": 1e-8, "tolerance_change": 0.0}
    torch._dynamo.reset()
    counters.clear()
    torch._dynamo.utils.warn_once_cache.clear()  # Dynamo warns once per process, whichever test traced first
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torchlbfgs.batched_minimize(
            counted_logistic, start, features, labels, compile={"backend": "aot_eager"}, progress=True,
            **options,
        )  # fmt: skip
    assert [str(warning.message) for warning in caught] == []  # tracing our round warns of nothing
    assert counters["stats"]["unique_graphs"] == 1
    assert eager_calls == 0
    # the batch dimension was marked dynamic on views: the caller's tensors carry no mark (one
    # would override their own torch.compile(dynamic=False), and fail it where their code
    # specialises that size)
    assert not hasattr(features, "_dynamo_dynamic_indices")
    shown = capsys.readouterr().err
    assert "batched_minimize: compiling one round" in shown
    assert re.search(r"batched_minimize: compiled one round .* in \d+\.\d s", shown), shown
    eager = torchlbfgs.batched_minimize(counted_logistic, start, features, labels, **options)
    assert eager_calls == int(eager.n_evals.max())  # one call per round, the first at the start
    torch.testing.assert_close(compiled.params, eager.params, rtol=1e-12, atol=1e-12)
    assert torch.equal(compiled.status, eager.status)
    assert torch.equal(compiled.n_evals, eager.n_evals)
    assert torch.equal(compiled.n_iter, eager.n_iter)
    assert bool(eager.converged.all())
    # a later solve with the same loss finds the round compiled: no compile line, no graph
    again = torchlbfgs.batched_minimize(
        counted_logistic, start, features, labels, compile={"backend": "aot_eager"}, progress=True,
        **options,
    )  # fmt: skip
    assert "compil" not in capsys.readouterr().err
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(again.params, compiled.params)


def test_compile_with_dynamic_false_is_static_and_keeps_the_batch_whole() -> None:
    """``compile={"dynamic": False}`` is honoured (``mark_dynamic`` would override it): the round
    is compiled once, for the whole batch, with static shapes, although four of the six problems
    stop early (the eager solve sets them aside; a static graph would compile again for the
    smaller batch). Every problem's result is the eager one."""

    def quadratic(x: torch.Tensor, curvature: torch.Tensor) -> torch.Tensor:
        return 0.5 * (curvature * x * x).sum()

    easy, hard = torch.ones(3, dtype=torch.float64), torch.tensor([1.0, 1e2, 1e4], dtype=torch.float64)
    curvatures = torch.stack([easy, easy, hard, easy, easy, hard])
    start = torch.ones(6, 3, dtype=torch.float64)
    options = {"max_iter": 50, "tolerance_grad": 1e-10, "tolerance_change": 0.0}
    graphs: list[list[object]] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        # a dynamic graph takes its symbolic sizes as inputs of their own (SymInt)
        graphs.append([tuple(t.shape) if isinstance(t, torch.Tensor) else type(t) for t in example_inputs])
        return gm.forward

    torch._dynamo.reset()
    compiled = torchlbfgs.batched_minimize(
        quadratic, start, curvatures, compile={"backend": recording_backend, "dynamic": False}, **options
    )
    assert len(graphs) == 1  # once, for the whole batch
    assert torch.SymInt not in graphs[0], graphs[0]  # static: no symbolic size
    assert (6, 3) in graphs[0]  # the iterates of all six problems
    eager = torchlbfgs.batched_minimize(quadratic, start, curvatures, **options)
    assert int(eager.n_iter[0]) < int(eager.n_iter[2])  # the easy ones stop first
    torch.testing.assert_close(compiled.params, eager.params, rtol=0, atol=0)
    assert torch.equal(compiled.n_iter, eager.n_iter)
    assert torch.equal(compiled.n_evals, eager.n_evals)
    assert bool(eager.converged.all())


def _solved_as_eager(
    loss: Callable[..., torch.Tensor], start: torch.Tensor, *data: torch.Tensor, **options: Any
) -> None:
    """Solve compiled (Dynamo only) and eagerly; the compiled solve must be the eager one."""
    compiled = torchlbfgs.batched_minimize(loss, start, *data, compile={"backend": "eager"}, **options)
    eager = torchlbfgs.batched_minimize(loss, start, *data, **{**options, "progress": False})
    torch.testing.assert_close(compiled.params, eager.params, rtol=1e-12, atol=1e-12)
    assert torch.equal(compiled.n_evals, eager.n_evals)
    assert torch.equal(compiled.status, eager.status)


def test_each_loss_function_keeps_a_compile_cache_of_its_own() -> None:
    """Dynamo counts the graphs of one code object against ``recompile_limit`` and fails a
    ``fullgraph`` compile beyond it. The round is a ``vmap`` wrapper, whose code is functorch's,
    shared by every vmapped function a process compiles: once the user's own compiled vmaps
    (or solves of other losses) had filled the limit, the next compiled solve failed. Each loss
    function now has a cache of its own, which a later solve with it reuses."""
    from torch._dynamo.utils import counters

    features, labels = _data(4)
    start = torch.zeros(4, 3, dtype=torch.float64)

    def doubled(w: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return 2.0 * _logistic(w, features, labels)

    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=1):
        # the user's own compiled vmap: the one graph functorch's vmap wrapper may have
        users = torch.compile(torch.func.vmap(torch.sin), fullgraph=True, backend="eager")
        torch.testing.assert_close(users(features), features.sin())
        for loss in (_logistic, doubled, _logistic):
            _solved_as_eager(loss, start, features, labels, max_iter=8, history_size=3)
    assert counters["stats"]["unique_graphs"] == 3  # the user's, then one per loss: reused


def test_a_loss_compiled_more_ways_than_the_limit_allows_gets_room_and_a_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One loss function solved with options that each need a graph of their own (two line
    searches), one more than ``recompile_limit`` allows: the second solve compiles its graph
    with a warning instead of failing (Dynamo's failure would leave the process slowed, see
    ``test_a_cap_that_room_does_not_lift_starts_a_fresh_cache``), and says so afterwards with
    ``progress=True`` although no compile was expected; a third solve finds its graph. After
    ``torch._dynamo.reset()`` the count starts again."""
    import re
    import warnings

    from torch._dynamo.utils import counters

    features, labels = _data(4)
    start = torch.zeros(4, 3, dtype=torch.float64)

    def loss(w: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _logistic(w, features, labels)

    torch._dynamo.reset()
    counters.clear()
    shown, caught = [], []
    with torch._dynamo.config.patch(recompile_limit=1):
        for line_search in ("strong_wolfe", "backtracking", "strong_wolfe"):
            options = {"max_iter": 8, "history_size": 3, "line_search": line_search}
            with warnings.catch_warnings(record=True) as solve_caught:
                warnings.simplefilter("always")
                _solved_as_eager(loss, start, features, labels, progress=True, **options)
            shown.append(capsys.readouterr().err)
            caught.append([str(warning.message) for warning in solve_caught])
    assert counters["stats"]["unique_graphs"] == 2  # the third solve found the first's graph
    assert "compiling one round" in shown[0]
    assert "compiling one round" not in shown[1]  # expected to find its round compiled...
    assert re.search(r"batched_minimize: compiled one round .* in \d+\.\d s", shown[1]), shown[1]
    assert "compil" not in shown[2]
    assert caught[0] == caught[2] == []
    assert len(caught[1]) == 1
    assert "2 graphs compiled for 'loss'" in caught[1][0]
    assert "recompile_limit (1)" in caught[1][0]
    # torch._dynamo.reset() drops the graphs: the next one is within the limit again, no warning
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1), warnings.catch_warnings():
        warnings.simplefilter("error")
        _solved_as_eager(loss, start, features, labels, max_iter=8, history_size=3)


def test_a_cap_that_room_does_not_lift_starts_a_fresh_cache() -> None:
    """Where Dynamo refuses a graph all the same (``accumulated_recompile_limit``, per code
    object), the step compiles in a fresh cache (a code object of its own) instead of failing.
    In a process of its own: after Dynamo's failure every later Python call of the process is
    slower (``torchlbfgs.compiled``), which would reach the tests run after this one."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import torch
        from torchlbfgs.compiled import CompiledStep

        def double(x):
            return x * 2

        with torch._dynamo.config.patch(accumulated_recompile_limit=1):
            run = CompiledStep("test", double, {"backend": "eager"})
            assert torch.equal(run(double, torch.ones(2)), torch.full((2,), 2.0))
            twice = run(double, torch.ones(2, dtype=torch.float64))  # a second graph: refused
        assert torch.equal(twice, torch.full((2,), 2.0, dtype=torch.float64))
        print("compiled afresh")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "compiled afresh"


def test_a_loss_is_known_by_its_code_through_methods_partials_and_wrappers() -> None:
    """The compile cache is found by the loss's code, so that a bound method (a new object at
    each attribute access), a ``functools.partial`` or a ``functools.wraps`` wrapper of one
    function finds the same cache; a callable object is known by its type (Dynamo's guards
    tell instances apart), and a cycle of ``__wrapped__`` ends."""
    import functools

    from torchlbfgs.compiled import user_code

    class Model(torch.nn.Module):
        def loss(self, w: torch.Tensor) -> torch.Tensor:
            return (w**2).sum()

    model = Model()
    code = Model.loss.__code__

    @functools.wraps(model.loss)
    def wrapper(w: torch.Tensor) -> torch.Tensor:
        return model.loss(w)

    assert model.loss is not model.loss  # a new bound method each time...
    assert user_code(model.loss) is user_code(Model().loss) is code  # ...one code
    assert user_code(functools.partial(model.loss)) is user_code(wrapper) is code
    assert user_code(model) is Model
    assert user_code(_logistic) is _logistic.__code__

    class Looping:
        pass

    first, second = Looping(), Looping()
    first.__wrapped__, second.__wrapped__ = second, first  # type: ignore[attr-defined]
    assert user_code(first) is Looping
