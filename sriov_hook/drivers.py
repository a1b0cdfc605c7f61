"""PCI driver binding through ``driver_override`` + ``drivers_probe``.

Order (as the kernel docs and Kata's later code do it, never ``new_id``,
which claims every device with the same vendor:device):

  1. write the new driver to ``driver_override``
  2. unbind from the current driver
  3. write the address to ``/sys/bus/pci/drivers_probe``
  4. wait (bounded) until the ``driver`` link names the new driver
  5. clear ``driver_override``

If any step fails, the device is put back on the driver it had. Used by the
hook's vfio, kata and dpdk modes and by the ``sriov-dpdk`` tool.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from .errors import HookError, SysfsError
from .log import NULL_LOG, StepLog
from .util import wait_for
from .sysfs import Sysfs

VFIO = "vfio-pci"
USERSPACE_DRIVERS = ("vfio-pci", "uio_pci_generic", "igb_uio")
# What may share an IOMMU group with a device handed to VFIO (kernel rules).
_VIABLE = (None, "vfio-pci", "pci-stub", "pcieport")
NOIOMMU_PARAM = "module/vfio/parameters/enable_unsafe_noiommu_mode"


class BindError(HookError):
    pass


@dataclass(frozen=True)
class VfioGroup:
    group: str
    noiommu: bool

    def node(self, dev_dir: str = "/dev/vfio") -> str:
        name = f"noiommu-{self.group}" if self.noiommu else self.group
        return os.path.join(dev_dir, name)


def driver_present(sysfs: Sysfs, driver: str) -> bool:
    return os.path.isdir(sysfs.driver_dir(driver))


def noiommu_enabled(sysfs: Sysfs) -> bool:
    try:
        return sysfs.read(os.path.join(sysfs.root, NOIOMMU_PARAM)) in ("Y", "1")
    except SysfsError:
        return False


def check_vfio(sysfs: Sysfs, bdf: str, allow_noiommu: bool) -> VfioGroup:
    """Everything that must hold before ``bdf`` can go to vfio-pci."""
    if not driver_present(sysfs, VFIO):
        raise BindError("the vfio-pci driver is not loaded (modprobe vfio-pci)")
    group = sysfs.iommu_group(bdf)
    if group is None:
        raise BindError(f"{bdf} has no IOMMU group")
    noiommu = not sysfs.iommu_present()
    if noiommu:
        if not allow_noiommu:
            raise BindError("no IOMMU is present (/sys/class/iommu is empty): boot with "
                            "intel_iommu=on or amd_iommu=on, or set allow_noiommu: true")
        if not noiommu_enabled(sysfs):
            raise BindError("noiommu is allowed but vfio's enable_unsafe_noiommu_mode is off")
    for dev in sysfs.group_devices(group):
        drv = sysfs.driver(dev)
        if dev != bdf and drv not in _VIABLE:
            raise BindError(f"IOMMU group {group} of {bdf} is not viable: {dev} is bound "
                            f"to {drv} (every device in the group must be on vfio-pci or unbound)")
    return VfioGroup(group, noiommu)


def bind(sysfs: Sysfs, bdf: str, driver: str, timeout: float = 5.0,
         log: StepLog = NULL_LOG) -> Optional[str]:
    """Bind ``bdf`` to ``driver``; return the driver it had. Rolls back on failure."""
    prev = sysfs.driver(bdf)
    if prev == driver:
        _clear_override(sysfs, bdf)
        return prev
    if not driver_present(sysfs, driver):
        raise BindError(f"driver {driver} is not loaded")
    try:
        sysfs.write(sysfs.dev(bdf, "driver_override"), driver)
        if prev is not None:
            sysfs.write(sysfs.driver_dir(prev, "unbind"), bdf)
        sysfs.write(os.path.join(sysfs.root, "bus/pci/drivers_probe"), bdf)
        if wait_for(lambda: True if sysfs.driver(bdf) == driver else None, timeout) is None:
            raise BindError(f"{bdf} did not bind to {driver} within {timeout:g}s "
                            f"(driver now: {sysfs.driver(bdf)})")
        _clear_override(sysfs, bdf)
    except HookError as err:
        log.error(f"bind {bdf} to {driver} failed: {err}; restoring {prev}")
        try:
            restore(sysfs, bdf, prev, timeout)
        except HookError as again:
            log.error(f"rollback of {bdf} to {prev} failed too: {again}")
        raise
    log.info(f"bound {bdf}: {prev} -> {driver}")
    return prev


def restore(sysfs: Sysfs, bdf: str, driver: Optional[str], timeout: float = 5.0) -> None:
    """Put ``bdf`` back on ``driver`` (None: leave it unbound); clear the override.

    Idempotent: also repairs a device a runtime left with a stale override.
    """
    current = sysfs.driver(bdf)
    if current == driver:
        _clear_override(sysfs, bdf)
        return
    if driver is not None:
        sysfs.write(sysfs.dev(bdf, "driver_override"), driver)
    if current is not None:
        sysfs.write(sysfs.driver_dir(current, "unbind"), bdf)
    if driver is not None:
        sysfs.write(os.path.join(sysfs.root, "bus/pci/drivers_probe"), bdf)
        if wait_for(lambda: True if sysfs.driver(bdf) == driver else None, timeout) is None:
            raise BindError(f"{bdf} did not return to {driver} within {timeout:g}s")
    _clear_override(sysfs, bdf)


def reprobe(sysfs: Sysfs, bdf: str, driver: str, timeout: float = 5.0) -> None:
    """Unbind ``bdf`` from ``driver`` and probe it again (a driver reload for
    one device: igbvf then asks its PF for the admin MAC)."""
    override = sysfs.driver_override(bdf)
    if override not in (None, driver):
        raise BindError(f"{bdf} has driver_override {override!r}: a probe would not "
                        f"return it to {driver}")
    if sysfs.driver(bdf) == driver:
        sysfs.write(sysfs.driver_dir(driver, "unbind"), bdf)
        # The kernel unbinds before the write returns; waiting for it costs
        # one readlink there, and keeps a stale "still bound" from passing
        # for "bound again" below.
        if wait_for(lambda: True if sysfs.driver(bdf) is None else None, timeout) is None:
            raise BindError(f"{bdf} did not leave {driver} within {timeout:g}s")
    sysfs.write(os.path.join(sysfs.root, "bus/pci/drivers_probe"), bdf)
    if wait_for(lambda: True if sysfs.driver(bdf) == driver else None, timeout) is None:
        raise BindError(f"{bdf} did not come back to {driver} within {timeout:g}s "
                        f"(driver now: {sysfs.driver(bdf)})")


def _clear_override(sysfs: Sysfs, bdf: str) -> None:
    if sysfs.driver_override(bdf) is not None:
        sysfs.write(sysfs.dev(bdf, "driver_override"), "\n")
