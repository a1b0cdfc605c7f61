# sriov-hook: everything a fresh Debian 12 machine needs, from the project's own files.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEB_PKGS := runc busybox-static podman iproute2 util-linux python3-venv dpdk
STAMP_DEB := $(VENV)/.deb-stamp
STAMP_PIP := $(VENV)/.pip-stamp
PYTEST_ARGS ?=

.PHONY: all venv deps test test-unit test-fast demo stress bench lab clean

all: test

# Debian packages: runc and busybox for containers, podman for the hooks.d
# test, iproute2 for the simulated host. Installed only if missing.
$(STAMP_DEB): Makefile
	@missing=""; for p in $(DEB_PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to apt-get install$$missing" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@mkdir -p $(VENV) && touch $@

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP_PIP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e '.[test]'
	@touch $@

deps: $(STAMP_DEB) $(STAMP_PIP)
venv: $(STAMP_PIP)

# The whole suite, then the SR-IOV lab when this machine can run it
# (lab/maybe.sh says loudly why when it cannot).
test: test-unit
	@bash lab/maybe.sh

test-unit: deps
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: deps
	$(BIN)/python -m pytest -q -m "not slow and not runc and not podman" $(PYTEST_ARGS)

demo: deps
	$(BIN)/python demo/demo.py

# 64 containers vs 32 VFs, 300 random cycles, every crash point, the hostile
# corpus; writes docs/stress.md.
stress: deps
	$(BIN)/python -m tests.stress

# Latency, floors, scale, concurrency and memory; bench/results.json + PNG.
bench: deps
	$(BIN)/pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e '.[bench]'
	$(BIN)/python bench/run.py

# Boot a QEMU guest with an emulated Intel 82576 (real SR-IOV) and run the
# lab tests in it against real sysfs and netlink.
lab: deps
	$(BIN)/python lab/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
