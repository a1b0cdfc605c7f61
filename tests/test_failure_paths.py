"""Failure paths with real runtimes: runc, crun, and podman on runc and crun.

Each case was a way to lose a VF, or to take someone else's interface:
a name that already exists in the container, two containers sharing a
netns, a create that fails (podman and crun run no poststop then), a retry
of the same container id, a gateway that collides with the container's
default route, and records that outlive a reboot.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from tests import simhost
from tests.conftest import HOOK, Sim, link_info, netns_process
from tests.containers import CRUN_WRAP, Runc, hook_entry, runc_bundle, shared_mount
from tests.test_podman import annotation, image, render_hooks  # noqa: F401  (fixture)

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.podman,
              pytest.mark.skipif(not all(shutil.which(b) for b in ("runc", "crun", "podman")),
                                 reason="needs runc, crun and podman")]

ENGINES = ["runc", "crun", "podman-runc", "podman-crun"]
PODMAN = ["podman", "run", "--rm", "--ulimit", "nofile=1024:1024", "--ulimit",
          "nproc=1024:1024"]


class Engine:
    """Start a container the way one engine does, with the hook wired in."""

    def __init__(self, kind: str, sim: Sim, tmp: str, image: str) -> None:
        self.kind, self.sim, self.tmp, self.image = kind, sim, tmp, image
        self.runtime = "crun" if kind.endswith("crun") else "runc"
        self.runc = Runc(f"/run/sriov-fp-{uuid.uuid4().hex[:8]}", self.runtime)
        self.podman_names: List[str] = []
        if kind.startswith("podman"):
            self.hooks_dir = render_hooks(os.path.join(tmp, f"hooks-{uuid.uuid4().hex[:6]}"),
                                          sim.config)
        if self.runtime == "crun":
            # The hook pins netns inside crun's mount namespace: let them out.
            shared_mount(os.path.join(sim.host.state_dir, "netns"))

    def run(self, ann: Optional[str], args: List[str], netns: Optional[str] = None,
            detach: bool = False, name: Optional[str] = None) -> subprocess.CompletedProcess:
        """``netns``: a /run/netns path, or "container:<name>" (the other's netns)."""
        name = name or f"fp{uuid.uuid4().hex[:8]}"
        if self.kind.startswith("podman"):
            return self._podman(ann, args, netns, detach, name)
        hooks = {"prestart": [hook_entry(HOOK, self.sim.config, "prestart")],
                 "poststop": [hook_entry(HOOK, self.sim.config, "poststop")]}
        bundle = runc_bundle(os.path.join(self.tmp, name), args,
                             {"sriov-hook.io/networks": ann} if ann else None, hooks)
        if netns:
            path = netns if not netns.startswith("container:") else \
                f"/proc/{self.pid(netns.split(':', 1)[1])}/ns/net"
            with open(os.path.join(bundle, "config.json")) as fh:
                spec = json.load(fh)
            for ns in spec["linux"]["namespaces"]:
                if ns["type"] == "network":
                    ns["path"] = path
            with open(os.path.join(bundle, "config.json"), "w") as fh:
                json.dump(spec, fh)
        if detach:
            return self.runc.start_detached(name, bundle)
        return self.runc.run(name, bundle)

    def _podman(self, ann: Optional[str], args: List[str], netns: Optional[str],
                detach: bool, name: str) -> subprocess.CompletedProcess:
        cmd = (CRUN_WRAP if self.runtime == "crun" else []) + PODMAN + [
            "--runtime", self.runtime, "--name", name, "--hooks-dir", self.hooks_dir,
            "--network", f"ns:{netns}" if netns and netns.startswith("/") else
            (netns or "none")]
        if ann:
            cmd += ["--annotation", annotation(ann)]
        if detach:
            cmd += ["-d"]
        self.podman_names.append(name)
        return subprocess.run(cmd + [self.image] + args, capture_output=True, text=True,
                              timeout=120)

    def pid(self, name: str) -> int:
        if self.kind.startswith("podman"):
            out = subprocess.run(["podman", "inspect", "-f", "{{.State.Pid}}", name],
                                 capture_output=True, text=True, check=True).stdout
            return int(out.strip())
        out = subprocess.run(self.runc.cmd + ["state", name], capture_output=True, text=True,
                             check=True).stdout
        return int(json.loads(out)["pid"])

    def stop(self, name: str) -> None:
        if self.kind.startswith("podman"):
            wrap = CRUN_WRAP if self.runtime == "crun" else []
            subprocess.run(wrap + ["podman", "rm", "-f", "-t", "0", name], capture_output=True,
                           timeout=120)
        else:
            self.runc.delete(name)

    def cleanup(self) -> None:
        for name in self.podman_names:
            self.stop(name)
        self.runc.cleanup()

    def reason(self, out: subprocess.CompletedProcess) -> str:
        """The hook's one line: in the engine's error, or (crun prints only its
        exit code) in the log."""
        lines = [ln for ln in (out.stderr + self.log()).splitlines() if "sriov-hook:" in ln
                 or " ERROR failed: " in ln]
        return "\n".join(lines)

    def log(self) -> str:
        path = self.sim.host.log_file
        return open(path).read() if os.path.exists(path) else ""


@pytest.fixture(params=ENGINES)
def engine(request: Any, make_sim: Callable[..., Sim], image: str,  # noqa: F811
           tmp_path: Any) -> Iterator[Engine]:
    sim = make_sim(nvfs=2)
    eng = Engine(request.param, sim, str(tmp_path), image)
    yield eng
    eng.cleanup()


def netns_with_eth0(sim: Sim, default_route: bool = False) -> "tuple[str, Dict[str, Any]]":
    """A named netns that already has its own eth0 (as a CNI would leave it)."""
    ns = sim.netns()
    peer = f"q{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name",
                    peer, "netns", ns], check=True)
    for cmd in (["addr", "add", "10.77.0.2/24", "dev", "eth0"], ["link", "set", "eth0", "up"]):
        subprocess.run(["ip", "-n", ns, *cmd], check=True)
    if default_route:
        subprocess.run(["ip", "-n", ns, "route", "add", "default", "via", "10.77.0.1"],
                       check=True)
    info = link_info("eth0", ns)
    assert info is not None
    return f"/run/netns/{ns}", info


