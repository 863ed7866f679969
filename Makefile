# aitbc-miner developer entry points. `make demo` and `make test` are the two
# commands a newcomer runs; both create the venv and install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages needed to build and run: venv support, headers and
# libsystemd for systemd-python, util-linux for the sandbox tools.
DEB_PACKAGES := python3-venv python3-dev libsystemd-dev pkg-config gcc util-linux

.PHONY: venv deps demo test fuzz run lint bench clean chaos system-test

deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	fi

$(STAMP): pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,systemd]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

# The fuzz properties of tests/fuzz with a large example budget (a few minutes);
# `make test` runs the same properties with a small one. Prints the input count.
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/fuzz

# The system tests alone (tests/system: the unit under a real systemd booted in a
# systemd-nspawn box, install.sh, journald, watchdog, promtool). `make test` runs
# them too, but skips them (loudly) where no box can be booted; here that fails.
# Needs root; the Debian rootfs is cached in /var/tmp/aitbc-miner-rootfs.
system-test: $(STAMP)
	AITBC_SYSTEM_TEST=require $(PY) -m pytest -q -m system tests/system

chaos: $(STAMP)
	$(PY) scripts/chaos.py --jobs 300 --kills 10 --terms 3

# The performance figures (dispatch latency, overhead, throughput vs a naive
# bash+curl loop, idle footprint, upload vs curl, recovery, sandbox cost) as one
# table, also in bench/results.json; about 8 minutes. See docs/benchmarks.md.
bench: $(STAMP)
	$(PY) scripts/bench.py

run: $(STAMP)
	MINER_AUTH=$${MINER_AUTH:-dev-bootstrap-token} $(PY) -m aitbc_miner run --config etc/config.dev.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check aitbc_miner mock_coordinator tests scripts
	$(VENV)/bin/ruff format --check aitbc_miner mock_coordinator tests scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .demo bench
