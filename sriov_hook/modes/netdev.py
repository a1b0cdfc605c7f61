"""netdev mode (runc, crun, podman): move the VF's kernel netdev into the
container's network namespace, configured; bring it home at poststop.

attach:  PF-side settings -> host-side MAC/MTU -> pin netns ->
         move+rename in one request -> addresses, up, routes (inside)
detach:  find the VF (pinned netns first, then host, by PCI address when
         the kernel reports it) -> move home under its old name ->
         MAC/MTU/up state -> PF-side settings -> unpin
"""
from __future__ import annotations

import binascii
import os
from typing import TYPE_CHECKING, Any, Dict, Optional

from .. import netns as nsmod
from .. import faults, pfside
from ..errors import LinkExists, LinkNotFound, NetlinkError
from ..netlink import Link, Netlink, VfInfo
from ..util import wait_for
from .base import Mode

if TYPE_CHECKING:
    from ..context import Ctx
    from ..inventory import Candidate
    from ..request import NetworkRequest
    from ..reservations import Reservation


def pf_side_attrs(req: "NetworkRequest", has_vf_ops: bool) -> Dict[str, Any]:
    attrs = pfside.wanted(req.vf)
    if not has_vf_ops:
        # Without VF ops on the PF the MAC can still be set on the VF's own
        # netdev (done below); every other setting needs the PF.
        attrs.pop("mac", None)
    return attrs


def capture(ctx: "Ctx", cand: "Candidate", res: "Reservation",
            req: "NetworkRequest") -> Optional[str]:
    """Record the VF netdev's and PF's original state; None if usable."""
    why = capture_netdev(ctx, cand, res, required=True)
    if why is None:
        capture_pf(ctx, cand, res, req)
    return why


def capture_netdev(ctx: "Ctx", cand: "Candidate", res: "Reservation",
                   required: bool) -> Optional[str]:
    """The VF netdev's name, MAC, MTU and state; a reason if it is unusable."""
    res.orig_driver = ctx.sysfs.driver(cand.bdf)
    name = ctx.sysfs.netdev(cand.bdf)
    if name is None:
        return "no netdev on the host (not on a kernel driver, or in another netns)" \
            if required else None
    link = ctx.host.link(name)
    if link is None:
        return f"netdev {name} is not in the host network namespace" if required else None
    addrs = ctx.host.global_addrs(link.index)
    if addrs:
        return f"netdev {name} is in use on the host (addresses {', '.join(addrs)})"
    if ctx.host.routes_via(link.index):
        return f"netdev {name} is in use on the host (routes point at it)"
    res.host_ifname, res.orig_mac, res.orig_mtu, res.orig_up = name, link.mac, link.mtu, link.up
    return None


def capture_pf(ctx: "Ctx", cand: "Candidate", res: "Reservation", req: "NetworkRequest",
               netdev_mac: bool = True) -> None:
    """The PF-side VF settings; fail before anything is written if the PF
    cannot do what is asked."""
    orig = None
    if cand.pf_ifname is not None:
        pf = ctx.host.link(cand.pf_ifname)
        if pf is not None:
            orig = ctx.host.vf_info(pf.index, cand.index)
    res.orig_vf = orig.to_json() if orig is not None else None
    pfside.require_vf_ops(cand.pf_ifname, cand.index, orig,
                          pf_side_attrs(req, orig is not None or not netdev_mac))


def apply_pf_side(ctx: "Ctx", res: "Reservation", req: "NetworkRequest") -> None:
    attrs = pf_side_attrs(req, res.orig_vf is not None)
    if attrs:
        pf = ctx.host.require(res.pf_ifname or "")
        pfside.apply(ctx.host, pf.index, res.vf_index, attrs, ctx.log)
    faults.point("pf_applied")


def restore_pf_side(ctx: "Ctx", res: "Reservation") -> None:
    if res.orig_vf is None or res.pf_ifname is None:
        return
    pf = ctx.host.link(res.pf_ifname)
    if pf is None:
        ctx.log.warning(f"PF {res.pf_ifname} is gone; cannot restore VF {res.vf_index} settings")
        return
    pfside.restore(ctx.host, pf.index, res.vf_index, VfInfo.from_json(res.orig_vf), ctx.log)
    faults.point("pf_restored")


def move_in(ctx: "Ctx", res: "Reservation", req: "NetworkRequest", netns_fd: int) -> None:
    """Pin the container netns, then move the VF there under its new name."""
    link = ctx.host.require(res.host_ifname or "")
    if link.up:
        ctx.host.set_link(link.index, state="down")
    if req.vf.mac is not None:
        ctx.host.set_link(link.index, address=req.vf.mac)
    if req.mtu is not None and req.mtu != link.mtu:
        ctx.host.set_link(link.index, mtu=req.mtu)
    if res.pin and res.netns:
        nsmod.pin(res.netns, res.pin)
        ctx.log.info(f"pinned netns {res.netns} at {res.pin}")
        faults.point("pinned")
    try:
        ctx.host.move(link.index, netns_fd, res.ifname)
    except LinkExists:
        raise LinkExists(f"the container already has an interface named {res.ifname}") from None
    ctx.log.info(f"moved {res.host_ifname} ({res.bdf}) into the container as {res.ifname}")
    faults.point("moved")


