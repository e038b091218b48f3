"""Memory of torchlbfgs.LBFGS against torch.optim.LBFGS: state kept between steps, peak of a step.

What: for one parameter vector of n float32 values and the same options for both optimizers
(history 10, ``max_iter=10``, tolerances 0, ``line_search_fn=None`` with ``lr=0.01`` or
``"strong_wolfe"`` with ``lr=1``, as in ``bench/step_cost.py``), and the closure
``zero_grad(); 0.5 * sum(c * x * x); backward()`` with ``c = logspace(0, 2, n)``:

* state: the bytes of every tensor reachable from ``optimizer.state`` (dicts, lists and tuples
  walked; each storage counted once, at its full size) after ``--warm-steps`` steps, when the
  history is full. torch keeps the lists ``old_dirs``/``old_stps``/``ro``/``al`` and ``d``,
  ``t``, ``H_diag``, ``prev_flat_grad``, ``prev_loss``; ours keeps the named leaves of its
  state pytree;
* peak: how much the resident set grows during one more ``step``: the high-water mark VmHWM
  (reset through ``/proc/self/clear_refs`` right before the step) minus the resident set at
  the reset. Measured twice, each in its own process: with every allocation of 16 KiB or more
  mmapped (``MALLOC_MMAP_THRESHOLD_=16384``), so that freed tensors leave the resident set at
  once and the peak counts live memory ("live"), and with glibc's default malloc, which keeps
  freed memory for reuse (what a process really sees; "default"). Torch has no allocator
  statistics on CPU and tracemalloc does not see its buffers, hence the resident set. glibc
  mmaps any block above its dynamic threshold (at most 32 MiB on 64-bit), so at n=1e7 (40 MB
  vectors) "default" counts live memory too; below that, the earlier steps leave freed blocks
  in the heap and the "default" peak depends on what happens to be free there (it varies
  between runs, and is mostly small because that memory is already resident);
* held: for the default malloc, how much the resident set grew from just before the first
  step (the closure already evaluated once, so the gradient exists) to just before the
  measured one: the state plus the freed memory that malloc keeps.

The resident-set counters are approximate (the kernel folds per-CPU page counts in lazily):
readings are good to about a quarter of a MiB, so small peaks can even come out negative, and
peak ratios are not given when torch's peak is under 1 MiB.

Each (optimizer, n, line search, malloc) case runs in a fresh process pinned to one CPU (this
script, re-invoked with hidden ``--worker`` arguments, writes a JSON report), so that no
allocator state leaks between cases. The closure alone is measured the same way, for
reference: its gradient and temporaries are part of every step's peak. Memory is given in MiB
and as a multiple of one vector (n * 4 bytes). One thread. The table also gives the
iterations and closure calls of the measured step.

Run: ``python bench/memory.py`` (``--sizes 1e5 1e6 1e7`` by default; about six minutes on
a 2-core machine, n=1e7 needs about 2 GB).
"""

from __future__ import annotations

import os

import common

common.use_one_thread()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

import torchlbfgs  # noqa: E402

HISTORY = 10
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"torch": torch.optim.LBFGS, "ours": torchlbfgs.LBFGS}
LINE_SEARCHES = {"none": None, "strong_wolfe": "strong_wolfe"}
MALLOCS = {"live": {"MALLOC_MMAP_THRESHOLD_": "16384"}, "default_malloc": {}}
MIB = 2.0**20
# The kernel keeps a process's page counts per CPU and folds them in lazily, so VmRSS and VmHWM
# are off by up to ~32 pages per CPU the process ran on (workers are pinned to one CPU); the
# ratio of two peaks is not given when the denominator is below this.
RESOLUTION_KIB = 1024


# ------------------------------------------------------------------------------------- problem


