# Two entry points, both from a clean clone: `make demo` and `make test`. `make wheel-test` checks the built wheel.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here, not in setup.cfg: 2.13.0 is the CPU wheel this machine kind serves locally.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test wheel-test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg setup.py pyproject.toml
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e .
	touch $@

# The test suite covers the MONAI Deploy app, so it installs the deploy extra too.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev,deploy]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/monai-cxr-ssl demo

# Two pytest-xdist workers, a whole test file each at a time (its module fixtures made once), the long files first,
# and torch on CPUs / workers threads each (tests/conftest.py): one process at a time leaves a core idle through the
# suite's process start-ups, SQLite writes and waits for killed runs.
TEST_WORKERS ?= 2
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# The wheel in a fresh virtual environment outside the checkout: demo, bundle-path, python -m monai.bundle run.
wheel-test:
	PYTHON=$(PYTHON) TORCH_PIN="$(TORCH_PIN)" bash .ci/wheel_test.sh

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

bench: $(VENV)/.installed
	$(BIN)/python bench/throughput.py

clean:
	rm -rf .demo outputs build dist *.egg-info
