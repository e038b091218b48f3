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

$(VENV)/.torch: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_PIN)"
	touch $@

$(VENV)/.installed-%: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-test
	@for example in docs/examples/*.py; do \
		echo "=== $$example"; \
		$(PY) "$$example" || exit 1; \
	done

lint: $(VENV)/.installed-test,dev,docs
	$(PY) -m ruff check src tests bench docs/examples
	$(PY) -m ruff format --check src tests bench docs/examples

typecheck: $(VENV)/.installed-test,dev,docs
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

# The checks run beside pytest (their log is shown after it): on two cores that saves their
# half-minute, and `make test` stays under five minutes on this project's machines.
test: $(VENV)/.installed-test,dev,docs
	@$(MAKE) --no-print-directory lint typecheck docs > $(VENV)/checks.log 2>&1 & checks=$$!; \
	$(PYTEST); tests=$$?; \
	wait $$checks; status=$$?; \
	echo "=== ruff, mypy and the strict docs build:"; cat $(VENV)/checks.log; \
	if [ $$status -ne 0 ]; then echo "make test: ruff, mypy or the docs build failed (log above)"; fi; \
	exit $$(( tests || status ))

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
