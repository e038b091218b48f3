"""The README's code, the documentation pages' code and every script in docs/examples/ run and
check their own claims."""

from __future__ import annotations

import inspect
import re
import subprocess
from pathlib import Path

import pytest
from background_runs import PendingRun

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


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda path: path.name)
def test_example_runs(
    script: Path, example_runs: dict[Path, PendingRun[subprocess.CompletedProcess[str]]]
) -> None:
    """Each script exits with 0 (it checks its own claims). The scripts run in the background
    from the start of the session (``example_runs`` in conftest.py); this waits for this one."""
    completed = example_runs[script].result()
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]


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
