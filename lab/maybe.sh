#!/usr/bin/env bash
# Run the SR-IOV lab if this machine can (root, apt, QEMU >= 8 installable);
# otherwise say loudly that it was skipped and why. Never skip quietly.
set -uo pipefail
cd "$(dirname "$0")/.."
why=""
if [ "${SRIOV_SKIP_LAB:-}" = 1 ]; then why="SRIOV_SKIP_LAB=1 was set"
elif [ "$(id -u)" != 0 ]; then why="not root (QEMU with 9p passthrough and apt-get need root)"
elif ! command -v apt-get >/dev/null; then why="no apt-get: cannot install QEMU from bookworm-backports"
elif ! grep -qs bookworm /etc/os-release; then why="not Debian 12: the lab recipe is for bookworm + backports"
fi
if [ -n "$why" ]; then
  printf '\n%s\n!!! SR-IOV LAB SKIPPED: %s\n!!! The real-kernel tests (make lab) did NOT run.\n%s\n' \
    "$(printf '!%.0s' {1..72})" "$why" "$(printf '!%.0s' {1..72})"
  exit 0
fi
exec .venv/bin/python lab/run.py
