"""What the benchmark scripts share: one-thread settings, machine metadata, resident-set reads,
device-synchronised timing.

Import it before torch (``import common; common.use_one_thread()``): thread pools read their
variables when they start.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}
PACKAGES = ("torch", "numpy", "scipy", "jax", "jaxlib", "optax", "jaxopt", "torchlbfgs")


def use_one_thread() -> None:
    """Set every thread variable to one thread, where the user has not set it already."""
    for name, value in ONE_THREAD.items():
        os.environ.setdefault(name, value)


def _proc_field(path: str, field: str) -> str | None:
    file = Path(path)
    lines = file.read_text().splitlines() if file.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(field)), None)


def machine() -> dict[str, Any]:
    """Machine, package versions and thread settings, for a script's JSON."""
    import torch

    packages: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        "cpu_count": os.cpu_count(),
        "memory": _proc_field("/proc/meminfo", "MemTotal"),
        "libc": " ".join(platform.libc_ver()),
        "torch_threads": torch.get_num_threads(),
        "env": {name: os.environ.get(name) for name in ONE_THREAD},
        "packages": packages,
        "date": time.strftime("%Y-%m-%d"),
    }


def rss_kib(field: str) -> int:
    """A memory field of this process (``VmRSS``, ``VmHWM``, ...) in KiB, from /proc/self/status."""
    value = _proc_field("/proc/self/status", field + ":")
    if value is None:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return int(value.split()[0])


def synchronize(device: str) -> None:
    """Wait for the device's queued work (timings on a GPU must include it); no-op on the CPU."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed_ms(
    work: Callable[[], object],
    repeats: int,
    device: str = "cpu",
    warmup: int = 1,
    statistic: Callable[[list[float]], float] = statistics.median,
) -> float:
    """``statistic`` (median unless told) of ``repeats`` timings of ``work()``, in ms, after
    ``warmup`` untimed calls; the device is synchronised around each timed call."""
    for _ in range(warmup):
        work()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistic(times)


Timer = Callable[[], tuple[float, dict[str, Any]]]  # one timed solve: seconds, and its results


def alternate(timers: dict[str, Timer], repeats: int) -> dict[str, dict[str, Any]]:
    """Each solver's results and median time, the solvers run in turn ``repeats`` times, so
    that each round of them sees the same state of the machine (its speed drifts by tens of
    percent within minutes); ``"times"`` holds each round's seconds."""
    times: dict[str, list[float]] = {name: [] for name in timers}
    results: dict[str, dict[str, Any]] = {}
    for _ in range(repeats):
        for name, timed in timers.items():
            seconds, results[name] = timed()
            times[name].append(seconds)
    for name, result in results.items():
        result.update(seconds=statistics.median(times[name]), times=times[name])
    return results


def paired_ratio(numerator: dict[str, Any], denominator: dict[str, Any]) -> float:
    """The median over the rounds of :func:`alternate` of one solver's time over another's."""
    pairs = zip(numerator["times"], denominator["times"], strict=True)
    return statistics.median(a / b for a, b in pairs)


def write_report(report: dict[str, Any], began: float, output: Path) -> None:
    """Add the run's duration (since ``began``, a ``time.perf_counter()``) to ``report``, print
    it, and write the report as JSON to ``output``."""
    report["runtime_seconds"] = runtime = time.perf_counter() - began
    print(f"\nruntime {runtime:.1f} s")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"wrote {output}")


def import_jax(*, x64: bool = True) -> tuple[Any, Any, Any, Any] | str:
    """``(jax, jax.numpy, jaxopt, optax)`` (with float64 enabled unless ``x64=False``), or why
    they are unavailable (a string)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import jax
            import jax.numpy as jnp
            import jaxopt
            import optax
    except ImportError as error:
        return f"not installed ({error.name})"
    if x64:
        jax.config.update("jax_enable_x64", True)
    return jax, jnp, jaxopt, optax
