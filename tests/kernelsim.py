"""A tiny in-test stand-in for the kernel's PCI driver core, over a fake sysfs.

This kernel has no vfio and no SR-IOV, so the bind path is exercised against
a FakeSysfs that reacts to writes like the kernel does. An inotify loop (a
thread in the test process) watches the files the hook writes:

  bus/pci/drivers_probe           bind the device to driver_override, or to
                                  its natural driver when there is none
  bus/pci/drivers/<drv>/unbind    drop the driver link
  bus/pci/drivers/<drv>/bind      bind to <drv>

Side effects match the kernel's: a netdev disappears from ``net/`` when
its driver unbinds and comes back on rebind; binding to vfio-pci creates
the group's node in a /dev/vfio-like dir (a real char device), and the
last unbind from vfio-pci removes it. ``fail_bind`` makes one driver's
probe leave the device unbound, as a failing driver would. Hugepage counts
follow writes to nr_hugepages synchronously (fanotify), capped at
``max_hugepages`` like a kernel short of memory. Test-only.
"""
from __future__ import annotations

import ctypes
import os
import select
import shutil
import struct
import threading
from typing import Callable, Dict, List, Optional

from tests.simhost import FakeSysfs

IN_CLOSE_WRITE = 0x00000008
FAN_CLASS_CONTENT, FAN_CLOEXEC, FAN_OPEN_PERM, FAN_MARK_ADD, FAN_ALLOW = 0x4, 0x1, 0x10000, 1, 1
AT_FDCWD = -100
NET_DRIVERS = {"igb", "igbvf", "ixgbevf", "iavf"}
VFIO_MAJOR = 240      # "local/experimental" char major: never a real device here
VFIO_CONTAINER = (10, 196)   # the real /dev/vfio/vfio misc minor


