"""PF-side handling against three PF driver behaviours (tests/pfmodel.py).

What the lab proves on real igb, run here in the fast suite against igb,
ixgbe and i40e-like models: the requested MAC goes on the PF as the VF's
admin MAC and reaches the VF netdev (through a driver reload where the
driver needs one), VLAN and trust are set, and release puts the PF side
back first, then the netdev, so both read exactly as before. Each crash
point and the rollback are covered, and so are the bad states: a MAC the
driver refuses, a PF renamed or gone, a netdev that never comes back.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from sriov_hook import faults
from tests import simhost
from tests.conftest import Sim, link_info, nsfs_mounts
from tests.invariants import vf_driver
from tests.kernelsim import KernelSim
from tests.pfmodel import DRIVERS, ENV, PfModel
from tests.test_netdev import one_line_error

pytestmark = pytest.mark.root

MAC = "02:00:00:5f:00:01"
FULL = {"pool": "fast", "mac": MAC, "vlan": 100, "trust": True, "ips": ["10.9.0.2/24"]}


@dataclass
class PfSim:
    sim: Sim
    model: PfModel
    ks: KernelSim
    driver: str

    def ann(self, **fields: Any) -> str:
        return json.dumps([{**FULL, **fields}])

    def snapshot(self) -> Dict[str, Any]:
        """What a user sees: the PF's view of each VF, and each VF netdev."""
        return {"pf": {i: asdict(self.model.vf(i)) for i in range(len(self.sim.vfs))},
                "netdev": {vf.ifname: _view(vf.ifname) for vf in self.sim.vfs}}

    def log(self) -> str:
        with open(self.sim.host.log_file) as fh:
            return fh.read()


def _view(name: str) -> Optional[Dict[str, Any]]:
    info = link_info(name)
    if info is None:
        return None
    return {"address": info["address"], "mtu": info["mtu"], "up": "UP" in info["flags"]}


def make_pfsim(make_sim: Callable[..., Sim], driver: str, udev: bool = False) -> PfSim:
    sim = make_sim(nvfs=4, pf_driver=driver, vf_driver=DRIVERS[driver])
    pf = sim.host.nics[0].pf_bdf
    allow = ["mac", "vlan", "trust", "mtu"]
    udev_dir = os.path.join(sim.host.dir, "udev")
    simhost.write_config(sim.host, pools=[
        {"name": "fast", "mode": "netdev", "pfs": [f"{pf}#0-1"], "allow": allow},
        {"name": "vm", "mode": "vfio", "pfs": [f"{pf}#2"], "allow": allow},
        {"name": "kata", "mode": "kata", "pfs": [f"{pf}#3"], "allow": allow}],
        extra={"udev_dir": udev_dir})
    model = PfModel.create(os.path.join(sim.host.dir, "pfmodel.json"), driver,
                           sim.host.sysfs_root, pf, sim.host.uid)
    if udev:
        os.makedirs(udev_dir)
        open(os.path.join(udev_dir, "control"), "w").close()
        model.set(udev_dir=udev_dir)
    ks = KernelSim(simhost.fake_sysfs(sim.host), sim.host.dev_dir)
    ks.on_net_probe.append(model.on_probe)
    sim.module = "tests.pfmodel"
    sim.env = {ENV: model.path}
    return PfSim(sim, model, ks, driver)


@pytest.fixture(params=sorted(DRIVERS))
def pf(request: Any, make_sim: Callable[..., Sim]) -> Iterator[PfSim]:
    p = make_pfsim(make_sim, request.param)
    yield p
    p.ks.stop()


@pytest.fixture
def igb(make_sim: Callable[..., Sim]) -> Iterator[PfSim]:
    p = make_pfsim(make_sim, "igb")
    yield p
    p.ks.stop()


def assert_restored(p: PfSim, before: Dict[str, Any]) -> None:
    assert p.snapshot() == before, p.log()[-4000:]
    assert p.sim.records() == []
    pins = os.path.join(p.sim.host.state_dir, "netns")
    assert not any(m.startswith(pins) for m in nsfs_mounts())


