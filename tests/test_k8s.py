"""The kubelet device plugin, against a kubelet-protocol peer (tests/k8speer.py).

Each test starts a real ``sriov-hook agent`` with ``device_plugin: true`` on the
simulated SR-IOV host, a peer playing kubelet on private sockets, and checks
what kubelet would see: the registration, ListAndWatch, GetPreferredAllocation
and Allocate, a kubelet restart; then runs what Allocate answered in real
containers (tests/test_k8s_e2e.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional

import grpc
import pytest

from sriov_hook.k8s.devices import prefer
from tests import simhost
from tests.conftest import ROOT, Sim, netns_process
from tests.k8speer import Kubelet
from tests.test_agent import Agents, in_process, state

pytestmark = [pytest.mark.root, pytest.mark.agent, pytest.mark.k8s]


@dataclass
class K8s:
    sim: Sim
    agents: Agents
    kubelet: Kubelet
    cdi_dir: str

    def endpoint(self, pool: str = "fast") -> str:
        return f"sriov-hook-{pool}.sock"

    def pcis(self) -> List[str]:
        return [vf.bdf for vf in self.sim.vfs]


def set_numa(sim: Sim, bdf: str, node: int) -> None:
    with open(os.path.join(sim.host.sysfs_root, "bus/pci/devices", bdf, "numa_node"), "w") as fh:
        fh.write(f"{node}\n")


def k8s_setup(sim: Sim, agents: Agents, pools: Any = None, cdi_dir: Optional[str] = None,
              **extra: Any) -> K8s:
    """A peer kubelet on private sockets, and the agent's config pointed at it."""
    base = agents.dir   # under /run: sun_path holds 108 bytes
    kubelet = Kubelet(os.path.join(base, "dp"), os.path.join(base, "pr", "kubelet.sock"))
    cdi_dir = cdi_dir or os.path.join(sim.tmp, f"cdi-{os.path.basename(base)}")
    agents.configure(pools=pools, device_plugin=True, device_plugin_dir=kubelet.dir,
                     pod_resources_socket=kubelet.pod_resources, cdi_dir=cdi_dir,
                     lock_timeout=2, **extra)
    return K8s(sim, agents, kubelet, cdi_dir)


@contextlib.contextmanager
def k8s_running(sim: Sim, before_start: Callable[[], None] = lambda: None) -> Iterator[K8s]:
    """The kubelet peer and an agent serving the device plugin for ``sim``;
    ``before_start`` shapes the host before the agent looks at it."""
    agents = Agents(sim)
    env = None
    try:
        env = k8s_setup(sim, agents)
        before_start()
        agents.start()
        yield env
    finally:
        if env is not None:
            env.kubelet.close()
        agents.cleanup()


@pytest.fixture
def k8s(make_sim: Callable[..., Sim]) -> Iterator[K8s]:
    sim = make_sim(nvfs=3, npfs=2)

    def two_numa_nodes() -> None:
        for vf in sim.host.nics[1].vfs:
            set_numa(sim, vf.bdf, 1)
        set_numa(sim, sim.host.nics[1].vfs[2].bdf, -1)
    with k8s_running(sim, two_numa_nodes) as env:
        yield env


def test_registers_every_pool_and_lists_one_device_per_vf(k8s: K8s) -> None:
    req = k8s.kubelet.registered()
    assert req.version == "v1beta1"
    assert req.resource_name == "sriov-hook.io/fast"
    assert req.endpoint == k8s.endpoint()
    assert os.path.exists(os.path.join(k8s.kubelet.dir, req.endpoint))
    assert req.options.get_preferred_allocation_available
    opts = k8s.kubelet.options(req.endpoint)
    assert opts.get_preferred_allocation_available and not opts.pre_start_required
    devices = k8s.kubelet.watch(req.endpoint).until(lambda d: len(d) == 6, "6 devices")
    nics = k8s.sim.host.nics
    want = {vf.bdf: [0] for vf in nics[0].vfs}
    want.update({vf.bdf: [1] for vf in nics[1].vfs})
    want[nics[1].vfs[2].bdf] = []          # numa_node -1: no topology
    assert {d[0]: d[2] for d in devices} == want
    assert all(d[1] == "Healthy" for d in devices)
    # The CDI spec describes each of them, with the hook naming the VF.
    with open(os.path.join(k8s.cdi_dir, "sriov-hook-kubelet-fast.json")) as fh:
        spec = json.load(fh)
    assert spec["kind"] == "sriov-hook.io/kubelet"
    assert len(spec["devices"]) == 6
    hooks = spec["devices"][0]["containerEdits"]["hooks"]
    assert [h["hookName"] for h in hooks] == ["createRuntime", "poststop"]
    assert hooks[0]["args"][-4:] == ["--pool", "fast", "--vf", nics[0].vfs[0].bdf]


