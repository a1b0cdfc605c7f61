"""A simulated SR-IOV host: a fake PCI sysfs tree plus real veth "VFs".

This machine has no SR-IOV NIC and no dummy/netdevsim, so:
  * ``FakeSysfs`` builds the standard sysfs layout (bus/pci/devices,
    virtfnN/physfn links, driver/iommu_group links, net/<ifname>,
    class/net/<ifname>/device) under a temp dir, relocatable, with
    relative links as the kernel makes them;
  * ``SimNic`` creates a bridge standing in for the NIC's embedded switch,
    a veth "PF", and per VF a veth pair whose host end is the VF netdev and
    whose peer is enslaved to the bridge, so VFs really reach each other.

Only the PCI tree is fake. Test-only: the product never imports this.

CLI (used by ``make demo``)::

    python -m tests.simhost up   --dir DIR --vfs N [--pools ...]   # prints JSON
    python -m tests.simhost down --dir DIR
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

INTEL = "0x8086"
PF_DEVICE, VF_DEVICE = "0x10c9", "0x10ca"   # 82576 PF / VF, as the lab's igb


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


class FakeSysfs:
    def __init__(self, root: str, iommu: bool = True) -> None:
        self.root = root
        self.pci = os.path.join(root, "devices/pci0000:00")
        for d in ("bus/pci/devices", "bus/pci/drivers", "class/net", "kernel/iommu_groups",
                  "class/iommu", "devices/pci0000:00", "module/vfio/parameters"):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        if iommu:
            os.makedirs(os.path.join(root, "class/iommu/dmar0"), exist_ok=True)
        self._write("module/vfio/parameters/enable_unsafe_noiommu_mode", "N\n")
        for drv in ("vfio-pci", "uio_pci_generic"):
            self.add_driver(drv)
        for d in ("kernel/mm/hugepages", "devices/system/node/node0/hugepages"):
            for size in ("2048kB", "1048576kB"):
                for f in ("nr_hugepages", "free_hugepages"):
                    if not os.path.exists(os.path.join(root, d, f"hugepages-{size}", f)):
                        self._write(f"{d}/hugepages-{size}/{f}", "0\n")
        self._write("bus/pci/drivers_probe", "")

    def _write(self, rel: str, text: str) -> None:
        path = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)

    def _link(self, rel: str, target: str) -> None:
        path = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.lexists(path):
            os.unlink(path)
        os.symlink(target, path)

    def add_driver(self, name: str) -> None:
        d = f"bus/pci/drivers/{name}"
        os.makedirs(os.path.join(self.root, d), exist_ok=True)
        for f in ("bind", "unbind", "new_id", "remove_id"):
            if not os.path.exists(os.path.join(self.root, d, f)):
                self._write(f"{d}/{f}", "")

    def add_device(self, bdf: str, vendor: str, device: str, driver: Optional[str],
                   numa: int = 0, group: Optional[int] = None) -> None:
        dev = f"devices/pci0000:00/{bdf}"
        for name, val in (("vendor", vendor), ("device", device), ("numa_node", str(numa)),
                          ("class", "0x020000"), ("driver_override", "(null)")):
            self._write(f"{dev}/{name}", val + "\n")
        self._link(f"bus/pci/devices/{bdf}", f"../../../{dev}")
        if driver:
            self.bind(bdf, driver)
        if group is not None:
            g = f"kernel/iommu_groups/{group}"
            self._link(f"{dev}/iommu_group", f"../../../{g}")
            self._link(f"{g}/devices/{bdf}", f"../../../../{dev}")

    def bind(self, bdf: str, driver: str) -> None:
        self.add_driver(driver)
        dev = f"devices/pci0000:00/{bdf}"
        self._link(f"{dev}/driver", f"../../../bus/pci/drivers/{driver}")
        self._link(f"bus/pci/drivers/{driver}/{bdf}", f"../../../../{dev}")

    def add_netdev(self, bdf: str, ifname: str) -> None:
        dev = f"devices/pci0000:00/{bdf}"
        os.makedirs(os.path.join(self.root, dev, "net", ifname), exist_ok=True)
        self._link(f"{dev}/net/{ifname}/device", f"../../../{bdf}")
        self._link(f"class/net/{ifname}", f"../../{dev}/net/{ifname}")

    def add_pf(self, bdf: str, ifname: Optional[str], totalvfs: int, driver: str = "igb",
               numa: int = 0, group: Optional[int] = None) -> None:
        self.add_device(bdf, INTEL, PF_DEVICE, driver, numa, group)
        dev = f"devices/pci0000:00/{bdf}"
        self._write(f"{dev}/sriov_totalvfs", f"{totalvfs}\n")
        self._write(f"{dev}/sriov_numvfs", "0\n")
        if ifname:
            self.add_netdev(bdf, ifname)

    def add_vf(self, pf: str, index: int, bdf: str, ifname: Optional[str],
               driver: Optional[str] = "igbvf", numa: int = 0,
               group: Optional[int] = None) -> None:
        self.add_device(bdf, INTEL, VF_DEVICE, driver, numa, group)
        self._link(f"devices/pci0000:00/{pf}/virtfn{index}", f"../{bdf}")
        self._link(f"devices/pci0000:00/{bdf}/physfn", f"../{pf}")
        if ifname:
            self.add_netdev(bdf, ifname)
        numvfs = os.path.join(self.pci, pf, "sriov_numvfs")
        with open(numvfs) as fh:
            n = int(fh.read())
        with open(numvfs, "w") as fh:
            fh.write(f"{max(n, index + 1)}\n")


def vf_bdf(pf_no: int, index: int) -> str:
    """Addresses like a real NIC's: PF 0000:1N:00.0, VFs on 0000:1N:SS.F."""
    slot, func = divmod(index, 8)
    return f"0000:{0x10 + pf_no:02x}:{0x10 + slot:02x}.{func}"


