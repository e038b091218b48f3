"""The strict documentation build (``.ci/build-docs``, what ``make docs`` and CI run) fails on a
broken reference: a copy of the docs with broken references must not build, and must say
which."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / ".ci" / "build-docs"


def _copy_of_the_docs(destination: Path) -> Path:
    """What the site is built from: the config, the pages, the sources that mkdocstrings reads
    and the files that pages include as snippets."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copy(ROOT / "mkdocs.yml", destination / "mkdocs.yml")
    for folder in ("docs", "src"):
        shutil.copytree(ROOT / folder, destination / folder, ignore=ignore)
    pages = "".join(page.read_text() for page in (ROOT / "docs").glob("*.md"))
    for snippet in set(re.findall(r'^--8<-- "(.+)"$', pages, flags=re.MULTILINE)):
        (destination / snippet).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / snippet, destination / snippet)
    return destination


def _build(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(BUILD), "mkdocs.yml", str(folder / "site")],
        cwd=folder,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_an_unbroken_copy_builds(tmp_path: Path) -> None:
    """The control for the cases below: the copy itself is complete."""
    built = _build(_copy_of_the_docs(tmp_path))
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "site" / "api" / "index.html").is_file()


# Each breakage, with what its warning must name. All three go into one copy (one build instead of
# three): the build must fail, and show a warning for each of them.
BREAKAGES = {
    # what broke the build before: text in brackets read as a cross-reference
    "cross-reference in a page": (
        "docs/functional.md",
        "\nSee [the solver][torchlbfgs.no_such_name].\n",
        "no_such_name",
    ),
    "cross-reference in a docstring": (
        "src/torchlbfgs/state.py",
        '\n\ndef _broken() -> None:\n    """See [the state][torchlbfgs.NoSuchState]."""\n',
        "NoSuchState",
    ),
    "link to a missing page": (
        "docs/index.md",
        "\nSee [the missing page](no-such-page.md).\n",
        "no-such-page.md",
    ),
}


def test_each_broken_reference_fails_the_build(tmp_path: Path) -> None:
    folder = _copy_of_the_docs(tmp_path)
    for relative, text, _ in BREAKAGES.values():
        with (folder / relative).open("a") as file:
            file.write(text)
    # the docstring is documented only if public: expose it on the API page
    with (folder / "docs" / "api.md").open("a") as page:
        page.write("\n::: torchlbfgs.state._broken\n    options:\n      show_if_no_docstring: true\n")
    built = _build(folder)
    assert built.returncode != 0, f"the build passed\n{built.stderr}"
    warnings = [line for line in built.stderr.splitlines() if line.startswith("WARNING")]
    for breakage, (_, _, name) in BREAKAGES.items():  # each cause is shown, not hidden
        assert any(name in line for line in warnings), f"{breakage}: no warning names {name}\n{built.stderr}"
