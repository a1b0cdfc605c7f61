"""The YAML config: where sysfs and state live, and the VF pools.

Errors name the file and the key, e.g.
``config /etc/sriov-hook/config.yaml: pools[0].mode: 'x' is not one of ...``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

from .errors import ConfigError, UnknownPool
from .pci import PfSelector, parse_selector

DEFAULT_PATH = "/etc/sriov-hook/config.yaml"
DEFAULT_AGENT_SOCKET = "/run/sriov-hook/agent.sock"
# Kubernetes (sriov_hook/k8s/): the kubelet's directories and the CDI spec directory.
DEFAULT_DEVICE_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
DEFAULT_POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
DEFAULT_CDI_DIR = "/var/run/cdi"
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9808"
MODES = ("netdev", "vfio", "kata", "dpdk")
LINK_STATES = ("auto", "enable", "disable")
# Fields a container may override, if the pool's ``allow`` lists them.
OVERRIDABLE = ("mac", "vlan", "qos", "mtu", "spoofchk", "trust", "rate", "link_state")
DEFAULT_ALLOW = ("mac", "mtu")
_POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_K8S_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")   # a DNS-1123 label
_TOP_KEYS = {"sysfs_root", "state_dir", "log_file", "log_level", "lock_timeout",
             "device_timeout", "pools", "vfio_dev_dir", "allow_noiommu", "cgroup_root",
             "hugepages_root", "numvfs", "agent_socket", "metrics_address", "udev_dir",
             "device_plugin", "device_plugin_dir", "pod_resources_socket", "cdi_dir",
             "cdi_hook_path"}
_POOL_KEYS = {"name", "pfs", "mode", "vlan", "qos", "mtu", "spoofchk", "trust",
              "min_tx_rate", "max_tx_rate", "link_state", "allow", "vlans",
              "max_per_container", "driver", "hugepages", "hugepage_size", "namespaces"}
USERSPACE_DRIVERS = ("vfio-pci", "uio_pci_generic", "igb_uio")
_SIZE = re.compile(r"^(\d+)\s*([KMG])$", re.I)


@dataclass(frozen=True)
class VfSettings:
    """PF-side settings for one VF; None means 'leave as it is'."""

    mac: Optional[str] = None
    vlan: Optional[int] = None
    qos: Optional[int] = None
    spoofchk: Optional[bool] = None
    trust: Optional[bool] = None
    min_tx_rate: Optional[int] = None
    max_tx_rate: Optional[int] = None
    link_state: Optional[str] = None

    def requested(self) -> List[str]:
        return [k for k, v in self.__dict__.items() if v is not None]


@dataclass(frozen=True)
class Pool:
    name: str
    mode: str
    pfs: Tuple[PfSelector, ...]
    defaults: VfSettings = VfSettings()
    mtu: Optional[int] = None
    allow: FrozenSet[str] = frozenset(DEFAULT_ALLOW)
    vlans: Optional[Tuple[Tuple[int, int], ...]] = None  # None = any, if vlan allowed
    max_per_container: int = 4
    driver: str = "vfio-pci"            # dpdk mode: the userspace driver
    hugepages_kb: int = 0               # dpdk mode: memory to have reserved per VF
    hugepage_kb: int = 2048             # dpdk mode: page size
    # Kubernetes namespaces whose pods may use the pool; None = anyone. Read
    # only from a key the CRI runtime sets itself (oci.Container.k8s_namespace).
    namespaces: Optional[FrozenSet[str]] = None

    def vlan_allowed(self, vlan: int) -> bool:
        return self.vlans is None or any(lo <= vlan <= hi for lo, hi in self.vlans)


@dataclass(frozen=True)
class Config:
    path: str
    sysfs_root: str = "/sys"
    state_dir: str = "/var/lib/sriov-hook"
    log_file: Optional[str] = None
    log_level: str = "info"
    lock_timeout: float = 10.0
    device_timeout: float = 5.0
    vfio_dev_dir: str = "/dev/vfio"
    allow_noiommu: bool = False
    cgroup_root: str = "/sys/fs/cgroup"
    hugepages_root: Optional[str] = None   # default: sysfs_root
    # udev's runtime dir: after a VF's driver is reloaded, wait for udev to
    # record (and maybe rename) the new netdev before touching it. "" = no udev.
    udev_dir: str = "/run/udev"
    numvfs: Dict[str, int] = field(default_factory=dict)   # PF -> VFs for 'sriov-hook setup'
    agent_socket: str = DEFAULT_AGENT_SOCKET   # where 'sriov-hook agent' listens (client.py too)
    metrics_address: str = DEFAULT_METRICS_ADDRESS   # host:port for Prometheus; "" = off
    device_plugin: bool = False   # the agent serves the kubelet device plugin API (k8s/)
    device_plugin_dir: str = DEFAULT_DEVICE_PLUGIN_DIR
    pod_resources_socket: str = DEFAULT_POD_RESOURCES_SOCKET
    cdi_dir: str = DEFAULT_CDI_DIR   # where the per-VF CDI specs go
    # The sriov-hook command the CDI specs have the runtime run, as the host sees it;
    # "": the one beside the agent's interpreter, else /usr/local/bin/sriov-hook.
    cdi_hook_path: str = ""
    pools: Dict[str, Pool] = field(default_factory=dict)

    def pool(self, name: str) -> Pool:
        try:
            return self.pools[name]
        except KeyError:
            known = ", ".join(sorted(self.pools)) or "none"
            raise UnknownPool(f"unknown pool {name!r} (configured: {known})") from None


def resolve_path(cli_path: Optional[str]) -> str:
    return cli_path or os.environ.get("SRIOV_HOOK_CONFIG") or DEFAULT_PATH


CACHE_DIR = "/run/sriov-hook/config-cache"


def load(cli_path: Optional[str] = None, cache_dir: Optional[str] = CACHE_DIR) -> Config:
    """Load and validate the config.

    PyYAML costs ~20 ms to import, a large share of an in-process hook.
    So the parsed document is cached as JSON under /run (root-only), keyed
    by the file's device, inode, size and mtime; the cached document is
    validated again on every load, exactly as fresh
    YAML is, and only a document that validated is ever cached.
    """
    path = resolve_path(cli_path)
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
            cached = _cache_read(cache_dir, path, key)
            if cached is not None:
                return _build(cached, path)
            text = fh.read()
    except OSError as err:
        raise ConfigError(f"config {path}: cannot read: {err.strerror}") from None
    raw = _parse_yaml(text, path)
    cfg = _build(raw, path)
    _cache_write(cache_dir, path, key, raw)
    return cfg


def _cache_file(cache_dir: str, path: str) -> str:
    # crc32 names the entry; the entry itself stores the full path and is
    # checked against it, so a collision is a miss, never a wrong config.
    import binascii
    absolute = os.path.abspath(path)
    return os.path.join(cache_dir, f"{binascii.crc32(absolute.encode()):08x}.json")


def _cache_read(cache_dir: Optional[str], path: str, key: str) -> Any:
    if not cache_dir:
        return None
    import json
    try:
        with open(_cache_file(cache_dir, path), "rb") as fh:
            data = json.loads(fh.read())
        if data.get("key") == key and data.get("path") == os.path.abspath(path):
            return data["raw"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return None


def _cache_write(cache_dir: Optional[str], path: str, key: str, raw: Any) -> None:
    if not cache_dir:
        return
    import json
    try:
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        target = _cache_file(cache_dir, path)
        tmp = f"{target}.{os.getpid()}.tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            json.dump({"path": os.path.abspath(path), "key": key, "raw": raw}, fh)
        os.rename(tmp, target)
    except (OSError, TypeError, ValueError):
        pass  # a cache is an optimisation: never a failure


def parse(text: bytes, path: str = "<config>") -> Config:
    return _build(_parse_yaml(text, path), path)


def _parse_yaml(text: bytes, path: str) -> Any:
    import yaml  # lazily, and only on a config-cache miss
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        raw = yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"config {path}:{where}: {problem}") from None
    return raw


class _Ctx:
    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"config {self.path}: {key}: {msg}")


def _build(raw: Any, path: str) -> Config:
    c = _Ctx(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: top level must be a mapping")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise c.fail(sorted(map(str, unknown))[0], f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    kw: Dict[str, Any] = {"path": path}
    for key in ("sysfs_root", "state_dir", "log_file", "vfio_dev_dir", "cgroup_root",
                "hugepages_root", "agent_socket", "device_plugin_dir", "pod_resources_socket",
                "cdi_dir", "cdi_hook_path"):
        if key in raw and raw[key] is not None:
            val = raw[key]
            if not isinstance(val, str) or not os.path.isabs(val):
                raise c.fail(key, "must be an absolute path")
            kw[key] = os.path.normpath(val)
    if "udev_dir" in raw:
        val = raw["udev_dir"]
        if val != "" and (not isinstance(val, str) or not os.path.isabs(val)):
            raise c.fail("udev_dir", 'must be an absolute path, or "" when the host runs no udev')
        kw["udev_dir"] = os.path.normpath(val) if val else ""
    if "metrics_address" in raw:
        kw["metrics_address"] = _address(c, raw["metrics_address"])
    if "device_plugin" in raw:
        kw["device_plugin"] = _bool(c, "device_plugin", raw["device_plugin"])
    if "allow_noiommu" in raw:
        if not isinstance(raw["allow_noiommu"], bool):
            raise c.fail("allow_noiommu", "must be true or false")
        kw["allow_noiommu"] = raw["allow_noiommu"]
    if "log_level" in raw:
        if raw["log_level"] not in ("debug", "info", "warning", "error"):
            raise c.fail("log_level", "must be one of debug, info, warning, error")
        kw["log_level"] = raw["log_level"]
    for key in ("lock_timeout", "device_timeout"):
        if key in raw:
            val = raw[key]
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 < val <= 300:
                raise c.fail(key, "must be a number of seconds in (0, 300]")
            kw[key] = float(val)
    if "numvfs" in raw:
        nv = raw["numvfs"]
        if not isinstance(nv, dict):
            raise c.fail("numvfs", "must map PF names or PCI addresses to VF counts")
        out: Dict[str, int] = {}
        for pf, n in nv.items():
            try:
                sel = parse_selector(pf)
            except ValueError as err:
                raise c.fail(f"numvfs.{pf}", str(err)) from None
            if sel.ranges is not None:
                raise c.fail(f"numvfs.{pf}", "takes a PF, not a VF range")
            out[sel.pf] = _int_in(c, f"numvfs.{pf}", n, 0, 4096)
        kw["numvfs"] = out
    pools_raw = raw.get("pools")
    if not isinstance(pools_raw, list) or not pools_raw:
        raise c.fail("pools", "must be a non-empty list")
    pools: Dict[str, Pool] = {}
    for i, p in enumerate(pools_raw):
        pool = _pool(c, f"pools[{i}]", p)
        if pool.name in pools:
            raise c.fail(f"pools[{i}].name", f"duplicate pool name {pool.name!r}")
        pools[pool.name] = pool
    _check_overlaps(c, pools)
    kw["pools"] = pools
    return Config(**kw)


def _address(c: _Ctx, val: Any) -> str:
    """``host:port`` (``[v6]:port`` too) for the metrics endpoint; empty or null = off."""
    if val is None or val == "":
        return ""
    host, _, port = str(val).rpartition(":") if isinstance(val, str) else ("", "", "")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(ch.isspace() for ch in host):
        raise c.fail("metrics_address", "must be host:port (e.g. 127.0.0.1:9808), or empty for off")
    return str(val)


def _int_in(c: _Ctx, key: str, val: Any, lo: int, hi: int) -> int:
    if isinstance(val, bool) or not isinstance(val, int) or not lo <= val <= hi:
        raise c.fail(key, f"must be an integer in {lo}..{hi}")
    return val


def _bool(c: _Ctx, key: str, val: Any) -> bool:
    if not isinstance(val, bool):
        raise c.fail(key, "must be true or false")
    return val


def _pool(c: _Ctx, key: str, p: Any) -> Pool:
    if not isinstance(p, dict):
        raise c.fail(key, "must be a mapping")
    unknown = set(p) - _POOL_KEYS
    if unknown:
        raise c.fail(f"{key}.{sorted(map(str, unknown))[0]}", "unknown key")
    name = p.get("name")
    if not isinstance(name, str) or not _POOL_NAME.match(name):
        raise c.fail(f"{key}.name", "must match [A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
    mode = p.get("mode", "netdev")
    if mode not in MODES:
        raise c.fail(f"{key}.mode", f"{mode!r} is not one of {', '.join(MODES)}")
    pfs_raw = p.get("pfs")
    if not isinstance(pfs_raw, list) or not pfs_raw:
        raise c.fail(f"{key}.pfs", "must be a non-empty list")
    pfs = []
    for j, s in enumerate(pfs_raw):
        try:
            pfs.append(parse_selector(s))
        except ValueError as err:
            raise c.fail(f"{key}.pfs[{j}]", str(err)) from None
    d: Dict[str, Any] = {}
    if "vlan" in p:
        d["vlan"] = _int_in(c, f"{key}.vlan", p["vlan"], 0, 4094)
    if "qos" in p:
        d["qos"] = _int_in(c, f"{key}.qos", p["qos"], 0, 7)
    for k in ("spoofchk", "trust"):
        if k in p:
            d[k] = _bool(c, f"{key}.{k}", p[k])
    for k in ("min_tx_rate", "max_tx_rate"):
        if k in p:
            d[k] = _int_in(c, f"{key}.{k}", p[k], 0, 10_000_000)
    if "link_state" in p:
        if p["link_state"] not in LINK_STATES:
            raise c.fail(f"{key}.link_state", f"must be one of {', '.join(LINK_STATES)}")
        d["link_state"] = p["link_state"]
    mtu = _int_in(c, f"{key}.mtu", p["mtu"], 68, 65535) if "mtu" in p else None
    allow = p.get("allow", list(DEFAULT_ALLOW))
    if not isinstance(allow, list) or any(a not in OVERRIDABLE for a in allow):
        raise c.fail(f"{key}.allow", f"must be a list drawn from {', '.join(OVERRIDABLE)}")
    vlans = None
    if "vlans" in p:
        vlans = _vlan_ranges(c, f"{key}.vlans", p["vlans"])
    maxn = _int_in(c, f"{key}.max_per_container", p["max_per_container"], 1, 64) \
        if "max_per_container" in p else 4
    extra: Dict[str, Any] = {}
    if "driver" in p:
        if p["driver"] not in USERSPACE_DRIVERS:
            raise c.fail(f"{key}.driver", f"must be one of {', '.join(USERSPACE_DRIVERS)}")
        extra["driver"] = p["driver"]
    for k, field_name in (("hugepages", "hugepages_kb"), ("hugepage_size", "hugepage_kb")):
        if k in p:
            extra[field_name] = _size_kb(c, f"{key}.{k}", p[k])
    if "namespaces" in p:
        extra["namespaces"] = _namespaces(c, f"{key}.namespaces", p["namespaces"])
    return Pool(name=name, mode=mode, pfs=tuple(pfs), defaults=VfSettings(**d), mtu=mtu,
                allow=frozenset(allow), vlans=vlans, max_per_container=maxn, **extra)


def _namespaces(c: _Ctx, key: str, val: Any) -> FrozenSet[str]:
    if not isinstance(val, list) or not val or len(val) > 1024:
        raise c.fail(key, "must be a non-empty list of Kubernetes namespaces")
    for item in val:
        if not isinstance(item, str) or not _K8S_NAMESPACE.match(item):
            raise c.fail(key, f"{str(item)[:70]!r} is not a Kubernetes namespace "
                              "(a DNS-1123 label: a-z, 0-9, '-', at most 63)")
    return frozenset(val)


def _size_kb(c: _Ctx, key: str, val: Any) -> int:
    m = _SIZE.match(str(val).strip())
    if not m or int(m.group(1)) <= 0:
        raise c.fail(key, "must be a size like 512M or 1G")
    return int(m.group(1)) * {"K": 1, "M": 1024, "G": 1024 * 1024}[m.group(2).upper()]


def _vlan_ranges(c: _Ctx, key: str, val: Any) -> Tuple[Tuple[int, int], ...]:
    if not isinstance(val, list):
        raise c.fail(key, "must be a list of VLAN ids or 'lo-hi' ranges")
    out = []
    for item in val:
        if isinstance(item, int) and not isinstance(item, bool):
            lo = hi = item
        elif isinstance(item, str) and re.fullmatch(r"\d{1,4}-\d{1,4}", item):
            lo, hi = (int(x) for x in item.split("-"))
        else:
            raise c.fail(key, f"bad entry {item!r}")
        if not 0 <= lo <= hi <= 4094:
            raise c.fail(key, f"bad range {item!r} (0..4094)")
        out.append((lo, hi))
    return tuple(out)


def _check_overlaps(c: _Ctx, pools: Dict[str, Pool]) -> None:
    """Two pools may not claim the same whole PF: a VF would have two modes."""
    owner: Dict[str, str] = {}
    for pool in pools.values():
        for sel in pool.pfs:
            if sel.ranges is None:
                if sel.pf in owner and owner[sel.pf] != pool.name:
                    raise c.fail(f"pools.{pool.name}.pfs",
                                 f"PF {sel.pf} is already used whole by pool {owner[sel.pf]}")
                owner[sel.pf] = pool.name
