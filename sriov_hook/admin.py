"""Operator commands: status and gc."""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List

from . import netns as nsmod
from . import owners
from .context import Ctx
from .errors import HookError, SysfsError
from .hook import release

STALE_TMP_SECONDS = 60.0


def status(ctx: Ctx) -> Dict[str, Any]:
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
            rows.append({
                "pci": cand.bdf, "pf": cand.pf_ifname or cand.pf_bdf,
                "vf_index": cand.index, "pool": pool.name, "mode": pool.mode,
                "netdev": ctx.sysfs.netdev(cand.bdf) or (res.host_ifname if res else None),
                "driver": ctx.sysfs.driver(cand.bdf), "state": state,
                "iommu_group": ctx.sysfs.iommu_group(cand.bdf),
                "owner": res.owner if res else None,
                "interface": res.ifname if res else None,
            })
    return {"vfs": rows}


def setup(ctx: Ctx) -> List[str]:
    """Enable the VFs the config asks for (``numvfs``), PF by PF.

    The kernel only accepts a new non-zero count from zero, so a change goes
    through 0, which destroys the PF's VFs: refused while any is reserved.
    """
    from .pci import PfSelector
    from .util import wait_for
    done = []
    for pf_name, want in ctx.cfg.numvfs.items():
        pf, _ = ctx.inventory.resolve_pf(PfSelector(pf_name))
        total = ctx.sysfs.totalvfs(pf)
        if want > total:
            raise HookError(f"PF {pf_name} supports {total} VFs (sriov_totalvfs); "
                            f"the config asks for {want}")
        have = ctx.sysfs.numvfs(pf)
        if have == want:
            done.append(f"{pf_name}: {want} VFs (unchanged)")
            continue
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


def format_status(data: Dict[str, Any]) -> str:
    cols = ("pci", "pf", "vf_index", "pool", "mode", "netdev", "driver", "state", "owner")
    table = [list(cols)]
    errors = []
    for row in data["vfs"]:
        if "error" in row:
            errors.append(f"pool {row['pool']}: {row['error']}")
            continue
        owner = row["owner"]
        table.append([str(row[c]) if row[c] is not None else "-" for c in cols[:-1]] +
                     [(owner[:12] + f" ({row['interface']})") if owner else "-"])
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table]
    free = sum(1 for r in data["vfs"] if r.get("state") == "free")
    lines.append(f"{free} free of {len(table) - 1} VFs")
    return "\n".join(lines + errors)


def gc(ctx: Ctx) -> Dict[str, int]:
    """Release records whose owner is gone; drop orphan pins and temp files."""
    stats = {"checked": 0, "released": 0, "failed": 0, "pins_removed": 0, "tmp_removed": 0}
    live_bdfs = set()
    for bdf, res, err in list(ctx.store.all()):
        stats["checked"] += 1
        live_bdfs.add(bdf)
        if res is None:
            ctx.log.warning(f"gc: {err}; leaving it for an operator")
            continue
        if owners.owner_alive(res):
            continue
        ctx.log.info(f"gc: owner {res.owner} of {bdf} is gone; releasing")
        try:
            release(ctx, res, reason="gc")
            stats["released"] += 1
            live_bdfs.discard(bdf)
        except HookError as e:
            ctx.log.error(f"gc: cannot release {bdf}: {e}")
            stats["failed"] += 1
    for name in _listdir(ctx.store.pin_dir):
        if name not in live_bdfs:
            path = os.path.join(ctx.store.pin_dir, name)
            nsmod.unpin(path)
            stats["pins_removed"] += 1
    for path in _stale_tmp(ctx):
        try:
            os.unlink(path)
            stats["tmp_removed"] += 1
        except FileNotFoundError:
            pass
    return stats


def _stale_tmp(ctx: Ctx) -> List[str]:
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
    from . import drivers
    problems: List[str] = []
    pins = set()
    for bdf, res, err in ctx.store.all():
        if res is None:
            problems.append(f"{bdf}: {err}")
            continue
        who = f"{bdf} (owner {res.owner}, {res.mode})"
        if not owners.owner_alive(res):
            problems.append(f"{who}: owner is gone; 'sriov-hook gc' will release it")
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
    for path in _stale_tmp(ctx):
        problems.append(f"{path}: temp record left by a crashed hook")
    for row in status(ctx)["vfs"]:
        if "error" in row:
            problems.append(f"pool {row['pool']}: {row['error']}")
            continue
        if row["state"] != "free":
            continue
        pci, mode = row["pci"], row["mode"]
        override = ctx.sysfs.driver_override(pci)
        if override is not None:
            problems.append(f"{pci}: free but driver_override is still {override!r}")
        if mode in ("netdev", "kata") and row["driver"] in drivers.USERSPACE_DRIVERS:
            problems.append(f"{pci}: free in {mode} pool {row['pool']} but bound to {row['driver']}")
        elif mode in ("netdev", "kata") and row["netdev"] is None:
            problems.append(f"{pci}: free in {mode} pool {row['pool']} but has no netdev on the host")
    return problems


def _listdir(path: str) -> List[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []
