# devstack: one-command entry points. `make run` and `make test` work on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup run test lint unit kube-test bench bench-quick bench-scale fuzz soak clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

## The main job: router + demo services on loopback, with curl lines to try.
run: setup
	$(BIN)/devstack demo

## The whole suite: lint, types, layering, then every test.
test: setup lint
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: setup
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

## Benchmarks (need the Debian packages wrk, nginx-light, haproxy; see benchmarks/README.md).
bench: setup
	$(PY) -m benchmarks.run

bench-quick: setup
	$(PY) -m benchmarks.run --quick --reps 3  # median of 3 interleaved runs: one noisy run must not fail CI

bench-scale: setup
	$(PY) -m benchmarks.run --scale

## A long fuzzing run (the test command runs a bounded one).
fuzz: setup
	DEVSTACK_FUZZ_PROFILE=long $(BIN)/pytest -q -p no:cacheprovider tests/test_fuzz.py

kube-test: setup
	$(BIN)/pytest -q tests/kube tests/test_kube_*.py

clean:
	rm -rf $(VENV) *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
