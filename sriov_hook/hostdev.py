"""The VF's kernel netdev: capture it, prepare it on the host, move it into a
container's network namespace and bring it home.

A VF is found by PCI address (sysfs ``net/`` on the host, the netlink
parent device in other namespaces), or by the ifindex the journal noted;
never by name alone, since names are what containers and udev change.
Journal steps (journal.py):

* ``netdev``: down, MTU (and the MAC, only on PFs without VF ops) on the
  host; undo: name, MAC, MTU and admin state as captured.
* ``pin``: the container's netns bind-mounted from the fd the hook opened,
  so it outlives the container; undo: unmount.
* ``move``: into the netns, renamed in the same request; undo: home under
  its old name.
"""
from __future__ import annotations

import binascii
import os
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence

from . import journal, procnet
from . import netns as nsmod
from .errors import DeviceNotFound, LinkExists, LinkNotFound, NetlinkError, RequestError
from .netlink import Link, Netlink
from .util import wait_for

if TYPE_CHECKING:
    from .context import Ctx
    from .inventory import Candidate
    from .request import NetworkRequest
    from .reservations import Reservation


# -- finding the netdev -------------------------------------------------------------
def host_link(ctx: "Ctx", bdf: str, prefer: Sequence[Optional[str]] = ()) -> Optional[Link]:
    """The VF's netdev in the host netns. ``prefer``: names it was just given
    (tried first: a fake sysfs in tests does not follow renames)."""
    for name in list(prefer) + ctx.sysfs.netdevs(bdf):
        if name:
            link = ctx.host.link(name)
            if link is not None and link.parent in (None, bdf):
                return link
    return None


def wait_netdev(ctx: "Ctx", bdf: str, prefer: Sequence[Optional[str]] = ()) -> Optional[Link]:
    """The VF's host netdev once it exists and udev is done naming it
    (bounded by ``device_timeout``); None if it never came."""
    link = wait_for(lambda: host_link(ctx, bdf, prefer), ctx.cfg.device_timeout)
    if link is None or not ctx.cfg.udev_dir:
        return link
    if not os.path.exists(os.path.join(ctx.cfg.udev_dir, "control")):
        return link   # no udev running: the kernel's name is final
    db = os.path.join(ctx.cfg.udev_dir, "data", f"n{link.index}")
    if wait_for(lambda: True if os.path.exists(db) else None, ctx.cfg.device_timeout) is None:
        raise DeviceNotFound(f"udev did not finish with {link.name} ({bdf}) within "
                             f"{ctx.cfg.device_timeout:g}s")
    return host_link(ctx, bdf, prefer) or link   # the name udev settled on


def set_mac(ctx: "Ctx", link: Link, mac: str) -> None:
    """Set a netdev's MAC (down meanwhile; drivers differ on live changes)."""
    if link.up:
        ctx.host.set_link(link.index, state="down")
    try:
        ctx.host.set_link(link.index, address=mac)
    finally:
        if link.up:
            ctx.host.set_link(link.index, state="up")


def fallback_name(bdf: str) -> str:
    # crc32, not hashlib: importing hashlib costs ~3.5 ms on every hook run.
    return f"sv{binascii.crc32(bdf.encode()):08x}"


# -- prepare: is the netdev usable, and what is it like now ----------------------------
def capture(ctx: "Ctx", cand: "Candidate", res: "Reservation", required: bool) -> Optional[str]:
    """The VF netdev's name, MAC, MTU and state into ``res``; a reason if it
    is unusable (missing when ``required``, or in use on the host)."""
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
    if name in procnet.routed_ifaces():
        return f"netdev {name} is in use on the host (routes point at it)"
    res.host_ifname, res.orig_mac, res.orig_mtu, res.orig_up = name, link.mac, link.mtu, link.up
    return None


# -- netdev step ------------------------------------------------------------------------
def prepare(ctx: "Ctx", res: "Reservation", req: "NetworkRequest", mac: Optional[str]) -> Link:
    """Down, and the MTU asked for, on the host before the move. ``mac``:
    set on the netdev itself (only when the PF has no VF ops). Returns the
    link, for the move."""
    journal.record(ctx, res, "netdev", mac_set=mac is not None)
    link = host_link(ctx, res.bdf)
    if link is None:
        raise LinkNotFound(f"VF {res.bdf} has no netdev on the host")
    if link.up:
        ctx.host.set_link(link.index, state="down")
    if mac is not None:
        ctx.host.set_link(link.index, address=mac)
    if req.mtu is not None and req.mtu != link.mtu:
        ctx.host.set_link(link.index, mtu=req.mtu)
    journal.done("netdev")
    return link