# -- attach and release ---------------------------------------------------------------
@pytest.mark.parametrize("trust", [True, False], ids=["trusted", "untrusted"])
def test_admin_mac_vlan_trust_roundtrip(pf: PfSim, trust: bool) -> None:
    # Untrusted matters: a trusted VF may change its own MAC, which would
    # hide a release that restores the netdev before the PF side.
    sim, before = pf.sim, pf.snapshot()
    ns = sim.netns()
    r = sim.prestart("a", sim.bundle(pf.ann(trust=trust), ns))
    assert r.rc == 0, r.stderr
    inside = link_info("net1", ns)
    assert inside is not None and inside["address"] == MAC   # the VF carries the admin MAC
    vf = pf.model.vf(0)
    assert (vf.admin, vf.mac, vf.vlan, vf.trust) == (True, MAC, 100, trust)
    if pf.driver in ("igb", "ixgbe"):
        assert "reloaded" in pf.log()         # the VF learns an admin MAC only on probe
    else:
        assert "reloaded" not in pf.log()       # i40e passes it on at once
    assert pf.snapshot()["pf"][1] == before["pf"][1]   # the other VF untouched
    r = sim.poststop("a")
    assert r.rc == 0, r.stderr
    assert_restored(pf, before)               # PF side and netdev exactly as before


def test_vfio_mode_release_restores_the_pf_side_first(pf: PfSim) -> None:
    sim, before = pf.sim, pf.snapshot()
    r = sim.prestart("v", sim.bundle(pf.ann(pool="vm", ips=[])))
    assert r.rc == 0, r.stderr
    assert pf.model.vf(2).admin and pf.model.vf(2).vlan == 100
    r = sim.poststop("v")
    assert r.rc == 0, r.stderr
    assert_restored(pf, before)


def test_kata_mode_after_the_runtime_took_the_vf(pf: PfSim) -> None:
    sim, before = pf.sim, pf.snapshot()
    ns = sim.netns()
    r = sim.prestart("k", sim.bundle(pf.ann(pool="kata"), ns))
    assert r.rc == 0, r.stderr
    # Kata's bindNICToVFIO: override, unbind from the VF driver, probe.
    bdf, root = sim.vfs[3].bdf, sim.host.sysfs_root
    for path, value in (((f"bus/pci/devices/{bdf}/driver_override"), "vfio-pci"),
                        (f"bus/pci/drivers/{DRIVERS[pf.driver]}/unbind", bdf),
                        ("bus/pci/drivers_probe", bdf)):
        with open(os.path.join(root, path), "w") as fh:
            fh.write(value)
    assert wait_for(lambda: vf_driver(sim, bdf) == "vfio-pci")
    r = sim.poststop("k")
    assert r.rc == 0, r.stderr
    assert_restored(pf, before)


def test_rollback_after_a_late_failure(pf: PfSim) -> None:
    """The gateway collides with the container's default route: everything
    done before (PF side, reload, move) is undone; the container's own
    interface and route stay; with replace_default it is taken over."""
    sim, before = pf.sim, pf.snapshot()
    ns = sim.netns()
    own = f"o{sim.host.uid}"
    subprocess.run(["ip", "link", "add", own, "netns", ns, "type", "veth", "peer", "name",
                    f"p{sim.host.uid}", "netns", ns], check=True)
    for cmd in (["addr", "add", "10.20.0.2/24", "dev", own], ["link", "set", own, "up"],
                ["route", "add", "default", "via", "10.20.0.1"]):
        subprocess.run(["ip", "-n", ns, *cmd], check=True)
    r = sim.prestart("r", sim.bundle(pf.ann(gateway="10.9.0.1"), ns))
    one_line_error(r, "already has a default route")
    assert_restored(pf, before)
    routes = subprocess.run(["ip", "-n", ns, "route"], capture_output=True, text=True).stdout
    assert f"default via 10.20.0.1 dev {own}" in routes and link_info("net1", ns) is None
    r = sim.prestart("r", sim.bundle(pf.ann(gateway="10.9.0.1", replace_default=True), ns))
    assert r.rc == 0, r.stderr
    routes = subprocess.run(["ip", "-n", ns, "route"], capture_output=True, text=True).stdout
    assert "default via 10.9.0.1 dev net1" in routes
    assert sim.poststop("r").rc == 0
    assert_restored(pf, before)


