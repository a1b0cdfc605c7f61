"""Read-only and write helpers for the PCI/net parts of sysfs.

Everything is read under ``root`` (``sysfs_root`` in the config), so tests
point it at a fake tree. This module is one of the two errno boundaries:
OSError never leaves it; SysfsError/DeviceNotFound do.

Note on netns: ``/sys/bus/pci/devices/<vf>/net/`` is namespace-tagged in a
real kernel, so a VF moved into a container disappears from it. Callers
must not use an empty ``net/`` as proof that a VF is gone.
"""
from __future__ import annotations

import errno as _errno
import os
from dataclasses import dataclass
from typing import List, Optional

from .errors import DeviceNotFound, SysfsError


@dataclass(frozen=True)
class PciInfo:
    bdf: str
    vendor: str
    device: str
    driver: Optional[str]
    numa_node: int
    iommu_group: Optional[str]


class Sysfs:
    def __init__(self, root: str = "/sys") -> None:
        self.root = root.rstrip("/") or "/"

    # -- paths -------------------------------------------------------------
    def dev(self, bdf: str, *parts: str) -> str:
        return os.path.join(self.root, "bus/pci/devices", bdf, *parts)

    def netclass(self, ifname: str, *parts: str) -> str:
        return os.path.join(self.root, "class/net", ifname, *parts)

    def driver_dir(self, driver: str, *parts: str) -> str:
        return os.path.join(self.root, "bus/pci/drivers", driver, *parts)

    # -- primitive reads, errno translated once ---------------------------
    def read(self, path: str) -> str:
        try:
            with open(path, encoding="ascii", errors="replace") as fh:
                return fh.read().strip()
        except OSError as err:
            raise self._translate(err, "read", path) from None

    def readlink_base(self, path: str) -> Optional[str]:
        """basename of a symlink's target, or None if there is no link."""
        try:
            return os.path.basename(os.readlink(path))
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno == _errno.EINVAL:  # not a link
                return None
            raise self._translate(err, "readlink", path) from None

    def listdir(self, path: str) -> List[str]:
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []
        except OSError as err:
            raise self._translate(err, "list", path) from None

    def write(self, path: str, value: str) -> None:
        try:
            # O_TRUNC is a no-op on real sysfs attributes and keeps plain
            # files (a fake tree) from holding a longer, older value.
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        except OSError as err:
            raise self._translate(err, "open", path) from None
        try:
            os.write(fd, value.encode())
        except OSError as err:
            raise self._translate(err, f"write {value!r} to", path) from None
        finally:
            os.close(fd)

    @staticmethod
    def _translate(err: OSError, what: str, path: str) -> SysfsError:
        why = err.strerror or str(err)
        if err.errno in (_errno.ENOENT, _errno.ENODEV):
            return DeviceNotFound(f"cannot {what} {path}: {why}")
        return SysfsError(f"cannot {what} {path}: {why}")

    # -- PCI / net queries -------------------------------------------------
    def device_exists(self, bdf: str) -> bool:
        return os.path.isdir(self.dev(bdf))

    def pf_of_netdev(self, ifname: str) -> str:
        """PCI address of the device behind host netdev ``ifname``."""
        bdf = self.readlink_base(self.netclass(ifname, "device"))
        if bdf is None:
            raise DeviceNotFound(f"no PCI device behind netdev {ifname} "
                                 f"({self.netclass(ifname, 'device')} missing)")
        return bdf

    def netdevs(self, bdf: str) -> List[str]:
        return self.listdir(self.dev(bdf, "net"))

    def netdev(self, bdf: str) -> Optional[str]:
        names = self.netdevs(bdf)
        return names[0] if names else None

    def numvfs(self, pf: str) -> int:
        return self._int(self.dev(pf, "sriov_numvfs"))

    def totalvfs(self, pf: str) -> int:
        return self._int(self.dev(pf, "sriov_totalvfs"))

    def virtfn(self, pf: str, index: int) -> Optional[str]:
        return self.readlink_base(self.dev(pf, f"virtfn{index}"))

    def physfn(self, vf: str) -> Optional[str]:
        return self.readlink_base(self.dev(vf, "physfn"))

    def driver(self, bdf: str) -> Optional[str]:
        return self.readlink_base(self.dev(bdf, "driver"))

    def iommu_group(self, bdf: str) -> Optional[str]:
        return self.readlink_base(self.dev(bdf, "iommu_group"))

    def driver_override(self, bdf: str) -> Optional[str]:
        """The override, or None when unset (the kernel shows "(null)")."""
        try:
            val = self.read(self.dev(bdf, "driver_override"))
        except DeviceNotFound:
            return None
        return None if val in ("", "(null)") else val

    def group_devices(self, group: str) -> List[str]:
        return self.listdir(os.path.join(self.root, "kernel/iommu_groups", group, "devices"))

    def iommu_present(self) -> bool:
        return bool(self.listdir(os.path.join(self.root, "class/iommu")))

    def numa_node(self, bdf: str) -> int:
        try:
            return self._int(self.dev(bdf, "numa_node"))
        except DeviceNotFound:
            return -1

    def info(self, bdf: str) -> PciInfo:
        return PciInfo(
            bdf=bdf,
            vendor=self.read(self.dev(bdf, "vendor")).replace("0x", ""),
            device=self.read(self.dev(bdf, "device")).replace("0x", ""),
            driver=self.driver(bdf),
            numa_node=self.numa_node(bdf),
            iommu_group=self.iommu_group(bdf),
        )

    def _int(self, path: str) -> int:
        text = self.read(path)
        try:
            return int(text)
        except ValueError:
            raise SysfsError(f"unexpected content {text!r} in {path}") from None
