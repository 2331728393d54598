# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create or refresh .venv first, with the exact versions of requirements.lock. GPU users override
# TORCH_SPEC, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
LOCK       := requirements.lock
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.vrc-installed
# `make test-latest` installs the newest releases pyproject.toml allows here; `make lock` freezes them.
LATEST     ?= .venv-latest

# The lmms-eval integration (vrc_dist/lmms) is tested in a venv of its own: lmms-eval's declared requirements
# would pull a torchvision that breaks this torch, so it gets lmms-eval with --no-deps plus requirements-lmms.lock.
LMMS_VENV  ?= .venv-lmms
LMMS_LOCK  := requirements-lmms.lock
LMMS_PY    := $(LMMS_VENV)/bin/python
LMMS_STAMP := $(LMMS_VENV)/.vrc-installed
LMMS_TESTS := tests/test_lmms_eval.py

# Under CI, keep the default suite and skip the long reliability runs.
PYTEST_ARGS ?= -m "not slow"

.PHONY: venv lmms-venv demo test lint test-all test-lmms test-latest lock bench clean

venv: $(STAMP)

# torch goes in first, from TORCH_SPEC: a bare `torch` requirement would pull a multi-GB CUDA build.
# The lock is a constraints file: it pins every package that gets installed, and installs nothing itself.
$(STAMP): pyproject.toml $(LOCK) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip
	$(PY) -m pip install -q -c $(LOCK) $(TORCH_SPEC)
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	touch $@

# The project's own packages at requirements.lock's versions, then lmms-eval and only what its evaluation path
# imports, exact, without their declared requirements; the last line fails the build if that set falls short.
lmms-venv: $(LMMS_STAMP)

$(LMMS_STAMP): pyproject.toml $(LOCK) $(LMMS_LOCK) Makefile
	test -x $(LMMS_PY) || $(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_PY) -m pip install -q -c $(LOCK) pip
	$(LMMS_PY) -m pip install -q -c $(LOCK) $(TORCH_SPEC)
	$(LMMS_PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	$(LMMS_PY) -m pip install -q --no-deps -r $(LMMS_LOCK)
	$(LMMS_PY) -c "import importlib.util, lmms_eval.__main__, vrc_dist.lmms.model; \
	  assert importlib.util.find_spec('torchvision') is None, 'torchvision got into $(LMMS_VENV)'"
	touch $@

demo: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH bash jobs/demo.sh

# pytest exits 5 when it collects nothing; make treats any non-zero exit as failure, so it cannot pass silently.
# Then the lmms-eval tests in their venv; there VRC_REQUIRE_LMMS=1 makes a missing lmms-eval a failure, not a skip.
test: $(STAMP) $(LMMS_STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)
	VRC_REQUIRE_LMMS=1 $(LMMS_PY) -m pytest $(PYTEST_ARGS) $(LMMS_TESTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test-lmms: $(LMMS_STAMP)
	VRC_REQUIRE_LMMS=1 $(LMMS_PY) -m pytest $(PYTEST_ARGS) $(LMMS_TESTS)

test-all: $(STAMP) $(LMMS_STAMP)
	$(PY) -m pytest
	VRC_REQUIRE_LMMS=1 $(LMMS_PY) -m pytest $(LMMS_TESTS)

# A bump is tried here, never in .venv: a fresh venv, no lock, the newest releases in pyproject's ranges.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q $(TORCH_SPEC)
	$(LATEST)/bin/python -m pip install -q -e ".[dev]"
	$(LATEST)/bin/python -m pip freeze --all --exclude-editable > $(LATEST)/versions.txt
	@grep -iE '^(transformers|torch|ray|faiss-cpu|pyarrow|numpy|webdataset)==' $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest $(PYTEST_ARGS)

# After `make test-latest` passed: its versions become the lock (torch stays with TORCH_SPEC).
lock:
	test -f $(LATEST)/versions.txt || { echo "run 'make test-latest' first"; exit 1; }
	{ sed -n '1,3p' $(LOCK); grep -viE '^torch==' $(LATEST)/versions.txt; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

bench: $(STAMP)
	$(PY) bench/probe_bench.py
	$(PY) bench/dpc_bench.py --quick

clean:
	rm -rf $(VENV) $(LATEST) $(LMMS_VENV) out .pytest_cache