def routes(path: str) -> str:
    return subprocess.run(["ip", "-n", os.path.basename(path), "route"], capture_output=True,
                          text=True).stdout


# -- the container's own interface is never touched ---------------------------------------
def test_name_clash_touches_only_the_refused_vf(engine: Engine) -> None:
    sim = engine.sim
    path, eth0 = netns_with_eth0(sim)
    out = engine.run("fast@eth0", ["true"], netns=path)
    assert out.returncode != 0
    assert "already has an interface named eth0" in engine.reason(out), out.stderr
    after = link_info("eth0", os.path.basename(path))
    assert after is not None and (after["ifindex"], after["address"]) == \
        (eth0["ifindex"], eth0["address"])
    sim.assert_clean()   # both VFs home and free; no record, no pin


def test_two_containers_sharing_a_netns(engine: Engine) -> None:
    sim = engine.sim
    ns = sim.netns()
    a = engine.run("fast@net1", ["sleep", "300"], netns=f"/run/netns/{ns}", detach=True,
                   name=f"fa{uuid.uuid4().hex[:6]}")
    assert a.returncode == 0, a.stderr
    first = link_info("net1", ns)
    assert first is not None
    name_a = (engine.podman_names or engine.runc.ids)[-1]
    b = engine.run("fast@net1", ["true"], netns=f"container:{name_a}")
    assert b.returncode != 0
    assert "already has an interface named net1" in engine.reason(b)
    again = link_info("net1", ns)
    assert again is not None and (again["ifindex"], again["address"]) == \
        (first["ifindex"], first["address"])      # A's VF stayed, untouched
    assert len(sim.records()) == 1
    assert sim.hook("check").rc == 0               # and check agrees
    engine.stop(name_a)
    sim.assert_clean()


def test_failed_create_leaks_nothing_for_the_next_container(engine: Engine) -> None:
    sim = engine.sim
    simhost.write_config(sim.host, pools=[{"name": "fast", "mode": "netdev",
                                           "pfs": [f"{sim.host.nics[0].pf}#0"]}])
    for _ in range(2):   # podman and crun run no poststop after this
        out = engine.run("fast", ["/no/such/entrypoint"])
        assert out.returncode != 0
    ok = engine.run("fast", ["cat", "/sys/class/net/net1/address"])
    assert ok.returncode == 0, ok.stderr + engine.log()[-2000:]  # the one VF came back, no gc
    assert sim.records() == [] and link_info(sim.vfs[0].ifname) is not None
    sim.assert_clean()


