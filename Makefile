# The README names these targets; .ci/run calls `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The wheel `pip install .` builds (setup.py: the data plane compiled by mypyc), unpacked
# here; `make test` runs the suite against it as well as against the sources.
COMPILED := build/compiled
COMPILED_STAMP := $(COMPILED)/.built-stamp

.PHONY: bench-instructions demo test test-pure test-compiled compiled compiler-deps soak lint typecheck imports link-tree format edge-deps browser-deps scale-deps bench bench-floor bench-relay bench-routing bench-routing-gpu verify-gpu bench-memory clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	SLUICE_COMPILE=0 $(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sluice serve --demo

# nginx from Debian and workerd from npm: the edge tests run the real programs.
edge-deps:
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light || DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx; \
	  else echo "nginx is missing: run 'sudo apt-get install -y nginx' (Debian/Ubuntu) and retry" >&2; exit 1; fi; }
	@[ -x cloudflare/node_modules/.bin/workerd ] || (cd cloudflare && npm ci --no-audit --no-fund --silent)

# Debian's chromium: the console tests drive it with Playwright (which downloads no browser).
browser-deps:
	@[ -x /usr/bin/chromium ] || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else echo "chromium is missing: run 'sudo apt-get install -y chromium' (Debian) and retry" >&2; exit 1; fi; }

