"""Start the ranks of a multi-process test on loopback (gloo), cheaply.

The ranks are forked from a fresh server process that imported torch once (the
``forkserver`` start method): importing torch in every rank was most of what the
distributed tests cost the suite.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path

import torch


def run_ranks(
    main: Callable[[str], None], out: Path, world_size: int, preload: list[str]
) -> list[tuple[int, str]]:
    """``world_size`` processes each running ``main(str(out))`` as one rank of a default process
    group (``init_process_group("gloo")`` reads the environment set here), after importing the
    ``preload`` modules once; the exit code of each, and its traceback if it failed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(preload)
    processes = [
        context.Process(target=_rank, args=(main, str(out), rank, world_size, port))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=240)
        if process.exitcode is None:
            process.kill()
    logs = [Path(f"{out}.rank{rank}.log") for rank in range(world_size)]
    return [
        (-1 if process.exitcode is None else process.exitcode, log.read_text() if log.exists() else "")
        for process, log in zip(processes, logs, strict=True)
    ]


def _rank(main: Callable[[str], None], out: str, rank: int, world_size: int, port: int) -> None:
    """One rank: its environment, one thread, and a failure's traceback in ``{out}.rank{rank}.log``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    try:
        main(out)
    except BaseException:
        Path(f"{out}.rank{rank}.log").write_text(traceback.format_exc())
        raise