def test_health_follows_vfs_taken_outside_kubernetes_and_pf_links(k8s: K8s) -> None:
    endpoint = k8s.kubelet.registered().endpoint
    watch = k8s.kubelet.watch(endpoint)
    watch.until(lambda d: len(d) == 6 and all(h == "Healthy" for _, h, _ in d), "all healthy")
    vf = k8s.sim.vfs[0].bdf
    with netns_process() as proc:
        # A container outside Kubernetes takes a VF (podman --device, by hand).
        r = in_process(k8s.sim, "prestart", "--pool", "fast", "--vf", vf,
                       state=state("outside", k8s.sim.bundle(None), proc.pid))
        assert r.rc == 0, r.stderr
        watch.until(lambda d: dict((i, h) for i, h, _ in d)[vf] == "Unhealthy",
                    f"{vf} unhealthy")
        r = in_process(k8s.sim, "poststop", state=state("outside"))
        assert r.rc == 0, r.stderr
    watch.until(lambda d: all(h == "Healthy" for _, h, _ in d), "all healthy again")
    # The second PF's link goes down: its three VFs are unhealthy until it is up.
    pf = k8s.sim.host.nics[1].pf
    down = {v.bdf for v in k8s.sim.host.nics[1].vfs}
    subprocess.run(["ip", "link", "set", pf, "down"], check=True)
    got = watch.until(lambda d: {i for i, h, _ in d if h == "Unhealthy"} == down, "PF down")
    assert len(got) == 6
    subprocess.run(["ip", "link", "set", pf, "up"], check=True)
    watch.until(lambda d: all(h == "Healthy" for _, h, _ in d), "PF up again")


def test_a_vf_whose_driver_is_gone_is_unhealthy_until_it_returns(k8s: K8s) -> None:
    endpoint = k8s.kubelet.registered().endpoint
    watch = k8s.kubelet.watch(endpoint)
    vf = k8s.sim.vfs[1].bdf
    link = os.path.join(k8s.sim.host.sysfs_root, "bus/pci/devices", vf, "driver")
    target = os.readlink(link)
    os.unlink(link)
    try:
        watch.until(lambda d: dict((i, h) for i, h, _ in d)[vf] == "Unhealthy", "no driver")
    finally:
        os.symlink(target, link)
    watch.until(lambda d: dict((i, h) for i, h, _ in d)[vf] == "Healthy", "driver back")


def test_preferred_allocation_packs_by_pf_and_numa(k8s: K8s) -> None:
    endpoint = k8s.kubelet.registered().endpoint
    a, b = k8s.sim.host.nics[0].vfs, k8s.sim.host.nics[1].vfs
    every = [vf.bdf for vf in a + b]
    # Two fit on either PF: the one kubelet must include decides.
    assert sorted(k8s.kubelet.preferred(endpoint, every, [b[1].bdf], 2)) == \
        sorted([b[0].bdf, b[1].bdf])
    # Best fit: with one VF left on the first PF, a single VF comes from there.
    assert k8s.kubelet.preferred(endpoint, [a[2].bdf] + [v.bdf for v in b], [], 1) == [a[2].bdf]
    # Three: one whole PF, never spread over two.
    got = k8s.kubelet.preferred(endpoint, every, [], 3)
    assert sorted(got) in (sorted(v.bdf for v in a), sorted(v.bdf for v in b))


def test_prefer_keeps_a_numa_node_together() -> None:
    where = {"a0": (0, "A"), "a1": (0, "A"), "b0": (0, "B"), "c0": (1, "C"), "c1": (1, "C")}
    assert prefer(list(where), [], 3, where) == ["a0", "a1", "b0"]   # node 0 holds 3
    assert prefer(list(where), ["c0"], 2, where) == ["c0", "c1"]
    assert prefer(["a0", "c0"], [], 4, where) == ["a0", "c0"]        # all there is


def test_allocate_answers_cdi_devices_and_the_pcidevice_variable(k8s: K8s) -> None:
    endpoint = k8s.kubelet.registered().endpoint
    k8s.kubelet.watch(endpoint).until(lambda d: len(d) == 6, "6 devices")
    picked = [k8s.sim.vfs[4].bdf, k8s.sim.vfs[1].bdf]
    answer = k8s.kubelet.allocate(endpoint, picked)
    assert dict(answer.envs) == {"PCIDEVICE_SRIOV_HOOK_IO_FAST": ",".join(sorted(picked))}
    assert [d.name for d in answer.cdi_devices] == [
        f"sriov-hook.io/kubelet=fast-{p.replace(':', '-')}" for p in sorted(picked)]


def test_the_annotation_alone_takes_no_vf_on_a_device_plugin_node(k8s: K8s) -> None:
    with netns_process() as proc:
        r = in_process(k8s.sim, "prestart", state=state("plain", k8s.sim.bundle("fast"),
                                                        proc.pid))
        assert r.rc == 0, r.stderr
        assert k8s.sim.records() == []
    with open(k8s.sim.host.log_file) as fh:
        assert "left to their CDI hooks" in fh.read()


def test_allocate_refuses_unknown_unhealthy_and_held_devices(k8s: K8s) -> None:
    endpoint = k8s.kubelet.registered().endpoint
    watch = k8s.kubelet.watch(endpoint)
    watch.until(lambda d: len(d) == 6, "6 devices")
    with pytest.raises(grpc.RpcError) as err:
        k8s.kubelet.allocate(endpoint, ["0000:99:00.1"])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no device '0000:99:00.1'" in err.value.details()
    pf = k8s.sim.host.nics[1].pf
    subprocess.run(["ip", "link", "set", pf, "down"], check=True)
    try:
        sick = k8s.sim.host.nics[1].vfs[0].bdf
        watch.until(lambda d: dict((i, h) for i, h, _ in d)[sick] == "Unhealthy", "PF down")
        with pytest.raises(grpc.RpcError) as err:
            k8s.kubelet.allocate(endpoint, [k8s.sim.vfs[0].bdf, sick])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"device {sick} is unhealthy: its PF {pf} is down" in err.value.details()
    finally:
        subprocess.run(["ip", "link", "set", pf, "up"], check=True)
    with netns_process() as proc:
        held = k8s.sim.vfs[0].bdf
        r = in_process(k8s.sim, "prestart", "--pool", "fast", "--vf", held,
                       state=state("held", k8s.sim.bundle(None), proc.pid))
        assert r.rc == 0, r.stderr
        with pytest.raises(grpc.RpcError) as err:
            k8s.kubelet.allocate(endpoint, [held])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"device {held} is already held by container held (outside Kubernetes)" \
            in err.value.details()
        assert in_process(k8s.sim, "poststop", state=state("held")).rc == 0
    k8s.sim.assert_clean()


def test_kubelet_restart_deletes_the_sockets_and_the_plugin_registers_again(k8s: K8s) -> None:
    first = k8s.kubelet.registered()
    k8s.kubelet.restart()
    again = k8s.kubelet.registered()
    assert (again.version, again.resource_name, again.endpoint) == \
        (first.version, first.resource_name, first.endpoint)
    # Served anew on a fresh socket: the new kubelet can list and allocate.
    devices = k8s.kubelet.watch(again.endpoint).until(lambda d: len(d) == 6, "6 devices")
    assert all(h == "Healthy" for _, h, _ in devices)
    assert k8s.kubelet.allocate(again.endpoint, [k8s.sim.vfs[2].bdf]).cdi_devices
