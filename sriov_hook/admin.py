"""Operator commands: status and gc."""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Dict, List, Optional

from . import faults, owners
from . import netns as nsmod
from .context import Ctx
from .errors import HookError, SysfsError
from .hook import reclaim_status
from .reservations import ATTACHED, Reservation

STALE_TMP_SECONDS = 60.0


def status(ctx: Ctx, where: bool = True) -> Dict[str, Any]:
    """A row per VF of every pool. ``where=False`` skips looking for each held VF
    (a netlink socket in its owner's netns): the metrics need only the counts."""
    rows: List[Dict[str, Any]] = []
    seen = set()
    for pool in ctx.cfg.pools.values():
        try:
            cands = list(ctx.inventory.candidates(pool))
        except SysfsError as err:
            rows.append({"pool": pool.name, "error": str(err)})
            continue
        for cand in cands:
            if cand.bdf in seen:
                continue
            seen.add(cand.bdf)
            try:
                res = ctx.store.read(cand.bdf)
                state = "reserved" if res is not None else "free"
            except HookError:
                res, state = None, "corrupt"
            driver = ctx.sysfs.driver(cand.bdf)
            rows.append({
                "pci": cand.bdf, "pf": cand.pf_ifname or cand.pf_bdf,
                "vf_index": cand.index, "pool": pool.name, "mode": pool.mode,
                "netdev": ctx.sysfs.netdev(cand.bdf) or (res.host_ifname if res else None),
                "driver": driver, "state": state,
                "iommu_group": ctx.sysfs.iommu_group(cand.bdf),
                "owner": res.owner if res else None,
                "interface": res.ifname if res else None,
                "phase": res.phase if res else None,
                "where": _where(ctx, cand.bdf, res, driver) if where else None,
            })
    return {"vfs": rows}


def _where(ctx: Ctx, bdf: str, res: Optional[Reservation], driver: Optional[str]) -> str:
    """Where the VF really is, looked at, not taken from its record."""
    from . import drivers, hostdev
    if driver in drivers.USERSPACE_DRIVERS:
        return f"on {driver}"
    if res is not None and res.step("move") is not None:
        place, name = hostdev.locate(ctx, res)
        return {"container": f"in {res.owner}'s netns as {name}",
                "host": f"on the host as {name}"}.get(place, "missing")
    if ctx.sysfs.netdev(bdf) is not None:
        return "on the host"
    return "no netdev" if driver else "unbound"


def setup(ctx: Ctx) -> List[str]:
    """Enable the VFs the config asks for (``numvfs``), PF by PF.

    The kernel only accepts a new non-zero count from zero, so a change goes
    through 0, which destroys the PF's VFs: refused while any is reserved.
    """
    from .pci import PfSelector
    done: List[str] = []
    with ctx.store.lock("setup", ctx.cfg.lock_timeout):   # one setup at a time
        for pf_name, want in ctx.cfg.numvfs.items():
            pf, _ = ctx.inventory.resolve_pf(PfSelector(pf_name))
            done.extend(_setup_pf(ctx, pf_name, pf, want))
    return done


def _setup_pf(ctx: Ctx, pf_name: str, pf: str, want: int) -> List[str]:
    from .util import wait_for
    done: List[str] = []
    total = ctx.sysfs.totalvfs(pf)
    if want > total:
        raise HookError(f"PF {pf_name} supports {total} VFs (sriov_totalvfs); "
                        f"the config asks for {want}")
    if want:
        done.extend(_pf_up(ctx, pf_name, pf))
    have = ctx.sysfs.numvfs(pf)
    if have == want:
        done.append(f"{pf_name}: {want} VFs (unchanged)")
        return done
    # A new count goes through 0, which destroys every VF of the PF: hold
    # their locks, so no hook reserves one between the check and the write.
    vfs = [b for b in (ctx.sysfs.virtfn(pf, i) for i in range(have)) if b is not None]
    with contextlib.ExitStack() as held_locks:
        for bdf in vfs:
            held_locks.enter_context(ctx.store.lock(bdf, ctx.cfg.lock_timeout))
        held = [b for b in ctx.store.bdfs() if ctx.sysfs.physfn(b) == pf]
        if held:
            raise HookError(f"PF {pf_name}: VF {held[0]} is reserved; release it before "
                            f"changing the VF count")
        path = ctx.sysfs.dev(pf, "sriov_numvfs")
        if have:
            ctx.sysfs.write(path, "0")
        ctx.sysfs.write(path, str(want))
    if want and wait_for(lambda: ctx.sysfs.virtfn(pf, want - 1), ctx.cfg.device_timeout) is None:
        raise HookError(f"PF {pf_name}: VF {want - 1} did not appear")
    ctx.log.info(f"setup: PF {pf_name} ({pf}) now has {want} VFs (was {have})")
    done.append(f"{pf_name}: {want} VFs (was {have})")
    return done


