"""Long runs: 10,000 steps on a small problem and 1,000 with a wrapping history on a larger
one. Memory does not grow (the number of live tensors and the bytes they hold, exactly, and the
resident set, to allocator noise), the counters count exactly, and the state's leaves keep
their shapes and dtypes throughout.
"""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

import pytest
import torch
from background_runs import BackgroundRuns

import torchlbfgs
from torchlbfgs import StopReason


def resident_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    pytest.skip("no /proc/self/status")


def live_tensors() -> tuple[int, int]:
    """How many tensors are alive, and the bytes of their storages (each storage once)."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some module objects warns of deprecations
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    storages = {}
    for t in tensors:
        try:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass  # fake or functional tensors that other tests' compiles leave in caches hold no memory
    return len(tensors), sum(storages.values())


@pytest.mark.parametrize(
    ("n", "steps", "history_size", "line_search_fn"),
    [(8, 10_000, 10, None), (20_000, 1_000, 5, "strong_wolfe")],
    ids=["small-10000-steps", "larger-1000-steps"],
)
def test_long_run_keeps_memory_counters_and_shapes(
    n: int, steps: int, history_size: int, line_search_fn: str | None, background: BackgroundRuns
) -> None:
    background.wait()  # the session's background runs allocate in this process too
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(0, 2, n, dtype=torch.float64)
    x = torch.nn.Parameter(torch.randn(n, generator=generator, dtype=torch.float64))
    optimizer = torchlbfgs.LBFGS([x], lr=0.005, max_iter=1, history_size=history_size,
                                 line_search_fn=line_search_fn, tolerance_grad=0.0,
                                 tolerance_change=0.0)  # fmt: skip
    calls = 0
    shift = torch.zeros(n, dtype=torch.float64)

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        optimizer.zero_grad()
        # a target that keeps moving, so the run never converges and every step works
        loss = 0.5 * (scales * (x - shift) ** 2).sum()
        loss.backward()
        return loss

    def shapes() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        leaves = optimizer.state[x]
        return {k: (tuple(v.shape), v.dtype) for k, v in leaves.items() if isinstance(v, torch.Tensor)}

    warmup = steps // 10
    for step in range(steps):
        shift.copy_(torch.sin(torch.tensor(step / 50.0)) * torch.ones(n, dtype=torch.float64))
        optimizer.step(closure)
        if step == warmup:
            expected_shapes = shapes()
            rss_after_warmup, tensors_after_warmup = resident_kib(), live_tensors()
        elif step > warmup and step % (steps // 5) == 0:
            assert shapes() == expected_shapes, f"step {step}"
    # No growth: live tensors and their allocated bytes exactly as after the warm-up; the
    # resident set within 8 MiB (allocator noise) while the run went on for 90% of its steps.
    # The resident set is read before the scan of live objects, as after the warm-up: in a long
    # session the scan's list of every object is megabytes, and once glibc has returned one
    # such block to the system it raises its mmap threshold and keeps the next one resident.
    rss_growth = resident_kib() - rss_after_warmup
    assert live_tensors() == tensors_after_warmup
    assert rss_growth < 8 * 1024
    state = optimizer.state_dict()["state"][0]
    assert shapes() == expected_shapes
    assert int(state["iteration"]) == steps  # one iteration per step (max_iter=1)
    assert int(state["n_evals"]) == calls
    assert int(state["n_pairs"]) == history_size
    # why the last step stopped: its one iteration (tolerances are 0, so none can be met
    # unless a search returns a zero step)
    assert int(state["status"]) in (StopReason.MAX_ITERATIONS, StopReason.STEP_TOLERANCE)
