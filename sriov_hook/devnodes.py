"""Give a running-to-be container a device node the spec did not list.

A createRuntime/prestart hook runs after runc has built the container's
mounts (its /dev tmpfs included) but before pivot_root. The container's
root is reachable from the host as ``/proc/<pid>/root<rootfs>``; a node
made there appears in the container's /dev. The image owns that tree, so
the node is made through rootfs.Root, which never leaves the rootfs nor
follows a symlink. Access is granted through the cgroup v1 devices
controller (``devices.allow``). cgroup v2 has no such file (device access
is a BPF program the runtime attaches), so there we refuse clearly and
point at the CDI spec, which the engine applies before the runtime starts.
"""
from __future__ import annotations

import os
import stat
from typing import List, Optional, Tuple

from .errors import HookError
from .oci import Container
from .rootfs import open_host_side


class DeviceError(HookError):
    pass


def char_device(host_node: str) -> Tuple[int, int]:
    try:
        st = os.stat(host_node)
    except OSError as err:
        raise DeviceError(f"device node {host_node}: {err.strerror}") from None
    if not stat.S_ISCHR(st.st_mode):
        raise DeviceError(f"{host_node} is not a character device")
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def add_node(container: Container, host_node: str, path: str, cgroup_root: str) -> Tuple[int, int]:
    """Create ``path`` (absolute, in the container) as a copy of ``host_node``."""
    major, minor = char_device(host_node)
    with open_host_side(container) as root:
        root.mknod_char(path, major, minor)
    allow(cgroup_root, container.state.pid or 0, major, minor)
    return major, minor


def devices_cgroup(pid: int) -> Optional[str]:
    """The pid's cgroup v1 devices path, or None on a cgroup v2-only system."""
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            lines: List[str] = fh.read().splitlines()
    except OSError as err:
        raise DeviceError(f"cannot read /proc/{pid}/cgroup: {err.strerror}") from None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "devices" in controllers.split(","):
            return path
    return None


def allow(cgroup_root: str, pid: int, major: int, minor: int) -> None:
    path = devices_cgroup(pid)
    if path is None:
        raise DeviceError("this host uses cgroup v2: a hook cannot grant device access there; "
                          "use the CDI spec (sriov-hook cdi) so the engine adds the device")
    allow_file = os.path.join(cgroup_root, "devices", path.lstrip("/"), "devices.allow")
    try:
        with open(allow_file, "w") as fh:
            fh.write(f"c {major}:{minor} rwm")
    except OSError as err:
        raise DeviceError(f"cannot allow c {major}:{minor} in {allow_file}: {err.strerror}") from None
