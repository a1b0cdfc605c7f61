"""Shared fixtures: a simulated SR-IOV host, throwaway netns, hook runner.

Everything a test makes has a unique name and is removed in a finalizer,
so a failing test leaves nothing behind and parallel runs never collide.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from tests import simhost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config: Any, items: List[Any]) -> None:
    skip = pytest.mark.skip(reason="needs root (netns, veth, mounts)")
    for item in items:
        if "root" in item.keywords and not IS_ROOT:
            item.add_marker(skip)


@dataclass
class HookResult:
    rc: int
    stdout: str
    stderr: str


# The venv's sriov-hook, what runtimes start: the compiled client (native/sriov-hook.c,
# built by make deps).
HOOK = os.path.join(os.path.dirname(sys.executable), "sriov-hook")
NATIVE = "native"


def run_hook(config: str, *args: str, state: Any = None, env: Optional[Dict[str, str]] = None,
             timeout: float = 60, module: str = "sriov_hook") -> HookResult:
    """``module``: tests.pfmodel runs the hook with a PF driver model; NATIVE, the
    compiled client (what runtimes start)."""
    data = state if isinstance(state, (bytes, type(None))) else json.dumps(state).encode()
    cmd = [HOOK] if module == NATIVE else [sys.executable, "-m", module]
    proc = subprocess.run([*cmd, "--config", config, *args],
                          input=data or b"", capture_output=True, timeout=timeout,
                          cwd=ROOT, env=env)
    return HookResult(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def imported_modules(cmd: List[str], data: bytes) -> List[str]:
    """The modules a command imports, in order (``cmd`` runs ``python -X importtime``);
    the command must succeed."""
    proc = subprocess.run(cmd, input=data, capture_output=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return [line.split("|")[-1].strip() for line in proc.stderr.decode().splitlines()
            if line.startswith("import time:")][1:]   # [0] is the column header


def link_info(name: str, netns: Optional[str] = None) -> Optional[Dict[str, Any]]:
    cmd = ["ip", "-j", "link", "show", "dev", name]
    if netns:
        cmd = ["ip", "-n", netns, "-j", "link", "show", "dev", name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout)[0]


def addrs(name: str, netns: Optional[str] = None) -> List[str]:
    cmd = ["ip", "-j", "addr", "show", "dev", name]
    if netns:
        cmd[1:1] = ["-n", netns]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return [f"{a['local']}/{a['prefixlen']}" for a in out[0].get("addr_info", [])
            if a.get("scope") == "global"]


def nsfs_mounts() -> List[str]:
    with open("/proc/self/mountinfo") as fh:
        return [line.split()[4] for line in fh if " - nsfs " in line]


def start_netns_process(seconds: int = 600) -> subprocess.Popen:
    """A stand-in container: a process in a network namespace of its own.

    Returns only once the process is really in its new netns; before that
    its /proc/<pid>/ns/net is still the host's, which the hook refuses.
    """
    proc = subprocess.Popen(["unshare", "--net", "sleep", str(seconds)])
    host = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if os.readlink(f"/proc/{proc.pid}/ns/net") != host:
                return proc
        except OSError:
            pass
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    raise RuntimeError("unshare --net did not enter a new network namespace")


@contextlib.contextmanager
def netns_process() -> Iterator[subprocess.Popen]:
    """start_netns_process(), killed on the way out whatever happens."""
    proc = start_netns_process()
    try:
        yield proc
    finally:
        proc.kill()   # a no-op if the test already killed and reaped it
        proc.wait()


class Sim:
    """A SimHost plus what tests need around it."""

    def __init__(self, host: simhost.SimHost, tmp: str) -> None:
        self.host = host
        self.tmp = tmp
        self.config = host.config
        self._ns: List[str] = []
        self.orig = {vf.ifname: link_info(vf.ifname) for vf in host.vfs}
        self.module = "sriov_hook"          # tests.pfmodel: with a PF driver model
        self.env: Dict[str, str] = {}       # added to the hook's environment

    @property
    def vfs(self) -> List[simhost.SimVf]:
        return self.host.vfs

    def netns(self) -> str:
        name = f"t{uuid.uuid4().hex[:10]}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self._ns.append(name)
        return name

    def bundle(self, annotation: Optional[str], netns: Optional[str] = None,
               extra: Optional[Dict[str, Any]] = None) -> str:
        d = os.path.join(self.tmp, f"bundle-{uuid.uuid4().hex[:8]}")
        os.makedirs(d)
        spec: Dict[str, Any] = {"ociVersion": "1.0.2", "annotations": {},
                                "linux": {"namespaces": [{"type": "network"}]}}
        if netns:
            spec["linux"]["namespaces"][0]["path"] = f"/run/netns/{netns}"
        if annotation is not None:
            spec["annotations"]["sriov-hook.io/networks"] = annotation
        spec.update(extra or {})
        with open(os.path.join(d, "config.json"), "w") as fh:
            json.dump(spec, fh)
        return d

    def hook(self, *args: str, **kw: Any) -> HookResult:
        if self.env:
            kw["env"] = {**(kw.get("env") or os.environ), **self.env}
        return run_hook(self.config, *args, module=self.module, **kw)

    def prestart(self, cid: str, bundle: str, pid: Optional[int] = None) -> HookResult:
        state: Dict[str, Any] = {"ociVersion": "1.0.2", "id": cid, "status": "creating",
                                 "bundle": bundle}
        if pid:
            state["pid"] = pid
        return self.hook("prestart", state=state)

    def poststop(self, cid: str, bundle: str = "/nonexistent") -> HookResult:
        return self.hook("poststop", state={"ociVersion": "1.0.2", "id": cid,
                                            "status": "stopped", "bundle": bundle})

    def status(self) -> List[Dict[str, Any]]:
        r = self.hook("status", "--json")
        assert r.rc == 0, r.stderr
        return json.loads(r.stdout)["vfs"]

    def records(self) -> List[str]:
        d = os.path.join(self.host.state_dir, "reservations")
        return sorted(os.listdir(d)) if os.path.isdir(d) else []

    def assert_home(self, vf: simhost.SimVf) -> None:
        """The VF is back on the host under its own name, exactly as it was."""
        now = link_info(vf.ifname)
        assert now is not None, f"{vf.ifname} is not back on the host"
        before = self.orig[vf.ifname]
        assert now["address"] == before["address"]
        assert now["mtu"] == before["mtu"]
        assert ("UP" in now["flags"]) == ("UP" in before["flags"])
        assert addrs(vf.ifname) == []

    def assert_clean(self) -> None:
        """Every VF free and at home; no records, no pins."""
        for vf in self.vfs:
            self.assert_home(vf)
        assert self.records() == []
        pins = os.path.join(self.host.state_dir, "netns")
        assert not any(m.startswith(pins) for m in nsfs_mounts())
        assert all(row["state"] == "free" for row in self.status())

    def cleanup(self) -> None:
        for name in self._ns:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        simhost.teardown(self.host)


@pytest.fixture
def make_sim(tmp_path: Any) -> Iterator[Callable[..., Sim]]:
    sims: List[Sim] = []

    def factory(nvfs: int = 4, **kw: Any) -> Sim:
        base = os.path.join(str(tmp_path), f"sim{len(sims)}")
        sim = Sim(simhost.build(base, nvfs=nvfs, **kw), str(tmp_path))
        sims.append(sim)
        return sim

    yield factory
    for sim in sims:
        sim.cleanup()


@pytest.fixture
def sim(make_sim: Callable[..., Sim]) -> Sim:
    return make_sim()
