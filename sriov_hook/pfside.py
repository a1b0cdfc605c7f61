"""PF-side VF settings (``ip link set <pf> vf N ...``), keyed by the PF's PCI address.

Shared by every mode: a VF handed to a VM or to DPDK still gets its MAC
and VLAN from the PF. Each change is a journal step (journal.py):

* ``vf_settings``: VLAN/QoS, spoofchk, trust, rate, link state; undo puts
  back the recorded values of exactly the keys that were set.
* ``admin_mac``: the requested MAC as the VF's *administrative* MAC. Real
  PF drivers then refuse MAC changes asked for by the VF itself (igb: any,
  ixgbe: a different one, unless the VF is trusted), so the MAC is never
  set on the VF netdev directly. Drivers that pass it on at once
  (i40e/iavf, mlx5) are waited for; the others (igb, ixgbe: "Reload the VF
  driver") get ``reprobe``: the VF's kernel driver is unbound and probed
  again, which makes it read its MAC from the PF.
* Undo of ``admin_mac`` clears the admin MAC (a zero MAC, which igb and
  ixgbe accept since Linux 4.18), then gives the VF netdev its original
  MAC back, which the VF reports to the PF: ``ip link show <pf>`` then
  lists the VF exactly as before.

The PF is found by PCI address every time: its netdev name may change
while a container holds the VF, and a PF that is gone keeps the VF's
record (its PF side may still carry a tenant's settings).

VF index 0 is a real VF; indices are compared with ``is not None``.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Dict, Optional

from . import drivers, hostdev, journal
from .config import VfSettings
from .errors import (DeviceNotFound, InvalidArgument, LinkNotFound, NotSupported, PfGone,
                     Refused, VerifyError)
from .netlink import Link, Netlink, VfInfo
from .util import wait_for

if TYPE_CHECKING:
    from .context import Ctx
    from .inventory import Candidate
    from .request import NetworkRequest
    from .reservations import Reservation

ZERO_MAC = "00:00:00:00:00:00"
_VERIFY_TIMEOUT = 1.0  # some drivers (i40e/iavf) apply VF settings asynchronously
# PF drivers whose VFs learn an admin MAC only when their driver resets.
RELOAD_TO_APPLY = frozenset({"igb", "ixgbe"})
# How long other drivers get to pass an admin MAC on by themselves.
PICKUP_GRACE = 1.0


def wanted(settings: VfSettings) -> Dict[str, Any]:
    """Netlink attributes for the settings that were asked for, in a safe order."""
    out: Dict[str, Any] = {}
    if settings.vlan is not None or settings.qos is not None:
        out["vlan"] = (settings.vlan or 0, settings.qos or 0)
    if settings.mac is not None:
        out["mac"] = settings.mac
    if settings.min_tx_rate is not None or settings.max_tx_rate is not None:
        out["rate"] = (settings.min_tx_rate or 0, settings.max_tx_rate or 0)
    for key in ("spoofchk", "trust", "link_state"):
        val = getattr(settings, key)
        if val is not None:
            out[key] = val
    return out


def _current(info: VfInfo, key: str) -> Any:
    if key == "vlan":
        return (info.vlan or 0, info.qos or 0)
    if key == "rate":
        return (info.min_tx_rate or 0, info.max_tx_rate or 0)
    return getattr(info, key)


def _orig_value(orig: VfInfo, key: str) -> Any:
    return wanted(VfSettings(
        mac=orig.mac, vlan=orig.vlan, qos=orig.qos, spoofchk=orig.spoofchk,
        trust=orig.trust, link_state=orig.link_state, min_tx_rate=orig.min_tx_rate,
        max_tx_rate=orig.max_tx_rate)).get(key)


# -- finding the PF ---------------------------------------------------------------
def pf_link(ctx: "Ctx", pf_bdf: str) -> Link:
    """The PF's netdev, found by PCI address."""
    name = ctx.sysfs.netdev(pf_bdf) if ctx.sysfs.device_exists(pf_bdf) else None
    link = ctx.host.link(name) if name is not None else None
    if link is None:
        raise PfGone(f"PF {pf_bdf} has no netdev on the host (removed, or its driver unbound)")
    return link


