"""End to end: what Allocate answered kubelet, run in real containers.

The CDI devices from Allocate are applied to a runc bundle the way a CDI-aware
engine does (tests/cdiapply.py), or handed to podman with ``--device``; the
Allocate variables go into the container's environment, as kubelet passes
them. Then: the VF inside is the one kubelet chose, configured from the
annotation, and back on the host afterwards. Also: a malformed annotation
refuses the container in one line, and the reclaim from kubelet's view.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from typing import Any, Callable, Dict, Iterator, List

import pytest

from tests import cdiapply, simhost
from tests.conftest import Sim, netns_process
from tests.containers import Runc, runc_bundle
from tests.kernelsim import VFIO_MAJOR, KernelSim
from tests.test_agent import Agents, in_process, state, wait_until
from tests.test_k8s import K8s, k8s_running, k8s_setup
from tests.test_podman import PODMAN_RUN, image  # noqa: F401  (fixture)

pytestmark = [pytest.mark.root, pytest.mark.agent, pytest.mark.k8s]
ANNOTATION = "sriov-hook.io/networks"


@pytest.fixture
def e2e(make_sim: Callable[..., Sim], tmp_path: Any) -> Iterator[K8s]:
    with k8s_running(make_sim(nvfs=3)) as env:
        yield env


@pytest.fixture
def runc(tmp_path: Any) -> Iterator[Runc]:
    r = Runc(str(tmp_path / "runc-root"))
    try:
        yield r
    finally:
        r.cleanup()


def allocated_bundle(k8s: K8s, dest: str, answer: Any, args: List[str],
                     annotation: Any) -> str:
    """A runc bundle as the engine would make it for the container kubelet allocated."""
    ann = {ANNOTATION: annotation if isinstance(annotation, str) else json.dumps(annotation)}
    bundle = runc_bundle(dest, args, annotations=ann)
    config = os.path.join(bundle, "config.json")
    cdiapply.apply(config, {"env": [f"{k}={v}" for k, v in answer.envs.items()]})
    for dev in answer.cdi_devices:
        cdiapply.apply(config, cdiapply.find(k8s.cdi_dir, dev.name))
    return bundle


def settled(sim: Sim) -> None:
    """Every VF home and free. The agent answers poststop first and releases right
    after, so the last VF may still be on its way when the runtime returns."""
    wait_until(lambda: not sim.records(), "the poststop releases")
    sim.assert_clean()


def macs(sim: Sim) -> Dict[str, str]:
    return {vf.bdf: sim.orig[vf.ifname]["address"] for vf in sim.vfs}


@pytest.mark.runc
def test_runc_gets_exactly_kubelets_vfs_with_the_annotation_in_order(
        e2e: K8s, runc: Runc, tmp_path: Any) -> None:
    endpoint = e2e.kubelet.registered().endpoint
    e2e.kubelet.watch(endpoint).until(lambda d: len(d) == 3, "3 devices")
    picked = [e2e.sim.vfs[2].bdf, e2e.sim.vfs[0].bdf]   # kubelet's choice, in its own order
    answer = e2e.kubelet.allocate(endpoint, picked)
    ann = [{"pool": "fast", "ips": ["10.77.0.1/24"]},
           {"pool": "fast", "interface": "data", "ips": ["10.77.0.2/24"]}]
    script = ("for i in net1 data; do echo $i $(cat /sys/class/net/$i/address) "
              "$(ip -o -4 addr show dev $i | awk '{print $4}'); done")
    bundle = allocated_bundle(e2e, str(tmp_path / "b"), answer, ["sh", "-c", script], ann)
    out = runc.run(f"k8s-{uuid.uuid4().hex[:8]}", bundle)
    assert out.returncode == 0, out.stderr
    low, high = sorted(picked)      # entries go to the VFs in PCI-address order
    mac = macs(e2e.sim)
    assert f"net1 {mac[low]} 10.77.0.1/24" in out.stdout, out.stdout
    assert f"data {mac[high]} 10.77.0.2/24" in out.stdout, out.stdout
    with open(e2e.sim.host.log_file) as fh:
        log = fh.read()
    assert f"assigned mode: VF {low}" in log and f"assigned mode: VF {high}" in log
    assert f"reserved {e2e.sim.vfs[1].bdf}" not in log      # never another VF
    settled(e2e.sim)                                        # both home after runc deleted it


@pytest.mark.runc
def test_a_malformed_annotation_refuses_the_container_in_one_line(
        e2e: K8s, runc: Runc, tmp_path: Any) -> None:
    endpoint = e2e.kubelet.registered().endpoint
    e2e.kubelet.watch(endpoint).until(lambda d: len(d) == 3, "3 devices")
    answer = e2e.kubelet.allocate(endpoint, [e2e.sim.vfs[1].bdf])
    bundle = allocated_bundle(e2e, str(tmp_path / "b"), answer, ["true"],
                              '[{"pool": "fast", "vlan": "ten"}]')
    out = runc.run(f"k8s-{uuid.uuid4().hex[:8]}", bundle)
    assert out.returncode != 0
    assert "sriov-hook: networks[0].vlan: must be an integer in 0..4094" in out.stderr
    e2e.sim.assert_clean()


@pytest.mark.runc
def test_an_annotation_entry_naming_another_vf_is_refused(
        e2e: K8s, runc: Runc, tmp_path: Any) -> None:
    endpoint = e2e.kubelet.registered().endpoint
    e2e.kubelet.watch(endpoint).until(lambda d: len(d) == 3, "3 devices")
    mine, other = e2e.sim.vfs[0].bdf, e2e.sim.vfs[2].bdf
    answer = e2e.kubelet.allocate(endpoint, [mine])
    bundle = allocated_bundle(e2e, str(tmp_path / "b"), answer, ["true"],
                              [{"pool": "fast", "pci": other}])
    out = runc.run(f"k8s-{uuid.uuid4().hex[:8]}", bundle)
    assert out.returncode != 0
    assert f"sriov-hook: the annotation's entry 1 for pool fast names VF {other}, but " \
           f"kubelet assigned {mine}" in out.stderr
    e2e.sim.assert_clean()


@pytest.mark.podman
@pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed")
def test_podman_device_from_allocate(make_sim: Callable[..., Sim],
                                     image: str) -> None:  # noqa: F811
    sim = make_sim(nvfs=2)
    pool = f"k{uuid.uuid4().hex[:8]}"     # CDI device names are global in /var/run/cdi
    agents = Agents(sim)
    k8s = None
    try:
        k8s = k8s_setup(sim, agents, pools=[{"name": pool, "mode": "netdev",
                                             "pfs": [sim.host.nics[0].pf]}],
                        cdi_dir="/var/run/cdi")      # where podman 4.3 looks
        agents.start()
        endpoint = k8s.kubelet.registered().endpoint
        k8s.kubelet.watch(endpoint).until(lambda d: len(d) == 2, "2 devices")
        vf = sim.vfs[1].bdf
        answer = k8s.kubelet.allocate(endpoint, [vf])
        ann = json.dumps([{"pool": pool, "ips": ["10.78.0.9/24"]}])
        args = PODMAN_RUN + ["--name", f"k8s-{uuid.uuid4().hex[:8]}",
                             "--annotation", '"' + f"{ANNOTATION}={ann}".replace('"', '""') + '"']
        for key, val in answer.envs.items():
            args += ["--env", f"{key}={val}"]
        for dev in answer.cdi_devices:
            args += ["--device", dev.name]
        out = subprocess.run(args + [image, "sh", "-c", "cat /sys/class/net/net1/address; "
                                     "ip -o -4 addr show dev net1"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert macs(sim)[vf] in out.stdout and "10.78.0.9/24" in out.stdout
        settled(sim)
    finally:
        if k8s is not None:
            k8s.kubelet.close()
        agents.cleanup()
        spec = f"/var/run/cdi/sriov-hook-kubelet-{pool}.json"
        if os.path.exists(spec):
            os.unlink(spec)


@pytest.mark.slow
def test_reclaim_from_kubelets_view(e2e: K8s) -> None:
    """A pod's VF is released once no pod holds it in PodResources, even though its
    container's process lives; a listed pod's VF and a VF held outside Kubernetes stay."""
    endpoint = e2e.kubelet.registered().endpoint
    e2e.kubelet.watch(endpoint).until(lambda d: len(d) == 3, "3 devices")
    gone, kept, outside = (vf.bdf for vf in e2e.sim.vfs)
    resource = "sriov-hook.io/fast"
    with netns_process() as p1, netns_process() as p2, netns_process() as p3:
        for pod, vf, proc in (("a", gone, p1), ("b", kept, p2)):
            answer = e2e.kubelet.allocate(endpoint, [vf])
            e2e.kubelet.hold("ns", pod, "c", {resource: [vf]})
            bundle = e2e.sim.bundle(None, extra={"process": {"env": [
                f"{k}={v}" for k, v in answer.envs.items()]}})
            r = in_process(e2e.sim, "createRuntime", "--pool", "fast", "--vf", vf,
                           state=state(f"pod-{pod}", bundle, proc.pid))
            assert r.rc == 0, r.stderr
        r = in_process(e2e.sim, "prestart", "--pool", "fast", "--vf", outside,
                       state=state("outside", e2e.sim.bundle(None), p3.pid))
        assert r.rc == 0, r.stderr
        assert sorted(e2e.sim.records()) == sorted(f"{v}.json" for v in (gone, kept, outside))
        e2e.kubelet.hold("ns", "a", "c", None)        # pod a is deleted; no poststop came
        wait_until(lambda: f"{gone}.json" not in e2e.sim.records(), f"{gone} released")
        assert sorted(e2e.sim.records()) == sorted(f"{v}.json" for v in (kept, outside))
        with open(e2e.sim.host.log_file) as fh:
            assert f"{gone}: no pod holds it in kubelet's PodResources" in fh.read()
        e2e.sim.assert_home(e2e.sim.vfs[0])
        for cid in ("pod-b", "outside"):
            assert in_process(e2e.sim, "poststop", state=state(cid)).rc == 0
    settled(e2e.sim)


@pytest.mark.runc
def test_vfio_pool_allocate_binds_and_the_group_node_reaches_the_container(
        make_sim: Callable[..., Sim], runc: Runc, tmp_path: Any) -> None:
    sim = make_sim(nvfs=2)
    ks = KernelSim(simhost.fake_sysfs(sim.host), sim.host.dev_dir)
    agents = Agents(sim)
    k8s = None
    try:
        k8s = k8s_setup(sim, agents, pools=[{"name": "vf", "mode": "vfio",
                                             "pfs": [sim.host.nics[0].pf]}])
        agents.start()
        endpoint = k8s.kubelet.registered().endpoint
        assert endpoint == "sriov-hook-vf.sock"
        k8s.kubelet.watch(endpoint).until(lambda d: len(d) == 2, "2 devices")
        vf = sim.vfs[1].bdf
        answer = k8s.kubelet.allocate(endpoint, [vf])
        # Allocate put the VF on vfio-pci, so the spec names its group's node.
        assert driver(sim, vf) == "vfio-pci"
        edits = cdiapply.find(k8s.cdi_dir, answer.cdi_devices[0].name)
        assert [n["path"] for n in edits["deviceNodes"]] == ["/dev/vfio/vfio", "/dev/vfio/102"]
        bundle = allocated_bundle(k8s, str(tmp_path / "b"), answer,
                                  ["sh", "-c", "ls -l /dev/vfio/; echo pci=$PCIDEVICE_SRIOV_HOOK_IO_VF"],
                                  [{"pool": "vf"}])
        out = runc.run(f"k8s-{uuid.uuid4().hex[:8]}", bundle)
        assert out.returncode == 0, out.stderr
        assert f"{VFIO_MAJOR}, " in out.stdout and " 102" in out.stdout, out.stdout
        assert f"pci={vf}" in out.stdout
        with open(sim.host.log_file) as fh:
            log = fh.read()
        assert f"reserved {vf}" in log and f"reserved {sim.vfs[0].bdf}" not in log
        wait_until(lambda: not sim.records(), "the poststop releases")
        assert driver(sim, sim.vfs[0].bdf) == "igbvf"       # never touched
    finally:
        if k8s is not None:
            k8s.kubelet.close()
        agents.cleanup()
        ks.stop()


def driver(sim: Sim, bdf: str) -> str:
    return os.path.basename(os.readlink(os.path.join(sim.host.sysfs_root, "bus/pci/devices",
                                                     bdf, "driver")))


@pytest.mark.runc
def test_dpdk_pool_gets_vfio_nodes_hugetlbfs_and_hugepages(
        make_sim: Callable[..., Sim], runc: Runc, tmp_path: Any) -> None:
    sim = make_sim(nvfs=2)
    ks = KernelSim(simhost.fake_sysfs(sim.host), sim.host.dev_dir)
    agents = Agents(sim)
    k8s = None
    try:
        k8s = k8s_setup(sim, agents, pools=[{"name": "dpdk", "mode": "dpdk", "hugepages": "4M",
                                             "pfs": [sim.host.nics[0].pf]}])
        agents.start()
        endpoint = k8s.kubelet.registered().endpoint
        k8s.kubelet.watch(endpoint).until(lambda d: len(d) == 2, "2 devices")
        vf = sim.vfs[0].bdf
        answer = k8s.kubelet.allocate(endpoint, [vf])
        edits = cdiapply.find(k8s.cdi_dir, answer.cdi_devices[0].name)
        assert edits["mounts"] == [{"hostPath": "nodev", "containerPath": "/dev/hugepages",
                                    "type": "hugetlbfs",
                                    "options": ["nosuid", "nodev", "pagesize=2M"]}]
        script = ("ls /dev/vfio/; grep -c ' /dev/hugepages hugetlbfs' /proc/mounts; "
                  "cat /run/sriov-hook/net1.json")
        bundle = allocated_bundle(k8s, str(tmp_path / "b"), answer, ["sh", "-c", script],
                                  [{"pool": "dpdk"}])
        out = runc.run(f"k8s-{uuid.uuid4().hex[:8]}", bundle)
        assert out.returncode == 0, out.stderr
        assert "101" in out.stdout.split() and "vfio" in out.stdout.split()
        info = json.loads(out.stdout[out.stdout.index("{"):])
        assert info["pci"] == vf and info["hugepages"]["pages"] == 2
        wait_until(lambda: not sim.records(), "the poststop releases")
        with open(os.path.join(sim.host.sysfs_root, "kernel/mm/hugepages/hugepages-2048kB",
                               "nr_hugepages")) as fh:
            assert fh.read().strip() == "0"              # the pages it added are given back
    finally:
        if k8s is not None:
            k8s.kubelet.close()
        agents.cleanup()
        ks.stop()