@dataclass
class SimVf:
    bdf: str
    ifname: str
    peer: str
    index: int
    pf: str


@dataclass
class SimNic:
    """One simulated PF with ``nvfs`` veth VFs on a shared bridge."""

    uid: str
    pf_no: int
    pf: str
    pf_bdf: str
    bridge: str
    vfs: List[SimVf] = field(default_factory=list)


@dataclass
class SimHost:
    dir: str
    uid: str
    sysfs_root: str
    dev_dir: str
    state_dir: str
    log_file: str
    config: str
    nics: List[SimNic] = field(default_factory=list)

    @property
    def vfs(self) -> List[SimVf]:
        return [vf for nic in self.nics for vf in nic.vfs]

    def to_json(self) -> Dict:
        return asdict(self)


def build(base: str, nvfs: int = 4, npfs: int = 1, uid: Optional[str] = None,
          with_netdevs: bool = True, pools: Optional[List[Dict]] = None,
          extra: Optional[Dict] = None, netdev_vfs: Optional[int] = None,
          pf_driver: str = "igb", vf_driver: str = "igbvf") -> SimHost:
    """``netdev_vfs``: give only the first N VFs of each PF a veth netdev (the
    rest exist in the PCI tree only, as VFs on no kernel driver would); for
    inventories too big to back with real interfaces."""
    """Create the fake tree, the bridge and the veths, and write a config."""
    uid = uid or uuid.uuid4().hex[:6]
    os.makedirs(base, exist_ok=True)
    root = os.path.join(base, "sys")
    fs = FakeSysfs(root)
    host = SimHost(dir=base, uid=uid, sysfs_root=root, dev_dir=os.path.join(base, "dev/vfio"),
                   state_dir=os.path.join(base, "state"),
                   log_file=os.path.join(base, "hook.log"), config=os.path.join(base, "config.yaml"))
    try:
        for p in range(npfs):
            nic = _build_nic(fs, uid, p, nvfs, with_netdevs, netdev_vfs, pf_driver, vf_driver)
            host.nics.append(nic)
        write_config(host, pools, extra)
    except BaseException:
        teardown(host)
        raise
    return host


