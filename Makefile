# The two quick-start commands. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: run test bench lint clean browser

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

## run: the embedded single node with its own nats-server and a demo transaction stream
run: $(VENV)/.installed
	$(VENV)/bin/branchguard run --demo

## test: the whole suite (real nats-server, real SQLite, loopback only)
test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

## lint: mypy --strict on the package
lint: $(VENV)/.installed-test
	$(VENV)/bin/mypy

## bench: throughput and latency on this machine (see README)
bench: $(VENV)/.installed
	$(VENV)/bin/branchguard bench --restart-rows 1000000

## browser: Debian's chromium and chromium-driver for the console's browser tests (issue 5);
## does nothing when both are installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || \
	  { $(SUDO) apt-get update && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y chromium chromium-driver; }

clean:
	rm -rf $(VENV) var .pytest_cache
