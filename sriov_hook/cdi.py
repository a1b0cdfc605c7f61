"""``sriov-hook cdi``: a CDI spec (Container Device Interface) for vfio pools.

A prestart hook cannot add device nodes to a spec the runtime has frozen;
CDI lets podman, CRI-O or containerd add them before the runtime starts.

How the CDI device and the hook's reservation agree: each CDI device
carries the hook itself (createRuntime + poststop CDI hooks) with the VF or
pool on its argv. So the engine cannot hand out a device without the hook
reserving exactly that VF at create time; if the VF is taken, the hook
fails and the container is refused.

* ``sriov-hook.io/vf=<pool>-<dddd-bb-ss.f>``: one VF. Device nodes
  ``/dev/vfio/vfio`` and ``/dev/vfio/<group>`` (present once the VF is on
  vfio-pci: ``--prebind`` binds the free VFs first), ``PCIDEVICE_*`` env.
  Works for runc and for VM runtimes (Kata cold/hot-plugs the group).
* ``sriov-hook.io/vf=<pool>``: any free VF of the pool. ``/dev/vfio/vfio``
  from CDI; the hook picks the VF at create time, binds it, and creates
  ``/dev/vfio/<group>`` inside the container (cgroup v1 devices.allow).

Kubernetes (the device plugin, k8s/deviceplugin.py) uses per-VF devices of
every mode, one spec per pool in ``cdi_dir``, kind ``sriov-hook.io/kubelet``
(a kind of its own, so its names never clash with the spec above):

* ``sriov-hook.io/kubelet=<pool>-<dddd-bb-ss.f>``: the hook as createRuntime
  and poststop CDI hooks with ``--pool``/``--vf`` (assigned mode, assigned.py);
  vfio pools (and dpdk pools on vfio-pci) add ``/dev/vfio/vfio`` and the
  group's node once the VF is on vfio-pci; dpdk pools add a hugetlbfs mount
  on ``/dev/hugepages``. No ``PCIDEVICE_*`` variable: Allocate sets it with
  every VF of the container, and a CDI variable would override that list.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List

from . import drivers
from .config import Pool
from .context import Ctx
from .errors import HookError

KIND = "sriov-hook.io/vf"
CDI_VERSION = "0.5.0"
DEFAULT_DIR = "/var/run/cdi"
SPEC_NAME = "sriov-hook.json"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def device_name(pool: str, bdf: str) -> str:
    return f"{pool}-{bdf.replace(':', '-')}"


def env_var(pool: str) -> str:
    """sriov-network-device-plugin's convention: PCIDEVICE_<RESOURCE>."""
    return "PCIDEVICE_SRIOV_HOOK_IO_" + re.sub(r"[^A-Z0-9]", "_", pool.upper())


KUBELET_KIND = "sriov-hook.io/kubelet"
HUGEPAGES_PATH = "/dev/hugepages"


def kubelet_device(pool: str, bdf: str) -> str:
    """The fully qualified CDI name the device plugin hands kubelet for one VF."""
    return f"{KUBELET_KIND}={device_name(pool, bdf)}"


def kubelet_spec_path(cdi_dir: str, pool: str) -> str:
    return os.path.join(cdi_dir, f"sriov-hook-kubelet-{pool}.json")


def _hooks(hook: str, config: str, extra: List[str]) -> List[Dict[str, Any]]:
    base = ["sriov-hook", "--config", config]
    return [{"hookName": "createRuntime", "path": hook, "args": base + ["createRuntime"] + extra,
             "env": [PATH_ENV], "timeout": 30},
            {"hookName": "poststop", "path": hook, "args": base + ["poststop"],
             "env": [PATH_ENV], "timeout": 30}]


def build(ctx: Ctx, hook: str) -> Dict[str, Any]:
    """The spec; refused when it would describe nothing (an empty spec hides the mistake)."""
    devices: List[Dict[str, Any]] = []
    vfio_node = os.path.join(ctx.cfg.vfio_dev_dir, "vfio")
    pools = [p for p in ctx.cfg.pools.values() if p.mode == "vfio"]
    if not pools:
        raise HookError(f"cdi: {ctx.cfg.path} has no vfio pool, and a CDI spec describes "
                        "vfio pools only")
    empty = []
    for pool in pools:
        cands = list(ctx.inventory.candidates(pool))
        if not cands:
            empty.append(pool.name)
            ctx.log.warning(f"cdi: vfio pool {pool.name} has no VF; left out of the spec")
            continue
        for cand in cands:
            nodes = [{"path": "/dev/vfio/vfio", "hostPath": vfio_node}]
            group = ctx.sysfs.iommu_group(cand.bdf)
            if group is not None and ctx.sysfs.driver(cand.bdf) == drivers.VFIO:
                node = drivers.VfioGroup(group, not ctx.sysfs.iommu_present()).node(
                    ctx.cfg.vfio_dev_dir)
                nodes.append({"path": f"/dev/vfio/{os.path.basename(node)}", "hostPath": node})
            devices.append({
                "name": device_name(pool.name, cand.bdf),
                "containerEdits": {
                    "env": [f"{env_var(pool.name)}={cand.bdf}"],
                    "deviceNodes": nodes,
                    "hooks": _hooks(hook, ctx.cfg.path, ["--pool", pool.name, "--vf", cand.bdf]),
                }})
        devices.append({
            "name": pool.name,
            "containerEdits": {
                "env": [f"SRIOV_HOOK_POOL={pool.name}"],
                "deviceNodes": [{"path": "/dev/vfio/vfio", "hostPath": vfio_node}],
                "hooks": _hooks(hook, ctx.cfg.path, ["--pool", pool.name, "--inject-nodes"]),
            }})
    if not devices:
        raise HookError(f"cdi: no VF in vfio pool(s) {', '.join(empty)}: are the VFs enabled "
                        "(sriov_numvfs; 'sriov-hook setup')?")
    return {"cdiVersion": CDI_VERSION, "kind": KIND, "devices": devices}


