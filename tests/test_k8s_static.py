"""Kubernetes pieces that need no kubelet peer: the generated code, the manifests,
the assigned mode's request building, and the node install."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional

import pytest
import yaml

from sriov_hook import assigned
from sriov_hook.config import parse as parse_config
from sriov_hook.errors import RequestError
from sriov_hook.oci import Container, State
from tests.conftest import ROOT
from tests.installing import Installed, wheelhouse  # noqa: F401  (fixture)

K8S = os.path.join(ROOT, "sriov_hook", "k8s")
DEPLOY = os.path.join(ROOT, "deploy")


def test_committed_code_is_what_the_protos_generate(tmp_path: Any) -> None:
    protos = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(K8S, "*.proto")))
    assert protos == ["sriov_hook/k8s/deviceplugin.proto", "sriov_hook/k8s/podresources.proto"]
    proc = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.",
                           f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    made = sorted(glob.glob(str(tmp_path / "sriov_hook/k8s/*.py")))
    assert len(made) == 4
    for path in made:
        with open(path) as fh, open(os.path.join(K8S, os.path.basename(path))) as committed:
            assert fh.read() == committed.read(), f"{path}: run 'make protos'"


def test_wire_names_are_the_kubelets() -> None:
    from sriov_hook.k8s import deviceplugin_pb2 as dp
    from sriov_hook.k8s import podresources_pb2 as pr
    services = {s.full_name: [m.name for m in s.methods]
                for mod in (dp, pr) for s in mod.DESCRIPTOR.services_by_name.values()}
    assert services == {
        "v1beta1.Registration": ["Register"],
        "v1beta1.DevicePlugin": ["GetDevicePluginOptions", "ListAndWatch",
                                 "GetPreferredAllocation", "Allocate", "PreStartContainer"],
        "v1.PodResourcesLister": ["List", "GetAllocatableResources", "Get"]}
    fields = {f.name: f.number for f in dp.ContainerAllocateResponse.DESCRIPTOR.fields}
    assert fields == {"envs": 1, "mounts": 2, "devices": 3, "annotations": 4, "cdi_devices": 5}
    assert {f.name: f.number for f in dp.RegisterRequest.DESCRIPTOR.fields} == \
        {"version": 1, "endpoint": 2, "resource_name": 3, "options": 4}


# -- the manifests ---------------------------------------------------------------------
def manifests() -> List[Dict[str, Any]]:
    docs: List[Dict[str, Any]] = []
    for path in sorted(glob.glob(os.path.join(DEPLOY, "*.yaml"))):
        with open(path) as fh:
            docs += [d for d in yaml.safe_load_all(fh) if d]
    return docs


def _without_nulls(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _without_nulls(v) for k, v in data.items() if v is not None}
    if isinstance(data, list):
        return [_without_nulls(v) for v in data]
    return data


def test_manifests_are_valid_kubernetes_objects() -> None:
    from kubernetes import client
    api = client.ApiClient()
    kinds = {"ConfigMap": "V1ConfigMap", "DaemonSet": "V1DaemonSet", "Pod": "V1Pod"}
    docs = manifests()
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "DaemonSet", "Pod"]
    for doc in docs:
        # The client's models check required fields; a round trip that loses a key
        # means the key is unknown to Kubernetes (a typo, a wrong level).
        obj = api._ApiClient__deserialize(doc, kinds[doc["kind"]])
        assert _without_nulls(api.sanitize_for_serialization(obj)) == doc, doc["kind"]


def test_the_configmap_config_loads_and_the_pod_asks_for_its_pool() -> None:
    docs = {d["kind"]: d for d in manifests()}
    cfg = parse_config(docs["ConfigMap"]["data"]["config.yaml"].encode())
    assert cfg.device_plugin and cfg.pools["dpdk"].mode == "dpdk"
    pod = docs["Pod"]
    limits = pod["spec"]["containers"][0]["resources"]["limits"]
    assert limits["sriov-hook.io/dpdk"] == "1" and "hugepages-2Mi" in limits
    entries = json.loads(pod["metadata"]["annotations"]["sriov-hook.io/networks"])
    assert [e["pool"] for e in entries] == ["dpdk"]
    ds = docs["DaemonSet"]["spec"]["template"]["spec"]
    paths = {v["hostPath"]["path"] for v in ds["volumes"] if "hostPath" in v}
    assert {"/var/lib/kubelet/device-plugins", "/var/lib/kubelet/pod-resources",
            "/var/run/cdi", "/sys", "/dev/vfio", "/var/lib/sriov-hook"} <= paths
    assert ds["containers"][0]["securityContext"]["privileged"] is True


# -- assigned mode: which settings go to which VF ------------------------------------
CONFIG = b"""
pools:
  - {name: fast, pfs: [ens1f0]}
  - {name: dpdk, mode: dpdk, pfs: [ens1f1]}
