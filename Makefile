# Two commands do all set-up on a fresh machine with only Python 3.10+:
#   make demo   - create .venv, install torchlbfgs, run every example in docs/examples/
#   make test   - create .venv, install torchlbfgs with its test/dev/docs extras, run ruff, mypy,
#                 the strict docs build and pytest
# torch is installed first, pinned to the CPU build torch==2.13.0, when the venv has none:
# an unpinned torch would pull a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test lint typecheck docs pytest bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# pip byte-compiles on one core (30 s of torch's 45 s install on two cores); each install here
# skips that and .ci/byte-compile.py compiles on every core.
INSTALL := $(PY) -m pip install --quiet --no-compile
BYTE_COMPILE := $(PY) .ci/byte-compile.py

$(VENV)/.torch: $(PY)
	$(PY) -c "import torch" 2>/dev/null || { $(INSTALL) "$(TORCH_PIN)" && $(BYTE_COMPILE); }
	touch $@

$(VENV)/.installed-%: pyproject.toml $(VENV)/.torch
	$(INSTALL) -e ".[$*]"
	$(BYTE_COMPILE)
	touch $@

demo: $(VENV)/.installed-test
	@for example in docs/examples/*.py; do \
		echo "=== $$example"; \
		$(PY) "$$example" || exit 1; \
	done

# ruff and mypy need only the dev extras (and torch): `make test` runs them while pip installs
# the rest.
lint: $(VENV)/.installed-dev
	$(PY) -m ruff check src tests bench docs/examples .ci/byte-compile.py
	$(PY) -m ruff format --check src tests bench docs/examples .ci/byte-compile.py

typecheck: $(VENV)/.installed-dev
	$(PY) -m mypy

# The documentation site: a broken reference, a missing page or a bad docstring fails the build
# (.ci/build-docs shows only warnings and errors; tests/test_docs_build.py proves it can fail).
docs: $(VENV)/.installed-test,dev,docs
	PYTHON=$(PY) bash .ci/build-docs mkdocs.yml $(VENV)/site

# Two pytest workers, each taking whole files (module fixtures stay in one process), the longest
# files first (tests/conftest.py: LONGEST_FILES).
PYTEST := $(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

pytest: $(VENV)/.installed-test,dev,docs
	$(PYTEST)

# On two cores, nothing waits that need not: ruff and mypy (mypy's half-minute with a cold
# cache) run while pip installs the test and docs extras, which keeps a core idle; then the
# strict docs build runs beside pytest. Their logs are shown after pytest's, and `make test`
# stays under five minutes on this project's machines.
test: $(VENV)/.installed-dev
	@$(MAKE) --no-print-directory lint typecheck > $(VENV)/checks.log 2>&1 & checks=$$!; \
	$(MAKE) --no-print-directory $(VENV)/.installed-test,dev,docs; installed=$$?; \
	tests=1; built=1; \
	if [ $$installed -eq 0 ]; then \
		$(MAKE) --no-print-directory docs > $(VENV)/docs.log 2>&1 & docs=$$!; \
		$(PYTEST); tests=$$?; \
		wait $$docs; built=$$?; \
	fi; \
	wait $$checks; checked=$$?; \
	echo "=== ruff and mypy:"; cat $(VENV)/checks.log; \
	if [ $$installed -eq 0 ]; then echo "=== the strict docs build:"; cat $(VENV)/docs.log; fi; \
	if [ $$checked -ne 0 ]; then echo "make test: ruff or mypy failed (log above)"; fi; \
	if [ $$built -ne 0 ]; then echo "make test: the docs build failed or did not run (log above)"; fi; \
	exit $$(( installed || tests || checked || built ))

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