def make_problem(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The parameter ``x`` (n,) and the curvatures ``c`` of ``0.5 * sum(c * x * x)``, float32."""
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.Parameter(torch.randn(n, generator=generator))
    return x, torch.logspace(0, 2, n)


def make_closure(x: torch.Tensor, scales: torch.Tensor, zero_grad: Callable[[], None]) -> Callable[[], Any]:
    def closure() -> torch.Tensor:
        zero_grad()
        loss = 0.5 * (scales * x * x).sum()
        loss.backward()
        return loss

    return closure


# ------------------------------------------------------------------------------ measurements


def peak_increase(action: Callable[[], Any]) -> dict[str, int]:
    """Run ``action`` and return VmRSS right before and after it and its peak VmHWM, in KiB."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark VmHWM to VmRSS
    before = common.rss_kib("VmHWM")  # VmRSS at the reset: the baseline the peak cannot go below
    action()
    return {
        "rss_before_kib": before,
        "peak_kib": common.rss_kib("VmHWM"),
        "rss_after_kib": common.rss_kib("VmRSS"),
    }


def _tensors(tree: Any, path: str = "") -> Any:
    """``(path, tensor)`` for every tensor in nested dicts, lists and tuples."""
    if isinstance(tree, torch.Tensor):
        yield path, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _tensors(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _tensors(value, f"{path}[]")


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Bytes of the tensors reachable from ``optimizer.state``, each storage counted once.

    ``bytes`` sums the storages' full sizes (what the state keeps alive); ``tensor_bytes`` sums
    ``numel * element_size`` of the distinct tensors (the two differ only if a leaf is a view
    into a larger buffer). ``by_key`` splits ``bytes`` by top-level state key.
    """
    storages: set[int] = set()
    views: set[tuple[int, int, int]] = set()
    total = tensor_total = count = 0
    by_key: dict[str, int] = {}
    for path, tensor in _tensors(dict(enumerate(optimizer.state.values()))):
        count += 1
        view = (tensor.data_ptr(), tensor.numel(), tensor.element_size())
        if view not in views:
            views.add(view)
            tensor_total += tensor.numel() * tensor.element_size()
        storage = tensor.untyped_storage()
        if storage.data_ptr() in storages:
            continue
        storages.add(storage.data_ptr())
        total += storage.nbytes()
        key = path.split(".", 1)[-1].split("[", 1)[0]
        by_key[key] = by_key.get(key, 0) + storage.nbytes()
    return {"bytes": total, "tensor_bytes": tensor_total, "tensors": count, "by_key": by_key}


def _progress(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """Cumulative iterations and the number of curvature pairs stored."""
    (state,) = optimizer.state.values()
    if "n_iter" in state:  # torch.optim.LBFGS
        return state["n_iter"], len(state["old_dirs"])
    return int(state["iteration"]), int(state["n_pairs"])


def case_worker(
    optimizer_name: str, n: int, line_search: str, warm_steps: int, max_iter: int
) -> dict[str, Any]:
    """State after ``warm_steps`` steps and the peak of one more step, in this process."""
    x, scales = make_problem(n)
    search = LINE_SEARCHES[line_search]
    optimizer = OPTIMIZERS[optimizer_name](
        [x], lr=1.0 if search else 0.01, max_iter=max_iter, history_size=HISTORY, line_search_fn=search,
        tolerance_grad=0.0, tolerance_change=0.0,
    )  # fmt: skip
    evaluate = make_closure(x, scales, optimizer.zero_grad)
    evaluate()  # the gradient exists between steps: count it in the baseline
    gc.collect()
    baseline = common.rss_kib("VmRSS")
    calls = [0]

    def closure() -> torch.Tensor:
        calls[0] += 1
        return evaluate()

    for _ in range(warm_steps):
        optimizer.step(closure)
    state = state_bytes(optimizer)
    iterations, pairs = _progress(optimizer)
    calls[0] = 0
    memory = peak_increase(lambda: optimizer.step(closure))
    return {"state": state, **memory, "held_kib": memory["rss_before_kib"] - baseline, "pairs": pairs,
            "step_iterations": _progress(optimizer)[0] - iterations, "step_evals": calls[0]}  # fmt: skip


def closure_worker(n: int) -> dict[str, Any]:
    """The peak of one closure call (gradient already allocated, as between steps)."""
    x, scales = make_problem(n)

    def zero_grad() -> None:
        x.grad = None  # what Optimizer.zero_grad() does by default

    closure = make_closure(x, scales, zero_grad)
    closure()
    closure()
    return {"state": None, **peak_increase(closure)}


# ------------------------------------------------------------------------------------ workers


def run_worker(arguments: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run this script as a worker in a fresh process with ``env`` added; return its report."""
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as directory:
        out = Path(directory) / "result.json"
        command = [sys.executable, __file__, "--worker", *arguments, "--worker-out", str(out)]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True,
                                  timeout=timeout, check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"error": f"killed after {timeout:.0f} s"}
        seconds = time.perf_counter() - start
        if done.returncode != 0 or not out.exists():
            lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
            return {"error": (lines[-1] if lines else f"exit code {done.returncode}")[:500]}
        report: dict[str, Any] = json.loads(out.read_text())
    report["worker_seconds"] = seconds
    report["peak_increase_kib"] = report["peak_kib"] - report["rss_before_kib"]
    return report


def measure(arguments: list[str], n: int, timeout: float) -> dict[str, Any]:
    """One worker per malloc setting; the peak increases also as MiB and multiples of n floats."""
    result: dict[str, Any] = {}
    for name, env in MALLOCS.items():
        report = run_worker(arguments, env, timeout)
        if "error" not in report:
            report["peak_mib"] = report["peak_increase_kib"] / 1024
            report["peak_vectors"] = report["peak_increase_kib"] * 1024 / (4 * n)
            if "held_kib" in report:
                report["held_mib"] = report["held_kib"] / 1024
                report["held_vectors"] = report["held_kib"] * 1024 / (4 * n)
            if report["state"] is not None:
                report["state"]["mib"] = report["state"]["bytes"] / MIB
                report["state"]["vectors"] = report["state"]["bytes"] / (4 * n)
        result[name] = report
    return result


# --------------------------------------------------------------------------------------- main


def _cell(entry: dict[str, Any], kind: str) -> str:
    """``MiB (x vectors)`` of the state or of the peak, or what went wrong."""
    if "error" in entry:
        return "failed"
    if kind == "state":
        state = entry["state"]
        return "-" if state is None else f"{state['mib']:.1f} ({state['vectors']:.2f})"
    if f"{kind}_mib" not in entry:
        return "-"
    return f"{entry[f'{kind}_mib']:.1f} ({entry[f'{kind}_vectors']:.2f})"


def _ratio(ours: dict[str, Any], theirs: dict[str, Any], kind: str) -> float | None:
    """``ours / theirs`` of the state or of the peak; ``None`` if either failed or theirs' peak is
    below the resolution of the resident-set counters."""
    if "error" in ours or "error" in theirs:
        return None
    if kind == "state":
        return float(ours["state"]["bytes"] / theirs["state"]["bytes"])
    if theirs["peak_increase_kib"] < RESOLUTION_KIB:
        return None
    return float(max(ours["peak_increase_kib"], 0) / theirs["peak_increase_kib"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6, 1e7], help="vector sizes n")
    parser.add_argument(
        "--warm-steps", type=int, default=3, help="steps before the measured one (to fill the history)"
    )
    parser.add_argument("--max-iter", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per worker process")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.worker:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one CPU: tighter RSS counters
        kind, *rest = args.worker
        if kind == "closure":
            report = closure_worker(int(rest[0]))
        else:
            report = case_worker(rest[0], int(rest[1]), rest[2], args.warm_steps, args.max_iter)
        report["torch_threads"] = torch.get_num_threads()
        report["cpus"] = sorted(os.sched_getaffinity(0))
        args.worker_out.write_text(json.dumps(report))
        return

    start = time.perf_counter()
    header = ("n", "line search", "optimizer", "its/evals", "state MiB (x n)", "peak live MiB (x n)",
              "peak default MiB (x n)", "held default MiB (x n)", "state o/t", "live o/t",
              "default o/t")  # fmt: skip
    widths = (5, 12, 13, 9, 16, 20, 22, 22, 9, 8, 11)
    print(" ".join(f"{name:>{width}}" for name, width in zip(header, widths, strict=True)), flush=True)

    def show(cells: tuple[Any, ...]) -> None:
        print(" ".join(f"{cell:>{width}}" for cell, width in zip(cells, widths, strict=True)), flush=True)

    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        n = int(size)
        label = f"1e{len(str(n)) - 1}" if n == 10 ** (len(str(n)) - 1) else str(n)
        alone = measure(["closure", str(n)], n, args.timeout)
        rows.append({"n": n, "line_search": None, "optimizer": "closure alone", **alone})
        show((label, "-", "closure alone", "-", "-", _cell(alone["live"], "peak"),
              _cell(alone["default_malloc"], "peak"), "-", "", "", ""))  # fmt: skip
        for line_search in LINE_SEARCHES:
            measured = {}
            for name in OPTIMIZERS:
                measured[name] = measure(["case", name, str(n), line_search], n, args.timeout)
                live = measured[name]["live"]
                ratios = {}
                if name == "ours":
                    theirs = measured["torch"]
                    ratios = {"state": _ratio(live, theirs["live"], "state"),
                              "peak_live": _ratio(live, theirs["live"], "peak"),
                              "peak_default_malloc": _ratio(measured[name]["default_malloc"],
                                                            theirs["default_malloc"], "peak")}  # fmt: skip
                rows.append({"n": n, "line_search": line_search, "optimizer": name, **measured[name],
                             "ours_over_torch": ratios or None})  # fmt: skip
                counts = "-" if "error" in live else f"{live['step_iterations']}/{live['step_evals']}"
                ratio_cells = tuple("" if not ratios else "-" if ratios[k] is None else f"{ratios[k]:.2f}"
                                    for k in ("state", "peak_live", "peak_default_malloc"))  # fmt: skip
                show((label, line_search, name, counts, _cell(live, "state"), _cell(live, "peak"),
                      _cell(measured[name]["default_malloc"], "peak"),
                      _cell(measured[name]["default_malloc"], "held"), *ratio_cells))  # fmt: skip
                for malloc, entry in measured[name].items():
                    if "error" in entry:
                        print(f"    {name} {malloc}: {entry['error']}")
                    elif entry["pairs"] < HISTORY:
                        print(f"    {name} {malloc}: only {entry['pairs']} pairs stored before the step")
    seconds = time.perf_counter() - start
    print(f"total {seconds:.0f} s")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    config = {"sizes": [int(size) for size in args.sizes], "history_size": HISTORY, "max_iter": args.max_iter,
              "warm_steps": args.warm_steps, "dtype": "float32", "tolerance_grad": 0.0,
              "tolerance_change": 0.0, "lr": {"none": 0.01, "strong_wolfe": 1.0},
              "mallocs": MALLOCS, "seconds": seconds}  # fmt: skip
    report = {"meta": common.machine(), "config": config, "rows": rows}
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