def _pf_up(ctx: Ctx, pf_name: str, pf: str) -> List[str]:
    """VFs pass no traffic while their PF is down (igb's VFs even fail their
    reset handshake if created then): bring the PF up first."""
    name = ctx.sysfs.netdev(pf)
    link = ctx.host.link(name) if name else None
    if link is None or link.up:
        return []
    ctx.host.set_link(link.index, state="up")
    ctx.log.info(f"setup: PF {pf_name} ({name}) was down; brought it up")
    return [f"{pf_name}: PF {name} was down; brought it up"]


def forget(ctx: Ctx, text: str) -> str:
    """Drop the record of a VF that is gone for good (its PF removed, its
    NIC replaced): only once sysfs confirms the device does not exist, since
    a record is what keeps a VF whose undo is pending from being handed out."""
    from .pci import normalize_bdf
    try:
        bdf = normalize_bdf(text)
    except ValueError as err:
        raise HookError(f"forget: {err}") from None
    with ctx.store.lock(bdf, ctx.cfg.lock_timeout):
        if ctx.sysfs.device_exists(bdf):
            raise HookError(f"forget: {bdf} still exists; 'sriov-hook gc' (or poststop) "
                            f"releases its record and undoes what it records")
        if not ctx.store.is_reserved(bdf):
            return f"forget: nothing to do: no record for {bdf}"
        try:
            res = ctx.store.read(bdf)
        except HookError:
            res = None   # unreadable: dropping it is the point
        if res is not None and res.pin:
            nsmod.unpin(res.pin)
        huge = res.step("hugepages") if res is not None else None
        if huge is not None:   # the pages it added are real, whatever became of the VF
            from .modes.dpdk import undo_hugepages
            undo_hugepages(ctx, res, huge)   # type: ignore[arg-type]
        ctx.store.delete(bdf)
    owner = f" (owner {res.owner}, pool {res.pool})" if res is not None else ""
    ctx.log.info(f"forget: dropped the record of {bdf}{owner}: the device does not exist")
    return f"forget: dropped the record of {bdf}{owner}"


def format_status(data: Dict[str, Any]) -> str:
    cols = ("pci", "pf", "vf_index", "pool", "mode", "netdev", "driver", "state", "where",
            "owner")
    table = [list(cols)]
    errors = []
    for row in data["vfs"]:
        if "error" in row:
            errors.append(f"pool {row['pool']}: {row['error']}")
            continue
        owner = row["owner"]
        state = row["state"] if row.get("phase") in (None, ATTACHED) else row["phase"]
        table.append([str(row[c]) if row[c] is not None else "-" for c in cols[:7]] +
                     [state, row["where"],
                      (owner[:12] + f" ({row['interface']})") if owner else "-"])
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table]
    free = sum(1 for r in data["vfs"] if r.get("state") == "free")
    lines.append(f"{free} free of {len(table) - 1} VFs")
    return "\n".join(lines + errors)


def gc(ctx: Ctx) -> Dict[str, int]:
    """Release records nobody holds any more (owner gone, hook died midway,
    earlier boot); drop orphan pins and temp files. VFs a hook is working
    on right now are left alone, and pins are only removed under the lock of
    their VF, so gc never races a prestart."""
    stats = {"checked": 0, "released": 0, "failed": 0, "pins_removed": 0, "tmp_removed": 0,
             "claims_freed": 0}
    for bdf, res, err in list(ctx.store.all()):
        stats["checked"] += 1
        if res is None:
            if _from_earlier_boot(ctx.store.record_path(bdf)):
                # Torn by the power loss that ended that boot: it describes
                # nothing that still exists, like any earlier-boot record.
                ctx.log.warning(f"gc: {err}; written before this boot: dropping it")
                ctx.store.delete(bdf)
                stats["released"] += 1
            else:
                ctx.log.warning(f"gc: {err}; leaving it for an operator")
            continue
        outcome = reclaim_status(ctx, bdf, "gc")
        if outcome == "released":
            stats["released"] += 1
        elif outcome == "failed":
            stats["failed"] += 1
    stats["claims_freed"] = _release_orphan_claims(ctx)
    faults.point("gc_records_done")
    for name in _listdir(ctx.store.pin_dir):
        fd = ctx.store.try_lock(name)
        if fd is None:
            continue
        try:
            if not ctx.store.is_reserved(name):
                nsmod.unpin(os.path.join(ctx.store.pin_dir, name))
                stats["pins_removed"] += 1
        finally:
            ctx.store.unlock(fd)
    for path in stale_tmp(ctx):
        try:
            os.unlink(path)
            stats["tmp_removed"] += 1
        except FileNotFoundError:
            pass
    return stats


def _orphan_claims(ctx: Ctx) -> List[str]:
    """Hugepage claims (dpdk mode's ledger) that no record names: a record
    dropped by hand, or a hook killed between claiming and recording."""
    if not os.path.exists(os.path.join(ctx.cfg.state_dir, "dpdk", "hugepages.json")):
        return []
    from .modes.dpdk import accounting
    out = []
    for key in accounting(ctx).claims():
        bdf = key.split("@", 1)[0]
        try:
            res = ctx.store.read(bdf)
        except HookError:
            continue   # unreadable: an operator's call, as for the record itself
        step = res.step("hugepages") if res is not None else None
        if step is None or step.get("claim") != key:
            out.append(key)
    return out