def guard(ctx: "Ctx", res: "Reservation") -> None:
    """Modes that unbind the netdev (vfio, dpdk) change nothing on it, but its
    name, MTU and state must come back with the kernel driver at release."""
    if res.host_ifname:
        journal.record(ctx, res, "netdev", mac_set=False)
        journal.done("netdev")


def undo_netdev(ctx: "Ctx", res: "Reservation", step: Dict[str, Any]) -> None:
    restore(ctx, res, mac=bool(step.get("mac_set")))


def restore(ctx: "Ctx", res: "Reservation", mac: bool = False) -> None:
    """Name, MTU, admin state (and the MAC if ``mac``) as captured; also
    after a driver reload, which makes a new netdev with the kernel's name."""
    if not res.host_ifname:
        return
    link = wait_netdev(ctx, res.bdf, prefer=(res.host_ifname,))
    if link is None:
        raise LinkNotFound(f"VF {res.bdf}'s netdev ({res.host_ifname}) is not on the host; "
                           f"its record is kept")
    if link.name != res.host_ifname:
        try:
            if link.up:
                ctx.host.set_link(link.index, state="down")
            ctx.host.set_link(link.index, ifname=res.host_ifname)
        except LinkExists:
            ctx.log.warning(f"cannot rename {link.name} back to {res.host_ifname}: name taken")
        link = host_link(ctx, res.bdf, (res.host_ifname, link.name)) or link
    if mac and res.orig_mac and (link.mac or "") != res.orig_mac:
        set_mac(ctx, link, res.orig_mac)
    if res.orig_mtu and link.mtu != res.orig_mtu:
        ctx.host.set_link(link.index, mtu=res.orig_mtu)
    if res.orig_up is not None and link.up != res.orig_up:
        ctx.host.set_link(link.index, state="up" if res.orig_up else "down")
    ctx.log.info(f"{res.host_ifname} ({res.bdf}) restored: mtu={res.orig_mtu} up={res.orig_up}")


# -- pin step ------------------------------------------------------------------------------
def pin(ctx: "Ctx", res: "Reservation", netns_fd: int) -> None:
    """Bind-mount the netns from the fd the hook opened (not from a /proc
    path, which pid reuse could point elsewhere by now)."""
    if not res.pin:
        return
    journal.record(ctx, res, "pin", path=res.pin)
    nsmod.pin(f"/proc/self/fd/{netns_fd}", res.pin)
    ctx.log.info(f"pinned netns {res.netns} at {res.pin}")
    journal.done("pin")


def undo_pin(ctx: "Ctx", res: "Reservation", step: Dict[str, Any]) -> None:
    nsmod.unpin(step["path"])


# -- move step -----------------------------------------------------------------------------
def refuse_name_clash(cnl: Netlink, ifname: str) -> None:
    """Before anything moves: the kernel moves a link first and renames it
    after, so a clash would strand the VF in the container."""
    if cnl.link(ifname) is not None:
        raise RequestError(f"the container already has an interface named {ifname}")


def move_in(ctx: "Ctx", res: "Reservation", netns_fd: int, cnl: Netlink, link: Link) -> Link:
    """Move ``link`` (the VF's host netdev, as prepare left it) into the netns."""
    entry = journal.record(ctx, res, "move", ifname=res.ifname, host_name=link.name,
                           host_index=link.index)
    try:
        ctx.host.move(link.index, netns_fd, res.ifname)
    except LinkExists:
        raise LinkExists(f"the container already has an interface named {res.ifname}") from None
    moved = cnl.link(res.ifname)
    if moved is None:
        raise LinkNotFound(f"{res.ifname} did not appear in the container")
    journal.update(ctx, res, entry, index=moved.index, mac=moved.mac)
    ctx.log.info(f"moved {link.name} ({res.bdf}) into the container as {res.ifname}")
    journal.done("move")
    return moved


