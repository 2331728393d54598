# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create or refresh .venv first. GPU users override TORCH_SPEC, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.vrc-installed

# Under CI, keep the default suite and skip the long reliability runs.
PYTEST_ARGS ?= -m "not slow"

.PHONY: venv demo test test-all bench clean

venv: $(STAMP)

# torch goes in first, from TORCH_SPEC: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH bash jobs/demo.sh

# pytest exits 5 when it collects nothing; make treats any non-zero exit as failure, so it cannot pass silently.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/probe_bench.py
	$(PY) bench/dpc_bench.py --quick

clean:
	rm -rf $(VENV) out .pytest_cache
