"""The invariant checker: after any phase of any test, the host must be sane.

* every VF is either free and exactly as it was (name, netns, MAC, MTU,
  admin state, driver, no override), or reserved by exactly one owner and
  present in that owner's namespace only;
* no record points at a dead owner, unless gc has yet to run;
* no pinned netns (nsfs mount) exists without a reservation.
"""
from __future__ import annotations

import json
import os
import subprocess
from typing import Dict, Iterable, List, Optional

from tests.conftest import Sim, addrs, link_info, nsfs_mounts


def vf_driver(sim: Sim, bdf: str) -> Optional[str]:
    """The driver a device of the simulated host is bound to, or None."""
    link = os.path.join(sim.host.sysfs_root, "bus/pci/devices", bdf, "driver")
    try:
        return os.path.basename(os.readlink(link))
    except FileNotFoundError:   # unbound, maybe just now by the simulated kernel
        return None


def _override(sim: Sim, bdf: str) -> str:
    path = os.path.join(sim.host.sysfs_root, "bus/pci/devices", bdf, "driver_override")
    with open(path) as fh:
        return fh.read().strip()


def records(sim: Sim) -> Dict[str, dict]:
    d = os.path.join(sim.host.state_dir, "reservations")
    out = {}
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if name.endswith(".json") and not name.startswith("."):
            with open(os.path.join(d, name)) as fh:
                out[name[:-5]] = json.load(fh)
    return out


def _macs_in(pid_or_ns: str) -> List[str]:
    """MACs of every non-loopback link in a netns (by pin path or pid)."""
    if pid_or_ns.isdigit():
        cmd = ["nsenter", "-t", pid_or_ns, "-n", "ip", "-j", "link"]
    else:
        cmd = ["nsenter", f"--net={pid_or_ns}", "ip", "-j", "link"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return []
    return [l.get("address", "") for l in json.loads(proc.stdout) if l["ifname"] != "lo"]


def check(sim: Sim, live_owners: Optional[Iterable[str]] = None,
          owner_netns: Optional[Dict[str, str]] = None,
          natural: str = "igbvf") -> List[str]:
    """Problems found; empty means every invariant holds.

    ``live_owners``: owners whose container is still alive (None: skip the
    dead-owner check). ``owner_netns``: owner -> netns (pid or path), to
    prove a reserved VF sits in its owner's namespace and nowhere else.
    """
    problems: List[str] = []
    recs = records(sim)
    seen_in: Dict[str, List[str]] = {}
    if owner_netns:
        for owner, ns in owner_netns.items():
            for mac in _macs_in(ns):
                seen_in.setdefault(mac, []).append(owner)
    for vf in sim.vfs:
        rec = recs.get(vf.bdf)
        orig = sim.orig[vf.ifname]
        if rec is None:
            now = link_info(vf.ifname)
            if now is None:
                problems.append(f"{vf.bdf}: free but {vf.ifname} is not on the host")
                continue
            for key in ("address", "mtu"):
                if now[key] != orig[key]:
                    problems.append(f"{vf.bdf}: free but {key} {now[key]} != {orig[key]}")
            if ("UP" in now["flags"]) != ("UP" in orig["flags"]):
                problems.append(f"{vf.bdf}: free but admin state changed")
            if addrs(vf.ifname):
                problems.append(f"{vf.bdf}: free but has addresses")
            if vf_driver(sim, vf.bdf) != natural:
                problems.append(f"{vf.bdf}: free but on driver {vf_driver(sim, vf.bdf)}")
            if _override(sim, vf.bdf) not in ("", "(null)"):
                problems.append(f"{vf.bdf}: free but driver_override={_override(sim, vf.bdf)}")
            holders = seen_in.get(orig["address"], [])
            if holders:
                problems.append(f"{vf.bdf}: free but seen in {holders}")
            continue
        owner = rec["owner"]
        if live_owners is not None and owner not in set(live_owners):
            problems.append(f"{vf.bdf}: reserved by {owner}, whose container is gone")
        if owner_netns and rec["mode"] in ("netdev", "kata"):
            holders = seen_in.get(orig["address"], [])
            if holders not in ([owner], []):
                problems.append(f"{vf.bdf}: reserved by {owner} but seen in {holders}")
            if len(holders) > 1:
                problems.append(f"{vf.bdf}: DOUBLE reservation {holders}")
    pin_dir = os.path.join(sim.host.state_dir, "netns")
    pinned = {m for m in nsfs_mounts() if m.startswith(pin_dir + "/")}
    wanted = {r["pin"] for r in recs.values() if r.get("pin")}
    for extra in sorted(pinned - wanted):
        problems.append(f"{extra}: pinned netns without a reservation")
    return problems


def double_reservations(problems: List[str]) -> int:
    return sum(1 for p in problems if "DOUBLE" in p)
