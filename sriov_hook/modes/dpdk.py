"""dpdk mode: a VF on a userspace driver plus hugepages, for testpmd-style apps.

attach:  PF-side settings (DPDK VFs still get MAC/VLAN from the PF) ->
         bind to the pool's driver -> free hugepages on the VF's NUMA node
         (only the shortfall is reserved, and recorded) -> in the container:
         /dev/vfio nodes (+ cgroup v1 access), hugetlbfs at /dev/hugepages,
         and /run/sriov-hook/<ifname>.json describing the VF
release: the journal backwards: exactly the hugepages this reservation
         added released -> kernel driver back -> netdev name/MTU/state ->
         PF-side settings restored
"""
from __future__ import annotations

import errno
import json
import os
from typing import TYPE_CHECKING, Any, Dict, Optional

from .. import drivers, faults, hostdev, journal, pfside
from .base import Mode
from . import vfio

if TYPE_CHECKING:
    from dpdk.hugepages import Accounting

    from .. import rootfs
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


def accounting(ctx: "Ctx") -> "Accounting":
    """Hugepage counts changed under the lock and ledger that sriov-dpdk's
    reserve/release share (state_dir/dpdk, as ``sriov-dpdk --config``)."""
    from dpdk.hugepages import Accounting
    return Accounting(_hugepages(ctx), os.path.join(ctx.cfg.state_dir, "dpdk"),
                      ctx.cfg.lock_timeout)


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
        why = hostdev.capture(ctx, cand, res, required=False)
        if why is None:
            pfside.capture(ctx, cand, res, req, mac_on_netdev_ok=False)
        return why

    def attach(self, ctx: "Ctx", res: "Reservation", req: "NetworkRequest",
               netns_fd: Optional[int]) -> None:
        pool = ctx.cfg.pool(res.pool)
        vfio.bind_userspace(ctx, res, req, pool.driver)
        self._reserve_hugepages(ctx, res, pool.hugepages_kb, pool.hugepage_kb)
        if ctx.container is not None and ctx.container.state.pid is not None:
            self._equip_container(ctx, res, req, pool.hugepage_kb)

    def _reserve_hugepages(self, ctx: "Ctx", res: "Reservation", amount_kb: int,
                           page_kb: int) -> None:
        if amount_kb <= 0:
            return
        node = _node(ctx, res.bdf)
        pages = -(-amount_kb // page_kb)
        # The claim's name is recorded first: whatever point a crash comes at,
        # the ledger under that name says what a replay has to give back.
        claim = f"{res.bdf}@{res.created:.6f}"
        entry = journal.record(ctx, res, "hugepages", size_kb=page_kb, node=node, pages=pages,
                               claim=claim, added=0)
        added = accounting(ctx).claim(claim, pages, page_kb, node)
        journal.update(ctx, res, entry, added=added)
        journal.done("hugepages")
        ctx.log.info(f"hugepages: {pages} x {page_kb}kB wanted on node {node}; added {added}")

    def _equip_container(self, ctx: "Ctx", res: "Reservation", req: "NetworkRequest",
                         page_kb: int) -> None:
        # Every path below the rootfs is the image's: rootfs.Root resolves
        # them inside it and follows no symlink (README, "Reliability").
        from .. import mountns, rootfs
        assert ctx.container is not None
        container = ctx.container
        if res.device_node and not _spec_has_node(container.spec, res.device_node):
            # Not already given by the engine (a CDI device lists the node in
            # the spec; on cgroup v2 the hook could not allow it anyway).
            vfio.inject_vfio_nodes(ctx, res)
        in_ns_root = rootfs.in_namespace_path(container)
        info = json.dumps(self.info(ctx, res, req), indent=2).encode()
        huge = res.step("hugepages") is not None

        def inside() -> str:
            with rootfs.Root.open(in_ns_root) as root:
                if huge:
                    root.makedirs(HUGE_DIR)
                    root.mount(HUGE_DIR, "nodev", "hugetlbfs", 0, f"pagesize={page_kb}k")
                run = _info_dir(root)
                root.write_file(f"{run}/{res.ifname}.json", info)
                return run

        run = mountns.run_in(container.state.pid or 0, inside, ctx.cfg.device_timeout)
        faults.point("equipped")
        ctx.log.info(f"container got {HUGE_DIR if huge else 'no hugetlbfs'} and "
                     f"{run}/{res.ifname}.json")

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
                "hugepages": _pages_info(res.step("hugepages")), "hugetlbfs": HUGE_DIR}


def _info_dir(root: "rootfs.Root") -> str:
    """/run/sriov-hook as a tmpfs of the hook's own, in the container. On a
    read-only rootfs without it: a tmpfs on /run if the image keeps nothing
    there, else the runtime's writable /dev tmpfs (/dev/sriov-hook). A symlink
    on the way is refused, never followed (rootfs.RootfsError). Runs in the
    forked child: rootfs is imported already, this only looks it up."""
    from ..rootfs import MS_NODEV, MS_NOEXEC, MS_NOSUID, RootfsError
    flags, opts = MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=755"
    run = INFO_DIR
    try:
        root.makedirs(run)
    except RootfsError as err:
        if err.errno != errno.EROFS:
            raise
        if root.is_empty_dir(os.path.dirname(INFO_DIR)):
            root.mount(os.path.dirname(INFO_DIR), "tmpfs", "tmpfs", flags, opts)
        else:
            run = INFO_FALLBACK
        root.makedirs(run)
    if not root.is_mount_point(run):
        root.mount(run, "tmpfs", "tmpfs", flags, opts)
    return run


def _spec_has_node(spec: Dict[str, Any], host_node: str) -> bool:
    """Does the spec's linux.devices already list the VF's group node?"""
    linux = spec.get("linux")
    devices = linux.get("devices") if isinstance(linux, dict) else None
    name = "/dev/vfio/" + os.path.basename(host_node)
    return isinstance(devices, list) and any(
        isinstance(d, dict) and d.get("path") == name for d in devices)


def _pages_info(step: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    return None if step is None else {k: v for k, v in step.items() if k != "kind"}


def undo_hugepages(ctx: "Ctx", res: "Reservation", step: Dict[str, Any]) -> None:
    """Give back the pages this reservation added, once: the ledger drops the
    claim with the pages, so a replay finds nothing left to give."""
    acct = accounting(ctx)
    if "claim" not in step:   # a record from before claims: its own count is all there is
        if step.get("added"):
            total = acct.remove_unclaimed(step["added"], step["size_kb"], step["node"])
            ctx.log.info(f"hugepages: gave back {step['added']} pages; node total now {total}")
        return
    given = acct.release(step["claim"])
    if given is None:
        ctx.log.info(f"hugepages: claim {step['claim']} was given back already")
    else:
        ctx.log.info(f"hugepages: gave back {given} pages of claim {step['claim']}")


MODE = DpdkMode()
