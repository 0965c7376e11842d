# The two commands of the README: `make run` (set up + main job) and `make test` (set up + tests).
# Set-up happens once: the .venv/.installed stamp is rebuilt only when pyproject.toml or
# constraints.txt change, so re-running a target on a ready .venv installs nothing.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip

export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
# Python randomises string hashes per process, and RLlib's results depend on that order: without
# a fixed hash seed two runs with the same `seed` train differently (moedream/platform/ray_setup.py).
export PYTHONHASHSEED ?= 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test test-fast test-unit bench lint format install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[dev]"
	# overcooked-ai 1.1.0 pins an old gym/pygame: install it without its dependencies.
	$(PIP) install --no-deps overcooked-ai==1.1.0
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/moedream quickstart

# The whole suite: what CI runs (.ci/run). Two pytest workers, each with its own local Ray
# cluster; --dist loadfile keeps a module's tests (and its module-scoped Ray fixtures) on one
# worker. Much of an integration test is waiting (process and replica start-up, health checks),
# so two workers finish sooner than one even on 2 cores. --no-loadscope-reorder hands modules
# out in tests/conftest.py's order (long integration modules first, unit modules filling in at
# the end) instead of xdist's default (most tests first), which left the long one-test modules
# for last, one worker running them while the other idled.
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=15 $(XDIST) tests

# The quick tier while editing, under 3 minutes on 2 cores: every test not marked `slow` (a test
# taking over ~10 s is marked), unit and quick integration tests alike; the latter still start
# the shared local Ray cluster (a few seconds) and Serve where they need it.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=10 $(XDIST) -m "not slow" tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests/unit

bench: $(STAMP)
	@for script in benchmarks/[a-z]*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check moedream tests benchmarks
	$(BIN)/ruff format --check moedream tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format moedream tests benchmarks
	$(BIN)/ruff check --fix moedream tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
