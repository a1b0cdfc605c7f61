"""Per-invocation context: config, sysfs, reservations, log, one host netlink socket."""
from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Optional

from .config import Config
from .oci import Container
from .inventory import Inventory
from .log import StepLog
from .reservations import Store
from .sysfs import Sysfs

if TYPE_CHECKING:
    from .netlink import Netlink


# The agent's worker threads keep one host netlink socket each across
# requests (~0.6 ms per request); a socket is bound to its namespace, and
# the host's never goes away.
_THREAD = threading.local()


class Ctx:
    def __init__(self, cfg: Config, log: StepLog, reuse_host: bool = False) -> None:
        self.cfg = cfg
        self.log = log
        self.sysfs = Sysfs(cfg.sysfs_root)
        self.store = Store(cfg.state_dir)
        self.inventory = Inventory(self.sysfs)
        self._host: Optional["Netlink"] = None
        self._reuse_host = reuse_host
        self._host_fd: Optional[int] = None
        self.container: Optional[Container] = None   # set at prestart
        self.inject_nodes = False   # create device nodes inside the container

    @property
    def host(self) -> "Netlink":
        """The runtime's (host) namespace socket, opened on first use."""
        if self._host is None:
            from .netlink import Netlink  # only hooks that talk netlink import it
            kept: Optional["Netlink"] = getattr(_THREAD, "host", None) if self._reuse_host \
                else None
            self._host = kept if kept is not None else Netlink(label="host")
            if self._reuse_host:
                _THREAD.host = self._host
        return self._host

    @property
    def host_netns_fd(self) -> int:
        if self._host_fd is None:
            self._host_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        return self._host_fd

    def close(self) -> None:
        self.store.close()
        if self._host is not None and not self._reuse_host:
            self._host.close()
        self._host = None
        if self._host_fd is not None:
            os.close(self._host_fd)
            self._host_fd = None

