"""Which interfaces of this netns carry routes, read from procfs.

dpdk-devbind.py's notion of an "active" interface (one `ip -o route`
names), shared by the hook (a VF netdev in use on the host is never taken)
and sriov-dpdk (nor bound away). procfs instead of netlink: three small
reads cost ~0.2 ms where two route dumps through pyroute2 cost ~3 ms.
"""
from __future__ import annotations

from typing import List, Set


def routed_ifaces() -> Set[str]:
    """Interfaces the routing tables point at, or with a global IPv6 address.

    An IPv4 address brings its connected route along while the interface is
    up, so this covers those addresses too (callers that must also see
    addresses on a down interface ask netlink or SIOCGIFADDR).
    """
    names: Set[str] = set()
    # /proc/net/route (the main table): header, then "<iface> <dest> ..."
    names.update(row[0] for row in _rows("/proc/net/route")[1:])
    # ipv6_route: "<dest> ... <iface>"; skip link-local and multicast routes
    names.update(row[-1] for row in _rows("/proc/net/ipv6_route")
                 if not row[0].startswith(("fe80", "ff00")) and row[-1] != "lo")
    # if_inet6: "<addr> <ifindex> <prefix> <scope> <flags> <iface>"; global scope only
    names.update(row[-1] for row in _rows("/proc/net/if_inet6") if row[3] == "00")
    return names


def _rows(path: str) -> List[List[str]]:
    try:
        with open(path) as fh:
            return [line.split() for line in fh if line.strip()]
    except OSError:
        return []