# -- crash at each step ------------------------------------------------------------------
def _kill_and_recover(p: PfSim, point: str, stage: str, n: int) -> Optional[str]:
    """Kill the hook at ``point``; recover with poststop (odd n) or gc after the
    container's netns is gone (even n). None if the point is never reached."""
    sim = p.sim
    ns = sim.netns()
    cid = f"f{n}"
    bundle = sim.bundle(p.ann(), ns)
    env = {**os.environ, **sim.env}
    env[faults.ENV] = point if stage == "prestart" else ""
    r = sim.prestart(cid, bundle) if not env[faults.ENV] else \
        sim.hook("prestart", state=_state(cid, bundle), env=env)
    if stage == "poststop":
        assert r.rc == 0, r.stderr
        env[faults.ENV] = point
        r = sim.hook("poststop", state=_state(cid, bundle, "stopped"), env=env)
    if r.rc != -signal.SIGKILL:
        assert sim.poststop(cid).rc == 0
        return None
    if n % 2:
        r = sim.poststop(cid)
    else:
        subprocess.run(["ip", "netns", "del", ns], check=True)
        r = sim.hook("gc")
    return f"rc={r.rc} {r.stdout} {r.stderr}" if r.rc != 0 else ""


def _state(cid: str, bundle: str, status: str = "creating") -> Dict[str, Any]:
    return {"ociVersion": "1.0.2", "id": cid, "status": status, "bundle": bundle}


@pytest.mark.slow
def test_every_crash_point_recovers(pf: PfSim) -> None:
    before = pf.snapshot()
    reached: List[str] = []
    points = [("prestart", p) for p in faults.PRESTART + faults.RECORD] + \
             [("poststop", p) for p in faults.POSTSTOP]
    for n, (stage, point) in enumerate(points):
        outcome = _kill_and_recover(pf, point, stage, n)
        if outcome is None:
            continue
        assert outcome == "", f"{stage}/{point}: recovery failed: {outcome}"
        assert pf.snapshot() == before, f"{stage}/{point}"
        assert pf.sim.records() == [], f"{stage}/{point}"
        reached.append(f"{stage}/{point}")
    for must in ("vf_settings:done", "admin_mac:recorded", "admin_mac:done", "move:done",
                 "undo:admin_mac", "undo:vf_settings", "undo:move"):
        assert any(r.endswith(must) for r in reached), (must, reached)
    if pf.driver != "i40e":
        assert "prestart/reprobe:recorded" in reached and "prestart/reprobe:done" in reached


# -- bad input and bad states ------------------------------------------------------------
def test_a_mac_the_driver_refuses(pf: PfSim) -> None:
    sim, before = pf.sim, pf.snapshot()
    pf.model.set(refuse_macs=[MAC])
    r = sim.prestart("m", sim.bundle(pf.ann(), sim.netns()))
    one_line_error(r, "Invalid argument")
    assert_restored(pf, before)               # VLAN and trust, set first, are undone
    ns = sim.netns()
    r = sim.prestart("m2", sim.bundle(pf.ann(mac="02:00:00:5f:00:02"), ns))
    assert r.rc == 0, r.stderr                # the VF is usable by the next container
    assert sim.poststop("m2").rc == 0
    assert_restored(pf, before)


def test_a_driver_that_cannot_clear_an_admin_mac(pf: PfSim) -> None:
    """Old kernels answer EINVAL to a zero MAC: the original MAC becomes the
    admin MAC (the netdev still gets it back), and the log says why."""
    sim, before = pf.sim, pf.snapshot()
    pf.model.set(refuse_zero=True)
    assert sim.prestart("z", sim.bundle(pf.ann(), sim.netns())).rc == 0
    r = sim.poststop("z")
    assert r.rc == 0, r.stderr
    after = pf.snapshot()
    assert after["netdev"] == before["netdev"]
    vf0 = after["pf"][0]
    assert vf0["mac"] == before["pf"][0]["mac"] and vf0["vlan"] == 0 and not vf0["trust"]
    assert "refuses to clear the admin MAC" in pf.log()


def test_pf_renamed_while_the_vf_is_out(igb: PfSim) -> None:
    sim, before = igb.sim, igb.snapshot()
    nic = sim.host.nics[0]
    assert sim.prestart("n", sim.bundle(igb.ann(), sim.netns())).rc == 0
    renamed = f"sr{sim.host.uid}"
    _rename_pf(sim, nic.pf, renamed)
    try:
        r = sim.poststop("n")
        assert r.rc == 0, r.stderr             # found by PCI address, not by name
        assert_restored(igb, before)
    finally:
        _rename_pf(sim, renamed, nic.pf)


