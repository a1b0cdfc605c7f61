"""vfio mode (VM runtimes, userspace drivers): bind the VF to vfio-pci.

attach:  PF-side settings (MAC/VLAN reach the guest from the PF) ->
         checks (vfio-pci loaded, IOMMU or allowed noiommu, viable group,
         netdev idle) done in prepare -> bind -> wait for /dev/vfio/<group>
detach:  back to the recorded driver, override cleared -> netdev home under
         its old name, MAC/MTU restored -> PF-side settings restored
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

from .. import drivers, faults
from ..errors import HookError
from ..util import wait_for
from . import netdev
from .base import Mode

if TYPE_CHECKING:
    from ..context import Ctx
    from ..inventory import Candidate
    from ..request import NetworkRequest
    from ..reservations import Reservation


def capture_for_bind(ctx: "Ctx", cand: "Candidate", res: "Reservation",
                     req: "NetworkRequest") -> Optional[str]:
    """Shared by vfio and dpdk: idle netdev, PF settings, VFIO viability."""
    why = netdev.capture_netdev(ctx, cand, res, required=False)
    if why is not None:
        return why
    netdev.capture_pf(ctx, cand, res, req, netdev_mac=False)
    group = drivers.check_vfio(ctx.sysfs, cand.bdf, ctx.cfg.allow_noiommu)
    res.vfio_group = group.group
    res.device_node = group.node(ctx.cfg.vfio_dev_dir)
    return None


def bind_vfio(ctx: "Ctx", res: "Reservation", driver: str = drivers.VFIO) -> None:
    drivers.bind(ctx.sysfs, res.bdf, driver, ctx.cfg.device_timeout, ctx.log)
    faults.point("bound")
    if driver == drivers.VFIO and res.device_node:
        node = res.device_node
        if wait_for(lambda: True if os.path.exists(node) else None,
                    ctx.cfg.device_timeout) is None:
            raise drivers.BindError(f"{res.bdf} is on vfio-pci but {node} did not appear")
        ctx.log.info(f"{res.bdf} is on {driver}; device node {node}")


def unbind_to_original(ctx: "Ctx", res: "Reservation") -> None:
    """Driver as recorded (repairs a stale override too), then the netdev."""
    drivers.restore(ctx.sysfs, res.bdf, res.orig_driver, ctx.cfg.device_timeout)
    ctx.log.info(f"{res.bdf} back on {res.orig_driver}, driver_override cleared")
    faults.point("driver_restored")
    if res.host_ifname:
        link = netdev.bring_home(ctx, res)
        if link is None:
            raise HookError(f"{res.bdf} is back on {res.orig_driver} but its netdev "
                            f"{res.host_ifname} did not reappear")
        netdev.restore_netdev(ctx, res, link)
    netdev.restore_pf_side(ctx, res)


def inject_vfio_nodes(ctx: "Ctx", res: "Reservation") -> None:
    """/dev/vfio/vfio and the group node, made inside the container."""
    from .. import devnodes
    assert ctx.container is not None and res.device_node
    for host in (os.path.join(ctx.cfg.vfio_dev_dir, "vfio"), res.device_node):
        path = "/dev/vfio/" + os.path.basename(host)
        devnodes.add_node(ctx.container, host, path, ctx.cfg.cgroup_root)
        ctx.log.info(f"created {path} in the container")


class VfioMode(Mode):
    name = "vfio"
    needs_netns = False

    def prepare(self, ctx: "Ctx", cand: "Candidate", res: "Reservation",
                req: "NetworkRequest") -> Optional[str]:
        return capture_for_bind(ctx, cand, res, req)

    def attach(self, ctx: "Ctx", res: "Reservation", req: "NetworkRequest",
               netns_fd: Optional[int]) -> None:
        netdev.apply_pf_side(ctx, res, req)
        bind_vfio(ctx, res)
        if ctx.inject_nodes and ctx.container is not None and res.device_node:
            inject_vfio_nodes(ctx, res)

    def detach(self, ctx: "Ctx", res: "Reservation") -> None:
        unbind_to_original(ctx, res)


MODE = VfioMode()
