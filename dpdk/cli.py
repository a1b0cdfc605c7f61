"""``sriov-dpdk``: bind VFs to userspace drivers and manage hugepages.

    sriov-dpdk status [--json]
    sriov-dpdk bind [--force] [--noiommu] DRIVER BDF...
    sriov-dpdk unbind [--driver NAME] BDF...
    sriov-dpdk hugepages show [--json]
    sriov-dpdk hugepages reserve SIZE [--node N] [--pagesize 2M|1G]
    sriov-dpdk hugepages release SIZE [--node N] [--pagesize 2M|1G]
    sriov-dpdk hugepages mount DIR [--pagesize 2M|1G]

``--sysfs-root`` (or the hook config's ``sysfs_root`` via ``--config``)
points everything at another sysfs tree, as the hook does.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import TYPE_CHECKING, List, Optional

from sriov_hook.errors import HookError

if TYPE_CHECKING:
    from .devbind import Device

DEFAULT_STATE = "/var/lib/sriov-hook/dpdk"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sriov-dpdk", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="read sysfs_root and state_dir from this hook config")
    ap.add_argument("--sysfs-root", help="sysfs tree to use (default /sys)")
    ap.add_argument("--state-dir", help="where previous drivers and the hugepage ledger and lock "
                                        f"are kept (default {DEFAULT_STATE})")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("status", help="PCI network devices by driver kind")
    st.add_argument("--json", action="store_true")
    b = sub.add_parser("bind", help="bind devices to a userspace driver")
    b.add_argument("--force", action="store_true", help="bind even if the interface is active")
    b.add_argument("--noiommu", action="store_true", help="enable vfio's unsafe noiommu mode")
    b.add_argument("driver")
    b.add_argument("bdfs", nargs="+", metavar="BDF")
    u = sub.add_parser("unbind", help="return devices to their kernel driver")
    u.add_argument("--driver", help="driver to return to (default: the one it had)")
    u.add_argument("bdfs", nargs="+", metavar="BDF")
    h = sub.add_parser("hugepages", help="show, reserve, release or mount hugepages")
    hs = h.add_subparsers(dest="hcmd", required=True)
    hs.add_parser("show").add_argument("--json", action="store_true")
    for name in ("reserve", "release"):
        p = hs.add_parser(name)
        p.add_argument("size")
        p.add_argument("--node", type=int)
        p.add_argument("--pagesize")
    m = hs.add_parser("mount")
    m.add_argument("dir")
    m.add_argument("--pagesize")
    return ap


def _paths(args: argparse.Namespace) -> "tuple[str, str]":
    sysfs_root, state_dir = "/sys", DEFAULT_STATE
    if args.config:
        from sriov_hook import config
        cfg = config.load(args.config)
        sysfs_root, state_dir = cfg.sysfs_root, os.path.join(cfg.state_dir, "dpdk")
    return args.sysfs_root or sysfs_root, args.state_dir or state_dir


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except HookError as err:
        print(f"sriov-dpdk: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"sriov-dpdk: {err.strerror}: {err.filename}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    sysfs_root, state_dir = _paths(args)
    from sriov_hook.sysfs import Sysfs
    fs = Sysfs(sysfs_root)
    if args.cmd == "status":
        from .devbind import mark_active, network_devices
        devs = network_devices(fs)
        mark_active(devs)
        if args.json:
            print(json.dumps({"devices": [d.to_json() for d in devs]}, indent=2))
        else:
            print(_status_text(devs))
        return 0
    if args.cmd in ("bind", "unbind"):
        from .devbind import Binder
        binder = Binder(fs, state_dir)
        if args.cmd == "bind":
            done = binder.bind(args.driver, args.bdfs, force=args.force, noiommu=args.noiommu)
            print(f"bound to {args.driver}: {', '.join(done)}")
        else:
            back = binder.unbind(args.bdfs, args.driver)
            print(", ".join(f"{b} -> {d or 'unbound'}" for b, d in back.items()))
        return 0
    from .hugepages import Accounting, Hugepages, fmt_kb, mount_hugetlbfs, parse_size_kb
    hp = Hugepages(sysfs_root)
    page_kb = parse_size_kb(args.pagesize) if getattr(args, "pagesize", None) else hp.default_size()
    if args.hcmd == "show":
        rows = hp.show()
        if args.json:
            print(json.dumps([r.__dict__ for r in rows], indent=2))
        else:
            print(f"{'node':<6}{'size':>6}{'total':>8}{'free':>8}")
            for r in rows:
                print(f"{'-' if r.node is None else r.node:<6}{fmt_kb(r.size_kb):>6}"
                      f"{r.total:>8}{r.free:>8}")
        return 0
    if args.hcmd == "mount":
        hp.pool(page_kb, None)  # refuses a size the kernel does not offer
        mount_hugetlbfs(args.dir, page_kb)
        print(f"mounted hugetlbfs (pagesize={fmt_kb(page_kb)}) on {args.dir}")
        return 0
    pages = math.ceil(parse_size_kb(args.size) / page_kb)
    # The same lock and ledger as the hook's dpdk mode (state_dir), so a
    # reserve never loses another writer's increment, and a release never
    # takes pages a dpdk container's reservation counts on.
    acct = Accounting(hp, state_dir)
    if args.hcmd == "reserve":
        total = acct.reserve(pages, page_kb, args.node)
        print(f"reserved {pages} x {fmt_kb(page_kb)} pages; total now {total}")
    else:
        taken, total = acct.give_back(pages, page_kb, args.node)
        kept = "" if taken == pages else \
            " (only free pages that no dpdk reservation counts on can go)"
        print(f"released {taken} of {pages} x {fmt_kb(page_kb)} pages{kept}; total now {total}")
    return 0


def _status_text(devs: "List[Device]") -> str:
    titles = {"dpdk": "Network devices using DPDK-compatible driver",
              "kernel": "Network devices using kernel driver",
              "other": "Other network devices"}
    out = []
    for group, title in titles.items():
        out += [title, "=" * len(title)]
        rows = [d for d in devs if d.group == group]
        if not rows:
            out.append("<none>")
        for d in rows:
            line = (f"{d.pci} '{d.vendor}:{d.device}' numa_node={d.numa_node} "
                    f"if={d.interface or '-'} drv={d.driver or '-'} iommu_group={d.iommu_group or '-'}")
            out.append(line + (" *Active*" if d.active else ""))
        out.append("")
    return "\n".join(out).rstrip()
