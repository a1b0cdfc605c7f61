"""Typed errors. Every user-facing failure is one of these.

``str(err)`` is the one-line message the CLI prints after ``sriov-hook:``.
errno values are turned into these classes at exactly two boundaries:
``sysfs`` (file-system reads and writes under sysfs_root) and ``netlink``
(rtnl.py's raw messages, and pyroute2 for VF settings). ``netns``
(mount/setns syscalls) is a third, tiny one.
"""
from __future__ import annotations


class HookError(Exception):
    """Base class: a failure the user can act on; never shown as a traceback."""

    exit_code = 1

    def __str__(self) -> str:
        # Keep messages on one line whatever the cause text contains.
        return " ".join(super().__str__().split())


class UsageError(HookError):
    exit_code = 2


class ConfigError(HookError):
    """The config file is missing, malformed or names an invalid value."""


class StateError(HookError):
    """The OCI state on stdin, or the bundle's config.json, is unusable."""


class RequestError(HookError):
    """The container's annotation asks for something malformed or forbidden."""


class PoolError(HookError):
    pass


class UnknownPool(PoolError):
    pass


class PoolExhausted(PoolError):
    pass


class LockTimeout(HookError):
    pass


class ReservationError(HookError):
    """A reservation record is missing, conflicting or unreadable."""


class SysfsError(HookError):
    """A sysfs read or write failed."""


class DeviceNotFound(SysfsError):
    pass


class NamespaceError(HookError):
    """A network namespace could not be opened, entered or pinned."""


class NetlinkError(HookError):
    """A netlink request failed; ``errno`` holds the kernel's answer."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class LinkNotFound(NetlinkError):
    pass


class LinkExists(NetlinkError):
    pass


class NotSupported(NetlinkError):
    """The driver does not implement the operation (e.g. a PF with no VF ops)."""


class DeviceBusy(NetlinkError):
    pass


class Refused(NetlinkError):
    """The driver refused the change (EPERM, EACCES, EADDRNOTAVAIL): e.g. igb
    refusing a VF's own MAC change while the PF holds an admin MAC for it."""


class InvalidArgument(NetlinkError):
    """The driver rejected a value (EINVAL, ERANGE)."""


class PfGone(HookError):
    """A VF's PF (found by PCI address) has no netdev any more: its PF-side
    settings cannot be read or restored, so the VF's record is kept."""


class VerifyError(HookError):
    """A setting was accepted by the kernel but did not read back as written."""