def test_gateway_collision_is_refused_and_names_the_route(engine: Engine) -> None:
    sim = engine.sim
    path, _ = netns_with_eth0(sim, default_route=True)
    ann = json.dumps([{"pool": "fast", "ips": ["10.9.0.2/24"], "gateway": "10.9.0.1"}])
    out = engine.run(ann, ["true"], netns=path)
    assert out.returncode != 0
    assert "already has a default route" in engine.reason(out)
    assert "default via 10.77.0.1 dev eth0" in routes(path)
    sim.assert_clean()


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_retry_of_the_same_container_id(make_sim: Callable[..., Sim], tmp_path: Any,
                                        runtime: str) -> None:
    sim = make_sim(nvfs=1)
    if runtime == "crun":
        shared_mount(os.path.join(sim.host.state_dir, "netns"))
    rt = Runc(f"/run/sriov-fp-{uuid.uuid4().hex[:8]}", runtime)
    hooks = {"prestart": [hook_entry(HOOK, sim.config, "prestart")],
             "poststop": [hook_entry(HOOK, sim.config, "poststop")]}
    cid = f"retry{uuid.uuid4().hex[:6]}"
    try:
        bad = runc_bundle(str(tmp_path / "bad"), ["/no/such/entrypoint"],
                          {"sriov-hook.io/networks": "fast"}, hooks)
        assert rt.run(cid, bad).returncode != 0
        rt.delete(cid)
        good = runc_bundle(str(tmp_path / "good"), ["cat", "/sys/class/net/net1/address"],
                           {"sriov-hook.io/networks": "fast"}, hooks)
        out = rt.run(cid, good)
        assert out.returncode == 0, out.stderr + open(sim.host.log_file).read()[-2000:]
    finally:
        rt.cleanup()
    sim.assert_clean()


# -- records and reboots -------------------------------------------------------------------
def _reboot(sim: Sim) -> None:
    """What a reboot leaves: records of another boot id, no pins, and the VFs
    (made anew at boot) on the host, down, under their own names."""
    for name in sim.records():
        path = os.path.join(sim.host.state_dir, "reservations", name)
        rec = json.load(open(path))
        rec["boot_id"] = "00000000-0000-0000-0000-000000000000"
        with open(path, "w") as fh:
            json.dump(rec, fh)
        if rec.get("pin"):
            subprocess.run(["nsenter", f"--net={rec['pin']}", "ip", "link", "set", "dev",
                            rec["ifname"], "down", "netns", "1", "name", rec["host_ifname"]],
                           check=True)
            subprocess.run(["umount", "-l", rec["pin"]], check=True)


def _hide_vf(sim: Sim, i: int, hidden: bool) -> None:
    """The VFs are not created yet after boot (no sriov_numvfs written)."""
    vf = sim.vfs[i]
    link = os.path.join(sim.host.sysfs_root, "bus/pci/devices", vf.bdf)
    virtfn = os.path.join(sim.host.sysfs_root, "bus/pci/devices", sim.host.nics[0].pf_bdf,
                          f"virtfn{vf.index}")
    for p in (link, virtfn):
        os.rename(p, p + ".later") if hidden else os.rename(p + ".later", p)


