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
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List

from . import drivers
from .context import Ctx
from .errors import HookError

KIND = "sriov-hook.io/vf"
CDI_VERSION = "0.5.0"
DEFAULT_DIR = "/var/run/cdi"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def device_name(pool: str, bdf: str) -> str:
    return f"{pool}-{bdf.replace(':', '-')}"


def env_var(pool: str) -> str:
    """sriov-network-device-plugin's convention: PCIDEVICE_<RESOURCE>."""
    return "PCIDEVICE_SRIOV_HOOK_IO_" + re.sub(r"[^A-Z0-9]", "_", pool.upper())


def _hooks(hook: str, config: str, extra: List[str]) -> List[Dict[str, Any]]:
    base = ["sriov-hook", "--config", config]
    return [{"hookName": "createRuntime", "path": hook, "args": base + ["createRuntime"] + extra,
             "env": [PATH_ENV], "timeout": 30},
            {"hookName": "poststop", "path": hook, "args": base + ["poststop"],
             "env": [PATH_ENV], "timeout": 30}]


def build(ctx: Ctx, hook: str) -> Dict[str, Any]:
    devices: List[Dict[str, Any]] = []
    vfio_node = os.path.join(ctx.cfg.vfio_dev_dir, "vfio")
    for pool in ctx.cfg.pools.values():
        if pool.mode != "vfio":
            continue
        bdfs = []
        for cand in ctx.inventory.candidates(pool):
            bdfs.append(cand.bdf)
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
    return {"cdiVersion": CDI_VERSION, "kind": KIND, "devices": devices}


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


def write(spec: Dict[str, Any], path: str) -> str:
    if os.path.isdir(path) or path.endswith("/"):
        path = os.path.join(path, "sriov-hook.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
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
