# The two commands the README names: `make run` (service on its embedded, simulated default)
# and `make test`. Both create the virtualenv from pyproject.toml on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint install bench reliability

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m app serve --simulate

# The whole suite; CI (.ci/run) runs this. TEST_WORKERS=auto runs it on every core (pytest-xdist;
# each worker has its own Redis key prefixes, ports and temporary directories). Still one process
# by default: in parallel on 2 busy cores, some timing tests still fail now and then (README).
TEST_WORKERS ?= 0
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# The unit tests only: not `slow` (a process of their own, tests/reliability/) and not
# `integration` (the app against its simulated upstreams); see tests/conftest.py.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto -m "not slow and not integration"

lint: $(STAMP)
	$(PY) -m ruff check app tests reliability
	$(PY) -m mypy
	$(VENV)/bin/lint-imports  # the layer contracts in pyproject.toml [tool.importlinter]

# Overhead and throughput against a fast fake upstream (needs wrk: apt-get install wrk);
# writes bench/results/latest.{json,md,png}. `make bench BENCH_ARGS=--quick` for a smoke run.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[ops]'  # matplotlib, for latest.png
	$(PY) bench/run.py $(BENCH_ARGS)

# Fault injection (tests/reliability/), SIGKILL crash consistency on SQLite and on two Redis
# replicas, a 10-minute soak, then docs/RELIABILITY.md (needs redis-server); ~12 min.
# `make reliability RELIABILITY_ARGS=--quick` (3 kills, a 60 s soak) for a try.
reliability: $(STAMP)
	$(PY) -m reliability.run $(RELIABILITY_ARGS)
