# devstack: one-command entry points. `make run` and `make test` work on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
# The interpreted pass re-runs what exercises the hot-path modules (everything else is pure Python anyway).
INTERPRETED_TESTS ?= tests/test_scoped_feed.py tests/test_keys.py tests/test_table.py tests/test_proxy.py tests/test_malformed_requests.py \
	tests/test_hardening.py tests/test_streaming.py tests/test_reload_under_load.py tests/test_admin.py \
	tests/test_tracing.py tests/test_fuzz.py tests/test_demo.py tests/test_compiled.py \
	tests/test_tunnels.py tests/test_slow_bodies.py tests/test_request_policy.py tests/test_errors.py \
	tests/test_access_log.py tests/test_failure_log.py tests/test_edge_keys.py tests/test_route_groups.py \
	tests/test_http2.py tests/test_h1_to_h2c.py

# The HTTP/2 tests again with the pure-Python h2 engine (the fallback where libnghttp2 is missing).
H2_ENGINE_TESTS ?= tests/test_http2.py tests/test_grpc_chain.py tests/test_http2_abuse.py tests/test_fuzz_http2.py \
	tests/test_h1_to_h2c.py tests/test_tls_clients.py

# router/_native.py owns the list of compiled sources (setup.py and router/__init__.py read it too).
HOT_PATH_SOURCES := $(shell python3 router/_native.py sources)

.PHONY: setup compile run test lint unit kube-test bench bench-quick bench-scale bench-micro fuzz soak clean wheel-check

setup: $(VENV)/.installed router/_compiled.json

# The editable install stays pure Python; `compile` builds the hot path in place next to it.
$(VENV)/.installed: pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 'setuptools>=77'  # `make compile` builds outside pip's isolation
	$(BIN)/pip uninstall -q -y devstack >/dev/null 2>&1 || true  # the distribution's old name, in a venv made before the rename
	DEVSTACK_COMPILE=0 $(BIN)/pip install -q -e '.[router,kubernetes,test]'
	touch $@

## The router hot path as C extensions (mypyc, plus the C helpers in router/*.c), rebuilt whenever one of its sources changes.
compile: router/_compiled.json

router/_compiled.json: $(VENV)/.installed $(HOT_PATH_SOURCES) router/_native.py setup.py
	@mkdir -p build
	$(PY) setup.py -q build_ext --inplace > build/compile.log 2>&1 || true
	@$(PY) -W ignore -c 'import router, sys; print("router hot path:", router.HOT_PATH_MODE); sys.exit(not router.COMPILED)' \
		|| { tail -40 build/compile.log; exit 1; }

## The main job: router + demo services on loopback, with curl lines to try.
run: setup
	$(BIN)/devstack demo

## The browser extension (extension/, no build step) zipped with manifest.json at the root: unzip and
## "Load unpacked" at chrome://extensions (or load extension/ itself), or upload the zip to a web store.
EXTENSION_ZIP ?= build/devstack-extension.zip
.PHONY: extension
extension:
	@mkdir -p $(dir $(EXTENSION_ZIP))
	@rm -f $(EXTENSION_ZIP)
	cd extension && python3 -m zipfile -c $(abspath $(EXTENSION_ZIP)) .
	@echo "wrote $(EXTENSION_ZIP)"

## The whole suite: lint, types, layering, then every test against the compiled hot path, then
## the router's own tests again with it interpreted (pure Python is what runs without a compiler).
test: setup lint
	DEVSTACK_EXPECT_COMPILED=1 $(BIN)/pytest -q $(PYTEST_ARGS)
	DEVSTACK_INTERPRETED=1 $(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS) $(INTERPRETED_TESTS)
	DEVSTACK_HTTP2_ENGINE=h2 $(BIN)/pytest -q $(PYTEST_ARGS) $(H2_ENGINE_TESTS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: setup
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

## Benchmarks (need the Debian packages wrk, nginx-light, haproxy, nghttp2-client; see benchmarks/README.md).
## `bench`: the HTTP/1.1 rows, then the gRPC rows (h2load over h2c).
bench: setup
	$(PY) -m benchmarks.run

## `bench-quick` ends with a short gRPC smoke when h2load is installed (a router without HTTP/2 is skipped).
bench-quick: setup
	$(PY) -m benchmarks.run --quick --reps 3  # median of 3 interleaved runs: one noisy run must not fail CI

bench-scale: setup
	$(PY) -m benchmarks.run --scale

## The hot path's own cost per exchange, no sockets: time, then instructions (needs valgrind).
bench-micro: setup
	$(PY) -m benchmarks.micro
	$(PY) -m benchmarks.micro --instructions

## A long fuzzing run (the test command runs a bounded one).
fuzz: setup
	DEVSTACK_FUZZ_PROFILE=long $(BIN)/pytest -q -p no:cacheprovider tests/test_fuzz.py tests/test_fuzz_http2.py

kube-test: setup
	$(BIN)/pytest -q tests/kube

## The release artefact, checked as a user gets it: a wheel of a clean copy of the tree with the hot
## path compiled, repaired by auditwheel to a manylinux tag (both from the test extra), installed into fresh
## venvs: [router] (the demo answers through the installed router) and [sdk] (none of the router's
## dependencies). Needs the package index. The wheel is left in $(WHEEL_DIR)/.
WHEEL_DIR ?= dist
wheel-check: setup
	DEVSTACK_WHEEL_CHECK=1 DEVSTACK_WHEEL_DIR=$(WHEEL_DIR) $(BIN)/pytest -q -s --durations=0 -p no:cacheprovider tests/test_wheel.py

clean:
	rm -rf $(VENV) build router/*.so router/_compiled.json *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
