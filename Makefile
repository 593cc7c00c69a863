# Two entry points a newcomer needs (see README "Quickstart"):
#   make demo   set up, fetch MNIST, train the tutorial's LeNet, print its test accuracy
#   make test   set up, lint, run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# Re-install only when the dependency declarations change.
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt setup.py src/lenet/_stages.c src/lenet/_stages_kernels.h
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch pinned to the CPU build: the package itself only declares a range.
	$(PY) -m pip install --quiet -c constraints.txt "torch==2.13.0" -e ".[dev,serve,export,plots]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/lenet data fetch mnist
	$(VENV)/bin/lenet train --model lenet --out runs/quickstart --force

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/train_speed.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
