#!/usr/bin/env bash
# The netlink work of one netdev prestart + poststop, done by iproute2 alone:
# what a C tool pays. Args: VF netdev on the host, target netns name.
set -euo pipefail
vf=$1 ns=$2
ip link set "$vf" mtu 1400
ip link set "$vf" netns "$ns" name net1
ip -n "$ns" addr add 10.98.0.2/24 dev net1
ip -n "$ns" link set net1 up
ip -n "$ns" route add 10.97.0.0/16 via 10.98.0.1 dev net1
ip -n "$ns" link set net1 down
ip -n "$ns" link set net1 netns 1 name "$vf"
ip link set "$vf" mtu 1500
