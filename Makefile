# estat: `make run` starts the collector, `make test` runs the whole suite.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

# The per-request modules, compiled in place with mypyc (scripts/build_native.py);
# rebuilt whenever one of them changes. ESTAT_NATIVE=0 keeps them pure Python.
NATIVE_SRC := $(shell python3 scripts/build_native.py --list)
# one stamp per mode, so that switching ESTAT_NATIVE rebuilds (or removes) the modules
NATIVE_MODE := $(if $(filter 0,$(ESTAT_NATIVE)),pure,compiled)
NATIVE_STAMP := build/native/.built-$(NATIVE_MODE)

.PHONY: install install-test run test test-fast test-pure test-postgres bench-instructions bench-dlq-million check lint fmt typecheck imports bench docs clean native

# what running needs (and the compiler of the hot path); install-test adds the test toolchain
install: $(STAMP) $(NATIVE_STAMP)

install-test: install $(TEST_STAMP)

$(STAMP): pyproject.toml uv.lock
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check "uv>=0.5,<1"
	@$(UV) sync --frozen --extra native --inexact -q --compile-bytecode
	@touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	@$(UV) sync --frozen --extra test --extra native --inexact -q --compile-bytecode
	@touch $(TEST_STAMP)

native: $(NATIVE_STAMP)

$(NATIVE_STAMP): $(STAMP) $(NATIVE_SRC) scripts/build_native.py
	@rm -f build/native/.built-*
	@if [ "$(NATIVE_MODE)" = compiled ]; then echo "compiling the ingest hot path with mypyc (scripts/build_native.py) ..."; fi
	@rc=0; $(PY) scripts/build_native.py || rc=$$?; \
	  if [ $$rc = 0 ]; then mkdir -p $(dir $(NATIVE_STAMP)) && touch $(NATIVE_STAMP); \
	  elif [ $$rc != 3 ]; then exit $$rc; fi

run: install
	$(VENV)/bin/estat serve

test: install-test
	@bash scripts/test-deps.sh
	$(PY) -m pytest -q --durations=15
	@$(MAKE) --no-print-directory test-pure

# The inner loop: unit and contract tests on fakes and the in-process
# listener, no subprocess (about a minute); `make test` runs everything.
test-fast: install-test
	$(PY) -m pytest -q -m "not e2e and not servers" --ignore=tests/e2e

# The whole suite again on PostgreSQL 16 and 18 (the machine has Debian's 15):
# relocatable builds from one PyPI wheel, under build/postgres (about 15 min).
test-postgres: install-test
	@bash scripts/test-postgres.sh

# The per-request modules as plain Python too (what runs without the compiled
# build): their unit tests against a copy of the sources without the .so files.
test-pure: install-test
	@rm -rf build/pure && mkdir -p build/pure && cp -r src/estat build/pure/
	@find build/pure -name '*.so' -delete
	@PYTHONPATH=build/pure $(PY) -c "from estat.ingest.http import http_compiled; assert not http_compiled()"
	PYTHONPATH=build/pure $(PY) -m pytest -q -p no:cacheprovider tests/ingest tests/pipeline tests/ops tests/codec

check: install-test lint typecheck imports docs-check

lint:
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

fmt: install-test
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

typecheck:
	$(VENV)/bin/mypy

imports:
	$(VENV)/bin/lint-imports

docs: install
	$(VENV)/bin/estat config --markdown > docs/configuration.md
	$(PY) -c "import sys; from estat.ingest.openapi import render; sys.stdout.buffer.write(render())" > docs/openapi.json

docs-check:
	@diff -u docs/configuration.md <($(VENV)/bin/estat config --markdown) \
	  || (echo "docs/configuration.md is stale: run 'make docs'"; exit 1)

bench: install-test
	@bash scripts/bench-deps.sh
	@bash scripts/test-deps.sh
	$(PY) benchmarks/run.py
	$(PY) benchmarks/pipeline_bench.py
	$(PY) benchmarks/dispatch_bench.py
	$(PY) benchmarks/dispatch_latency_bench.py
	$(PY) benchmarks/relay_bench.py
	$(PY) benchmarks/relay_store_bench.py
	$(PY) benchmarks/lease_backlog_bench.py
	$(PY) benchmarks/dlq_bench.py
	$(PY) benchmarks/ratelimit_bench.py

# the DLQ with 1,000,000 files: start-up, RSS, pick and a full replay (about half an hour)
bench-dlq-million: install-test
	$(PY) benchmarks/dlq_bench.py --million

# CPU instructions per /collect request (valgrind): repeatable where wall-clock is not
bench-instructions: install-test
	@bash scripts/bench-deps.sh
	$(PY) benchmarks/instructions.py
	$(PY) benchmarks/instructions.py --pure

clean:
	@test ! -x $(PY) || $(PY) scripts/build_native.py --clean
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache
