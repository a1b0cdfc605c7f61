"""Which annotations the hook believes: sandbox ids and Kubernetes namespaces
only from keys the CRI runtime that made the spec writes itself (after the
pod's own annotations), and per-pool access by namespace."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Optional

import pytest

from sriov_hook import config, oci, request
from sriov_hook.errors import RequestError, StateError
from tests import simhost
from tests.conftest import Sim, link_info
from tests.test_netdev import one_line_error

CRIO = {"io.container.manager": "cri-o"}
CONTAINERD = {"io.kubernetes.cri.container-type": "container"}
PODMAN = {"io.container.manager": "libpod"}


def container(annotations: Dict[str, str], state_ann: Optional[Dict[str, str]] = None,
              ) -> oci.Container:
    state = oci.State(id="c1", bundle="/b", annotations=state_ann or {})
    return oci.Container(state=state, spec={}, annotations={**annotations, **(state_ann or {})})


@pytest.mark.parametrize("ann,runtime,sandbox", [
    ({**CRIO, "io.kubernetes.cri-o.SandboxID": "pod1"}, "CRI-O", "pod1"),
    ({**CONTAINERD, "io.kubernetes.cri.sandbox-id": "pod2"}, "containerd", "pod2"),
    # containerd's spec: a CRI-O key a pod passed through is not containerd's
    ({**CONTAINERD, "io.kubernetes.cri.sandbox-id": "pod2",
      "io.kubernetes.cri-o.SandboxID": "victim"}, "containerd", "pod2"),
    # podman sets the CRI-O key for pod members, but its user can too: none
    ({**PODMAN, "io.kubernetes.cri-o.SandboxID": "pod3"}, None, None),
    ({"io.kubernetes.cri-o.SandboxID": "pod4"}, None, None),
    ({"io.kubernetes.cri.sandbox-id": "pod5"}, None, None),
    ({"io.katacontainers.pkg.oci.sandbox_id": "pod6"}, None, None),   # set by no runtime
    ({}, None, None),
])
def test_sandbox_id_comes_only_from_the_runtimes_own_key(ann: Dict[str, str],
                                                          runtime: Optional[str],
                                                          sandbox: Optional[str]) -> None:
    c = container(ann)
    assert (c.runtime.name if c.runtime else None) == runtime
    assert c.sandbox_id == sandbox


@pytest.mark.parametrize("ann,needle", [
    ({**CRIO, **CONTAINERD, "io.kubernetes.cri-o.SandboxID": "a",
      "io.kubernetes.cri.sandbox-id": "a"}, "marks of two runtimes"),
    ({**CRIO, "io.kubernetes.cri-o.SandboxID": "../etc"}, "not a valid id"),
    ({**CRIO}, "io.kubernetes.cri-o.SandboxID is missing"),
    ({**CONTAINERD, "io.kubernetes.cri-o.SandboxID": "a"}, "io.kubernetes.cri.sandbox-id"),
])
def test_inconsistent_marks_are_refused(ann: Dict[str, str], needle: str) -> None:
    with pytest.raises(StateError, match=needle):
        container(ann).sandbox_id


def test_namespace_key_per_runtime() -> None:
    assert container({**CRIO, "io.kubernetes.pod.namespace": "ns-a"}).k8s_namespace == "ns-a"
    both = {**CONTAINERD, "io.kubernetes.pod.namespace": "ns-a",
            "io.kubernetes.cri.sandbox-namespace": "ns-b"}
    assert container(both).k8s_namespace == "ns-b"     # containerd's own key, not the pod's
    assert container({**PODMAN, "io.kubernetes.pod.namespace": "ns-a"}).k8s_namespace is None
    with pytest.raises(StateError, match="sandbox-namespace is missing"):
        container({**CONTAINERD, "io.kubernetes.pod.namespace": "ns-a"}).k8s_namespace
    # The state's annotations win over the spec's, as for every key.
    spoof = container({**CRIO, "io.kubernetes.pod.namespace": "ns-a"},
                      {"io.kubernetes.pod.namespace": "ns-b"})
    assert spoof.k8s_namespace == "ns-b"


POOLS = b"""
pools:
  - {name: open, pfs: ["p#0"]}
  - {name: only-a, pfs: ["p#1"], namespaces: [ns-a, ns-c]}
