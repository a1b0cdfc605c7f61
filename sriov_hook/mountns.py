"""Run a few mount/file operations inside a container's mount namespace.

A forked child enters the namespace (setns on /proc/<pid>/ns/mnt), so the
hook's own root, cwd and mounts are never touched. At prestart/createRuntime
the container has not pivoted yet: its rootfs is mounted at the spec's
``root.path`` inside that namespace, so targets are ``<rootfs>/...``.
"""
from __future__ import annotations

import ctypes
import os
import time
from typing import Callable

from .errors import HookError

CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8


class MountNsError(HookError):
    pass


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), flags,
                  data.encode() or None) != 0:
        raise OSError(ctypes.get_errno(), f"mount {fstype} on {target}")


def run_in(pid: int, action: Callable[[], None], timeout: float = 10.0) -> None:
    """Fork, enter ``pid``'s mount namespace, run ``action``; raise its error here."""
    try:
        nsfd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        # setns(CLONE_NEWNS) resets our root to the namespace's root; the
        # runtime may itself run chrooted, so take the process's own root.
        rootfd = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise MountNsError(f"cannot open mount namespace of pid {pid}: {err.strerror}") from None
    rfd, wfd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.close(rfd)
        code = 0
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(nsfd, CLONE_NEWNS) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            os.fchdir(rootfd)
            os.chroot(".")
            action()
        except BaseException as err:  # noqa: BLE001 - report anything to the parent
            msg = f"{err.strerror}: {err.filename or ''}" if isinstance(err, OSError) else str(err)
            os.write(wfd, msg.encode()[:1000])
            code = 1
        os._exit(code)
    os.close(wfd)
    os.close(nsfd)
    os.close(rootfd)
    deadline = time.monotonic() + timeout
    try:
        while True:
            done, status = os.waitpid(child, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(child, 9)
                os.waitpid(child, 0)
                raise MountNsError(f"work in the mount namespace of pid {pid} timed out")
            time.sleep(0.005)
        msg = os.read(rfd, 1000).decode(errors="replace")
    finally:
        os.close(rfd)
    if os.waitstatus_to_exitcode(status) != 0:
        raise MountNsError(f"in the container's mount namespace: {msg or 'failed'}")
