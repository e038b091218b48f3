"""Slow subprocess runs (the docs' example scripts, the distributed ranks) that tests check, run
once per test session, beside the tests, and shared by the pytest-xdist workers.

Each worker starts a thread at the session's start that goes through the same list of runs and
claims each one it reaches first (an exclusive create in a folder the workers share); it runs
the runs it claimed, one after another, and writes each result there. A test that checks a run
waits for its result, whichever worker ran it. Every run is thus run once (each worker running
all of them cost the session a minute of CPU on two cores), and a run spends most of its time
starting Python and importing torch, on a core the tests leave idle.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest

Value = TypeVar("Value")


def shared_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of this test session that every pytest-xdist worker sees (the workers' own
    temporary folders share a parent; the run's id keeps a reused ``--basetemp`` from
    offering an earlier session's results), or this process's own without workers."""
    base, run = tmp_path_factory.getbasetemp(), os.environ.get("PYTEST_XDIST_TESTRUNUID")
    folder = base.parent / f"background-runs-{run}" if run else base / "background-runs"
    folder.mkdir(exist_ok=True)
    return folder


class BackgroundRuns:
    """The runs (name -> function) of one session, claimed and run by a thread of this process,
    with the other workers' threads doing the same in the same folder."""

    def __init__(self, folder: Path, runs: Mapping[str, Callable[[], Any]]) -> None:
        self.folder, self.runs = folder, dict(runs)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._claim_and_run, name="background-runs", daemon=True)
        self._thread.start()

    def _claim_and_run(self) -> None:
        for name, run in self.runs.items():
            if self._stopping.is_set():
                return
            try:
                os.close(os.open(self.folder / f"{name}.claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue  # another worker runs it
            try:
                outcome: tuple[bool, Any] = (True, run())
            except BaseException:  # the test that checks this run reports it
                outcome = (False, traceback.format_exc())
            partial = self.folder / f"{name}.partial"
            partial.write_bytes(pickle.dumps(outcome))
            partial.replace(self.folder / f"{name}.result")  # whole, or not there

    def pending(self, name: str) -> PendingRun[Any]:
        if name not in self.runs:
            raise KeyError(f"no background run {name!r} in this session (runs: {sorted(self.runs)})")
        return PendingRun(self.folder / f"{name}.result", name)

    def wait(self) -> None:
        """Return once this process's thread has gone through every run (each run then claimed
        by it or by another worker): a test that measures this process's memory must not see
        the allocations of a run in progress."""
        self._thread.join()

    def close(self) -> None:
        """Claim no further run and finish the one in progress: a test of another worker may be
        waiting for it. Runs no worker claimed are left to the workers still testing."""
        self._stopping.set()
        self._thread.join()


class PendingRun(Generic[Value]):
    """The result of one background run, when it is there."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name

    def result(self, timeout: float = 600.0) -> Value:
        deadline = time.monotonic() + timeout
        while not self.path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"background run {self.name!r}: no result after {timeout} s")
            time.sleep(0.05)
        finished, value = pickle.loads(self.path.read_bytes())
        if not finished:
            raise RuntimeError(f"background run {self.name!r} raised:\n{value}")
        return value  # type: ignore[no-any-return]
