"""dpdk mode: a VF on a userspace driver plus hugepages, for testpmd-style apps.

attach:  PF-side settings (DPDK VFs still get MAC/VLAN from the PF) ->
         bind to the pool's driver -> free hugepages on the VF's NUMA node
         (only the shortfall is reserved, and recorded) -> in the container:
         /dev/vfio nodes (+ cgroup v1 access), hugetlbfs at /dev/hugepages,
         and /run/sriov-hook/<ifname>.json describing the VF
detach:  kernel driver back, netdev home, PF-side settings restored, and
         exactly the hugepages this reservation added released
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Dict, Optional

from .. import drivers, faults
from .base import Mode
from . import netdev, vfio

if TYPE_CHECKING:
    from ..context import Ctx
    from ..inventory import Candidate
    from ..request import NetworkRequest
    from ..reservations import Reservation

INFO_DIR = "/run/sriov-hook"
INFO_FALLBACK = "/dev/sriov-hook"
HUGE_DIR = "/dev/hugepages"


def _hugepages(ctx: "Ctx"):  # type: ignore[no-untyped-def]
    from dpdk.hugepages import Hugepages
    return Hugepages(ctx.cfg.hugepages_root or ctx.cfg.sysfs_root)


def _node(ctx: "Ctx", bdf: str) -> Optional[int]:
    node = ctx.sysfs.numa_node(bdf)
    hp = _hugepages(ctx)
    return node if node >= 0 and node in hp.nodes() else (0 if hp.nodes() else None)


class DpdkMode(Mode):
    name = "dpdk"
    needs_netns = False

    def prepare(self, ctx: "Ctx", cand: "Candidate", res: "Reservation",
                req: "NetworkRequest") -> Optional[str]:
        pool = ctx.cfg.pool(res.pool)
        if pool.driver == drivers.VFIO:
            return vfio.capture_for_bind(ctx, cand, res, req)
        why = netdev.capture_netdev(ctx, cand, res, required=False)
        if why is None:
            netdev.capture_pf(ctx, cand, res, req, netdev_mac=False)
        return why

    def attach(self, ctx: "Ctx", res: "Reservation", req: "NetworkRequest",
               netns_fd: Optional[int]) -> None:
        pool = ctx.cfg.pool(res.pool)
        netdev.apply_pf_side(ctx, res, req)
        vfio.bind_vfio(ctx, res, pool.driver)
        self._reserve_hugepages(ctx, res, pool.hugepages_kb, pool.hugepage_kb)
        if ctx.container is not None and ctx.container.state.pid is not None:
            self._equip_container(ctx, res, req, pool.hugepage_kb)

    def _reserve_hugepages(self, ctx: "Ctx", res: "Reservation", amount_kb: int,
                           page_kb: int) -> None:
        if amount_kb <= 0:
            return
        hp = _hugepages(ctx)
        node = _node(ctx, res.bdf)
        pages = -(-amount_kb // page_kb)
        missing = max(0, pages - hp.pool(page_kb, node).free)
        # Record first, so a crash right after the kernel grants the pages
        # still lets poststop/gc give them back.
        res.extras["hugepages"] = {"size_kb": page_kb, "node": node, "pages": pages,
                                   "added": missing}
        ctx.store.write(res)
        try:
            hp.add(missing, page_kb, node)
        except Exception:
            res.extras["hugepages"]["added"] = 0
            ctx.store.write(res)
            raise
        faults.point("hugepages")
        ctx.log.info(f"hugepages: {pages} x {page_kb}kB wanted on node {node}; added {missing}")

    def _equip_container(self, ctx: "Ctx", res: "Reservation", req: "NetworkRequest",
                         page_kb: int) -> None:
        from .. import devnodes, mountns
        assert ctx.container is not None
        container = ctx.container
        if res.device_node:
            vfio.inject_vfio_nodes(ctx, res)
        in_ns_root = devnodes.rootfs_path(container)
        info = json.dumps(self.info(ctx, res, req), indent=2).encode()
        huge = res.extras.get("hugepages") is not None

        def inside() -> None:
            if huge:
                target = in_ns_root + HUGE_DIR
                os.makedirs(target, exist_ok=True)
                mountns.mount("nodev", target, "hugetlbfs", 0, f"pagesize={page_kb}k")
            run = in_ns_root + INFO_DIR
            try:
                os.makedirs(run, exist_ok=True)
            except OSError:
                # A read-only rootfs without /run/sriov-hook: a tmpfs on /run
                # if the image keeps nothing there, else the runtime's own
                # writable /dev tmpfs (/dev/sriov-hook).
                base = in_ns_root + "/run"
                if os.path.isdir(base) and not os.listdir(base):
                    mountns.mount("tmpfs", base, "tmpfs",
                                  mountns.MS_NOSUID | mountns.MS_NODEV | mountns.MS_NOEXEC,
                                  "size=64k,mode=755")
                    os.makedirs(run)
                else:
                    run = in_ns_root + INFO_FALLBACK
                    os.makedirs(run, exist_ok=True)
            if not os.path.ismount(run):
                mountns.mount("tmpfs", run, "tmpfs",
                              mountns.MS_NOSUID | mountns.MS_NODEV | mountns.MS_NOEXEC,
                              "size=64k,mode=755")
            with open(os.path.join(run, f"{res.ifname}.json"), "wb") as fh:
                fh.write(info)

        mountns.run_in(container.state.pid or 0, inside, ctx.cfg.device_timeout)
        faults.point("equipped")
        ctx.log.info(f"container got {HUGE_DIR if huge else 'no hugetlbfs'} and "
                     f"{INFO_DIR}/{res.ifname}.json")

    @staticmethod
    def info(ctx: "Ctx", res: "Reservation", req: "NetworkRequest") -> Dict[str, Any]:
        orig_vf = res.orig_vf or {}
        return {"pci": res.bdf, "pf": res.pf_ifname or res.pf_bdf, "vf_index": res.vf_index,
                "driver": ctx.cfg.pool(res.pool).driver,
                "mac": req.vf.mac or orig_vf.get("mac") or res.orig_mac,
                "vlan": req.vf.vlan if req.vf.vlan is not None else orig_vf.get("vlan"),
                "numa_node": ctx.sysfs.numa_node(res.bdf),
                "iommu_group": res.vfio_group,
                "device": "/dev/vfio/" + os.path.basename(res.device_node)
                if res.device_node else None,
                "hugepages": res.extras.get("hugepages"), "hugetlbfs": HUGE_DIR}

    def detach(self, ctx: "Ctx", res: "Reservation") -> None:
        vfio.unbind_to_original(ctx, res)
        huge = res.extras.get("hugepages")
        if huge and huge.get("added"):
            total = _hugepages(ctx).remove(huge["added"], huge["size_kb"], huge["node"])
            ctx.log.info(f"hugepages: gave back {huge['added']} pages; node total now {total}")
            huge["added"] = 0


MODE = DpdkMode()
