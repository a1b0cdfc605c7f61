# sriov-hook: everything a fresh Debian 12 machine needs, from the project's own files.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEB_PKGS := runc crun busybox-static podman iproute2 util-linux python3-venv dpdk containerd docker.io gcc libc6-dev
STAMP_DEB := $(VENV)/.deb-stamp
STAMP_PIP := $(VENV)/.pip-stamp
STAMP_NATIVE := $(VENV)/.native-stamp
CC := cc
NATIVE_CFLAGS := -O2 -Wall -Wextra -Werror -std=gnu11
PYTEST_ARGS ?=

WHEELHOUSE := build/wheelhouse
# make install INSTALL_ROOT=/some/dir: a staging root (the tree works in place there).
INSTALL_ROOT ?= /
INSTALL_ARGS ?=

.PHONY: protos k8s-install all venv deps typecheck test test-unit test-fast demo demo-agent stress bench lab clean wheel install uninstall

all: test

# Debian packages: runc and busybox for containers, podman for the hooks.d
# test, containerd and docker.io for the runtime wrapper's tests (private
# daemons, started by the tests), iproute2 for the simulated host, gcc for
# the compiled hook client (native/).
# Installed only if missing.
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

# The venv's sriov-hook becomes the compiled thin client (native/sriov-hook.c):
# what runtimes start, in the tests as on hosts. It runs the Python beside it
# whenever the agent cannot answer; bin/sriov-hook stays the portable client.
# Every pip install of the project writes the Python client there again: each
# one is followed by build_native.
define build_native
	$(CC) $(NATIVE_CFLAGS) -o $(BIN)/sriov-hook.tmp native/sriov-hook.c
	mv -f $(BIN)/sriov-hook.tmp $(BIN)/sriov-hook
endef

$(STAMP_NATIVE): native/sriov-hook.c $(STAMP_PIP) $(STAMP_DEB)
	$(build_native)
	@touch $@

deps: $(STAMP_DEB) $(STAMP_PIP) $(STAMP_NATIVE)
	@head -c4 $(BIN)/sriov-hook | grep -q ELF || { echo "a pip install replaced the compiled client: building it again"; \
	  $(CC) $(NATIVE_CFLAGS) -o $(BIN)/sriov-hook.tmp native/sriov-hook.c && mv -f $(BIN)/sriov-hook.tmp $(BIN)/sriov-hook; }
venv: $(STAMP_PIP)

# The whole suite, then the SR-IOV lab when this machine can run it
# (lab/maybe.sh says loudly why when it cannot).
test: test-unit
	@bash lab/maybe.sh

test-unit: deps typecheck
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# mypy --strict over the product (settings in setup.cfg [mypy]).
typecheck: deps
	$(BIN)/python -m mypy sriov_hook dpdk

test-fast: deps
	$(BIN)/python -m pytest -q -m "not slow and not runc and not podman" $(PYTEST_ARGS)

demo: deps
	$(BIN)/python demo/demo.py

# The same two containers through the node agent; its metrics read with curl.
demo-agent: deps
	$(BIN)/python demo/demo.py --agent

# 64 containers vs 32 VFs, 300 random cycles, every crash point, the hostile
# corpus; writes docs/stress.md.
stress: deps
	$(BIN)/python -m tests.stress

# Latency, floors, scale, concurrency and memory; bench/results.json + PNG.
# The agent is timed against Debian's Go host-device CNI plugin (bench/agent.py);
# GNU time measures peak RSS.
BENCH_DEB_PKGS := containernetworking-plugins time
bench: deps
	@missing=""; for p in $(BENCH_DEB_PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	$(BIN)/pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e '.[bench]'
	$(build_native)
	$(BIN)/python bench/run.py

# Boot a QEMU guest with an emulated Intel 82576 (real SR-IOV) and run the
# lab tests in it against real sysfs and netlink.
lab: deps
	$(BIN)/python lab/run.py $(ARGS)

# The wheel plus its dependencies' wheels: all that 'install' needs, offline.
# setuptools builds in build/ and never deletes there: clear it, or a module
# removed from the source would still ship.
wheel: $(BIN)/python
	rm -rf $(WHEELHOUSE) build/lib build/bdist.* build/scripts-*
	$(BIN)/pip wheel -q --disable-pip-version-check -w $(WHEELHOUSE) .

# A venv of its own under /opt/sriov-hook, commands in /usr/local/bin, an
# example config, hooks.d files and systemd units (packaging/install.py).
# Upgrade: run it again. Undo: make uninstall (PURGE=1: config and state too).
install: wheel
	$(PY) packaging/install.py install --root $(INSTALL_ROOT) --wheelhouse $(WHEELHOUSE) $(INSTALL_ARGS)

uninstall:
	$(PY) packaging/install.py uninstall --root $(INSTALL_ROOT) $(if $(PURGE),--purge) $(INSTALL_ARGS)

# The kubelet API modules (sriov_hook/k8s/*_pb2*.py) are committed, generated from
# the .proto files beside them; run this after changing a .proto
# (tests/test_k8s_protos.py fails while they differ).
K8S_PROTOS := sriov_hook/k8s/deviceplugin.proto sriov_hook/k8s/podresources.proto
protos: deps
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. $(K8S_PROTOS)

# A Kubernetes node: what 'make install' puts in place, plus the device plugin
# switched on in a new config and the CDI directory (packaging/k8s_node.py;
# deploy/README.md). Undo: make uninstall.
k8s-install: wheel
	$(PY) packaging/k8s_node.py --root $(INSTALL_ROOT) --wheelhouse $(WHEELHOUSE) $(INSTALL_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
