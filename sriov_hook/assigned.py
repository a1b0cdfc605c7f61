"""Assigned mode: kubelet chose the VF; the pod's annotation only says how to set it up.

The device plugin (k8s/deviceplugin.py) answers Allocate with one CDI device
per VF (cdi.kubelet_edits), and each carries the hook as a createRuntime CDI
hook with ``--pool P --vf PCI`` on its argv. That argv, written by the plugin
into the CDI spec, is the only thing that names the VF: the hook takes
exactly that VF and never another, and fails (the container is refused) if
it is not free.

Settings come from the ``sriov-hook.io/networks`` annotation, matched to the
container's VFs *in order*, pool by pool: the k-th entry naming pool P goes to
the k-th VF of P in the container's ``PCIDEVICE_SRIOV_HOOK_IO_<P>`` variable,
which Allocate sets to every VF of P it gave the container, sorted by PCI
address. A container with several VFs runs one hook per CDI device; each finds
its own VF's place in that list, so each attaches only its VF, with the entry
that belongs to it, whatever order the engine runs the hooks in. The variable
only orders settings: a container that forges it can misplace its own
settings, never obtain another VF. When the variable does not list the VF (a
CDI device used outside Kubernetes), a pool with a single entry still gets it;
with several entries the hook refuses, as it cannot tell which is meant. A VF
with no entry gets defaults and a name of its own: net1, net2, ... skipping
the entries' names, counted over the container's VFs that have no entry (pools
by name, then PCI order).

The plain hook (hooks.d, no ``--vf``) leaves the entries of those pools to the
CDI hooks, so it never picks a second VF for them; on a node that serves the
device plugin, it leaves every pool to them (annotation_value).
"""
from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from .cdi import env_var
from .errors import RequestError, UsageError
from .pci import normalize_bdf
from .request import ANNOTATION, NetworkRequest, parse

if TYPE_CHECKING:
    from .config import Config
    from .context import Ctx
    from .oci import Container


def prestart_value(ctx: "Ctx", container: "Container", pool: Optional[str],
                   vf: Optional[str], forced: Optional[str]) -> Optional[str]:
    """The request text hook.prestart acts on, for the hook's argv.

    ``--pool P --vf PCI`` (assigned mode): that VF alone, with its annotation
    entry (hook.prestart then looks only at that VF's record). ``--pool P``
    alone: ``forced``, as before. Neither: the annotation, less the entries of
    pools kubelet assigns to this container.
    """
    if pool is not None and vf is not None:
        one = request_value(ctx.cfg, container, pool, vf)
        bdf = json.loads(one)[0]["pci"]
        ctx.log.info(f"assigned mode: VF {bdf} of pool {pool}, as kubelet chose it")
        return one
    if forced is not None:
        return forced
    rest = annotation_value(ctx.cfg, container)
    if rest != container.annotations.get(ANNOTATION):
        ctx.log.info("annotation entries of pools kubelet assigns are left to their "
                     "CDI hooks (assigned mode)")
    return rest


def assigned_vfs(cfg: "Config", container: "Container") -> Dict[str, List[str]]:
    """Pool -> the VFs its ``PCIDEVICE_SRIOV_HOOK_IO_<POOL>`` lists in the container's
    environment (config.json's process.env), for every pool that has one."""
    env = _env(container)
    out: Dict[str, List[str]] = {}
    for name in sorted(cfg.pools):
        text = env.get(env_var(name))
        if text:
            vfs = []
            for item in text.split(","):
                try:
                    vfs.append(normalize_bdf(item.strip()))
                except ValueError:
                    raise RequestError(f"{env_var(name)}: {item.strip()[:40]!r} is not a PCI "
                                       "address") from None
            out[name] = vfs
    return out


def request_value(cfg: "Config", container: "Container", pool: str, vf: str) -> str:
    """The one request, as annotation text, for VF ``vf`` of ``pool``."""
    cfg.pool(pool)   # an unknown pool: UnknownPool, before anything else
    try:
        bdf = normalize_bdf(vf)
    except ValueError:
        raise UsageError(f"--vf {vf[:40]!r} is not a PCI address like 0000:3b:02.1") from None
    text = container.annotations.get(ANNOTATION)
    entries = parse(text) if text is not None else []
    mine = [r for r in entries if r.pool == pool]
    assigned = assigned_vfs(cfg, container)
    order = assigned.get(pool, [])
    if bdf in order:
        index = order.index(bdf)
    elif len(mine) <= 1:
        index = 0
    else:
        raise RequestError(f"the annotation has {len(mine)} entries for pool {pool} and nothing "
                           f"says which one is VF {bdf}'s: the container's {env_var(pool)} "
                           "does not list it")
    if index < len(mine):
        req = mine[index]
        if req.pci is not None and req.pci != bdf:
            raise RequestError(f"the annotation's entry {index + 1} for pool {pool} names VF "
                               f"{req.pci}, but kubelet assigned {bdf}")
        entry = to_entry(req)
    else:
        entry = {"pool": pool, "interface": _default_name(assigned, bdf, entries)}
    entry["pci"] = bdf
    return json.dumps([entry])


def annotation_value(cfg: "Config", container: "Container") -> Optional[str]:
    """The annotation for the plain hook: entries of kubelet's pools dropped (None when
    nothing is left). Kubelet's pools: every pool when the node serves the device
    plugin (``device_plugin: true``; a pod's sandbox container, which has no
    PCIDEVICE variable, must not pick VFs from them either), else the pools whose
    PCIDEVICE variable the container has. Unchanged, and not parsed, when none."""
    text = container.annotations.get(ANNOTATION)
    if text is None:
        return None
    kubelets = set(cfg.pools) if cfg.device_plugin else set(assigned_vfs(cfg, container))
    if not kubelets:
        return text
    keep = [to_entry(r) for r in parse(text) if r.pool not in kubelets]
    return json.dumps(keep) if keep else None


def to_entry(req: NetworkRequest) -> Dict[str, Any]:
    """A parsed request as a long-form annotation entry (parse() reads it back the same)."""
    entry: Dict[str, Any] = {"pool": req.pool, "interface": req.interface}
    if req.pci is not None:
        entry["pci"] = req.pci
    entry.update({k: v for k, v in dataclasses.asdict(req.vf).items() if v is not None})
    if req.mtu is not None:
        entry["mtu"] = req.mtu
    if req.ips:
        entry["ips"] = [str(ip) for ip in req.ips]
    if req.gateway is not None:
        entry["gateway"] = str(req.gateway)
    if req.routes:
        entry["routes"] = [{"dst": str(r.dst), **({"via": str(r.via)} if r.via else {})}
                           for r in req.routes]
    if req.replace_default:
        entry["replace_default"] = True
    return entry


def _default_name(assigned: Dict[str, List[str]], bdf: str,
                  entries: List[NetworkRequest]) -> str:
    """net1, net2, ... by the VF's place among the assigned VFs that no entry
    covers (pools by name, then PCI order), skipping the names entries use."""
    flat = []
    for pool, vfs in assigned.items():
        covered = sum(1 for r in entries if r.pool == pool)
        flat += vfs[covered:]
    place = flat.index(bdf) if bdf in flat else 0
    taken = {r.interface for r in entries}
    n, free = 0, -1
    while free < place:
        n += 1
        if f"net{n}" not in taken:
            free += 1
    return f"net{n}"


def _env(container: "Container") -> Dict[str, str]:
    process = container.spec.get("process")
    items = process.get("env") if isinstance(process, dict) else None
    out: Dict[str, str] = {}
    for item in items if isinstance(items, list) else []:
        if isinstance(item, str) and "=" in item:
            key, _, val = item.partition("=")
            out[key] = val
    return out