"""
A, B, C = "0000:3b:02.0", "0000:3b:02.1", "0000:3b:02.2"


def container(annotation: Optional[str], env: Dict[str, str]) -> Container:
    spec = {"process": {"env": [f"{k}={v}" for k, v in env.items()]}}
    ann = {} if annotation is None else {"sriov-hook.io/networks": annotation}
    return Container(State("c1", "/b"), spec, ann)


def one(annotation: Optional[str], env: Dict[str, str], pool: str, vf: str) -> Dict[str, Any]:
    entry: Dict[str, Any] = json.loads(assigned.request_value(
        parse_config(CONFIG), container(annotation, env), pool, vf))[0]
    return entry


def test_entries_go_to_the_vfs_of_their_pool_in_pci_order() -> None:
    ann = json.dumps([{"pool": "fast", "ips": ["10.0.0.1/24"]},
                      {"pool": "dpdk", "mac": "02:00:00:00:00:09"},
                      {"pool": "fast", "interface": "data", "mac": "02:00:00:00:00:02"}])
    env = {"PCIDEVICE_SRIOV_HOOK_IO_FAST": f"{A},{C}", "PCIDEVICE_SRIOV_HOOK_IO_DPDK": B}
    assert one(ann, env, "fast", A) == {"pool": "fast", "pci": A, "interface": "net1",
                                        "ips": ["10.0.0.1/24"]}
    assert one(ann, env, "fast", C) == {"pool": "fast", "pci": C, "interface": "data",
                                        "mac": "02:00:00:00:00:02"}
    assert one(ann, env, "dpdk", B) == {"pool": "dpdk", "pci": B, "interface": "net2",
                                        "mac": "02:00:00:00:00:09"}


def test_vfs_without_an_entry_get_defaults_and_distinct_names() -> None:
    env = {"PCIDEVICE_SRIOV_HOOK_IO_FAST": f"{A},{B}", "PCIDEVICE_SRIOV_HOOK_IO_DPDK": C}
    ann = '[{"pool": "fast", "interface": "net2"}]'
    got = {vf: one(ann, env, pool, vf)["interface"]
           for pool, vf in (("dpdk", C), ("fast", A), ("fast", B))}
    assert got == {A: "net2", C: "net1", B: "net3"}
    assert one(None, {}, "fast", B) == {"pool": "fast", "pci": B, "interface": "net1"}


def test_assigned_mode_refusals() -> None:
    two = '[{"pool": "fast"}, {"pool": "fast"}]'
    with pytest.raises(RequestError, match="nothing says which one is VF"):
        one(two, {}, "fast", A)          # no PCIDEVICE variable lists the VF
    with pytest.raises(RequestError, match=f"names VF {B}, but kubelet assigned {A}"):
        one(f'[{{"pool": "fast", "pci": "{B}"}}]', {}, "fast", A)
    with pytest.raises(RequestError, match="is not a PCI address"):
        one(None, {"PCIDEVICE_SRIOV_HOOK_IO_FAST": "nonsense"}, "fast", A)
    with pytest.raises(RequestError, match=r"networks\[0\].mtu"):
        one('[{"pool": "fast", "mtu": 1}]', {}, "fast", A)


def test_the_plain_hook_leaves_assigned_pools_to_their_cdi_hooks() -> None:
    cfg = parse_config(CONFIG)
    ann = '[{"pool": "fast", "mtu": 9000}, {"pool": "dpdk"}]'
    assert assigned.annotation_value(cfg, container(ann, {})) == ann   # nothing assigned
    left = assigned.annotation_value(cfg, container(ann, {"PCIDEVICE_SRIOV_HOOK_IO_FAST": A}))
    assert left is not None and json.loads(left) == [{"pool": "dpdk", "interface": "net2"}]
    env = {"PCIDEVICE_SRIOV_HOOK_IO_FAST": A, "PCIDEVICE_SRIOV_HOOK_IO_DPDK": B}
    assert assigned.annotation_value(cfg, container(ann, env)) is None
    # A node serving the device plugin: every pool is kubelet's, even for a container
    # without the variables (a pod's sandbox container).
    node = parse_config(CONFIG + b"device_plugin: true\n")
    assert assigned.annotation_value(node, container(ann, {})) is None


# -- node install ------------------------------------------------------------------------
@pytest.mark.root
@pytest.mark.install
@pytest.mark.slow
def test_k8s_node_install_switches_the_device_plugin_on(wheelhouse: str,  # noqa: F811
                                                        tmp_path: Any) -> None:
    inst = Installed(str(tmp_path / "root"), wheelhouse)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "packaging", "k8s_node.py"),
                           "--root", inst.root, "--wheelhouse", wheelhouse, "--no-enable"],
                          capture_output=True, text=True, timeout=600)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        with open(inst.config) as fh:
            text = fh.read()
        assert "\ndevice_plugin: true\n" in text
        assert os.path.isdir(inst.at("/var/run/cdi"))
        assert sorted(os.listdir(inst.hooks_dir)) == ["50-sriov-hook-create.json",
                                                      "50-sriov-hook-poststop.json"]
        assert os.path.exists(inst.at("/etc/systemd/system/sriov-hook-agent.service"))
        # The installed release has what the device plugin imports.
        py = inst.at("/opt/sriov-hook/current/bin/python")
        check = subprocess.run([py, "-c", "import sriov_hook.k8s.deviceplugin"],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        # A second run keeps the operator's config as it is.
        again = subprocess.run([sys.executable, os.path.join(ROOT, "packaging", "k8s_node.py"),
                                "--root", inst.root, "--wheelhouse", wheelhouse, "--no-enable"],
                               capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout + again.stderr
        with open(inst.config) as fh:
            assert fh.read() == text
    finally:
        inst.installer("uninstall", "--purge")