def test_pf_gone_keeps_the_vf_out_of_use(igb: PfSim) -> None:
    sim, before = igb.sim, igb.snapshot()
    nic = sim.host.nics[0]
    assert sim.prestart("g", sim.bundle(igb.ann(), sim.netns())).rc == 0
    _hide_pf(sim, nic.pf)
    try:
        r = sim.poststop("g")
        one_line_error(r, "has no netdev on the host")
        assert sim.records() == [f"{sim.vfs[0].bdf}.json"]    # kept: the tenant's MAC is on it
        assert igb.model.vf(0).admin                          # (and stays, until the PF is back)
        r = sim.prestart("g2", sim.bundle("fast", sim.netns()))
        assert r.rc == 0, r.stderr
        assert json.load(open(os.path.join(sim.host.state_dir, "reservations",
                                           f"{sim.vfs[1].bdf}.json")))["owner"] == "g2"
        assert sim.poststop("g2").rc == 0
        assert igb.snapshot()["pf"][1] == before["pf"][1]
    finally:
        _unhide_pf(sim, nic.pf)
    r = sim.hook("gc")
    assert r.rc == 0 and "released=1" in r.stdout, r.stdout + r.stderr
    assert_restored(igb, before)


def test_netdev_that_never_comes_back_after_the_reload(igb: PfSim) -> None:
    sim, before = igb.sim, igb.snapshot()
    igb.model.set(netdev_on_probe=False)
    r = sim.prestart("d", sim.bundle(igb.ann(), sim.netns()))
    one_line_error(r, "no netdev came back within")
    assert sim.records() == [f"{sim.vfs[0].bdf}.json"]        # nobody else gets this VF
    assert igb.snapshot()["pf"][1] == before["pf"][1]
    r = sim.prestart("d2", sim.bundle("fast", sim.netns()))
    assert r.rc == 0 and sim.poststop("d2").rc == 0
    # The driver behaves again; an operator reloads it; gc finishes the job.
    igb.model.set(netdev_on_probe=True)
    bdf = sim.vfs[0].bdf
    drivers = os.path.join(sim.host.sysfs_root, "bus/pci")
    with open(os.path.join(drivers, "drivers/igbvf/unbind"), "w") as fh:
        fh.write(bdf)
    assert wait_for(lambda: vf_driver(sim, bdf) is None)
    with open(os.path.join(drivers, "drivers_probe"), "w") as fh:
        fh.write(bdf)
    assert wait_for(lambda: vf_driver(sim, bdf) == "igbvf")
    r = sim.hook("gc")
    assert r.rc == 0 and "released=1" in r.stdout, r.stdout + r.stderr
    assert_restored(igb, before)


def test_waits_for_udev_to_name_the_reloaded_netdev(make_sim: Callable[..., Sim]) -> None:
    p = make_pfsim(make_sim, "igb", udev=True)
    try:
        sim, before = p.sim, p.snapshot()
        ns = sim.netns()
        r = sim.prestart("u", sim.bundle(p.ann(), ns))
        assert r.rc == 0, r.stderr
        assert not p.model.read().raced       # not moved before udev was done with it
        assert f"netdev u{sim.host.uid}" in p.log()
        assert link_info("net1", ns)["address"] == MAC
        assert sim.poststop("u").rc == 0
        assert_restored(p, before)
    finally:
        p.ks.stop()


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _pf_dirs(sim: Sim, name: str) -> "tuple[str, str]":
    dev = os.path.join(sim.host.sysfs_root, "bus/pci/devices", sim.host.nics[0].pf_bdf)
    return os.path.join(dev, "net", name), os.path.join(sim.host.sysfs_root, "class/net", name)


def _rename_pf(sim: Sim, old: str, new: str) -> None:
    subprocess.run(["ip", "link", "set", "dev", old, "name", new], check=True)
    net_old, cls_old = _pf_dirs(sim, old)
    net_new, cls_new = _pf_dirs(sim, new)
    os.rename(net_old, net_new)
    target = os.readlink(cls_old)
    os.unlink(cls_old)
    os.symlink(target[: -len(old)] + new, cls_new)


def _hide_pf(sim: Sim, name: str) -> None:
    net, cls = _pf_dirs(sim, name)
    os.rename(net, net + ".gone")
    os.rename(cls, cls + ".gone")


def _unhide_pf(sim: Sim, name: str) -> None:
    net, cls = _pf_dirs(sim, name)
    os.rename(net + ".gone", net)
    os.rename(cls + ".gone", cls)
