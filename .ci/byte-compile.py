"""Byte-compile this interpreter's site-packages on every core: ``python .ci/byte-compile.py``.

The Makefile installs with ``pip install --no-compile`` and then runs this. pip byte-compiles
what it installs on one core (for torch, about 30 s of a 45 s install on a 2-core machine, the
other core idle); this splits the files into one share per core. Byte-compiling cannot be
skipped: with PYTHONDONTWRITEBYTECODE=1 (set on this project's machines) nothing is compiled
at import either, so every process would compile torch again (``import torch`` 4.4 s instead
of 2). Files already compiled are skipped. Files that do not compile (templates, Python 2
leftovers in some packages) are skipped silently, as pip skips them.
"""

from __future__ import annotations

import compileall
import os
import sysconfig
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def compile_share(files: list[str]) -> int:
    """Byte-compile ``files``; how many did not compile."""
    return sum(not compileall.compile_file(file, quiet=2) for file in files)


def main() -> None:
    site_packages = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    files = sorted(str(path) for folder in site_packages for path in Path(folder).rglob("*.py"))
    # One share per core, each a whole process: a pool task per file (compileall -j) costs
    # more in hand-offs than the compiling itself (a no-op pass over torch: 18 s against 1 s).
    shares = os.cpu_count() or 1
    with ProcessPoolExecutor(shares) as pool:
        not_compiled = sum(pool.map(compile_share, [files[start::shares] for start in range(shares)]))
    where = ", ".join(sorted(site_packages))
    print(f"byte-compiled {len(files) - not_compiled} of {len(files)} files in {where}")


if __name__ == "__main__":
    main()