def _build_nic(fs: FakeSysfs, uid: str, p: int, nvfs: int, with_netdevs: bool,
               netdev_vfs: Optional[int] = None, pf_driver: str = "igb",
               vf_driver: str = "igbvf") -> SimNic:
    pf_bdf = f"0000:{0x10 + p:02x}:00.0"
    nic = SimNic(uid=uid, pf_no=p, pf=f"sp{uid}{p}", pf_bdf=pf_bdf, bridge=f"sb{uid}{p}")
    ip("link", "add", nic.bridge, "type", "bridge")
    ip("link", "set", nic.bridge, "up")
    ip("link", "add", nic.pf, "type", "veth", "peer", "name", f"sq{uid}{p}")
    ip("link", "set", f"sq{uid}{p}", "master", nic.bridge, "up")
    ip("link", "set", nic.pf, "up")
    fs.add_pf(pf_bdf, nic.pf, totalvfs=max(nvfs, 8), driver=pf_driver, group=100 + p * 300)
    for i in range(nvfs):
        bdf = vf_bdf(p, i)
        name, peer = f"sv{uid}{p}x{i}", f"sw{uid}{p}x{i}"
        real = with_netdevs and (netdev_vfs is None or i < netdev_vfs)
        if real:
            ip("link", "add", name, "type", "veth", "peer", "name", peer)
            ip("link", "set", peer, "master", nic.bridge, "up")
        fs.add_vf(pf_bdf, i, bdf, name if real else None, driver=vf_driver,
                  group=101 + p * 300 + i)
        if real:
            nic.vfs.append(SimVf(bdf=bdf, ifname=name, peer=peer, index=i, pf=nic.pf))
    return nic


def write_config(host: SimHost, pools: Optional[List[Dict]] = None,
                 extra: Optional[Dict] = None) -> None:
    import yaml
    pools = pools if pools is not None else [
        {"name": "fast", "mode": "netdev", "pfs": [n.pf for n in host.nics]}]
    cfg = {"sysfs_root": host.sysfs_root, "state_dir": host.state_dir,
           "log_file": host.log_file, "log_level": "debug", "vfio_dev_dir": host.dev_dir,
           "device_timeout": 2, "pools": pools}
    cfg.update(extra or {})
    with open(host.config, "w") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)


def mounted(path: str) -> bool:
    """Is ``path`` a mount point? (os.path.ismount misses a bind mount of a
    directory onto itself: same device, no inode change.)"""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == real for line in fh)


def teardown(host: SimHost) -> None:
    """Remove everything ``build`` made; tolerate pieces already gone."""
    pin_dir = os.path.join(host.state_dir, "netns")
    if os.path.isdir(pin_dir):
        for name in os.listdir(pin_dir):
            subprocess.run(["umount", "-l", os.path.join(pin_dir, name)], capture_output=True)
        if mounted(pin_dir):   # made shared for crun tests
            subprocess.run(["umount", "-l", pin_dir], capture_output=True)
    for nic in host.nics:
        for vf in nic.vfs:
            ip("link", "del", vf.ifname, check=False)
            ip("link", "del", vf.peer, check=False)
        ip("link", "del", nic.pf, check=False)
        ip("link", "del", f"sq{nic.uid}{nic.pf_no}", check=False)   # the PF's peer, if renamed
        ip("link", "del", nic.bridge, check=False)
    shutil.rmtree(host.dir, ignore_errors=True)


def fake_sysfs(host: SimHost) -> FakeSysfs:
    return FakeSysfs(host.sysfs_root)


def load(path: str) -> SimHost:
    with open(path) as fh:
        data = json.load(fh)
    nics = [SimNic(**{**n, "vfs": [SimVf(**v) for v in n["vfs"]]}) for n in data.pop("nics")]
    return SimHost(**data, nics=nics)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="simhost")
    ap.add_argument("action", choices=["up", "down"])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--vfs", type=int, default=4)
    ap.add_argument("--pfs", type=int, default=1)
    args = ap.parse_args(argv)
    desc = os.path.join(args.dir, "simhost.json")
    if args.action == "up":
        host = build(args.dir, nvfs=args.vfs, npfs=args.pfs)
        with open(desc, "w") as fh:
            json.dump(host.to_json(), fh, indent=2)
        print(json.dumps(host.to_json(), indent=2))
    else:
        if os.path.exists(desc):
            teardown(load(desc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
