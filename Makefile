# The two front-door commands: `make demo` (set up, then run the main job on an embedded Ray)
# and `make test` (set up, then run the test suite). Both create the virtualenv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# constraints.txt pins the exact set tested on Python 3.11; other Pythons get pyproject's ranges.
CONSTRAINTS = $(shell $(PYTHON) -c 'import sys; print("-c constraints.txt" if sys.version_info[:2] == (3, 11) else "")')

.PHONY: setup demo test lint fmt bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(CONSTRAINTS) -e '.[dev,onnx]'
	touch $@

demo: setup
	$(BIN)/imgpipe demo --config configs/demo.yaml

# Two pytest runs: the suite on one shared local Ray, then the tests that build a multi-node
# cluster_utils cluster in the test process itself (they must not share a process with that Ray).
test: setup lint
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q -m multinode

# Lint and format drift fail `make test`; `make fmt` fixes what ruff can.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs
