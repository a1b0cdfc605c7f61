"""A stand-in container for hook tests that need no runtime: a process with
mount and network namespaces of its own, in a devices cgroup of its own, and
a rootfs directory laid out the way a test wants (hostile ones included).

The hook reaches it exactly as it reaches a runc container before
pivot_root: ``/proc/<pid>/ns/mnt`` for the mounts, ``/proc/<pid>/root`` +
the spec's ``root.path`` for the rootfs, ``/proc/<pid>/cgroup`` for device
access. Everything made here is removed on the way out.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from typing import Dict, Iterator, Optional

CGROUP_DEVICES = "/sys/fs/cgroup/devices"


def _ns(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


@contextlib.contextmanager
def container(seconds: int = 600) -> Iterator[subprocess.Popen]:
    """The process; it is killed, and its cgroup removed, whatever happens."""
    proc = subprocess.Popen(["unshare", "--mount", "--net", "--propagation", "private",
                             "sleep", str(seconds)])
    cgroup: Optional[str] = None
    try:
        deadline = time.monotonic() + 10
        while any(_ns(proc.pid, k) == _ns(os.getpid(), k) for k in ("net", "mnt")):
            if time.monotonic() > deadline:
                raise RuntimeError("unshare did not enter new namespaces")
            time.sleep(0.005)
        if os.path.isdir(CGROUP_DEVICES):
            cgroup = os.path.join(CGROUP_DEVICES, f"sriov-test-{uuid.uuid4().hex[:8]}")
            os.mkdir(cgroup)
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as fh:
                fh.write(str(proc.pid))
        yield proc
    finally:
        proc.kill()
        proc.wait()
        if cgroup is not None:
            for _ in range(100):   # the cgroup empties once the kernel reaped the task
                try:
                    os.rmdir(cgroup)
                    break
                except OSError:
                    time.sleep(0.01)


def busybox_tree(dest: str) -> str:
    """A writable copy of the test busybox rootfs (tests/containers.py)."""
    from tests.containers import busybox_rootfs
    shutil.copytree(busybox_rootfs(), dest, symlinks=True)
    return dest


# Hostile layouts: what each path in the image is. "{host}" is a directory
# on the host, outside the rootfs, that the test creates and checks is left
# untouched; "{up}" climbs out of the rootfs with "..".
LAYOUTS: Dict[str, Dict[str, str]] = {
    "run-to-etc": {"run": "/etc"},
    "run-to-host-dir": {"run": "{host}"},
    "run-dotdot-escape": {"run": "{up}{host}"},
    "run-sriov-hook-to-host": {"run/sriov-hook": "{host}"},
    "run-sriov-hook-relative": {"run/sriov-hook": "../../{up}{host}"},
    "dev-to-host": {"dev": "{host}"},
    "dev-to-image-dir": {"dev": "tmp/devdir"},
    "dev-vfio-to-host": {"dev/vfio": "{host}"},
    "dev-hugepages-to-host": {"dev/hugepages": "{host}"},
    "dev-hugepages-to-etc": {"dev/hugepages": "/etc"},
}


def plant(rootfs: str, layout: Dict[str, str], host: str) -> None:
    """Replace each named path of ``rootfs`` with a symlink as ``layout`` says."""
    up = "../" * 12
    for rel, target in layout.items():
        path = os.path.join(rootfs, rel)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(target.format(host=host.lstrip("/") if "{up}" in target else host,
                                 up=up), path)


def snapshot(path: str) -> Dict[str, bytes]:
    """Every file under ``path`` with its content, to prove nothing changed."""
    out: Dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):   # never followed (/etc/mtab -> /proc/mounts)
                out[os.path.relpath(full, path)] = b"<link> " + os.fsencode(os.readlink(full))
            elif os.path.isfile(full):
                with open(full, "rb") as fh:
                    out[os.path.relpath(full, path)] = fh.read()
            else:
                out[os.path.relpath(full, path)] = b"<dir>"
    return out