def configure_inside(ctx: "Ctx", res: "Reservation", req: "NetworkRequest",
                     netns_fd: int) -> None:
    with Netlink(netns_fd, label=f"container {res.owner}") as ns:
        link = wait_for(lambda: ns.link(res.ifname), ctx.cfg.device_timeout)
        if link is None:
            raise LinkNotFound(f"{res.ifname} did not appear in the container")
        for ip in req.ips:
            ns.add_addr(link.index, str(ip.ip), ip.network.prefixlen)
        ns.set_link(link.index, state="up")
        for route in req.routes:
            ns.add_route(str(route.dst), link.index, str(route.via) if route.via else None)
        if req.gateway is not None:
            default = "0.0.0.0/0" if req.gateway.version == 4 else "::/0"
            ns.add_route(default, link.index, str(req.gateway))
    faults.point("configured")
    ctx.log.info(f"configured {res.ifname}: ips={[str(i) for i in req.ips]} mtu={req.mtu} "
                 f"routes={len(req.routes)} gateway={req.gateway}")


def _find_in(nl: Netlink, res: "Reservation", names: "tuple[Optional[str], ...]") -> Optional[Link]:
    """The VF's link in ``nl``'s namespace: by PCI address if the kernel says,
    else by the names we gave it."""
    for link in nl.links():
        if link.parent == res.bdf:
            return link
    for name in names:
        if name:
            link = nl.link(name)
            if link is not None and link.parent in (None, res.bdf):
                return link
    return None


def _fallback_name(res: "Reservation") -> str:
    # crc32, not hashlib: importing hashlib costs ~3.5 ms on every hook run.
    return f"sv{binascii.crc32(res.bdf.encode()):08x}"


def bring_home(ctx: "Ctx", res: "Reservation") -> Optional[Link]:
    """Move the VF netdev back to the host namespace; return its host link."""
    host_name = res.host_ifname or _fallback_name(res)
    if res.pin and nsmod.is_pinned(res.pin):
        fd = nsmod.open_netns(res.pin)
        try:
            with Netlink(fd, label=f"pinned {res.owner}") as ns:
                link = _find_in(ns, res, (res.ifname, res.host_ifname))
                if link is not None:
                    if link.up:
                        ns.set_link(link.index, state="down")
                    try:
                        ns.move(link.index, ctx.host_netns_fd, host_name)
                    except LinkExists:
                        # Someone took the name on the host meanwhile: come home
                        # under a unique name rather than stay stranded.
                        host_name = _fallback_name(res)
                        ctx.log.warning(f"{res.host_ifname} is taken on the host; "
                                        f"returning {res.bdf} as {host_name}")
                        ns.move(link.index, ctx.host_netns_fd, host_name)
                    ctx.log.info(f"moved {res.ifname} ({res.bdf}) home as {host_name}")
                    faults.point("moved_home")
        finally:
            os.close(fd)

    def at_home() -> Optional[Link]:
        for name in (host_name, res.host_ifname, ctx.sysfs.netdev(res.bdf)):
            if name:
                link = ctx.host.link(name)
                if link is not None and link.parent in (None, res.bdf):
                    return link
        return None

    # A physical VF whose netns died returns asynchronously, maybe as devN:
    # wait for it, bounded.
    link = at_home() or wait_for(at_home, ctx.cfg.device_timeout)
    if link is None:
        return None
    if res.host_ifname and link.name != res.host_ifname:
        try:
            ctx.host.set_link(link.index, state="down")
            ctx.host.set_link(link.index, ifname=res.host_ifname)
            link = ctx.host.require(res.host_ifname)
        except LinkExists:
            ctx.log.warning(f"cannot rename {link.name} back to {res.host_ifname}: name taken")
    return link


def restore_netdev(ctx: "Ctx", res: "Reservation", link: Link) -> None:
    """MAC, MTU and admin state as recorded, set from the host side."""
    if res.orig_mac and (link.mac or "").lower() != res.orig_mac.lower():
        if link.up:
            ctx.host.set_link(link.index, state="down")
            link = ctx.host.require(link.name)
        ctx.host.set_link(link.index, address=res.orig_mac)
    if res.orig_mtu and link.mtu != res.orig_mtu:
        ctx.host.set_link(link.index, mtu=res.orig_mtu)
    if res.orig_up is not None and link.up != res.orig_up:
        ctx.host.set_link(link.index, state="up" if res.orig_up else "down")
    faults.point("netdev_restored")
    ctx.log.info(f"{link.name} ({res.bdf}) restored: mac={res.orig_mac} mtu={res.orig_mtu} "
                 f"up={res.orig_up}")


class NetdevMode(Mode):
    name = "netdev"

    def prepare(self, ctx: "Ctx", cand: "Candidate", res: "Reservation",
                req: "NetworkRequest") -> Optional[str]:
        return capture(ctx, cand, res, req)

    def attach(self, ctx: "Ctx", res: "Reservation", req: "NetworkRequest",
               netns_fd: Optional[int]) -> None:
        assert netns_fd is not None
        apply_pf_side(ctx, res, req)
        move_in(ctx, res, req, netns_fd)
        configure_inside(ctx, res, req, netns_fd)

    def detach(self, ctx: "Ctx", res: "Reservation") -> None:
        return_netdev(ctx, res)


def return_netdev(ctx: "Ctx", res: "Reservation") -> None:
    link = bring_home(ctx, res)
    if link is None:
        raise NetlinkError(f"VF {res.bdf} ({res.host_ifname}) was found neither in the "
                           f"pinned netns nor on the host; its record is kept for gc")
    restore_netdev(ctx, res, link)
    restore_pf_side(ctx, res)
    if res.pin:
        nsmod.unpin(res.pin)
        faults.point("unpinned")


MODE = NetdevMode()