"""


@pytest.mark.parametrize("ann,pool,needle", [
    ({**CRIO, "io.kubernetes.pod.namespace": "ns-a"}, "only-a", None),
    ({**CONTAINERD, "io.kubernetes.cri.sandbox-namespace": "ns-c"}, "only-a", None),
    ({}, "open", None),
    ({**CRIO, "io.kubernetes.pod.namespace": "ns-b"}, "only-a",
     "does not admit Kubernetes namespace ns-b"),
    ({"io.kubernetes.pod.namespace": "ns-a"}, "only-a", "not made by a CRI runtime"),
    ({**PODMAN, "io.kubernetes.pod.namespace": "ns-a"}, "only-a", "not made by a CRI runtime"),
    ({**CONTAINERD, "io.kubernetes.pod.namespace": "ns-a",
      "io.kubernetes.cri.sandbox-namespace": "ns-b"}, "only-a", "namespace ns-b"),
])
def test_pool_namespaces(ann: Dict[str, str], pool: str, needle: Optional[str]) -> None:
    cfg = config.parse(POOLS)
    reqs = request.parse(pool)
    if needle is None:
        assert request.apply_policy(cfg, reqs, container(ann))[0].pool == pool
    else:
        with pytest.raises(RequestError, match=needle):
            request.apply_policy(cfg, reqs, container(ann))


def test_restricted_pool_without_a_container_admits_nobody() -> None:
    cfg = config.parse(POOLS)
    with pytest.raises(RequestError, match="no container to check"):
        request.apply_policy(cfg, request.parse("only-a"))
    assert request.apply_policy(cfg, request.parse("open"))[0].pool == "open"


# -- end to end: the hook on the simulated host ------------------------------------------------
@pytest.fixture
def ksim(make_sim: Callable[..., Sim]) -> Sim:
    sim = make_sim(nvfs=3)
    pf = sim.host.nics[0].pf
    simhost.write_config(sim.host, pools=[
        {"name": "kata", "mode": "kata", "pfs": [f"{pf}#0-1"]},
        {"name": "only-a", "mode": "netdev", "pfs": [f"{pf}#2"], "namespaces": ["ns-a"]}])
    return sim


def _bundle(sim: Sim, ns: str, ann: Dict[str, str], request_value: str = "kata") -> str:
    extra: Any = {"annotations": {"sriov-hook.io/networks": request_value, **ann}}
    return sim.bundle(None, ns, extra)


@pytest.mark.root
def test_spoofed_sandbox_id_does_not_join_another_pods_vf(ksim: Sim) -> None:
    """A pod made by CRI-O holds a kata VF. A container whose owner copied
    that pod's sandbox id into its own annotations (as any podman or runc
    user can) does not join it: it is a sandbox of its own."""
    sim = ksim
    pod_ns, other_ns = sim.netns(), sim.netns()
    victim = {**CRIO, "io.kubernetes.cri-o.SandboxID": "podX"}
    assert sim.prestart("ctr-a", _bundle(sim, pod_ns, victim)).rc == 0
    rec_path = os.path.join(sim.host.state_dir, "reservations", f"{sim.vfs[0].bdf}.json")
    assert json.load(open(rec_path))["refs"] == ["ctr-a"]
    spoof = {**PODMAN, "io.kubernetes.cri-o.SandboxID": "podX"}
    r = sim.prestart("evil", _bundle(sim, other_ns, spoof))
    assert r.rc == 0, r.stderr
    rec = json.load(open(rec_path))
    assert rec["owner"] == "podX" and rec["refs"] == ["ctr-a"]     # untouched
    assert link_info("net1", pod_ns) is not None and link_info("net1", other_ns) is not None
    owners = sorted(row["owner"] for row in sim.status() if row["state"] == "reserved")
    assert owners == ["evil", "podX"]
    assert sim.poststop("evil").rc == 0
    assert json.load(open(rec_path))["refs"] == ["ctr-a"]
    assert sim.poststop("ctr-a").rc == 0
    sim.assert_clean()


@pytest.mark.root
def test_two_runtimes_marks_are_refused_before_anything_moves(ksim: Sim) -> None:
    sim = ksim
    ann = {**CRIO, **CONTAINERD, "io.kubernetes.cri-o.SandboxID": "podY",
           "io.kubernetes.cri.sandbox-id": "podY"}
    one_line_error(sim.prestart("both", _bundle(sim, sim.netns(), ann)), "marks of two runtimes")
    sim.assert_clean()


@pytest.mark.root
@pytest.mark.parametrize("ann,needle", [
    ({**CRIO, "io.kubernetes.pod.namespace": "ns-a"}, None),
    ({**CRIO, "io.kubernetes.pod.namespace": "ns-b"}, "does not admit Kubernetes namespace ns-b"),
    ({"io.kubernetes.pod.namespace": "ns-a"}, "not made by a CRI runtime"),
])
def test_namespace_restricted_pool_end_to_end(ksim: Sim, ann: Dict[str, str],
                                              needle: Optional[str]) -> None:
    """Needs hook.prestart to hand the container to apply_policy."""
    sim = ksim
    ns = sim.netns()
    r = sim.prestart("nsc", _bundle(sim, ns, ann, "only-a"))
    if needle is None:
        assert r.rc == 0, r.stderr
        assert link_info("net1", ns) is not None
        assert sim.poststop("nsc").rc == 0
    else:
        one_line_error(r, needle)
    sim.assert_clean()
