# The two set-up commands: `make train` and `make test` (they create .venv on first use).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# 8 virtual CPU devices, so the 8-device layouts run on a machine without accelerators.
CPU_DEVICES ?= 8
# Merged into XLA_FLAGS the user already has (e.g. --xla_dump_to=...), as `launch` and `memory` do; a device
# count already there is kept.
ifeq ($(findstring --xla_force_host_platform_device_count,$(XLA_FLAGS)),)
export XLA_FLAGS := $(strip $(XLA_FLAGS) --xla_force_host_platform_device_count=$(CPU_DEVICES))
endif

.PHONY: train test test-slow test-notebooks notebooks bench install browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium and its WebDriver, for the dashboard's test in a real headless browser
# (tests/test_dashboard_browser.py); installed only when missing (sudo only when not root).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || { \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; }

train: $(STAMP)
	$(BIN)/picotron-jax train --config meshes/default.yaml

# Two pytest-xdist workers: most of a test is single-threaded XLA compilation, so two share the 2 cores well.
PYTEST_WORKERS ?= 2

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -m slow

test-notebooks: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -m notebooks

notebooks: $(STAMP)
	$(BIN)/python -m pip install --quiet jupyterlab
	$(BIN)/jupyter lab notebooks/

bench: $(STAMP)
	$(BIN)/picotron-jax bench --peak --json benchmarks/results/peak.json
	XLA_FLAGS= $(BIN)/picotron-jax bench --config meshes/bench-32m.yaml --json benchmarks/results/bench-32m.json

clean:
	rm -rf runs .pytest_cache
