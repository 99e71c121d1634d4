# Two commands do everything on a fresh machine with Python 3.11 and make:
#   make demo   - the full flow against a generated local NOAA mirror
#   make test   - the test suite
# Both create .venv from uv.lock first (uv itself is installed into .tools/ by pip).

PYTHON ?= python3.11
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
export DAGSTER_HOME := $(CURDIR)/.dagster_home
# gRPC calls between Dagster's processes (launch a run, evaluate a sensor) time out after 60 s
# by default, which a loaded 2-core machine exceeds; see dagster.yaml and README "Timeouts".
export DAGSTER_GRPC_TIMEOUT_SECONDS ?= 180
export UV_PROJECT_ENVIRONMENT := $(CURDIR)/$(VENV)

.PHONY: install demo test test-fast bench faults dev status-page clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Bytecode compiled at install: with PYTHONDONTWRITEBYTECODE set (as on CI machines) every
# Dagster process would otherwise compile ~1,900 modules from source, 1.4 s of each run's start.
$(VENV)/.installed: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --group dev --python $(PYTHON) --compile-bytecode
	@touch $@

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	@mkdir -p $(DAGSTER_HOME)
	@ln -sf ../dagster.yaml $@

install: $(VENV)/.installed $(DAGSTER_HOME)/dagster.yaml  ## create .venv from the lock file
	@$(PY) -m compileall -q weather_pipeline

demo: install  ## generate a mirror, serve it, ingest through Dagster, print a summary
	$(VENV)/bin/weather-pipeline demo

test: install  ## the whole test suite (slow end-to-end tests included)
	$(PY) -m pytest

test-fast: install  ## the tests not marked slow
	$(PY) -m pytest -m "not slow"

bench: install  ## benchmarks; figures go to docs/benchmarks.md
	$(PY) -m weather_pipeline.bench --write docs/benchmarks.md

faults: install  ## the fault table: every fault through the real code paths; writes docs/reliability.md
	$(PY) -m weather_pipeline.faults --write docs/reliability.md

# make dev's ports; the status page and the deep status learn the UI's address from UI_PORT
MIRROR_PORT ?= 8765
UI_PORT ?= 3000
STATUS_PORT ?= 8766
DAGSTER_URL := http://127.0.0.1:$(UI_PORT)
# the demo's models publish only the hours it generated (written by `make demo`)
DEMO_CATALOG := $(DAGSTER_HOME)/demo-catalog.toml
dev: install  ## Dagster UI on :UI_PORT (3000), status page on :STATUS_PORT (8766), ./mirror served on :MIRROR_PORT (8765)
	@test -d mirror || { echo "no ./mirror yet: run 'make demo' first"; exit 2; }
	@test ! -f $(DEMO_CATALOG) || echo "using the demo's catalog overlay $(DEMO_CATALOG)"
	$(VENV)/bin/weather-pipeline mirror serve --root mirror --port $(MIRROR_PORT) & mirror_pid=$$!; \
	  WEATHER_PIPELINE_CACHE=$(CURDIR)/cache WEATHER_PIPELINE_DAGSTER_URL=$(DAGSTER_URL) \
	  $(VENV)/bin/weather-pipeline serve-status --port $(STATUS_PORT) & status_pid=$$!; \
	  trap 'kill $$mirror_pid $$status_pid' EXIT INT TERM; \
	  env $$(test -f $(DEMO_CATALOG) && echo WEATHER_PIPELINE_CATALOG=$(DEMO_CATALOG)) \
	  WEATHER_PIPELINE_SOURCES=mirror WEATHER_PIPELINE_MIRROR_URL=http://127.0.0.1:$(MIRROR_PORT) \
	  WEATHER_PIPELINE_DAGSTER_URL=$(DAGSTER_URL) WEATHER_PIPELINE_KEEP_GRIBS=all \
	  WEATHER_PIPELINE_CACHE=$(CURDIR)/cache $(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(UI_PORT)

status-page: install  ## serve the status page on http://127.0.0.1:STATUS_PORT/status (reads cache/status/deep.json)
	WEATHER_PIPELINE_CACHE=$(CURDIR)/cache WEATHER_PIPELINE_DAGSTER_URL=$(DAGSTER_URL) \
	  $(VENV)/bin/weather-pipeline serve-status --port $(STATUS_PORT)

clean:  ## remove generated data (cache, mirror, Dagster storage); keeps .venv
	rm -rf cache mirror .dagster_home
