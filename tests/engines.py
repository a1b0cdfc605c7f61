"""Private container engines for tests: Debian's containerd 1.6 and dockerd 20.10.

Each daemon gets its own root, state dir and socket, and is stopped (with
its shims, mounts and cgroups) afterwards, whatever happened. Nothing of the
host's own engine (if any) is used or touched. Images come from the busybox
rootfs of tests/containers.py, never from a registry.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
from typing import Dict, List, Optional, Tuple

from tests.containers import rootfs_tar

# Directories the daemons create outside their own roots (the shims' sockets,
# dockerd's plugin dir): removed afterwards if a test made them.
SHARED_DIRS = ("/run/containerd/s", "/run/containerd/fifo", "/run/containerd/runc",
               "/run/containerd", "/run/docker/plugins", "/run/docker")
CGROUP_ROOT = "/sys/fs/cgroup"


def oci_archive(dest: str, ref: str) -> str:
    """An OCI image layout tar holding the busybox rootfs as its one layer."""
    layer_tar = rootfs_tar(dest + ".layer")
    with open(layer_tar, "rb") as fh:
        layer = fh.read()
    os.unlink(layer_tar)
    with tarfile.open(dest, "w") as tar:
        def blob(data: bytes, media: str) -> Dict[str, object]:
            digest = hashlib.sha256(data).hexdigest()
            _add(tar, f"blobs/sha256/{digest}", data)
            return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)}
        ldesc = blob(layer, "application/vnd.oci.image.layer.v1.tar")
        config = {"architecture": "amd64", "os": "linux",
                  "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
                  "rootfs": {"type": "layers", "diff_ids": [ldesc["digest"]]}}
        cdesc = blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": cdesc, "layers": [ldesc]}
        mdesc = blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
        mdesc["annotations"] = {"org.opencontainers.image.ref.name": ref,
                                "io.containerd.image.name": ref}
        _add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        _add(tar, "index.json", json.dumps({"schemaVersion": 2, "manifests": [mdesc]}).encode())
    return dest


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


class _Daemon:
    """What both daemons share: start, wait until up, stop and sweep up after."""

    def __init__(self, kind: str, base: str) -> None:
        self.uid = uuid.uuid4().hex[:8]
        self.base = base                                   # on disk: roots, logs
        self.run_dir = f"/run/sriov-test-{kind}-{self.uid}"   # short: sockets live here
        self.sock = os.path.join(self.run_dir, "api.sock")
        self.log_path = os.path.join(base, f"{kind}.log")
        self.proc: Optional["subprocess.Popen[bytes]"] = None
        self._shared_before = {d for d in SHARED_DIRS if os.path.lexists(d)}
        os.makedirs(base, exist_ok=True)
        os.makedirs(self.run_dir, mode=0o711)

    def _start(self, cmd: List[str], ready: List[str]) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited: {self.log_tail()}")
            if subprocess.run(ready, capture_output=True).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{cmd[0]} did not come up: {self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(fh.readlines()[-n:])
        except OSError:
            return ""

    def _stop_daemon(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _sweep(self, cgroup_parent: str) -> List[str]:
        """Shims, mounts, cgroups and shared dirs this daemon left, by exact path or pid.

        Returns the processes and mounts that were still there: after a clean
        stop, none.
        """
        left = []
        for pid in _pids_mentioning(self.run_dir):
            left.append(f"process {pid}")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for mnt in reversed(_mounts_under((self.run_dir, self.base))):
            left.append(f"mount {mnt}")
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        for ctl in _listdir(CGROUP_ROOT):
            _rmdir_tree(os.path.join(CGROUP_ROOT, ctl, cgroup_parent))
        shutil.rmtree(self.run_dir, ignore_errors=True)
        for d in SHARED_DIRS:
            if d not in self._shared_before:
                _rmdir_tree(d)
        return left


class Containerd(_Daemon):
    """containerd with its own root, state, socket and namespace (the CRI plugin off)."""

    def __init__(self, base: str) -> None:
        super().__init__("ctd", base)
        self.ns = f"sriovtest{self.uid}"   # also the parent of its containers' cgroups
        config = os.path.join(base, "containerd.toml")
        with open(config, "w") as fh:
            fh.write(f'version = 2\nroot = "{base}/root"\nstate = "{self.run_dir}/state"\n'
                     'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                     f'[grpc]\n  address = "{self.sock}"\n'
                     f'[ttrpc]\n  address = "{self.sock}.ttrpc"\n')
        self._start(["containerd", "--config", config],
                    ["ctr", "-a", self.sock, "version"])

    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ctr", "-a", self.sock, "-n", self.ns, *args],
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def containers(self) -> List[str]:
        out = self.ctr("containers", "list", "-q").stdout.split()
        return sorted(out)

    def remove(self, cid: str) -> None:
        self.ctr("tasks", "kill", "-s", "SIGKILL", cid)
        self.ctr("tasks", "delete", "-f", cid)
        self.ctr("containers", "delete", cid)

    def stop(self) -> List[str]:
        """Remove every container, stop the daemon; what had to be swept up by force."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                for cid in self.containers():
                    self.remove(cid)
        finally:
            self._stop_daemon()
        return self._sweep(self.ns)


