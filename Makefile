# Two commands on a fresh machine:  `make run` (the demo) and `make test` (the test suite).
# Both create .venv on first use: CPU torch 2.13.0 (unless a torch is already importable there),
# then pdserve in editable mode with its test extras.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pdserve-installed
PYTEST_ARGS ?=

.PHONY: setup run serve test lint browser clean proto

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/pdserve serve --demo

serve: setup
	$(VENV)/bin/pdserve serve $(SERVE_ARGS)

test: lint browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

browser:
	@tests/support/ensure_browser.sh

lint: setup
	$(VENV)/bin/ruff check pdserve tests benchmarks
	$(VENV)/bin/mypy pdserve
	$(VENV)/bin/hadolint deploy/docker/Dockerfile.gpu deploy/docker/Dockerfile.cpu

clean:
	rm -rf $(VENV) .pytest_cache

proto: setup
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. proto/pdserve/v1/*.proto
