"""The device plugin's view of a pool: its VFs, their health, and how to pack them.

No gRPC here (deviceplugin.py turns a Vf into a kubelet Device).

Unhealthy, in this order: the PF is gone, its netdev is gone or down; the VF's
record is unreadable, or held outside Kubernetes (holdings.py; a pod's VF in use
is healthy: kubelet counts it as allocated); the VF has no driver (unless a bind
is under way: driver_override set), or, netdev/kata pools, no netdev to hand over.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from .. import drivers
from ..config import Pool
from ..context import Ctx
from ..errors import HookError
from ..inventory import Candidate
from .holdings import Holdings


@dataclass(frozen=True)
class Vf:
    pci: str
    pf: str                      # the PF's PCI address
    numa: int                    # -1: sysfs knows no node
    problem: Optional[str]       # why it is unhealthy; None: healthy


# -- health ------------------------------------------------------------------------------
def survey(ctx: Ctx, pool: Pool, holdings: Holdings) -> List[Vf]:
    """Every VF of the pool with its health (raises HookError if the PF is gone)."""
    links: Dict[str, Optional[bool]] = {}   # PF netdev -> up (None: gone), once per survey

    def pf_up(name: str) -> Optional[bool]:
        if name not in links:
            link = ctx.host.link(name)
            links[name] = None if link is None else link.up
        return links[name]

    return [Vf(c.bdf, c.pf_bdf, ctx.sysfs.numa_node(c.bdf), _problem(ctx, pool, c, holdings, pf_up))
            for c in ctx.inventory.candidates(pool)]


def _problem(ctx: Ctx, pool: Pool, cand: Candidate, holdings: Holdings,
             pf_up: Callable[[str], Optional[bool]]) -> Optional[str]:
    if not ctx.sysfs.device_exists(cand.pf_bdf):
        return f"its PF {cand.pf_bdf} is gone"
    if cand.pf_ifname is not None:
        up = pf_up(cand.pf_ifname)
        if up is None:
            return f"its PF's netdev {cand.pf_ifname} is gone"
        if not up:
            return f"its PF {cand.pf_ifname} is down"
    try:
        record = ctx.store.read(cand.bdf)
    except HookError:
        return "its reservation record is unreadable (sriov-hook check)"
    if record is not None:
        # A pod's VF is in use, not unhealthy: kubelet counts it as allocated.
        if holdings.held_by_kubernetes(cand.bdf, record):
            return None
        return f"held outside Kubernetes by {record.owner}"
    driver = ctx.sysfs.driver(cand.bdf)
    if driver is None:
        # driver_override set and no driver: a bind is under way, not a loss.
        return None if ctx.sysfs.driver_override(cand.bdf) is not None else "it has no driver"
    if pool.mode in ("netdev", "kata"):
        if driver in drivers.USERSPACE_DRIVERS:
            return f"it is on {driver}, with no netdev to hand over"
        if ctx.sysfs.netdev(cand.bdf) is None:
            return "it has no netdev"
    return None


# -- GetPreferredAllocation ---------------------------------------------------------------
def prefer(available: List[str], must: List[str], size: int,
           where: Dict[str, Tuple[int, str]]) -> List[str]:
    """Pack by PF and NUMA node: the devices kubelet must include first; then, one at
    a time, a device on a PF already chosen, else on a NUMA node already chosen, else
    on the PF (and node) that can hold the rest whole, the smallest such (best fit,
    so large free groups stay whole); when none can, the largest; ties by address."""
    chosen = list(dict.fromkeys(must))
    left = sorted(set(available) - set(chosen))
    while len(chosen) < size and left:
        need = size - len(chosen)
        pfs = {where.get(c, (-1, ""))[1] for c in chosen}
        nodes = {where.get(c, (-1, ""))[0] for c in chosen}
        pf_free: Dict[str, int] = {}
        node_free: Dict[int, int] = {}
        for dev in left:
            node, pf = where.get(dev, (-1, ""))
            pf_free[pf] = pf_free.get(pf, 0) + 1
            node_free[node] = node_free.get(node, 0) + 1

        def rank(dev: str) -> Tuple[bool, bool, bool, int, bool, int, str]:
            node, pf = where.get(dev, (-1, ""))
            pf_fits, node_fits = pf_free[pf] >= need, node_free[node] >= need
            return (pf not in pfs, node not in nodes, not node_fits,
                    node_free[node] if node_fits else -node_free[node],
                    not pf_fits, pf_free[pf] if pf_fits else -pf_free[pf], dev)

        best = min(left, key=rank)
        chosen.append(best)
        left.remove(best)
    return chosen
