"""Network namespace handles: open, enter (setns) and pin (bind mount).

Pinning matters: by poststop the container's processes are gone, and an
unpinned namespace dies with them. A physical VF then drifts back to the
host late, maybe renamed ``devN``; a veth is destroyed. A bind mount under
``state_dir`` keeps the namespace alive until the hook has moved the VF home.
Syscall errors become NamespaceError here.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from typing import Iterator, Optional, Tuple

from .errors import NamespaceError

CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MNT_DETACH = 2
_libc: Optional[ctypes.CDLL] = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _fail(what: str) -> NamespaceError:
    err = ctypes.get_errno()
    return NamespaceError(f"{what}: {os.strerror(err)}")


def open_netns(path: str) -> int:
    """An O_RDONLY fd on a netns file; raises NamespaceError if it is not one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise NamespaceError(f"cannot open network namespace {path}: {err.strerror}") from None
    if os.fstat(fd).st_dev != _nsfs_dev():
        os.close(fd)
        raise NamespaceError(f"{path} is not a network namespace")
    return fd


def identity(path_or_fd: "str | int") -> Tuple[int, int]:
    """(st_dev, st_ino) of a namespace: what makes two paths the same netns."""
    try:
        st = os.stat(path_or_fd)
    except OSError as err:
        raise NamespaceError(f"cannot stat network namespace {path_or_fd}: {err.strerror}") from None
    return st.st_dev, st.st_ino


def _nsfs_dev() -> int:
    return os.stat("/proc/self/ns/net").st_dev


def is_pinned(path: str) -> bool:
    """True if ``path`` is a live bind mount of a namespace (nsfs)."""
    try:
        return os.stat(path).st_dev == _nsfs_dev()
    except OSError:
        return False


_DEFERRED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


@contextlib.contextmanager
def enter_netns(fd: int) -> Iterator[None]:
    """Run the body with this thread in the netns ``fd``; always come back.

    SIGTERM/SIGINT/SIGHUP are held back for the whole stay: the hook turns
    them into an exception, and one raised between the setns() calls would
    leave the thread (and the rollback it starts) in the container's netns.
    They are delivered once the thread is home.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    masked = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    try:
        if _c().setns(fd, CLONE_NEWNET) != 0:
            raise _fail("cannot enter network namespace")
        try:
            yield
        finally:
            if _c().setns(home, CLONE_NEWNET) != 0:
                # Continuing in the wrong namespace would corrupt the host.
                raise _fail("cannot return to the original network namespace")
    finally:
        os.close(home)
        signal.pthread_sigmask(signal.SIG_SETMASK, masked)


def pin(source: str, target: str) -> None:
    """Bind-mount the netns ``source`` onto ``target`` (created, mode 0600)."""
    if is_pinned(target):
        if identity(target) == identity(source):
            return  # ensure(): already pinned to the same namespace
        raise NamespaceError(f"{target} already pins another network namespace")
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
    except OSError as err:
        raise NamespaceError(f"cannot create pin file {target}: {err.strerror}") from None
    if _c().mount(source.encode(), target.encode(), None, MS_BIND, None) != 0:
        failure = _fail(f"cannot pin network namespace {source} at {target}")
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise failure


def unpin(target: str) -> None:
    """Undo ``pin``; a missing or already-unmounted pin is fine (idempotent)."""
    while is_pinned(target):
        if _c().umount2(target.encode(), MNT_DETACH) != 0:
            raise _fail(f"cannot unpin network namespace at {target}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(target)
