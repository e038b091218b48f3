"""Settings and fixtures for the whole test session."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from data_parallel_worker import run_two_ranks
from sharded_worker import run_ranks

# One intra-op thread: the tests' tensors are small, and the tests run beside subprocesses (see
# `background`), where a second thread's OpenMP hand-offs wait on a busy core (a property test
# took 40% longer so on two cores). Set in the environment too, for the scripts and workers the
# tests start. An explicit OMP_NUM_THREADS is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parent.parent


def selected(session: pytest.Session, test: str) -> list[pytest.Item]:
    """The items of this session that are cases of the test function named ``test``."""
    return [item for item in session.items if getattr(item, "originalname", None) == test]


@pytest.fixture(scope="session")
def background() -> Iterator[ThreadPoolExecutor]:
    """One thread that runs slow subprocesses, one run after another, from the session's first
    test on. Such a run spends most of its time starting Python and importing torch, on one
    core: beside the tests, which use the other, it costs the session next to nothing. A test
    that checks a run waits for its result."""
    with ThreadPoolExecutor(max_workers=1) as executor:
        yield executor
        executor.shutdown(cancel_futures=True)  # runs no test waited for (a failed or stopped session)


def run_script(script: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=ROOT, check=False
    )


@pytest.fixture(scope="session", autouse=True)
def example_runs(
    request: pytest.FixtureRequest, background: ThreadPoolExecutor
) -> dict[Path, Future[subprocess.CompletedProcess[str]]]:
    """The docs/examples/ scripts that ``test_docs.py::test_example_runs`` checks, run in the
    background."""
    scripts = [item.callspec.params["script"] for item in selected(request.session, "test_example_runs")]
    return {script: background.submit(run_script, script) for script in scripts}


@pytest.fixture(scope="session", autouse=True)
def data_parallel_run(
    request: pytest.FixtureRequest, background: ThreadPoolExecutor, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Future[list[tuple[int, str]]]] | None:
    """The two ranks that ``test_data_parallel.py`` checks, run in the background: where they save
    their results, and each one's exit status and output."""
    if not selected(request.session, "test_two_ranks_step_identically_and_match_full_batch"):
        return None
    out = tmp_path_factory.mktemp("data_parallel") / "result"
    return out, background.submit(run_two_ranks, out)


@pytest.fixture(scope="session", autouse=True)
def sharded_run(
    request: pytest.FixtureRequest, background: ThreadPoolExecutor, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Future[list[tuple[int, str]]]] | None:
    """The 4 ranks that ``test_sharded.py`` checks (on meshes of 2 and 4), run in the
    background: where they save their results, and each rank's exit status and output."""
    if not selected(request.session, "test_sharded_steps_equal_one_process"):
        return None
    out = tmp_path_factory.mktemp("sharded") / "result"
    return out, background.submit(run_ranks, out, 4)
