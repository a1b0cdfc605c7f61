"""Real containers for tests and the demo: a busybox rootfs and runc bundles.

The rootfs is built from Debian's busybox-static, with no image registry:
one static binary plus a symlink per applet. It is cached under build/.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import uuid
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOTFS = os.path.join(ROOT, "build", "rootfs")
BUSYBOX = "/bin/busybox"


def busybox_rootfs(path: str = ROOTFS) -> str:
    """Build (once) a busybox rootfs; safe to call from parallel tests."""
    if os.path.exists(os.path.join(path, ".complete")):
        return path
    tmp = f"{path}.{uuid.uuid4().hex[:6]}"
    os.makedirs(os.path.join(tmp, "bin"))
    for d in ("proc", "sys", "dev", "etc", "tmp", "run", "root"):
        os.makedirs(os.path.join(tmp, d), exist_ok=True)
    shutil.copy2(BUSYBOX, os.path.join(tmp, "bin/busybox"))
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for app in applets:
        if app != "busybox":
            os.symlink("busybox", os.path.join(tmp, "bin", app))
    with open(os.path.join(tmp, "etc/passwd"), "w") as fh:
        fh.write("root:x:0:0:root:/root:/bin/sh\n")
    with open(os.path.join(tmp, "etc/group"), "w") as fh:
        fh.write("root:x:0:\n")
    open(os.path.join(tmp, ".complete"), "w").close()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.rename(tmp, path)
    except OSError:  # another test won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def rootfs_tar(dest: str) -> str:
    """The rootfs as a tar, for ``podman import``."""
    rootfs = busybox_rootfs()
    with tarfile.open(dest, "w") as tar:
        for name in sorted(os.listdir(rootfs)):
            if name != ".complete":
                tar.add(os.path.join(rootfs, name), arcname=name)
    return dest


def runc_bundle(dest: str, args: List[str], annotations: Optional[Dict[str, str]] = None,
                hooks: Optional[Dict[str, Any]] = None) -> str:
    """A runc bundle running ``args`` in a fresh netns, over the shared rootfs."""
    os.makedirs(dest, exist_ok=True)
    subprocess.run(["runc", "spec", "--bundle", dest], check=True)
    path = os.path.join(dest, "config.json")
    with open(path) as fh:
        spec = json.load(fh)
    spec["root"] = {"path": busybox_rootfs(), "readonly": True}
    spec["process"]["args"] = args
    spec["process"]["terminal"] = False
    spec["process"]["env"] = ["PATH=/bin", "HOME=/root"]
    spec["hostname"] = "sriov-test"
    # ping needs a raw socket; the runc default set lacks CAP_NET_RAW.
    for kind in ("bounding", "effective", "permitted"):
        caps = spec["process"]["capabilities"].setdefault(kind, [])
        if "CAP_NET_RAW" not in caps:
            caps.append("CAP_NET_RAW")
    if annotations:
        spec["annotations"] = annotations
    if hooks:
        spec["hooks"] = hooks
    with open(path, "w") as fh:
        json.dump(spec, fh, indent=1)
    return dest


def hook_entry(hook_bin: str, config: str, stage: str, timeout: int = 30) -> Dict[str, Any]:
    return {"path": hook_bin, "args": ["sriov-hook", "--config", config, stage],
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "timeout": timeout}


# crun 1.8 refuses this host's hybrid cgroup layout unless cgroup2 is out of
# sight: run it in a private mount namespace without /sys/fs/cgroup/unified.
# "--propagation unchanged" keeps every other mount as it is, so a mount the
# hook makes on a shared mount (a netns pin; see shared_mount) still reaches
# the host, as it would with crun running in the host's mount namespace.
CRUN_WRAP = ["unshare", "-m", "--propagation", "unchanged", "sh", "-c",
             'umount /sys/fs/cgroup/unified 2>/dev/null; exec "$@"', "crun-wrap"]


def shared_mount(path: str) -> None:
    """Make ``path`` a shared mount point, so mounts made under it inside a
    mount namespace copied from the host's (CRUN_WRAP) show on the host."""
    from tests.simhost import mounted
    os.makedirs(path, mode=0o700, exist_ok=True)
    if not mounted(path):
        subprocess.run(["mount", "--bind", path, path], check=True)
    subprocess.run(["mount", "--make-shared", path], check=True)


class Runc:
    """runc (or crun, with ``binary="crun"``) with a private state root, so
    tests never see each other's containers."""

    def __init__(self, root: str, binary: str = "runc") -> None:
        self.root = root
        self.ids: List[str] = []
        self.cmd = (CRUN_WRAP if binary == "crun" else []) + [binary, "--root", root]

    def run(self, cid: str, bundle: str, timeout: float = 60) -> subprocess.CompletedProcess:
        self.ids.append(cid)
        return subprocess.run(self.cmd + ["run", "--bundle", bundle, cid],
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def start_detached(self, cid: str, bundle: str) -> subprocess.CompletedProcess:
        self.ids.append(cid)
        # The container inherits our stdio: give it none, or we would wait
        # on its pipes until it exits.
        import tempfile
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.run(self.cmd + ["run", "--detach", "--bundle", bundle, cid],
                                  stdout=subprocess.DEVNULL, stderr=err,
                                  text=True, timeout=60, stdin=subprocess.DEVNULL)
            err.seek(0)
            proc.stderr = err.read()
        return proc

    def exec(self, cid: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd + ["exec", cid, *args],
                              capture_output=True, text=True, timeout=60)

    def delete(self, cid: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd + ["delete", "--force", cid],
                              capture_output=True, text=True, timeout=60)

    def cleanup(self) -> None:
        for cid in self.ids:
            self.delete(cid)
        shutil.rmtree(self.root, ignore_errors=True)
