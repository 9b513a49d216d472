# Everything a developer and CI run. `make run` and `make test` bootstrap themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
# apt-get needs root: use sudo when not root
SUDO := $(shell test "$$(id -u)" = 0 || echo sudo)

.PHONY: install run test test-deps lint bench chromium node clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## Serve on ./peoplebase.db (flags: make run ARGS="--port 9000")
run: install
	$(BIN)/peoplebase serve $(ARGS)

## The official JavaScript SDKs (npm) for the conformance tests
node: node_modules/.installed

node_modules/.installed: package.json package-lock.json
	@command -v npm >/dev/null 2>&1 || { \
	  echo "installing Debian nodejs and npm"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nodejs npm; }
	npm ci --no-audit --no-fund
	@touch $@

## Debian's Chromium for the browser tests (they fail, never skip, without it)
chromium:
	@test -x /usr/bin/chromium || { \
	  echo "installing Debian chromium"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; }
	@test -x /usr/bin/chromium || { echo "error: /usr/bin/chromium could not be installed" >&2; exit 1; }

test-deps: install node chromium

## The whole suite: unit, HTTP, SDK end-to-end, browser, PostgreSQL
test: test-deps
	$(BIN)/python -m pytest $(ARGS)

lint: install
	$(BIN)/ruff check peoplebase tests benchmarks
	$(BIN)/ruff format --check peoplebase
	$(BIN)/mypy

## Benchmarks: prints one table; figures go to BENCHMARKS.md
bench: install
	$(BIN)/python -m benchmarks.run $(ARGS)

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache .hypothesis