class Dockerd(_Daemon):
    """dockerd (and the containerd it starts) under its own roots: no bridge, no iptables."""

    def __init__(self, base: str, runtimes: Dict[str, str]) -> None:
        super().__init__("dk", base)
        self.cgroup_parent = f"sriovtest-dk{self.uid}"
        self.client_env = dict(os.environ, DOCKER_CONFIG=os.path.join(base, "client"))
        config = os.path.join(base, "daemon.json")
        with open(config, "w") as fh:
            json.dump({"runtimes": {name: {"path": path} for name, path in runtimes.items()},
                       # dockerd 20.10 writes a trust key to /etc/docker otherwise
                       "deprecated-key-path": os.path.join(base, "key.json")}, fh)
        self._start(["dockerd", "--config-file", config, "--data-root", f"{base}/data",
                     "--exec-root", f"{self.run_dir}/exec", "--pidfile", f"{self.run_dir}/pid",
                     "-H", f"unix://{self.sock}", "--bridge", "none", "--iptables=false",
                     "--ip6tables=false", "--ip-forward=false", "--ip-masq=false",
                     "--userland-proxy=false", "--storage-driver", "vfs",
                     "--exec-opt", "native.cgroupdriver=cgroupfs",
                     "--cgroup-parent", self.cgroup_parent],
                    ["/usr/bin/docker", "-H", f"unix://{self.sock}", "version"])

    def docker(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        # Debian's client, the daemon's own version (another may be first on PATH).
        return subprocess.run(["/usr/bin/docker", "-H", f"unix://{self.sock}", *args],
                              capture_output=True, text=True, timeout=timeout,
                              env=self.client_env, stdin=subprocess.DEVNULL)

    def stop(self) -> List[str]:
        """Remove every container, stop the daemon; what had to be swept up by force."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                ids = self.docker("ps", "-aq").stdout.split()
                if ids:
                    self.docker("rm", "-f", *ids)
        finally:
            self._stop_daemon()
        return self._sweep(self.cgroup_parent)


def _pids_mentioning(text: str) -> List[int]:
    """Processes whose command line names ``text`` (our unique run dir): our shims."""
    out = []
    for entry in _listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if text.encode() in fh.read():
                    out.append(int(entry))
        except OSError:
            pass
    return out


def _mounts_under(prefixes: Tuple[str, ...]) -> List[str]:
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh]
    return [p for p in points if any(p == d or p.startswith(d.rstrip("/") + "/")
                                     for d in prefixes)]


def _rmdir_tree(path: str) -> None:
    """rmdir bottom-up (cgroup dirs cannot be unlinked, only rmdir'ed when empty)."""
    if not os.path.isdir(path):
        return
    for dirpath, dirnames, _ in os.walk(path, topdown=False):
        for d in dirnames:
            try:
                os.rmdir(os.path.join(dirpath, d))
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def _listdir(path: str) -> List[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
