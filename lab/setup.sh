#!/usr/bin/env bash
# Install what the SR-IOV lab needs on a Debian 12 host, and fetch the guest
# kernel. Idempotent. The backports suite is derived from the machine's own
# Debian entry (same URIs and keyring), never a hard-coded mirror.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${LAB_CACHE:-$here/cache}
mkdir -p "$cache"

bp=/etc/apt/sources.list.d/sriov-lab-backports.sources
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  src=$(grep -lsE '^Suites:.*\bbookworm\b' /etc/apt/sources.list.d/*.sources | head -n1 || true)
  if [ -n "$src" ]; then
    # First stanza naming the plain 'bookworm' suite: keep its URIs and keyring.
    awk 'BEGIN{RS="";FS="\n"} /Suites:[^\n]*bookworm( |$|\n)/ && !done {
           for(i=1;i<=NF;i++){ if($i ~ /^Suites:/) print "Suites: bookworm-backports"; else if($i !~ /^#/) print $i }
           done=1 }' "$src" > "$bp"
  elif [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
    [ -n "$uri" ] || { echo "lab: no Debian bookworm source to derive backports from" >&2; exit 1; }
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\n' "$uri" > "$bp"
  else
    echo "lab: no apt sources found" >&2; exit 1
  fi
  apt-get update -qq
fi

need=""
qemu_ok=0
if command -v qemu-system-x86_64 >/dev/null && qemu-system-x86_64 -device help 2>/dev/null | grep -q '"igb"'; then
  qemu_ok=1
fi
if [ $qemu_ok = 0 ]; then
  echo "lab: installing QEMU from bookworm-backports (bookworm's 7.2 has no igb)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -t bookworm-backports qemu-system-x86 >/dev/null
fi
for p in busybox-static kmod xz-utils cpio dpdk dpdk-dev runc iproute2 pciutils; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need="$need $p"
done
if [ -n "$need" ]; then
  echo "lab: installing$need"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
fi

# The guest kernel: the newest 6.12 image in bookworm-backports, unpacked, never installed.
if [ ! -e "$cache/kernel/.complete" ]; then
  pkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9.]+\+deb12-amd64$' \
        | awk '{print $1}' | sort -V | tail -n1)
  [ -n "$pkg" ] || { echo "lab: no linux-image-6.12 in bookworm-backports" >&2; exit 1; }
  rm -rf "$cache/kernel" && mkdir -p "$cache/kernel" && cd "$cache"
  apt-get download -qq "$pkg"
  dpkg-deb -x ./"$pkg"_*.deb "$cache/kernel"
  rm -f ./"$pkg"_*.deb
  touch "$cache/kernel/.complete"
fi
echo "lab: ready ($(qemu-system-x86_64 --version | head -n1))"
