"""vfio and kata modes against the simulated host plus the kernel simulator."""
from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any, Callable, Iterator, Optional, Tuple

import pytest

from tests import simhost
from tests.conftest import Sim, link_info
from tests.kernelsim import KernelSim, remove_driver
from tests.test_netdev import one_line_error

pytestmark = pytest.mark.root


@pytest.fixture
def vsim(make_sim: Callable[..., Sim]) -> Iterator[Tuple[Sim, KernelSim]]:
    sim = make_sim(nvfs=4)
    pf = sim.host.nics[0].pf
    simhost.write_config(sim.host, pools=[
        {"name": "vm", "mode": "vfio", "pfs": [f"{pf}#0-1"], "allow": ["mac", "vlan"]},
        {"name": "kata", "mode": "kata", "pfs": [f"{pf}#2-3"]}])
    ks = KernelSim(simhost.fake_sysfs(sim.host), sim.host.dev_dir)
    yield sim, ks
    ks.stop()


def drv(sim: Sim, bdf: str) -> Optional[str]:
    link = os.path.join(sim.host.sysfs_root, "bus/pci/devices", bdf, "driver")
    return os.path.basename(os.readlink(link)) if os.path.lexists(link) else None


def override(sim: Sim, bdf: str) -> str:
    with open(os.path.join(sim.host.sysfs_root, "bus/pci/devices", bdf, "driver_override")) as f:
        return f.read().strip()


def assert_vf_restored(sim: Sim, i: int) -> None:
    vf = sim.vfs[i]
    assert drv(sim, vf.bdf) == "igbvf"
    assert override(sim, vf.bdf) in ("", "(null)")
    assert os.path.isdir(os.path.join(sim.host.sysfs_root, "bus/pci/devices", vf.bdf, "net",
                                      vf.ifname))
    sim.assert_home(vf)


def test_vfio_binds_and_rebinds(vsim: Tuple[Sim, KernelSim]) -> None:
    sim, _ = vsim
    vf = sim.vfs[0]
    r = sim.prestart("vm1", sim.bundle("vm"))
    assert r.rc == 0, r.stderr
    assert drv(sim, vf.bdf) == "vfio-pci"
    assert override(sim, vf.bdf) in ("", "(null)")   # cleared after the bind
    node = os.path.join(sim.host.dev_dir, "101")
    assert os.path.exists(node)
    rec = json.load(open(os.path.join(sim.host.state_dir, "reservations", f"{vf.bdf}.json")))
    assert rec["device_node"] == node and rec["orig_driver"] == "igbvf"
    assert sim.poststop("vm1").rc == 0
    assert_vf_restored(sim, 0)
    assert not os.path.exists(node)
    sim.assert_clean()


def test_vfio_kata_shaped_state(vsim: Tuple[Sim, KernelSim]) -> None:
    sim, _ = vsim
    state = {"ociVersion": "", "status": "", "id": "sandbox1", "pid": os.getpid(),
             "bundle": sim.bundle("vm")}
    r = sim.hook("prestart", state=state)
    assert r.rc == 0, r.stderr
    r = sim.hook("poststop", state={"ociVersion": "", "status": "", "id": "sandbox1",
                                    "bundle": state["bundle"]})
    assert r.rc == 0, r.stderr
    sim.assert_clean()


@pytest.mark.parametrize("case,needle", [
    ("nonviable", "not viable"),
    ("noiommu", "no IOMMU"),
    ("in_use", "in use"),
    ("no_vfio", "vfio-pci driver is not loaded"),
    ("bind_fails", "did not bind to vfio-pci"),
])
def test_vfio_failures_leave_vf_on_its_driver(vsim: Tuple[Sim, KernelSim], case: str,
                                              needle: str) -> None:
    sim, ks = vsim
    fs = simhost.fake_sysfs(sim.host)
    vf = sim.vfs[0]
    if case == "nonviable":
        # Another device, bound to a kernel driver, shares VF0's group.
        fs.add_device("0000:20:00.0", "0x8086", "0x1234", "igb", group=101)
    elif case == "noiommu":
        os.rmdir(os.path.join(sim.host.sysfs_root, "class/iommu/dmar0"))
    elif case == "in_use":
        for v in sim.vfs[:2]:
            subprocess.run(["ip", "addr", "add", "192.0.2.1/32", "dev", v.ifname], check=True)
    elif case == "no_vfio":
        remove_driver(fs, "vfio-pci")
    elif case == "bind_fails":
        ks.fail_bind[vf.bdf] = "vfio-pci"
    try:
        r = sim.prestart("bad", sim.bundle("vm"))
        one_line_error(r, needle)
        assert drv(sim, vf.bdf) == "igbvf"
        assert override(sim, vf.bdf) in ("", "(null)")
        assert sim.records() == []
        assert os.listdir(sim.host.dev_dir) == ["vfio"]
    finally:
        if case == "in_use":
            for v in sim.vfs[:2]:
                subprocess.run(["ip", "addr", "del", "192.0.2.1/32", "dev", v.ifname])