def _release_orphan_claims(ctx: Ctx) -> int:
    from .modes.dpdk import accounting
    released = 0
    for key in _orphan_claims(ctx):
        fd = ctx.store.try_lock(key.split("@", 1)[0])
        if fd is None:
            continue   # a hook is attaching or releasing that VF right now
        try:
            if key in _orphan_claims(ctx):
                given = accounting(ctx).release(key)
                ctx.log.info(f"gc: hugepage claim {key} had no record; gave back {given} pages")
                released += 1
        finally:
            ctx.store.unlock(fd)
    return released


def _from_earlier_boot(path: str) -> bool:
    try:
        return os.stat(path).st_mtime < owners.boot_time()
    except FileNotFoundError:
        return False


def stale_tmp(ctx: Ctx) -> List[str]:
    """Temp records whose writer is dead (or that are old): a crash mid-write."""
    out = []
    now = time.time()
    for name in _listdir(ctx.store.rec_dir):
        if not name.endswith(".tmp"):
            continue
        path = os.path.join(ctx.store.rec_dir, name)
        pid = name.rsplit(".", 2)[-2]
        try:
            old = now - os.stat(path).st_mtime > STALE_TMP_SECONDS
        except FileNotFoundError:
            continue
        if old or not (pid.isdigit() and os.path.exists(f"/proc/{pid}")):
            out.append(path)
    return out


def check(ctx: Ctx) -> List[str]:
    """Everything inconsistent, described; changes nothing."""
    problems: List[str] = []
    pins = set()
    for bdf, res, err in ctx.store.all():
        if res is None:
            problems.append(f"{bdf}: {err}")
            continue
        who = f"{bdf} (owner {res.owner}, {res.mode})"
        if res.boot_id != owners.boot_id():
            problems.append(f"{who}: record from an earlier boot; 'sriov-hook gc' drops it")
            continue
        if res.phase != ATTACHED:
            problems.append(f"{who}: left {res.phase} by a hook that died, or being worked on "
                            f"now; the next hook that needs it or 'sriov-hook gc' finishes it")
        elif not owners.owner_alive(res):
            problems.append(f"{who}: owner is gone; 'sriov-hook gc' will release it")
        elif res.mode in ("netdev", "kata"):
            problems.extend(_misplaced(ctx, res, who))
        if res.pin:
            pins.add(os.path.basename(res.pin))
            if res.mode in ("netdev", "kata") and not nsmod.is_pinned(res.pin):
                problems.append(f"{who}: its netns pin {res.pin} is missing")
            elif nsmod.is_pinned(res.pin) and res.netns_id and \
                    tuple(nsmod.identity(res.pin)) != tuple(res.netns_id):
                problems.append(f"{who}: its pin holds a different netns than recorded")
    for name in _listdir(ctx.store.pin_dir):
        if name not in pins:
            problems.append(f"{os.path.join(ctx.store.pin_dir, name)}: pin without a reservation")
    for path in stale_tmp(ctx):
        problems.append(f"{path}: temp record left by a crashed hook")
    for key in _orphan_claims(ctx):
        problems.append(f"hugepage claim {key}: no record holds it; 'sriov-hook gc' gives "
                        f"its pages back")
    for row in status(ctx, where=False)["vfs"]:   # held VFs: _misplaced looked already
        if "error" in row:
            problems.append(f"pool {row['pool']}: {row['error']}")
            continue
        if row["state"] == "free":
            problems += free_vf_problems(ctx, row)
    return problems


def free_vf_problems(ctx: Ctx, row: Dict[str, Any]) -> List[str]:
    """Why a free VF (a status() row) could not be handed out as its pool's mode needs."""
    from . import drivers
    pci, mode = row["pci"], row["mode"]
    out = []
    override = ctx.sysfs.driver_override(pci)
    if override is not None:
        out.append(f"{pci}: free but driver_override is still {override!r}")
    if mode in ("netdev", "kata") and row["driver"] in drivers.USERSPACE_DRIVERS:
        out.append(f"{pci}: free in {mode} pool {row['pool']} but bound to {row['driver']}")
    elif mode in ("netdev", "kata") and row["netdev"] is None:
        out.append(f"{pci}: free in {mode} pool {row['pool']} but has no netdev on the host")
    return out


def _misplaced(ctx: Ctx, res: Reservation, who: str) -> List[str]:
    """A held VF must be in its owner's netns: the netdev found there must be
    this VF (by PCI address, or by the identity the move recorded)."""
    from . import drivers, hostdev
    if res.mode == "kata" and ctx.sysfs.driver(res.bdf) in drivers.USERSPACE_DRIVERS:
        return []   # the VM runtime took it into its guest: that is where it belongs
    place, name = hostdev.locate(ctx, res)
    if place == "container":
        return []
    found = f"it is on the host as {name}" if place == "host" else "it is nowhere to be found"
    return [f"{who}: its record says it is in {res.owner}'s netns as {res.ifname}, but {found}"]


def _listdir(path: str) -> List[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []
