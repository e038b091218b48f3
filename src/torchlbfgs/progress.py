"""What a long solve shows while it runs: a progress bar of rounds, and a line around compiling.

:func:`torchlbfgs.minimize` and :func:`torchlbfgs.batched_minimize` take ``progress``:
``True`` shows a bar on stderr (via ``tqdm`` when it is installed, ``pip install
torchlbfgs[progress]``; plain lines otherwise) with the rounds, the problems still running and
the lowest and highest value among them, and a line when ``torch.compile`` starts compiling a
round and when it is done, with its duration. ``None`` (the default) shows it when stderr is a
terminal; ``False`` never. The bar is drawn where the solve reads its stop flags anyway (every
round on the CPU, every 16 rounds on other devices), plus one host read of the values there.
Inside ``vmap`` or ``torch.compile`` there is no host to show anything on, and nothing is shown.

Examples:
    >>> import io, torch, torchlbfgs
    >>> from torchlbfgs.progress import ProgressBar
    >>> shown = io.StringIO()
    >>> bar = ProgressBar(enabled=True, total=40, label="minimize", stream=shown, use_tqdm=False)
    >>> bar.update(rounds=12, running=3, values=torch.tensor([0.5, 2.0, 7.0]))
    >>> bar.close()
    >>> print(shown.getvalue().strip())
    minimize: round 12/40, 3 running, value 0.5 .. 7
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import torch

from torchlbfgs.compiled import graphs_compiled

__all__ = ["ProgressBar", "progress_wanted"]


def progress_wanted(progress: bool | None, stream: TextIO | None = None) -> bool:
    """``progress`` resolved: ``None`` means on when the stream (stderr) is a terminal; never
    while ``torch.compile`` traces the solve (there is no host to draw on)."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    if torch.compiler.is_compiling():
        return False
    if progress is not None:
        return progress
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


class ProgressBar:
    """A progress bar over evaluation rounds (``enabled=False``: does nothing)."""

    def __init__(
        self, *, enabled: bool, total: int, label: str, stream: TextIO | None = None,
        use_tqdm: bool | None = None,
    ) -> None:  # fmt: skip
        self.enabled, self.total, self.label = enabled, total, label
        self.stream = sys.stderr if stream is None else stream
        self._bar: Any = None
        self._shown = 0
        if not enabled:
            return
        if use_tqdm is not False:
            try:
                from tqdm.auto import tqdm  # type: ignore[import-untyped,unused-ignore]
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=label, unit="round", file=self.stream, leave=True)

    def update(self, *, rounds: int, running: int, values: torch.Tensor | None) -> None:
        """Show that ``rounds`` rounds are done, ``running`` problems still run, with ``values``
        (``None``: none evaluated yet)."""
        if not self.enabled:
            return
        finite = None if values is None else values[torch.isfinite(values)]
        if finite is None:
            summary = "not evaluated yet"
        elif finite.numel():
            low, high = (float(v) for v in torch.aminmax(finite))  # sync-ok: progress is shown on the host
            summary = f"value {low:.6g} .. {high:.6g}"
        else:
            summary = "no finite value"
        if self._bar is not None:  # tqdm redraws at most every 0.1 s
            self._bar.set_postfix_str(f"{running} running, {summary}", refresh=False)
            self._bar.update(rounds - self._shown)
        else:
            line = f"{self.label}: round {rounds}/{self.total}, {running} running, {summary}"
            print(line, file=self.stream)
        self._shown = rounds

    def note(self, line: str) -> None:
        """A line of its own (above the bar)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream)

    @contextlib.contextmanager
    def compiling(self, what: str, *, announce: bool = True) -> Iterator[None]:
        """Around the first call of a compiled function: a line before it where a compile is
        expected (``announce``), and one after it, timed, where one was expected or Dynamo
        compiled a graph after all. A call that finds its graph compiled shows nothing."""
        graphs = graphs_compiled()
        if announce:
            self.note(f"{self.label}: compiling {what} with torch.compile (first call; this takes a while)")
        start = time.perf_counter()
        yield
        if announce or graphs_compiled() > graphs:
            self.note(f"{self.label}: compiled {what} in {time.perf_counter() - start:.1f} s")

    def close(self) -> None:
        """The end: the bar's total becomes the rounds run (the total shown until then is the
        bound :func:`~torchlbfgs.rounds.max_rounds`, which few solves reach)."""
        if self._bar is not None:
            self._bar.total = self._shown
            self._bar.refresh()
            self._bar.close()
            self._bar = None