class KernelSim:
    def __init__(self, fs: FakeSysfs, dev_dir: str) -> None:
        self.fs = fs
        self.dev_dir = dev_dir
        self.natural: Dict[str, Optional[str]] = {}
        self.fail_bind: Dict[str, str] = {}   # bdf -> driver whose probe fails
        self.on_net_probe: List[Callable[[str, str], None]] = []   # (bdf, driver)
        self.events = 0
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wd: Dict[int, str] = {}
        self._stop_r, self._stop_w = os.pipe()
        self._lock = threading.Lock()
        os.makedirs(dev_dir, exist_ok=True)
        vfio = os.path.join(dev_dir, "vfio")
        if not os.path.exists(vfio):
            os.mknod(vfio, 0o20666, os.makedev(*VFIO_CONTAINER))
        for bdf in os.listdir(os.path.join(fs.root, "bus/pci/devices")):
            self.natural[bdf] = self._driver(bdf)
        self.watch(os.path.join(fs.root, "bus/pci"))
        drivers = os.path.join(fs.root, "bus/pci/drivers")
        for drv in os.listdir(drivers):
            self.watch(os.path.join(drivers, drv))
        # Hugepages: the kernel applies a write to nr_hugepages before the
        # writer's read-back. fanotify permission events give us that: any
        # open of nr_hugepages waits until the simulator has applied the
        # last write (capped at max_hugepages) and updated free_hugepages.
        self.max_hugepages = 512
        self._pages: Dict[str, int] = {}
        self._fan = self._libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC, os.O_RDWR)
        if self._fan < 0:
            raise OSError(ctypes.get_errno(), "fanotify_init")
        for d in ("kernel/mm/hugepages", "devices/system/node/node0/hugepages"):
            base = os.path.join(fs.root, d)
            for size in os.listdir(base):
                path = os.path.join(base, size)
                self._pages[path] = self._read_int(os.path.join(path, "nr_hugepages"))
                if self._libc.fanotify_mark(self._fan, FAN_MARK_ADD,
                                            ctypes.c_uint64(FAN_OPEN_PERM), AT_FDCWD,
                                            os.path.join(path, "nr_hugepages").encode()) != 0:
                    raise OSError(ctypes.get_errno(), "fanotify_mark")
        self._fan_thread = threading.Thread(target=self._fan_loop, daemon=True)
        self._fan_thread.start()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def watch(self, path: str) -> None:
        wd = self._libc.inotify_add_watch(self._fd, path.encode(), IN_CLOSE_WRITE)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        self._wd[wd] = path

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        self._fan_thread.join(5)
        for fd in (self._fd, self._fan, self._stop_r, self._stop_w):
            os.close(fd)

    def _fan_loop(self) -> None:
        while True:
            ready, _, _ = select.select([self._fan, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            buf = os.read(self._fan, 4096)
            off = 0
            while off < len(buf):
                length, _v, _r, _m, _mask, efd, _pid = struct.unpack_from("IBBHQii", buf, off)
                off += length
                try:
                    self._apply_hugepages(efd)
                finally:
                    os.write(self._fan, struct.pack("iI", efd, FAN_ALLOW))
                    os.close(efd)

    def _apply_hugepages(self, efd: int) -> None:
        """Apply a pending nr_hugepages write through the event's own fd (no
        new open, so no new permission event)."""
        d = os.path.dirname(os.readlink(f"/proc/self/fd/{efd}"))
        text = os.pread(efd, 64, 0).decode().strip()
        if not text.isdigit() or int(text) == self._pages.get(d):
            return
        old = self._pages.get(d, 0)
        got = min(int(text), self.max_hugepages)
        self._pages[d] = got
        os.ftruncate(efd, 0)
        os.pwrite(efd, f"{got}\n".encode(), 0)
        free_path = os.path.join(d, "free_hugepages")
        free = self._read_int(free_path) + (got - old)
        with open(free_path, "w") as fh:
            fh.write(f"{max(free, 0)}\n")

    # -- the loop ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            ready, _, _ = select.select([self._fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                buf = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            off = 0
            while off < len(buf):
                wd, _mask, _cookie, size = struct.unpack_from("iIII", buf, off)
                name = buf[off + 16: off + 16 + size].rstrip(b"\0").decode()
                off += 16 + size
                base = self._wd.get(wd)
                if base and name:
                    self._handle(os.path.join(base, name))

    @staticmethod
    def _read_int(path: str) -> int:
        with open(path) as fh:
            return int(fh.read().strip() or 0)

    def _handle(self, path: str) -> None:
        try:
            with open(path) as fh:
                value = fh.read().strip()
        except OSError:
            return
        if not value:
            return
        with self._lock:
            self.events += 1
            name = os.path.basename(path)
            parent = os.path.basename(os.path.dirname(path))
            if name == "drivers_probe":
                self._probe(value)
            elif name == "unbind":
                if self._driver(value) == parent:
                    self._unbind(value)
            elif name == "bind":
                if self._driver(value) is None:
                    self._bind(value, parent)
            # A write to a real sysfs attribute leaves nothing behind.
            if name in ("drivers_probe", "unbind", "bind"):
                open(path, "w").close()

    # -- driver core -----------------------------------------------------------------
    def _dev(self, bdf: str, *parts: str) -> str:
        return os.path.join(self.fs.root, "devices/pci0000:00", bdf, *parts)

    def _driver(self, bdf: str) -> Optional[str]:
        try:
            return os.path.basename(os.readlink(self._dev(bdf, "driver")))
        except OSError:
            return None

    def _override(self, bdf: str) -> Optional[str]:
        try:
            with open(self._dev(bdf, "driver_override")) as fh:
                val = fh.read().strip()
        except OSError:
            return None
        return None if val in ("", "(null)") else val

    def _group(self, bdf: str) -> Optional[str]:
        try:
            return os.path.basename(os.readlink(self._dev(bdf, "iommu_group")))
        except OSError:
            return None

    def _node(self, group: str) -> str:
        """/dev/vfio/N, or noiommu-N when the machine has no IOMMU."""
        iommu = os.listdir(os.path.join(self.fs.root, "class/iommu"))
        return os.path.join(self.dev_dir, group if iommu else f"noiommu-{group}")

    def _probe(self, bdf: str) -> None:
        if self._driver(bdf) is not None:
            return
        drv = self._override(bdf) or self.natural.get(bdf)
        if drv is not None and self.fail_bind.get(bdf) == drv:
            return
        if drv and os.path.isdir(os.path.join(self.fs.root, "bus/pci/drivers", drv)):
            self._bind(bdf, drv)

    def _bind(self, bdf: str, drv: str) -> None:
        override = self._override(bdf)
        if override is not None and override != drv:
            return  # the kernel refuses a driver other than the override
        if drv in NET_DRIVERS:
            parked = self._dev(bdf, ".net-unbound")
            if os.path.isdir(parked):
                for ifname in os.listdir(parked):
                    os.makedirs(self._dev(bdf, "net"), exist_ok=True)
                    os.rename(os.path.join(parked, ifname), self._dev(bdf, "net", ifname))
                    self.fs.add_netdev(bdf, ifname)
            # The driver's probe (a PF driver model: MAC from the PF, rename)
            # is over before the driver link appears, as a write to
            # drivers_probe returns only after the probe.
            for hook in self.on_net_probe:
                hook(bdf, drv)
        self.fs.bind(bdf, drv)
        if drv == "vfio-pci":
            group = self._group(bdf)
            node = self._node(group) if group else None
            if node and not os.path.exists(node):
                os.mknod(node, 0o20600, os.makedev(VFIO_MAJOR, int(group or 0) % 256))

    def _unbind(self, bdf: str) -> None:
        drv = self._driver(bdf)
        os.unlink(self._dev(bdf, "driver"))
        link = os.path.join(self.fs.root, "bus/pci/drivers", str(drv), bdf)
        if os.path.lexists(link):
            os.unlink(link)
        if drv in NET_DRIVERS:
            # The netdev goes away with its driver: park its sysfs dir.
            net = self._dev(bdf, "net")
            if os.path.isdir(net):
                os.makedirs(self._dev(bdf, ".net-unbound"), exist_ok=True)
                for ifname in os.listdir(net):
                    os.rename(os.path.join(net, ifname), self._dev(bdf, ".net-unbound", ifname))
                    cls = os.path.join(self.fs.root, "class/net", ifname)
                    if os.path.lexists(cls):
                        os.unlink(cls)
        if drv == "vfio-pci":
            group = self._group(bdf)
            if group:
                members = os.listdir(os.path.join(self.fs.root, "kernel/iommu_groups",
                                                  group, "devices"))
                if not any(self._driver(m) == "vfio-pci" for m in members):
                    node = self._node(group)
                    if os.path.exists(node):
                        os.unlink(node)


def remove_driver(fs: FakeSysfs, drv: str) -> None:
    shutil.rmtree(os.path.join(fs.root, "bus/pci/drivers", drv), ignore_errors=True)
