"""Every file operation inside a container's rootfs, confined to that rootfs.

The image owns that tree: any component of a path in it may be a symlink (to
``/etc``, to a host mount point, ``../../..``), a FIFO or a device node, and
the hook runs as root. So no path below the rootfs is ever handed to the
kernel as a string from a root the hook shares with the host. The rootfs is
opened once (its path is the runtime's, from the bundle), and every path
below it is resolved component by component with openat2(2) relative to that
fd, with

    RESOLVE_IN_ROOT        ".." and absolute names stay inside the rootfs
    RESOLVE_NO_SYMLINKS    and no symlink is followed at all
    RESOLVE_NO_MAGICLINKS  nor a /proc/<pid>/fd-style jump

A symlink on the way is an error that names it: the hook writes where the
container will look, or nowhere. Files are created new (O_EXCL, never through
a name the image planted) and renamed into place, which replaces a planted
FIFO or device node instead of opening it. Mounts go onto the resolved
directory itself (fchdir to it, mount on "."), never onto a path.

Works the same from the host (``/proc/<pid>/root<rootfs>``, for device
nodes) and inside the container's mount namespace (mountns.run_in, for the
mounts dpdk mode makes there).
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat
from typing import List, Tuple

from .errors import HookError
from .oci import Container

# openat2(2) is 437 on every architecture but alpha (the syscall tables were
# unified from 424 on); Linux >= 5.6.
_SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_IN_ROOT = 0x10
_RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_AT_EMPTY_PATH = 0x1000
_STATX_BASIC_STATS = 0x7FF
_STATX_ATTR_MOUNT_ROOT = 0x2000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


class RootfsError(HookError):
    """A path in the container's rootfs cannot be used; ``errno`` says why."""

    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


def openat2(dirfd: int, name: str, flags: int, mode: int = 0) -> int:
    """openat2(dirfd, name) confined below ``dirfd``, no symlink followed."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, _RESOLVE)
    for _ in range(8):   # EAGAIN: a rename raced a ".." check; try again
        fd = _libc.syscall(_SYS_OPENAT2, ctypes.c_int(dirfd), os.fsencode(name),
                           ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err != errno.EAGAIN:
            break
    if err == errno.ENOSYS:
        raise RootfsError("this kernel has no openat2(2) (Linux >= 5.6 is needed to work "
                          "safely inside a container's rootfs)", err)
    raise OSError(err, os.strerror(err), name)


def in_namespace_path(container: Container) -> str:
    """The rootfs as mounted in the container's mount namespace (before pivot_root)."""
    root = container.spec.get("root")
    path = root.get("path") if isinstance(root, dict) else None
    path = path or "rootfs"
    if not isinstance(path, str) or "\0" in path:
        raise RootfsError("spec root.path must be a string")
    if not os.path.isabs(path):
        path = os.path.join(container.state.bundle, path)
    return os.path.normpath(path)


def host_path(container: Container) -> str:
    """The same directory reached from the host through /proc/<pid>/root."""
    pid = container.state.pid
    if pid is None:
        raise RootfsError("state has no pid: cannot reach the container's rootfs")
    return f"/proc/{pid}/root{in_namespace_path(container)}"


def _parts(path: str) -> List[str]:
    """The components of one of the hook's own paths (absolute, in the container)."""
    parts = path.strip("/").split("/")
    if "\0" in path or any(p in ("", ".", "..") for p in parts):
        raise RootfsError(f"bad path {path!r} for the container")
    return parts


def _shown(parts: List[str]) -> str:
    return "/" + "/".join(parts)