def test_records_of_an_earlier_boot_never_block_a_pool(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim(nvfs=2)
    with netns_process() as a, netns_process() as b:
        assert sim.prestart("old-a", sim.bundle("fast"), pid=a.pid).rc == 0
        assert sim.prestart("old-b", sim.bundle("fast"), pid=b.pid).rc == 0
    _reboot(sim)
    _hide_vf(sim, 1, True)
    try:
        # VF 0 exists again, VF 1 not yet: a new container gets VF 0 at once.
        with netns_process() as c:
            r = sim.prestart("new", sim.bundle("fast"), pid=c.pid)
            assert r.rc == 0, r.stderr
            assert "earlier boot" in open(sim.host.log_file).read()
        assert sim.poststop("new").rc == 0
        r = sim.hook("gc")   # VF 1's record: dropped without waiting for the device
        assert r.rc == 0 and "released=1" in r.stdout, r.stdout + r.stderr
    finally:
        _hide_vf(sim, 1, False)
    assert sim.records() == []


def test_forget_a_vf_that_is_gone_for_good(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim(nvfs=2)
    with netns_process() as p:
        assert sim.prestart("f", sim.bundle("fast"), pid=p.pid).rc == 0
        bdf = sim.vfs[0].bdf
        r = sim.hook("forget", bdf)
        assert r.rc != 0 and "still exists" in r.stderr   # never while the device is there
        _hide_vf(sim, 0, True)
        try:
            r = sim.hook("forget", bdf)
            assert r.rc == 0 and f"dropped the record of {bdf}" in r.stdout, r.stderr
            assert sim.records() == []
            r = sim.hook("forget", bdf)
            assert r.rc == 0 and "nothing to do" in r.stdout
        finally:
            _hide_vf(sim, 0, False)


# -- hostile images, on every engine ----------------------------------------------------------
@pytest.mark.parametrize("layout", ["run-to-etc", "run-to-host-dir"])
@pytest.mark.parametrize("kind", ["crun", "podman-runc", "podman-crun"])
def test_hostile_image_gets_nothing_outside_its_rootfs(make_sim: Callable[..., Sim],
                                                       tmp_path: Any, kind: str,
                                                       layout: str) -> None:
    """An image whose /run is a symlink (to /etc, or to a host directory): dpdk
    mode's file in /run/sriov-hook is refused, nothing is written outside the
    rootfs, and the VF comes back. (runc: tests/test_dpdk.py, more layouts.)"""
    from tests import standin
    from tests.kernelsim import KernelSim
    sim = make_sim(nvfs=2)
    simhost.write_config(sim.host, pools=[
        {"name": "dp", "mode": "dpdk", "pfs": [sim.host.nics[0].pf], "hugepages": "4M"}])
    ks = KernelSim(simhost.fake_sysfs(sim.host), sim.host.dev_dir)
    host = f"/tmp/sriov-host-{uuid.uuid4().hex[:8]}"   # a host path, as an attacker would aim
    os.makedirs(host)
    tag = f"localhost/sriov-hostile:{uuid.uuid4().hex[:8]}"
    rootfs = standin.busybox_tree(str(tmp_path / "rootfs"))
    standin.plant(rootfs, standin.LAYOUTS[layout], host)
    eng = Engine(kind, sim, str(tmp_path), tag)
    try:
        with open(os.path.join(host, "keep"), "w") as fh:
            fh.write("host data\n")
        before, etc_before = standin.snapshot(host), standin.snapshot(os.path.join(rootfs, "etc"))
        if kind.startswith("podman"):
            tar = str(tmp_path / "hostile.tar")
            subprocess.run(["tar", "-C", rootfs, "-cf", tar, "."], check=True)
            subprocess.run(["podman", "import", tar, tag], check=True, capture_output=True)
            out = eng.run('[{"pool":"dp"}]', ["cat", "/run/sriov-hook/net1.json"])
        else:
            hooks = {"prestart": [hook_entry(HOOK, sim.config, "prestart")],
                     "poststop": [hook_entry(HOOK, sim.config, "poststop")]}
            bundle = runc_bundle(str(tmp_path / "b"), ["cat", "/run/sriov-hook/net1.json"],
                                 {"sriov-hook.io/networks": '[{"pool":"dp"}]'}, hooks)
            path = os.path.join(bundle, "config.json")
            with open(path) as fh:
                spec = json.load(fh)
            spec["root"] = {"path": rootfs, "readonly": False}
            with open(path, "w") as fh:
                json.dump(spec, fh)
            out = eng.runc.run(f"hx{uuid.uuid4().hex[:8]}", bundle)
        assert out.returncode != 0, out.stdout
        # Either the hook refuses, or (podman's /run mount under crun) the
        # runtime already refuses to resolve the link, before any hook runs.
        assert "/run in the container is a symlink" in eng.reason(out) or \
            "openat2 `run`" in out.stderr, out.stderr
        assert standin.snapshot(host) == before
        assert not os.path.exists("/etc/sriov-hook")
        assert standin.snapshot(os.path.join(rootfs, "etc")) == etc_before
        sim.assert_clean()   # the hook's own rollback gave the VF back: no poststop needed
    finally:
        eng.cleanup()
        ks.stop()
        if kind.startswith("podman"):
            subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)
        shutil.rmtree(host, ignore_errors=True)


@pytest.mark.parametrize("kind", ["podman-runc", "podman-crun"])
def test_retry_of_the_same_container_name_under_podman(make_sim: Callable[..., Sim],
                                                        image: str, tmp_path: Any,  # noqa: F811
                                                        kind: str) -> None:
    """podman gives a retry a new id under the same name; what the failed
    create left (no poststop ran) must not stand in its way."""
    sim = make_sim(nvfs=1)
    eng = Engine(kind, sim, str(tmp_path), image)
    name = f"rt{uuid.uuid4().hex[:8]}"
    try:
        assert eng.run("fast", ["/no/such/entrypoint"], name=name).returncode != 0
        eng.stop(name)
        out = eng.run("fast", ["cat", "/sys/class/net/net1/address"], name=name)
        assert out.returncode == 0, out.stderr + eng.log()[-2000:]
    finally:
        eng.cleanup()
    sim.assert_clean()