# -- prepare: what the PF can do, and what the VF is like now -----------------------
def capture(ctx: "Ctx", cand: "Candidate", res: "Reservation", req: "NetworkRequest",
            mac_on_netdev_ok: bool) -> None:
    """Record the VF's PF-side settings into ``res.orig_vf`` and fail before
    anything changes if the PF cannot do what is asked.

    ``mac_on_netdev_ok``: without VF ops on the PF a MAC can still go on
    the VF's own netdev (modes that keep the netdev); other settings can't.
    """
    pf: Optional[Link]
    try:
        pf = pf_link(ctx, cand.pf_bdf)
    except PfGone:
        pf = None
    orig = ctx.host.vf_info(pf.index, cand.index) if pf is not None else None
    res.orig_vf = orig.to_json() if orig is not None else None
    attrs = wanted(req.vf)
    if orig is None and mac_on_netdev_ok:
        attrs.pop("mac", None)
    if attrs and orig is None:
        names = ", ".join(sorted(attrs))
        raise NotSupported(f"PF {pf.name if pf else cand.pf_bdf} reports no VF settings over netlink "
                           f"(not an SR-IOV PF driver?); cannot set {names} on VF {cand.index}")


def has_vf_ops(res: "Reservation") -> bool:
    return res.orig_vf is not None


# -- attach -------------------------------------------------------------------------
def apply(ctx: "Ctx", res: "Reservation", req: "NetworkRequest") -> None:
    """The requested PF-side settings, each read back; the admin MAC last."""
    if not has_vf_ops(res):
        return
    attrs = wanted(req.vf)
    mac = attrs.pop("mac", None)
    if not attrs and mac is None:
        return
    pf = pf_link(ctx, res.pf_bdf)
    if attrs:
        journal.record(ctx, res, "vf_settings", keys=sorted(attrs))
        _set(ctx, pf, res.vf_index, attrs)
        journal.done("vf_settings")
    if mac is not None:
        journal.record(ctx, res, "admin_mac", mac=mac)
        _set(ctx, pf, res.vf_index, {"mac": mac})
        journal.done("admin_mac")


def _set(ctx: "Ctx", pf: Link, vf: int, attrs: Dict[str, Any]) -> None:
    for key, val in attrs.items():
        ctx.host.set_vf(pf.index, vf, **{key: val})
        ctx.log.info(f"PF {pf.name} VF {vf}: set {key}={val}")
    _verify(ctx.host, pf.index, vf, attrs)


def _verify(nl: Netlink, pf_index: int, vf: int, attrs: Dict[str, Any]) -> None:
    deadline = time.monotonic() + _VERIFY_TIMEOUT
    while True:
        info = nl.vf_info(pf_index, vf)
        wrong = [k for k, v in attrs.items() if info is None or _current(info, k) != v]
        if not wrong:
            return
        if time.monotonic() >= deadline:
            got = {k: _current(info, k) for k in wrong} if info else "nothing"
            raise VerifyError(f"VF {vf} settings did not read back: wanted "
                              f"{ {k: attrs[k] for k in wrong} }, got {got}")
        time.sleep(0.05)


def pickup(ctx: "Ctx", res: "Reservation") -> None:
    """Make the VF's kernel netdev carry the admin MAC just set (modes that
    hand over the netdev). Never sets the MAC on the netdev itself."""
    step = res.step("admin_mac")
    if step is None:
        return
    mac = step["mac"]
    link = hostdev.host_link(ctx, res.bdf)
    if link is None:
        raise DeviceNotFound(f"VF {res.bdf} has no netdev on the host")
    if (link.mac or "").lower() == mac:
        return
    if ctx.sysfs.driver(res.pf_bdf) not in RELOAD_TO_APPLY:
        if wait_for(lambda: _carries(ctx, res.bdf, mac), PICKUP_GRACE) is not None:
            ctx.log.info(f"{res.bdf}: its driver took the admin MAC {mac} by itself")
            return
    driver = ctx.sysfs.driver(res.bdf)
    if driver is None:
        raise DeviceNotFound(f"VF {res.bdf} is on no driver: cannot reload it")
    journal.record(ctx, res, "reprobe", driver=driver)
    link = reprobe(ctx, res, driver)
    if (link.mac or "").lower() != mac:
        raise VerifyError(f"VF {res.bdf} ({link.name}) came back from {driver} with MAC "
                          f"{link.mac}, not the admin MAC {mac}")
    journal.done("reprobe")


def _carries(ctx: "Ctx", bdf: str, mac: str) -> Optional[Link]:
    link = hostdev.host_link(ctx, bdf)
    return link if link is not None and (link.mac or "").lower() == mac else None


