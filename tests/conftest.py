"""Settings and fixtures for the whole test session."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from background_runs import BackgroundRuns, PendingRun, shared_folder
from data_parallel_worker import run_two_ranks
from sharded_worker import run_ranks

# One intra-op thread: the tests' tensors are small, and the tests run beside subprocesses (see
# `background`), where a second thread's OpenMP hand-offs wait on a busy core (a property test
# took 40% longer so on two cores). Set in the environment too, for the scripts and workers the
# tests start. An explicit OMP_NUM_THREADS is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parent.parent


# The longest test files (seconds of a worker, `pytest --durations=0` summed per file), handed
# out first: the workers take whole files (`--dist loadfile`) in the order of collection
# (`--no-loadscope-reorder`: xdist would sort the files by their number of tests), so that no
# long file, collected late, leaves one worker running it alone at the end of the session.
LONGEST_FILES = (
    "test_compile.py",
    "test_minimize.py",
    "test_bounds.py",
    "test_implicit.py",
    "test_more_thuente.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def selected(session: pytest.Session, test: str) -> list[pytest.Item]:
    """The items of this session that are cases of the test function named ``test``."""
    return [item for item in session.items if getattr(item, "originalname", None) == test]


@pytest.fixture(scope="session")
def background(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackgroundRuns]:
    """The slow subprocess runs that this session's tests check (``background_runs.py``), run
    from the session's first test on, once for all the pytest-xdist workers: the example
    scripts, the two data-parallel ranks and the four sharded ranks (their results saved in
    ``shared_folder``)."""
    session, folder = request.session, shared_folder(tmp_path_factory)
    runs: dict[str, Callable[[], Any]] = {}
    if selected(session, "test_sharded_steps_equal_one_process"):
        runs["sharded"] = functools.partial(run_ranks, folder / "sharded", 4)
    for item in selected(session, "test_example_runs"):
        script = item.callspec.params["script"]
        runs[f"example-{script.name}"] = functools.partial(run_script, script)
    if selected(session, "test_two_ranks_step_identically_and_match_full_batch"):
        runs["data_parallel"] = functools.partial(run_two_ranks, folder / "data_parallel")
    background = BackgroundRuns(folder, runs)
    yield background
    background.close()


def run_script(script: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=ROOT, check=False
    )


@pytest.fixture(scope="session", autouse=True)
def example_runs(request: pytest.FixtureRequest, background: BackgroundRuns) -> dict[Path, PendingRun[Any]]:
    """The docs/examples/ scripts that ``test_docs.py::test_example_runs`` checks, run in the
    background."""
    scripts = [item.callspec.params["script"] for item in selected(request.session, "test_example_runs")]
    return {script: background.pending(f"example-{script.name}") for script in scripts}


@pytest.fixture(scope="session")
def data_parallel_run(background: BackgroundRuns) -> tuple[Path, PendingRun[list[tuple[int, str]]]]:
    """The two ranks that ``test_data_parallel.py`` checks, run in the background: where they save
    their results, and each one's exit status and output."""
    return background.folder / "data_parallel", background.pending("data_parallel")


@pytest.fixture(scope="session")
def sharded_run(background: BackgroundRuns) -> tuple[Path, PendingRun[list[tuple[int, str]]]]:
    """The 4 ranks that ``test_sharded.py`` checks (on meshes of 2 and 4), run in the
    background: where they save their results, and each rank's exit status and output."""
    return background.folder / "sharded", background.pending("sharded")
