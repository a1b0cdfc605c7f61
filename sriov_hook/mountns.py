"""Run a few mount/file operations inside a container's mount namespace.

A forked child enters the namespace (setns on /proc/<pid>/ns/mnt), so the
hook's own root, cwd and mounts are never touched. At prestart/createRuntime
the container has not pivoted yet: its rootfs is mounted at the spec's
``root.path`` inside that namespace. Paths below it come from the image, so
the action works through rootfs.Root, confined to the rootfs.
"""
from __future__ import annotations

import ctypes
import os
import time
from typing import Callable, Optional

from .errors import HookError

CLONE_NEWNS = 0x00020000
_MAX_REPLY = 1000


class MountNsError(HookError):
    pass


def run_in(pid: int, action: Callable[[], Optional[str]], timeout: float = 10.0) -> str:
    """Fork, enter ``pid``'s mount namespace, run ``action``; return what it
    returned ("" for None), or raise its error here: a HookError's message
    as it is, anything else prefixed with where it happened."""
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
                errno = ctypes.get_errno()
                raise OSError(errno, f"setns: {os.strerror(errno)}")
            os.fchdir(rootfd)
            os.chroot(".")
            reply = action() or ""
        except HookError as err:   # already one line for the user
            reply, code = str(err), 2
        except BaseException as err:  # noqa: BLE001 - report anything to the parent
            reply = f"{err.strerror}: {err.filename or ''}" if isinstance(err, OSError) \
                else f"{type(err).__name__}: {err}"
            code = 1
        os.write(wfd, reply.encode(errors="replace")[:_MAX_REPLY])
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
        reply = os.read(rfd, _MAX_REPLY).decode(errors="replace")
    finally:
        os.close(rfd)
    code = os.waitstatus_to_exitcode(status)
    if code == 2:
        raise MountNsError(reply)
    if code != 0:
        raise MountNsError(f"in the container's mount namespace: {reply or 'failed'}")
    return reply
