"""vfio mode (VM runtimes, userspace drivers): bind the VF to vfio-pci.

prepare: vfio-pci loaded, IOMMU or allowed noiommu, viable group, netdev
         idle on the host
attach:  PF side (MAC/VLAN reach the guest from the PF) -> netdev guard ->
         bind -> wait for /dev/vfio/<group> (-> nodes in the container)
release: the journal backwards: back to the recorded driver, override
         cleared -> netdev name/MTU/state -> admin MAC cleared and the
         netdev's own MAC back -> PF settings
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

from .. import binding, drivers, faults, hostdev, pfside
from ..util import wait_for
from .base import Mode

if TYPE_CHECKING:
    from ..context import Ctx
    from ..inventory import Candidate
    from ..request import NetworkRequest
    from ..reservations import Reservation


def capture_for_bind(ctx: "Ctx", cand: "Candidate", res: "Reservation",
                     req: "NetworkRequest") -> Optional[str]:
    """Shared by vfio and dpdk: idle netdev, PF settings, VFIO viability."""
    why = hostdev.capture(ctx, cand, res, required=False)
    if why is not None:
        return why
    pfside.capture(ctx, cand, res, req, mac_on_netdev_ok=False)
    group = drivers.check_vfio(ctx.sysfs, cand.bdf, ctx.cfg.allow_noiommu)
    res.vfio_group = group.group
    res.device_node = group.node(ctx.cfg.vfio_dev_dir)
    return None


def bind_userspace(ctx: "Ctx", res: "Reservation", req: "NetworkRequest",
                   driver: str = drivers.VFIO) -> None:
    """PF side, then the driver; for vfio-pci, wait for the group's node."""
    pfside.apply(ctx, res, req)
    hostdev.guard(ctx, res)
    binding.bind(ctx, res, driver)
    if driver == drivers.VFIO and res.device_node:
        node = res.device_node
        if wait_for(lambda: True if os.path.exists(node) else None,
                    ctx.cfg.device_timeout) is None:
            raise drivers.BindError(f"{res.bdf} is on vfio-pci but {node} did not appear")
        ctx.log.info(f"{res.bdf} is on {driver}; device node {node}")


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
        bind_userspace(ctx, res, req)
        if ctx.inject_nodes and ctx.container is not None and res.device_node:
            inject_vfio_nodes(ctx, res)
            faults.point("equipped")


MODE = VfioMode()
