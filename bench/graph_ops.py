"""What the compiled round of ``batched_minimize`` is made of: its captured operations counted
by the function of ours that made them.

A ``torch.compile`` backend receives the round's graph (Dynamo's capture, before AOTAutograd
and Inductor) and attributes each call to the innermost frame of ``torchlbfgs`` in its stack
trace ("user/other": the problem's own loss and gradient, and torch's). The graph's size drives
the compile time (``bench/compile_time.py``): this says where to shrink it. Problems as in
``compile_time.py`` (the batch size does not change the graph; 64 by default).

Run: ``python bench/graph_ops.py`` (about a minute; ``--problems``, ``--top``).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from compile_time import PROBLEMS  # noqa: E402

import torchlbfgs  # noqa: E402

_FRAME = re.compile(r'File "([^"]+)", line \d+, in (\w+)')


def count_ops(problem: str, batch: int) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """The round's captured calls: their number, and how many each function of ours made
    itself (innermost frame) and in all (any frame)."""
    fun, start, data, options = PROBLEMS[problem](batch)
    innermost: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0

    def backend(graph_module: torch.fx.GraphModule, example_inputs: Any) -> Any:
        nonlocal total
        for node in graph_module.graph.nodes:
            if node.op not in ("call_function", "call_method"):
                continue
            total += 1
            frames = _FRAME.findall(node.meta.get("stack_trace") or "")
            ours = [f"{path.split('torchlbfgs/')[-1]}:{fn}" for path, fn in frames if "/torchlbfgs/" in path]
            innermost[ours[-1] if ours else "user/other"] += 1
            inclusive.update(set(ours))
        return graph_module.forward

    torch._dynamo.reset()
    torchlbfgs.batched_minimize(fun, start, *data, compile={"backend": backend}, progress=False, **options)
    return total, innermost, inclusive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "graph_ops.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {}
    for problem in args.problems:
        total, innermost, inclusive = count_ops(problem, args.batch)
        report[problem] = {"ops": total, "innermost": dict(innermost), "inclusive": dict(inclusive)}
        print(f"{problem}: {total} operations in one round")
        print(f"  {'made itself':>11} {'in all':>7}  function")
        for name, count in innermost.most_common(args.top):
            print(f"  {count:>11} {inclusive.get(name, count):>7}  {name}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
