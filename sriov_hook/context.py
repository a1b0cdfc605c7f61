"""Per-invocation context: config, sysfs, reservations, log, one host netlink socket."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

from .config import Config
from .oci import Container
from .inventory import Inventory
from .log import StepLog
from .reservations import Store
from .sysfs import Sysfs

if TYPE_CHECKING:
    from .netlink import Netlink


class Ctx:
    def __init__(self, cfg: Config, log: StepLog) -> None:
        self.cfg = cfg
        self.log = log
        self.sysfs = Sysfs(cfg.sysfs_root)
        self.store = Store(cfg.state_dir)
        self.inventory = Inventory(self.sysfs)
        self._host: Optional["Netlink"] = None
        self._host_fd: Optional[int] = None
        self.container: Optional[Container] = None   # set at prestart
        self.inject_nodes = False   # create device nodes inside the container

    @property
    def host(self) -> "Netlink":
        """The runtime's (host) namespace socket, opened on first use."""
        if self._host is None:
            from .netlink import Netlink  # pyroute2 is heavy: only when needed
            self._host = Netlink(label="host")
        return self._host

    @property
    def host_netns_fd(self) -> int:
        if self._host_fd is None:
            self._host_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        return self._host_fd

    def close(self) -> None:
        if self._host is not None:
            self._host.close()
            self._host = None
        if self._host_fd is not None:
            os.close(self._host_fd)
            self._host_fd = None

