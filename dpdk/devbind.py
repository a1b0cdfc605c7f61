"""PCI network devices and userspace-driver binding, like dpdk-devbind.py
but from sysfs alone (no lspci), with rollback and a memory of the previous
driver so ``unbind`` can return a device to it."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

from sriov_hook import drivers
from sriov_hook.errors import DeviceNotFound, HookError
from sriov_hook.pci import normalize_bdf
from sriov_hook.procnet import routed_ifaces
from sriov_hook.sysfs import Sysfs

NET_CLASS = "0x02"


class DevbindError(HookError):
    pass


@dataclass
class Device:
    pci: str
    vendor: str
    device: str
    numa_node: int
    interface: Optional[str]
    driver: Optional[str]
    iommu_group: Optional[str]
    active: bool = False

    @property
    def group(self) -> str:
        if self.driver in drivers.USERSPACE_DRIVERS:
            return "dpdk"
        return "kernel" if self.driver else "other"

    def to_json(self) -> Dict[str, object]:
        return {**asdict(self), "group": self.group}


def device(fs: Sysfs, bdf: str) -> Optional[Device]:
    try:
        if not fs.read(fs.dev(bdf, "class")).startswith(NET_CLASS):
            return None
    except DeviceNotFound:
        return None
    info = fs.info(bdf)
    return Device(bdf, info.vendor, info.device, info.numa_node, fs.netdev(bdf),
                  info.driver, info.iommu_group)


def network_devices(fs: Sysfs) -> List[Device]:
    devs = (device(fs, bdf) for bdf in fs.listdir(os.path.join(fs.root, "bus/pci/devices")))
    return [d for d in devs if d is not None]


def _has_ipv4(ifname: str) -> bool:
    """SIOCGIFADDR: does the interface carry an IPv4 address (even while down)?"""
    import fcntl
    import socket
    import struct
    SIOCGIFADDR = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", ifname.encode()[:15]))
            return True
        except OSError:
            return False


def mark_active(devs: List[Device]) -> None:
    """A device whose netdev has routes or addresses is 'active' (in use)."""
    if any(d.interface for d in devs):
        routed = routed_ifaces()
        for d in devs:
            d.active = d.interface is not None and \
                (d.interface in routed or _has_ipv4(d.interface))


class Binder:
    def __init__(self, fs: Sysfs, state_dir: str, timeout: float = 5.0) -> None:
        self.fs = fs
        self.state_dir = state_dir
        self.timeout = timeout

    def _record(self, bdf: str) -> str:
        return os.path.join(self.state_dir, f"{bdf}.json")

    def resolve(self, text: str) -> str:
        try:
            bdf = normalize_bdf(text)
        except ValueError as err:
            raise DevbindError(str(err)) from None
        if not self.fs.device_exists(bdf):
            raise DevbindError(f"device {bdf} does not exist")
        return bdf

    def check(self, bdf: str, driver: str, force: bool, noiommu: bool) -> None:
        if driver not in drivers.USERSPACE_DRIVERS:
            raise DevbindError(f"unknown driver {driver!r} (one of "
                               f"{', '.join(drivers.USERSPACE_DRIVERS)})")
        if not drivers.driver_present(self.fs, driver):
            raise DevbindError(f"driver {driver} is not loaded (modprobe {driver})")
        dev = [d for d in (device(self.fs, bdf),) if d is not None]
        if dev and not force:
            mark_active(dev)
            if dev[0].active:
                raise DevbindError(f"{bdf} ({dev[0].interface}) is active: it has addresses or "
                                   f"routes; use --force to bind it anyway")
        if driver == drivers.VFIO:
            drivers.check_vfio(self.fs, bdf, allow_noiommu=noiommu)

    def bind(self, driver: str, bdfs: List[str], force: bool = False,
             noiommu: bool = False) -> List[str]:
        """Bind every device or none: all checks first, then binds, undone on failure."""
        resolved = [self.resolve(b) for b in bdfs]
        if noiommu:
            self.fs.write(os.path.join(self.fs.root, drivers.NOIOMMU_PARAM), "1")
        for bdf in resolved:
            self.check(bdf, driver, force, noiommu)
        done: List[Tuple[str, Optional[str]]] = []
        try:
            for bdf in resolved:
                prev = drivers.bind(self.fs, bdf, driver, self.timeout)
                done.append((bdf, prev))
        except HookError:
            for bdf, prev in reversed(done):
                drivers.restore(self.fs, bdf, prev, self.timeout)
            raise
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        for bdf, prev in done:
            if prev not in drivers.USERSPACE_DRIVERS:
                with open(self._record(bdf), "w") as fh:
                    json.dump({"driver": prev}, fh)
        return resolved

    def unbind(self, bdfs: List[str], driver: Optional[str] = None) -> Dict[str, Optional[str]]:
        resolved = [self.resolve(b) for b in bdfs]
        targets: Dict[str, Optional[str]] = {}
        for bdf in resolved:
            target = driver
            if target is None:
                try:
                    with open(self._record(bdf)) as fh:
                        target = json.load(fh).get("driver")
                except FileNotFoundError:
                    raise DevbindError(f"no record of the driver {bdf} had; name one: "
                                       f"sriov-dpdk unbind --driver DRIVER {bdf}") from None
            if target is not None and not drivers.driver_present(self.fs, target):
                raise DevbindError(f"driver {target} is not loaded")
            targets[bdf] = target
        for bdf, target in targets.items():
            drivers.restore(self.fs, bdf, target, self.timeout)
            try:
                os.unlink(self._record(bdf))
            except FileNotFoundError:
                pass
        return targets
