"""`sriov-hook cdi`: the spec, and podman resolving it (per-VF and per-pool devices)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from typing import Callable, Iterator, Tuple

import pytest

from tests import simhost
from tests.conftest import Sim
from tests.kernelsim import VFIO_MAJOR, KernelSim
from tests.test_podman import PODMAN_RUN, image  # noqa: F401  (fixture)

pytestmark = pytest.mark.root
CDI_DIR = "/var/run/cdi"


@pytest.fixture
def csim(make_sim: Callable[..., Sim]) -> Iterator[Tuple[Sim, KernelSim, str]]:
    sim = make_sim(nvfs=3)
    pool = f"t{uuid.uuid4().hex[:8]}"   # device names are global per CDI kind
    simhost.write_config(sim.host, pools=[
        {"name": pool, "mode": "vfio", "pfs": [f"{sim.host.nics[0].pf}#0-1"]}])
    ks = KernelSim(simhost.fake_sysfs(sim.host), sim.host.dev_dir)
    os.makedirs(CDI_DIR, exist_ok=True)   # cdi --output FILE.json needs its directory
    spec = os.path.join(CDI_DIR, f"sriov-hook-{pool}.json")
    yield sim, ks, pool
    if os.path.exists(spec):
        os.unlink(spec)
    ks.stop()


def cdi(sim: Sim, pool: str, *args: str) -> dict:
    out = os.path.join(CDI_DIR, f"sriov-hook-{pool}.json")
    r = sim.hook("cdi", "--output", out, *args)
    assert r.rc == 0, r.stderr
    with open(out) as fh:
        return json.load(fh)


def test_spec_shape(csim: Tuple[Sim, KernelSim, str]) -> None:
    sim, _, pool = csim
    spec = cdi(sim, pool)
    assert spec["kind"] == "sriov-hook.io/vf" and spec["cdiVersion"].startswith("0.")
    names = [d["name"] for d in spec["devices"]]
    vf0 = sim.vfs[0].bdf
    assert names == [f"{pool}-{vf0.replace(':', '-')}",
                     f"{pool}-{sim.vfs[1].bdf.replace(':', '-')}", pool]
    dev = spec["devices"][0]["containerEdits"]
    assert f"PCIDEVICE_SRIOV_HOOK_IO_{pool.upper()}={vf0}" in dev["env"]
    assert [n["path"] for n in dev["deviceNodes"]] == ["/dev/vfio/vfio"]  # not bound yet
    assert dev["hooks"][0]["hookName"] == "createRuntime"
    assert dev["hooks"][0]["args"][-4:] == ["--pool", pool, "--vf", vf0]
    assert spec["devices"][2]["containerEdits"]["hooks"][0]["args"][-1] == "--inject-nodes"


def test_prebind_puts_group_nodes_in_the_spec(csim: Tuple[Sim, KernelSim, str]) -> None:
    sim, _, pool = csim
    spec = cdi(sim, pool, "--prebind")
    nodes = spec["devices"][0]["containerEdits"]["deviceNodes"]
    assert [n["path"] for n in nodes] == ["/dev/vfio/vfio", "/dev/vfio/101"]
    assert os.path.exists(nodes[1]["hostPath"])


needs_podman = pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed")


def podman(args: list) -> subprocess.CompletedProcess:
    name = f"cdi-{uuid.uuid4().hex[:8]}"
    try:
        return subprocess.run(PODMAN_RUN + ["--name", name] + args, capture_output=True,
                              text=True, timeout=120)
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True)


@needs_podman
@pytest.mark.podman
def test_podman_per_vf_device(csim: Tuple[Sim, KernelSim, str], image: str) -> None:  # noqa: F811
    sim, _, pool = csim
    cdi(sim, pool, "--prebind")
    vf = sim.vfs[1]
    dev = f"sriov-hook.io/vf={pool}-{vf.bdf.replace(':', '-')}"
    out = podman(["--device", dev, image, "sh", "-c",
                  "ls -l /dev/vfio/; env | grep PCIDEVICE"])
    assert out.returncode == 0, out.stderr
    assert f"{VFIO_MAJOR}," in out.stdout and " 102" in out.stdout   # the VF's group node
    assert f"={vf.bdf}" in out.stdout
    log = open(sim.host.log_file).read()
    assert f"reserved {vf.bdf}" in log and f"released {vf.bdf}" in log
    assert sim.records() == []


@needs_podman
@pytest.mark.podman
def test_podman_pool_device_hook_injects_the_node(csim: Tuple[Sim, KernelSim, str],
                                                   image: str) -> None:  # noqa: F811
    sim, _, pool = csim
    cdi(sim, pool)
    out = podman(["--device", f"sriov-hook.io/vf={pool}", image, "sh", "-c",
                  "ls -l /dev/vfio/; cat /proc/self/cgroup | grep devices"])
    assert out.returncode == 0, out.stderr
    assert " 101" in out.stdout and f"{VFIO_MAJOR}," in out.stdout
    log = open(sim.host.log_file).read()
    assert "created /dev/vfio/101 in the container" in log
    assert sim.records() == []
    # Poststop put the VF back on the driver it had before: igbvf.
    link = os.path.join(sim.host.sysfs_root, "bus/pci/devices", sim.vfs[0].bdf, "driver")
    assert os.path.basename(os.readlink(link)) == "igbvf"