def _find_moved(ns: Netlink, res: "Reservation", step: Dict[str, Any]) -> Optional[Link]:
    """The VF in a container netns: by PCI parent; else, for netdevs without
    one, by the ifindex the journal noted, with the name it must carry."""
    for link in ns.links():
        if link.parent == res.bdf:
            return link
    candidates = ((step.get("index"), (step["ifname"], step["host_name"])),
                  # the move happened but the rename did not: host name kept
                  (step.get("host_index"), (step["host_name"],)))
    for index, names in candidates:
        if index is None:
            continue
        found = ns.link_by_index(index)
        if found is not None and found.parent in (None, res.bdf) and found.name in names:
            return found
    return None


def locate(ctx: "Ctx", res: "Reservation") -> "tuple[str, Optional[str]]":
    """Where a VF the journal moved into a container really is: ("container",
    name), ("host", name) or ("missing", None). Identity is the PCI parent;
    for netdevs without one, the ifindex, name and MAC the move left."""
    step = res.step("move")
    if step is not None and res.pin and nsmod.is_pinned(res.pin):
        fd = nsmod.open_netns(res.pin)
        try:
            with Netlink(fd, label=f"pinned {res.owner}") as ns:
                link = _find_moved(ns, res, step)
        finally:
            os.close(fd)
        if link is not None and (link.parent == res.bdf or step.get("mac") in (None, link.mac)):
            return "container", link.name
    home = host_link(ctx, res.bdf)
    return ("host", home.name) if home is not None else ("missing", None)


def undo_move(ctx: "Ctx", res: "Reservation", step: Dict[str, Any]) -> None:
    """Home under its old name (a unique one if that is taken meanwhile)."""
    home = res.host_ifname or fallback_name(res.bdf)
    if res.pin and nsmod.is_pinned(res.pin):
        fd = nsmod.open_netns(res.pin)
        try:
            with Netlink(fd, label=f"pinned {res.owner}") as ns:
                link = _find_moved(ns, res, step)
                if link is not None:
                    home = _move_home(ctx, ns, link, res, home)
        finally:
            os.close(fd)
    # A physical VF whose netns died comes back by itself, maybe as devN: wait.
    if wait_netdev(ctx, res.bdf, prefer=(home, res.host_ifname)) is None:
        raise NetlinkError(f"VF {res.bdf} ({res.host_ifname}) was found neither in the "
                           f"pinned netns nor on the host; its record is kept")


def _move_home(ctx: "Ctx", ns: Netlink, link: Link, res: "Reservation", home: str) -> str:
    if link.up:
        ns.set_link(link.index, state="down")
    try:
        ns.move(link.index, ctx.host_netns_fd, home)
    except LinkExists:
        home = fallback_name(res.bdf)
        ctx.log.warning(f"{res.host_ifname} is taken on the host; returning {res.bdf} as {home}")
        ns.move(link.index, ctx.host_netns_fd, home)
    ctx.log.info(f"moved {link.name} ({res.bdf}) home as {home}")
    return home


# -- inside the container (no undo: all of it leaves with the netdev) --------------------------
def configure_inside(ctx: "Ctx", res: "Reservation", req: "NetworkRequest", cnl: Netlink,
                     link: Link) -> None:
    for ip in req.ips:
        cnl.add_addr(link.index, str(ip.ip), ip.network.prefixlen)
    cnl.set_link(link.index, state="up")
    for route in req.routes:
        _route(cnl, str(route.dst), link.index, str(route.via) if route.via else None, False)
    if req.gateway is not None:
        default = "0.0.0.0/0" if req.gateway.version == 4 else "::/0"
        _route(cnl, default, link.index, str(req.gateway), req.replace_default)
    ctx.log.info(f"configured {res.ifname}: ips={[str(i) for i in req.ips]} mtu={req.mtu} "
                 f"routes={len(req.routes)} gateway={req.gateway}")


def _route(cnl: Netlink, dst: str, oif: int, via: Optional[str], replace: bool) -> None:
    try:
        cnl.add_route(dst, oif, via, replace=replace)
    except LinkExists:
        what = "a default route" if dst in ("0.0.0.0/0", "::/0") else f"a route to {dst}"
        hint = " (set replace_default to take its place)" if dst in ("0.0.0.0/0", "::/0") else ""
        raise RequestError(f"the container already has {what}{hint}; not adding "
                           f"{dst}{' via ' + via if via else ''}") from None
