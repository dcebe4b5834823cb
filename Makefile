# The two quick-start commands. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: run test bench lint clean tools

# The install compiles the hot modules with mypyc (setup.py; appliance/compiled.py lists them),
# so it is redone when they change: an editable install would otherwise run their source
# (appliance/compiled.py refuses a stale build). One install per target: each `pip install -e`
# compiles anew, so the test install also stands for the plain one.
BUILD := pyproject.toml setup.py appliance/compiled.py appliance/scoring/features.py

$(VENV)/.installed: $(BUILD)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(BUILD)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

## run: the embedded single node with its own nats-server and a demo transaction stream
run: $(VENV)/.installed
	$(VENV)/bin/branchguard run --demo

## test: the whole suite (real nats-server, real SQLite, loopback only)
test: tools $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

## lint: mypy --strict on the package, and the layers (import-linter's contracts in pyproject.toml)
lint: $(VENV)/.installed-test
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

## bench: throughput and latency on this machine (see README)
bench: $(VENV)/.installed
	$(VENV)/bin/branchguard bench --restart-rows 1000000

## tools: the Debian packages the tests need (systemd-analyze, promtool, chromium and
## chromium-driver); installs only what is missing
tools:
	@.ci/install-tools

clean:
	rm -rf $(VENV) var .pytest_cache build appliance/_compiled.json
	find appliance -name '*.so' -delete