def test_vfio_noiommu_when_allowed(vsim: Tuple[Sim, KernelSim]) -> None:
    sim, _ = vsim
    os.rmdir(os.path.join(sim.host.sysfs_root, "class/iommu/dmar0"))
    with open(sim.config, "a") as fh:
        fh.write("allow_noiommu: true\n")
    r = sim.prestart("nio", sim.bundle("vm"))
    one_line_error(r, "enable_unsafe_noiommu_mode is off")
    with open(os.path.join(sim.host.sysfs_root,
                           "module/vfio/parameters/enable_unsafe_noiommu_mode"), "w") as fh:
        fh.write("Y\n")
    r = sim.prestart("nio", sim.bundle("vm"))
    assert r.rc == 0, r.stderr
    rec = json.load(open(os.path.join(sim.host.state_dir, "reservations",
                                      f"{sim.vfs[0].bdf}.json")))
    assert rec["device_node"].endswith("/noiommu-101")
    assert sim.poststop("nio").rc == 0
    assert_vf_restored(sim, 0)


def kata_runtime_binds(sim: Sim, bdf: str, detach: bool) -> None:
    """What Kata does with a physical endpoint it found in the sandbox netns."""
    root = sim.host.sysfs_root
    dev = os.path.join(root, "bus/pci/devices", bdf)

    def write(path: str, value: str) -> None:
        with open(path, "w") as fh:
            fh.write(value)

    write(os.path.join(dev, "driver_override"), "vfio-pci")
    write(os.path.join(root, "bus/pci/drivers/igbvf/unbind"), bdf)
    write(os.path.join(root, "bus/pci/drivers_probe"), bdf)
    deadline = time.time() + 5
    while drv(sim, bdf) != "vfio-pci" and time.time() < deadline:
        time.sleep(0.02)
    assert drv(sim, bdf) == "vfio-pci"
    if detach:  # Kata's detach: host driver into the override, rebind, no clear
        write(os.path.join(dev, "driver_override"), "igbvf")
        write(os.path.join(root, "bus/pci/drivers/vfio-pci/unbind"), bdf)
        write(os.path.join(root, "bus/pci/drivers_probe"), bdf)
        while drv(sim, bdf) != "igbvf" and time.time() < deadline:
            time.sleep(0.02)


@pytest.mark.parametrize("detach", [False, True], ids=["left-on-vfio", "stale-override"])
def test_kata_physical_endpoint(vsim: Tuple[Sim, KernelSim], detach: bool) -> None:
    sim, _ = vsim
    ns = sim.netns()   # stands in for the sandbox netns QEMU runs in
    vf = sim.vfs[2]
    ann = '[{"pool":"kata","ips":["10.40.0.2/24"],"mac":"02:00:00:cc:00:02"}]'
    bundle = sim.bundle(ann, ns)
    r = sim.hook("prestart", state={"ociVersion": "", "status": "", "id": "sbx",
                                    "pid": 1, "bundle": bundle})
    assert r.rc == 0, r.stderr
    assert link_info("net1", ns)["address"] == "02:00:00:cc:00:02"
    kata_runtime_binds(sim, vf.bdf, detach)
    r = sim.hook("poststop", state={"ociVersion": "", "status": "", "id": "sbx",
                                    "bundle": bundle})
    assert r.rc == 0, r.stderr
    assert_vf_restored(sim, 2)
    sim.assert_clean()


def test_kata_sandbox_refcount(vsim: Tuple[Sim, KernelSim]) -> None:
    sim, _ = vsim
    ns = sim.netns()
    extra: Any = {"annotations": {"sriov-hook.io/networks": "kata",
                                  "io.container.manager": "cri-o",   # CRI-O made it
                                  "io.kubernetes.cri-o.SandboxID": "pod1"}}
    b1 = sim.bundle(None, ns, extra)
    assert sim.prestart("ctr-a", b1).rc == 0
    assert sim.prestart("ctr-b", b1).rc == 0
    assert len(sim.records()) == 1   # one VF for the whole sandbox
    row = [r for r in sim.status() if r["state"] == "reserved"]
    assert len(row) == 1 and row[0]["owner"] == "pod1"
    assert sim.poststop("ctr-a").rc == 0
    assert len(sim.records()) == 1 and link_info("net1", ns) is not None
    assert sim.poststop("ctr-b").rc == 0
    sim.assert_clean()