def _vfio_nodes(ctx: Ctx, bdf: str) -> List[Dict[str, str]]:
    """/dev/vfio/vfio, plus the VF's group node when the VF is on vfio-pci (the node
    exists only then, and an engine refuses a spec naming a node that is not there)."""
    nodes = [{"path": "/dev/vfio/vfio", "hostPath": os.path.join(ctx.cfg.vfio_dev_dir, "vfio")}]
    group = ctx.sysfs.iommu_group(bdf)
    if group is not None and ctx.sysfs.driver(bdf) == drivers.VFIO:
        node = drivers.VfioGroup(group, not ctx.sysfs.iommu_present()).node(ctx.cfg.vfio_dev_dir)
        nodes.append({"path": f"/dev/vfio/{os.path.basename(node)}", "hostPath": node})
    return nodes


def uses_vfio(pool: Pool) -> bool:
    """Does a VF of this pool reach its container as a /dev/vfio group node?"""
    return pool.mode == "vfio" or (pool.mode == "dpdk" and pool.driver == drivers.VFIO)


def kubelet_edits(ctx: Ctx, pool: Pool, bdf: str, hook: str) -> Dict[str, Any]:
    """What the engine adds to a container for one VF kubelet assigned to it."""
    edits: Dict[str, Any] = {"hooks": _hooks(hook, ctx.cfg.path,
                                             ["--pool", pool.name, "--vf", bdf])}
    if uses_vfio(pool):
        edits["deviceNodes"] = _vfio_nodes(ctx, bdf)
    if pool.mode == "dpdk":
        # The hook reserves the pages on the VF's NUMA node; the engine gives the
        # container a hugetlbfs of that page size to map them from.
        size = f"{pool.hugepage_kb // 1024}M" if pool.hugepage_kb % (1024 * 1024) \
            else f"{pool.hugepage_kb // (1024 * 1024)}G"
        edits["mounts"] = [{"hostPath": "nodev", "containerPath": HUGEPAGES_PATH,
                            "type": "hugetlbfs", "options": ["nosuid", "nodev", f"pagesize={size}"]}]
    return edits


def build_kubelet(ctx: Ctx, pool: Pool, hook: str) -> Dict[str, Any]:
    """The device plugin's spec for one pool, any mode: a device per VF (none if it
    has no VF: the plugin then advertises nothing either)."""
    devices = [{"name": device_name(pool.name, cand.bdf),
                "containerEdits": kubelet_edits(ctx, pool, cand.bdf, hook)}
               for cand in ctx.inventory.candidates(pool)]
    return {"cdiVersion": CDI_VERSION, "kind": KUBELET_KIND, "devices": devices}


def bind_for_cdi(ctx: Ctx, bdf: str) -> bool:
    """Put one free VF of a vfio pool on vfio-pci under its lock, so its group node
    exists when the engine resolves the CDI device; True if it was bound now."""
    with ctx.store.lock(bdf, ctx.cfg.lock_timeout):
        if ctx.store.is_reserved(bdf) or ctx.sysfs.driver(bdf) == drivers.VFIO:
            return False
        drivers.check_vfio(ctx.sysfs, bdf, ctx.cfg.allow_noiommu)
        drivers.bind(ctx.sysfs, bdf, drivers.VFIO, ctx.cfg.device_timeout, ctx.log)
        return True


def prebind(ctx: Ctx) -> List[str]:
    """Bind every free VF of every vfio pool to vfio-pci, under its lock."""
    bound = []
    for pool in ctx.cfg.pools.values():
        if pool.mode != "vfio":
            continue
        for cand in ctx.inventory.candidates(pool):
            with ctx.store.lock(cand.bdf, ctx.cfg.lock_timeout):
                if ctx.store.is_reserved(cand.bdf) or ctx.sysfs.driver(cand.bdf) == drivers.VFIO:
                    continue
                drivers.check_vfio(ctx.sysfs, cand.bdf, ctx.cfg.allow_noiommu)
                drivers.bind(ctx.sysfs, cand.bdf, drivers.VFIO, ctx.cfg.device_timeout, ctx.log)
                bound.append(cand.bdf)
    return bound


def output_path(path: str) -> str:
    """``--output``: an existing directory (the spec goes in as sriov-hook.json), or
    FILE.json in an existing directory. Only the default directory is created."""
    if os.path.normpath(path) == DEFAULT_DIR:
        try:
            os.makedirs(DEFAULT_DIR, mode=0o755, exist_ok=True)
        except OSError as err:
            raise HookError(f"cdi: cannot create {DEFAULT_DIR}: {err.strerror}") from None
    if os.path.isdir(path):
        return os.path.join(path, SPEC_NAME)
    if path.endswith("/"):
        raise HookError(f"cdi --output {path}: no such directory")
    if not path.endswith(".json"):
        raise HookError(f"cdi --output {path}: neither an existing directory nor a FILE.json "
                        "(engines read only *.json and *.yaml spec files)")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise HookError(f"cdi --output {path}: directory {parent} does not exist")
    return path


def write(spec: Dict[str, Any], path: str) -> str:
    path = output_path(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as fh:
            json.dump(spec, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except OSError as err:
        raise HookError(f"cannot write CDI spec {path}: {err.strerror}") from None
    return path