def reprobe(ctx: "Ctx", res: "Reservation", driver: str) -> Link:
    """Unbind and probe the VF's kernel driver; its netdev, found again by
    PCI address once udev is done with it."""
    drivers.reprobe(ctx.sysfs, res.bdf, driver, ctx.cfg.device_timeout)
    link = hostdev.wait_netdev(ctx, res.bdf)
    if link is None:
        raise DeviceNotFound(f"VF {res.bdf}: no netdev came back within "
                             f"{ctx.cfg.device_timeout:g}s of reloading {driver}")
    ctx.log.info(f"reloaded {driver} on {res.bdf}: netdev {link.name}, MAC {link.mac}")
    return link


# -- undo -------------------------------------------------------------------------
def undo_settings(ctx: "Ctx", res: "Reservation", step: Dict[str, Any]) -> None:
    """Put back the recorded value of every key this step set. Idempotent."""
    if res.orig_vf is None:
        return
    orig = VfInfo.from_json(res.orig_vf)
    pf = pf_link(ctx, res.pf_bdf)
    now = ctx.host.vf_info(pf.index, res.vf_index)
    if now is None:
        raise PfGone(f"PF {pf.name} ({res.pf_bdf}) no longer reports VF {res.vf_index}")
    for key in step["keys"]:
        target = _orig_value(orig, key)
        if target is None or _current(now, key) == target:
            continue
        ctx.host.set_vf(pf.index, res.vf_index, **{key: target})
        ctx.log.info(f"PF {pf.name} VF {res.vf_index}: restored {key}={target}")


def undo_admin_mac(ctx: "Ctx", res: "Reservation", step: Dict[str, Any]) -> None:
    """Clear the admin MAC, then give the VF netdev its own MAC back.

    Also when the step was recorded but not carried out: clearing is then a
    no-op for the admin flag, and re-setting the netdev's MAC makes the VF
    report it to the PF again (igb drops the VF's MAC filter on a clear).
    """
    pf = pf_link(ctx, res.pf_bdf)
    vf = res.vf_index
    cleared = _clear(ctx, pf, vf)
    link = hostdev.host_link(ctx, res.bdf, (res.host_ifname,)) if res.host_ifname else None
    if res.host_ifname and link is None:
        raise LinkNotFound(f"VF {res.bdf}'s netdev ({res.host_ifname}) is not on the host: "
                           f"cannot give it its MAC back; its record is kept")
    if link is not None and res.orig_mac:
        try:
            hostdev.set_mac(ctx, link, res.orig_mac)
        except Refused:
            if cleared:
                raise
            # The driver kept its admin MAC: make the original MAC the admin
            # one and let the VF driver read it, as at attach.
            _set(ctx, pf, vf, {"mac": res.orig_mac})
            reprobe(ctx, res, ctx.sysfs.driver(res.bdf) or res.orig_driver or "")
            hostdev.restore(ctx, res)
    orig_pf_mac = (res.orig_vf or {}).get("mac")
    if orig_pf_mac and orig_pf_mac not in (ZERO_MAC, (res.orig_mac or "").lower()):
        # A distinct admin MAC was there before us (not the VF's own): back it goes.
        _set(ctx, pf, vf, {"mac": orig_pf_mac})
    ctx.log.info(f"PF {pf.name} VF {vf}: admin MAC {step['mac']} removed; "
                 f"netdev MAC {res.orig_mac}")


def _clear(ctx: "Ctx", pf: Link, vf: int) -> bool:
    try:
        ctx.host.set_vf(pf.index, vf, mac=ZERO_MAC)
        return True
    except (NotSupported, InvalidArgument) as err:
        ctx.log.warning(f"PF {pf.name} VF {vf}: the driver refuses to clear the admin MAC "
                        f"({err}); restoring the original MAC as the admin MAC instead")
        return False


def undo_reprobe(ctx: "Ctx", res: "Reservation", step: Dict[str, Any]) -> None:
    """The VF back on its kernel driver with a netdev (a reload that died
    halfway leaves it unbound)."""
    drivers.restore(ctx.sysfs, res.bdf, step["driver"], ctx.cfg.device_timeout)
    if res.host_ifname and hostdev.wait_netdev(ctx, res.bdf, (res.host_ifname,)) is None:
        raise DeviceNotFound(f"VF {res.bdf} is on {step['driver']} but has no netdev "
                             f"(was {res.host_ifname}); its record is kept")
    hostdev.restore(ctx, res)   # the reload gave it a new name and default MTU

