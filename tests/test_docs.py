"""The README's code, the documentation pages' code and every script in docs/examples/ run and
check their own claims."""

from __future__ import annotations

import contextlib
import inspect
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NamedTuple

import pytest

import torchlbfgs

ROOT = Path(__file__).resolve().parent.parent
README_BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.py"))
SNIPPET = "--8<--"  # a block that includes an example script, which runs on its own below
DOC_BLOCKS = [
    (page.name, index, block)
    for page in sorted((ROOT / "docs").glob("*.md"))
    for index, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL))
    if not block.startswith(SNIPPET)
]


def test_readme_has_the_three_quick_starts() -> None:
    assert len(README_BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(README_BLOCKS)))
def test_readme_code_runs(index: int) -> None:
    exec(compile(README_BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})


def test_every_example_is_included_in_a_docs_page() -> None:
    pages = "".join(page.read_text() for page in (ROOT / "docs").glob("*.md"))
    for script in EXAMPLES:
        assert f'{SNIPPET} "docs/examples/{script.name}"' in pages, f"{script.name} is in no docs page"


def test_every_docs_page_has_runnable_code() -> None:
    pages = {page for page, _, _ in DOC_BLOCKS}
    expected = {
        "index.md",
        "functional.md",
        "drop-in.md",
        "checkpointing.md",
        "batched.md",
        "line-searches.md",
    }
    assert expected <= pages, sorted(expected - pages)


@pytest.mark.parametrize(("page", "index", "block"), DOC_BLOCKS, ids=[f"{p}-{i}" for p, i, _ in DOC_BLOCKS])
def test_docs_page_code_runs(page: str, index: int, block: str) -> None:
    exec(compile(block, f"docs/{page} block {index}", "exec"), {"__name__": "__docs__"})


class ExampleRun(NamedTuple):
    process: subprocess.Popen[str]
    log: IO[str]  # the script's stdout and stderr


@pytest.fixture(scope="module", autouse=True)
def example_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[Path, ExampleRun]]:
    """The selected scripts of docs/examples/, all started when this module's first test runs.
    Most of a script's time is its start-up (importing torch): side by side, and beside the
    in-process tests here, they take a fraction of the time they take one after another."""
    scripts = [
        item.callspec.params["script"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_example_runs"
    ]
    logs = tmp_path_factory.mktemp("examples")
    with contextlib.ExitStack() as stack:
        runs = {}
        for script in scripts:
            log = stack.enter_context(open(logs / f"{script.name}.log", "w+"))
            process = subprocess.Popen(
                [sys.executable, str(script)], stdout=log, stderr=log, text=True, cwd=ROOT
            )
            stack.callback(process.wait)
            stack.callback(process.kill)  # (no-op once it has exited)
            runs[script] = ExampleRun(process, log)
        yield runs


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda path: path.name)
def test_example_runs(script: Path, example_runs: dict[Path, ExampleRun]) -> None:
    process, log = example_runs[script]
    returncode = process.wait(timeout=240)
    log.seek(0)
    assert returncode == 0, log.read()[-6000:]


@pytest.mark.parametrize("name", [name for name in torchlbfgs.__all__ if name != "__version__"])
def test_every_public_name_has_a_runnable_example(name: str) -> None:
    """Docstring examples run as doctests (pytest --doctest-modules over src/); this makes sure
    each public name has one."""
    doc = inspect.getdoc(getattr(torchlbfgs, name)) or ""
    assert ">>>" in doc, f"torchlbfgs.{name} has no example in its docstring"


def test_package_is_typed_and_versioned() -> None:
    assert (Path(torchlbfgs.__file__).parent / "py.typed").is_file()
    assert re.fullmatch(r"\d+\.\d+\.\d+", torchlbfgs.__version__)
    assert sorted(torchlbfgs.__all__) == sorted(set(torchlbfgs.__all__))