class Root:
    """An open container rootfs; every method takes a path as the container
    will see it (``/run/sriov-hook``) and never leaves the rootfs."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, path: str) -> "Root":
        """``path``: the runtime's rootfs directory (trusted: it comes from the bundle)."""
        try:
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise RootfsError(f"cannot open the container's rootfs {path}: {err.strerror}",
                              err.errno or 0) from None
        return cls(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Root":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- walking ---------------------------------------------------------------------
    def _explain(self, dirfd: int, parts: List[str], err: OSError) -> RootfsError:
        """Turn a failed step into one line that names the component."""
        where = _shown(parts)
        try:
            st = os.stat(parts[-1], dir_fd=dirfd, follow_symlinks=False)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(parts[-1], dir_fd=dirfd)
            except OSError:
                target = "?"
            return RootfsError(f"{where} in the container is a symlink (to {target[:60]!r}); "
                               f"the hook never follows the image's symlinks", errno.ELOOP)
        if st is not None and not stat.S_ISDIR(st.st_mode) and \
                err.errno in (errno.ENOTDIR, errno.ELOOP):
            return RootfsError(f"{where} in the container is not a directory", errno.ENOTDIR)
        return RootfsError(f"{where} in the container: {err.strerror}", err.errno or 0)

    def _dir(self, parts: List[str], create: bool, mode: int = 0o755) -> int:
        """An O_PATH fd of directory ``parts`` (made if ``create``); the caller closes it."""
        cur = os.dup(self.fd)
        try:
            for i, name in enumerate(parts):
                nxt = self._step(cur, parts[:i + 1], create, mode)
                os.close(cur)
                cur = nxt
        except BaseException:
            os.close(cur)
            raise
        return cur

    def _step(self, cur: int, parts: List[str], create: bool, mode: int) -> int:
        name = parts[-1]
        flags = os.O_PATH | os.O_DIRECTORY
        try:
            return openat2(cur, name, flags)
        except FileNotFoundError:
            if not create:
                raise RootfsError(f"{_shown(parts)} does not exist in the container",
                                  errno.ENOENT) from None
        except OSError as err:
            raise self._explain(cur, parts, err) from None
        try:
            os.mkdir(name, mode, dir_fd=cur)     # mkdirat never follows a planted link
        except FileExistsError:
            pass                                 # raced: the open below decides
        except OSError as err:
            raise RootfsError(f"cannot create {_shown(parts)} in the container: "
                              f"{err.strerror}", err.errno or 0) from None
        try:
            return openat2(cur, name, flags)
        except OSError as err:
            raise self._explain(cur, parts, err) from None

    def _parent(self, path: str, create: bool) -> Tuple[int, str, List[str]]:
        parts = _parts(path)
        return self._dir(parts[:-1], create), parts[-1], parts

    # -- operations ------------------------------------------------------------------
    def makedirs(self, path: str, mode: int = 0o755) -> None:
        os.close(self._dir(_parts(path), True, mode))

    def is_empty_dir(self, path: str) -> bool:
        """False if ``path`` does not exist; RootfsError if it is no plain directory."""
        try:
            fd = self._dir(_parts(path), False)
        except RootfsError as err:
            if err.errno == errno.ENOENT:
                return False
            raise
        try:
            listable = openat2(fd, ".", os.O_RDONLY | os.O_DIRECTORY)
        finally:
            os.close(fd)
        try:
            return not os.listdir(listable)
        finally:
            os.close(listable)

    def is_mount_point(self, path: str) -> bool:
        fd = self._dir(_parts(path), False)
        try:
            return _is_mount_root(fd)
        finally:
            os.close(fd)

    def mount(self, path: str, source: str, fstype: str, flags: int = 0, data: str = "") -> None:
        """Mount onto the directory ``path`` resolves to (in the caller's mount namespace)."""
        fd = self._dir(_parts(path), False)
        here = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fchdir(fd)
            if _libc.mount(source.encode(), b".", fstype.encode(), ctypes.c_ulong(flags),
                           data.encode() or None) != 0:
                err = ctypes.get_errno()
                raise RootfsError(f"cannot mount {fstype} on {path} in the container: "
                                  f"{os.strerror(err)}", err)
        finally:
            os.fchdir(here)
            os.close(here)
            os.close(fd)

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write ``path`` whole: a new file renamed over whatever has that name."""
        parent, name, parts = self._parent(path, create=False)
        tmp = f".{name}.{os.getpid()}.tmp"
        try:
            try:
                fd = openat2(parent, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             mode)
            except OSError as err:
                raise RootfsError(f"cannot create {_shown(parts)} in the container: "
                                  f"{err.strerror}", err.errno or 0) from None
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            try:
                os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            except OSError as err:
                os.unlink(tmp, dir_fd=parent)
                raise RootfsError(f"cannot write {_shown(parts)} in the container: "
                                  f"{err.strerror}", err.errno or 0) from None
        finally:
            os.close(parent)

    def mknod_char(self, path: str, major: int, minor: int, mode: int = 0o666) -> None:
        """Make the character device ``path`` (its directories too); one that is
        already there with the same numbers is fine, anything else is refused."""
        parent, name, parts = self._parent(path, create=True)
        rdev = os.makedev(major, minor)
        try:
            try:
                os.mknod(name, stat.S_IFCHR | mode, rdev, dir_fd=parent)
                return
            except FileExistsError:
                pass
            except OSError as err:
                raise RootfsError(f"cannot create {_shown(parts)} in the container: "
                                  f"{err.strerror}", err.errno or 0) from None
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == rdev):
                raise RootfsError(f"{_shown(parts)} already exists in the container and is "
                                  f"something else", errno.EEXIST)
        finally:
            os.close(parent)


class _Statx(ctypes.Structure):
    _fields_ = [("mask", ctypes.c_uint32), ("blksize", ctypes.c_uint32),
                ("attributes", ctypes.c_uint64), ("rest", ctypes.c_uint8 * 40),
                ("attributes_mask", ctypes.c_uint64), ("tail", ctypes.c_uint8 * 192)]


def _is_mount_root(fd: int) -> bool:
    buf = _Statx()
    if _libc.statx(ctypes.c_int(fd), b"", ctypes.c_int(_AT_EMPTY_PATH),
                   ctypes.c_uint(_STATX_BASIC_STATS), ctypes.byref(buf)) == 0 \
            and buf.attributes_mask & _STATX_ATTR_MOUNT_ROOT:
        return bool(buf.attributes & _STATX_ATTR_MOUNT_ROOT)
    # No STATX_ATTR_MOUNT_ROOT (Linux < 5.8): a mount root sits on another
    # device than its parent (a bind mount of the same device is missed).
    parent = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    try:
        return os.fstat(fd).st_dev != os.fstat(parent).st_dev
    finally:
        os.close(parent)


def open_host_side(container: Container) -> Root:
    """The container's rootfs reached from the host (the pid's root); for work
    that needs no mount namespace, such as device nodes."""
    return Root.open(host_path(container))