# redis-server and PostgreSQL from Debian: the scale tests start their own servers (a
# shared limit store and a shared records database) on free loopback ports.
scale-deps:
	@{ command -v redis-server >/dev/null 2>&1 && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server postgresql; \
	  else echo "redis-server or PostgreSQL is missing: run 'sudo apt-get install -y redis-server postgresql' (Debian/Ubuntu) and retry" >&2; exit 1; fi; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy and import-linter resolve `sluice.*` through a tree of links, since the editable
# install maps folders with an import hook that static tools cannot follow.
link-tree:
	@mkdir -p build/typecheck/sluice
	@for d in proxy control sim client; do ln -sfn "$(CURDIR)/$$d" build/typecheck/sluice/$$d; done

typecheck: $(STAMP) link-tree
	cd build/typecheck && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p sluice.proxy -p sluice.control -p sluice.sim -p sluice.client

# The import contracts in pyproject.toml: layers, proxy's forbidden imports, no cycles.
imports: $(STAMP) link-tree
	cd build/typecheck && ../../$(VENV)/bin/lint-imports --config ../../pyproject.toml

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# What a fresh `pip install .` builds, from a clean build folder (setuptools would otherwise
# carry files deleted from the sources into the wheel).
WHEEL_SOURCES := $(shell find proxy control sim client nginx cloudflare presets -type f \
	-not -path '*/node_modules/*' -not -path '*/__pycache__/*' 2>/dev/null)
$(COMPILED_STAMP): $(STAMP) setup.py pyproject.toml $(WHEEL_SOURCES)
	rm -rf $(COMPILED) build/wheel build/lib.* build/temp.* build/bdist.* build/mypyc build/mypyc-src
	$(PY) -m pip wheel -q --no-deps -w build/wheel .
	$(PY) -m pip install -q --no-deps --target $(COMPILED) build/wheel/*.whl
	touch $@

compiled: compiler-deps $(COMPILED_STAMP)

# A C compiler for the compiled build (setup.py; Python's headers come with python.org and
# pyenv builds, Debian's python3-dev otherwise).
compiler-deps:
	@command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc; \
	  else echo "no C compiler: run 'sudo apt-get install -y gcc' (Debian/Ubuntu) and retry" >&2; exit 1; fi; }

# The same suite against both builds of the data plane: the sources (pure Python, the
# fallback) and the compiled wheel. SLUICE_EXPECT_BUILD makes tests/test_compiled_build.py fail if a run
# is not testing the build it names.
test: $(STAMP) edge-deps browser-deps scale-deps lint typecheck imports compiled
	$(MAKE) --no-print-directory test-pure test-compiled

# Each suite runs on TEST_JOBS pytest-xdist processes: most of a test's time is spent
# waiting on the servers it started, so two processes on two cores take ~60% of the time
# of one. The tests marked `serial` (load-timed: a burst whose spread must stay within a
# queue's wait, TTFTs compared under load) run afterwards, alone. TEST_JOBS=0: one process.
TEST_JOBS ?= 2
PYTEST_PURE := SLUICE_EXPECT_BUILD=pure $(VENV)/bin/pytest -q
PYTEST_COMPILED := SLUICE_EXPECT_BUILD=compiled PYTHONPATH=$(CURDIR)/$(COMPILED) $(VENV)/bin/pytest -q -p no:cacheprovider

test-pure: $(STAMP)
	$(PYTEST_PURE) -n $(TEST_JOBS) -m "not serial"
	$(PYTEST_PURE) -m serial

test-compiled: compiled
	$(PYTEST_COMPILED) -n $(TEST_JOBS) -m "not serial"
	$(PYTEST_COMPILED) -m serial

# The long reliability runs behind docs/RELIABILITY.md (~10 min on 2 cores): 10,000+
# fuzz cases of each kind, the fault matrix, 50 reloads under 200 streams, 100,000 mixed
# requests (10% faulty) with the proxy's RSS, 20 concurrent 3.6 MB bodies.
soak: $(STAMP)
	SLUICE_SOAK=1 $(VENV)/bin/pytest -q -s tests/reliability tests/reload/test_reload_under_load.py
	$(VENV)/bin/python -m tests.reliability.soak --requests 100000 --bodies

bench: $(COMPILED_STAMP) edge-deps
	PYTHONPATH=$(CURDIR)/$(COMPILED) $(VENV)/bin/sluice bench --compare --concurrency 256 --requests 1024 --max-tokens 64

# sluice (the compiled build), nginx and a relay that only moves bytes (bench/floor_proxy.py),
# interleaved: how far sluice is from what a Python relay on uvloop can reach (~1 min).
bench-floor: $(COMPILED_STAMP) edge-deps
	PYTHONPATH=$(CURDIR)/$(COMPILED) $(VENV)/bin/python -m bench.floor --rounds 4 --requests 1024

# The relay's per-event path in-process (ns per event, 256 streams, pass-through and with a
# policy), on the compiled build and on the sources (seconds).
bench-relay: $(COMPILED_STAMP)
	PYTHONPATH=$(CURDIR)/$(COMPILED) $(VENV)/bin/python -m bench.relay_events
	$(VENV)/bin/python -m bench.relay_events

# A GPU host with vLLM installed (python3 -m vllm): serve a tiny random Llama, run
# `sluice verify` against it, then `sluice bench --compare --url` at 64 and 256 streams.
# Output in build/verify-gpu/; docs/VLLM.md says what it checks. Not part of `make test`.
verify-gpu: $(STAMP) edge-deps
	SLUICE="$(CURDIR)/$(VENV)/bin/sluice" bash scripts/gpu/verify_gpu.sh

# On a GPU host with vLLM: two vLLM replicas + `sluice bench routing --urls` (docs/ROUTING.md).
# Output in build/routing-gpu/. Not part of `make test`.
bench-routing-gpu: $(STAMP) edge-deps
	SLUICE="$(CURDIR)/$(VENV)/bin/sluice" bash scripts/gpu/routing_gpu.sh

# docs/ROUTING.md: round-robin vs least-outstanding vs sluice's replica choice (~1-2 min)
bench-routing: $(STAMP) edge-deps
	$(VENV)/bin/sluice bench routing --workers 2,4

# User-space instructions per 2-token request of the compiled build, counted by valgrind's
# callgrind: deterministic to ~0.3%, for A/Bs of per-request work where CPU time on a
# shared machine moves by 10% (~30 s; TOKENS=64 and serve arguments: bench/instructions.sh).
bench-instructions: $(COMPILED_STAMP)
	@command -v valgrind >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q valgrind; \
	  else echo "no valgrind: run 'sudo apt-get install -y valgrind' and retry" >&2; exit 1; fi; }
	bash bench/instructions.sh $(COMPILED) 2000 9150

# Resident memory per open stream (bounded: about 30 s).
bench-memory: $(STAMP)
	$(VENV)/bin/python -m sluice.control.bench.memory --streams 1000,5000,9000

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
