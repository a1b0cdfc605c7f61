"""Parse and validate the ``sriov-hook.io/networks`` annotation.

Two forms:
  short: ``fast`` or ``fast@net1,fast@net2`` (Multus-like)
  long:  a JSON list of objects with ``pool`` and optional
         ``interface, mac, vlan, qos, mtu, ips, gateway, routes,
         spoofchk, trust, min_tx_rate, max_tx_rate, link_state``.

Every field is validated strictly: whoever starts a container controls
this text and the hook runs as root.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

from .config import LINK_STATES, Config, Pool, VfSettings
from .errors import RequestError
from .jsonbound import TooDeep, loads as bounded_loads
from .pci import ifname_problem, normalize_bdf

if TYPE_CHECKING:
    from .oci import Container

ANNOTATION = "sriov-hook.io/networks"
MAX_ANNOTATION_BYTES = 16 * 1024
# The long form nests 4 deep at most (list, entry, routes, route); anything
# deeper is refused before the JSON decoder sees it.
MAX_ANNOTATION_DEPTH = 6
MAX_REQUESTS = 16
MAX_IPS = 16
MAX_ROUTES = 64
RESERVED_IFNAMES = {"lo"}
_POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_LONG_KEYS = {"pool", "pci", "interface", "mac", "vlan", "qos", "mtu", "ips", "gateway", "routes",
              "spoofchk", "trust", "min_tx_rate", "max_tx_rate", "link_state",
              "replace_default"}

IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True)
class Route:
    dst: IPNetwork
    via: Optional[IPAddress] = None

    def to_json(self) -> Dict[str, Optional[str]]:
        return {"dst": str(self.dst), "via": str(self.via) if self.via else None}


@dataclass(frozen=True)
class NetworkRequest:
    pool: str
    interface: str
    vf: VfSettings = VfSettings()       # what the container asked for, PF side
    mtu: Optional[int] = None
    ips: Tuple[IPInterface, ...] = ()
    gateway: Optional[IPAddress] = None
    routes: Tuple[Route, ...] = ()
    pci: Optional[str] = None           # a specific VF of the pool (CDI per-VF devices)
    replace_default: bool = False       # the gateway may take the place of an existing default route

    def to_json(self) -> Dict[str, Any]:
        return {
            "pool": self.pool, "pci": self.pci, "interface": self.interface,
            "vf": {k: v for k, v in self.vf.__dict__.items() if v is not None},
            "mtu": self.mtu, "ips": [str(i) for i in self.ips],
            "gateway": str(self.gateway) if self.gateway else None,
            "routes": [r.to_json() for r in self.routes],
            "replace_default": self.replace_default,
        }


def parse(value: Any) -> List[NetworkRequest]:
    """Parse the annotation text into requests, interfaces named net1.. by default."""
    if not isinstance(value, str):
        raise RequestError(f"annotation {ANNOTATION} must be a string")
    if len(value.encode("utf-8", "surrogateescape")) > MAX_ANNOTATION_BYTES:
        raise RequestError(f"annotation {ANNOTATION} is larger than {MAX_ANNOTATION_BYTES} bytes")
    text = value.strip()
    if not text:
        raise RequestError(f"annotation {ANNOTATION} is empty")
    items = _long_form(text) if text[0] in "[{" else _short_form(text)
    if len(items) > MAX_REQUESTS:
        raise RequestError(f"annotation asks for {len(items)} networks; at most {MAX_REQUESTS}")
    reqs = []
    taken = {i.get("interface") for i in items if isinstance(i.get("interface"), str)}
    n = 0
    for pos, item in enumerate(items):
        if "interface" not in item:
            # Default names net1, net2, ... in request order, skipping names
            # another entry asked for explicitly.
            n += 1
            while f"net{n}" in taken:
                n += 1
            item = {**item, "interface": f"net{n}"}
        reqs.append(_one(item, pos))
    seen: Dict[str, int] = {}
    for pos, r in enumerate(reqs):
        if r.interface in seen:
            raise RequestError(f"networks[{pos}].interface: {r.interface!r} is also used by networks[{seen[r.interface]}]")
        seen[r.interface] = pos
    return reqs


def _short_form(text: str) -> List[Dict[str, Any]]:
    out = []
    for part in text.split(","):
        part = part.strip()
        pool, at, ifname = part.partition("@")
        if not _POOL_NAME.match(pool):
            raise RequestError(f"annotation entry {part!r}: pool name must match [A-Za-z0-9][A-Za-z0-9_.-]*")
        entry: Dict[str, Any] = {"pool": pool}
        if at:
            entry["interface"] = ifname
        out.append(entry)
    return out


def _long_form(text: str) -> List[Dict[str, Any]]:
    try:
        data = bounded_loads(text, MAX_ANNOTATION_DEPTH)
    except TooDeep as err:
        raise RequestError(f"annotation {ANNOTATION} {err}; refused unparsed") from None
    except ValueError as err:
        raise RequestError(f"annotation {ANNOTATION} is not valid JSON: {err}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise RequestError(f"annotation {ANNOTATION} must be a non-empty JSON list of objects")
    for pos, item in enumerate(data):
        if not isinstance(item, dict):
            raise RequestError(f"networks[{pos}] must be a JSON object")
        unknown = set(item) - _LONG_KEYS
        if unknown:
            raise RequestError(f"networks[{pos}]: unknown key {sorted(unknown)[0]!r}")
    return data


def _one(item: Dict[str, Any], pos: int) -> NetworkRequest:
    where = f"networks[{pos}]"
    pool = item.get("pool")
    if not isinstance(pool, str) or not _POOL_NAME.match(pool):
        raise RequestError(f"{where}.pool: required, must match [A-Za-z0-9][A-Za-z0-9_.-]*")
    pci = None
    if item.get("pci") is not None:
        try:
            pci = normalize_bdf(item["pci"]) if isinstance(item["pci"], str) else None
        except ValueError:
            pci = None
        if pci is None:
            raise RequestError(f"{where}.pci: must be a PCI address like 0000:3b:02.1")
    ifname = item["interface"]
    why = ifname_problem(ifname)
    if why:
        raise RequestError(f"{where}.interface: {ifname!r} {why}")
    if ifname in RESERVED_IFNAMES:
        raise RequestError(f"{where}.interface: {ifname!r} is reserved")
    vf: Dict[str, Any] = {}
    if "mac" in item:
        vf["mac"] = _mac(item["mac"], f"{where}.mac")
    if "vlan" in item:
        vf["vlan"] = _int(item["vlan"], f"{where}.vlan", 0, 4094)
    if "qos" in item:
        vf["qos"] = _int(item["qos"], f"{where}.qos", 0, 7)
    for key in ("spoofchk", "trust"):
        if key in item:
            if not isinstance(item[key], bool):
                raise RequestError(f"{where}.{key}: must be true or false")
            vf[key] = item[key]
    for key in ("min_tx_rate", "max_tx_rate"):
        if key in item:
            vf[key] = _int(item[key], f"{where}.{key}", 0, 10_000_000)
    if "link_state" in item:
        if item["link_state"] not in LINK_STATES:
            raise RequestError(f"{where}.link_state: must be one of {', '.join(LINK_STATES)}")
        vf["link_state"] = item["link_state"]
    mtu = _int(item["mtu"], f"{where}.mtu", 68, 65535) if "mtu" in item else None
    ips = tuple(_ips(item.get("ips", []), f"{where}.ips"))
    gateway = _addr(item["gateway"], f"{where}.gateway") if item.get("gateway") is not None else None
    if gateway is not None and not any(i.version == gateway.version for i in ips):
        raise RequestError(f"{where}.gateway: {gateway} has no address of its family in ips")
    routes = tuple(_routes(item.get("routes", []), f"{where}.routes"))
    replace_default = item.get("replace_default", False)
    if not isinstance(replace_default, bool):
        raise RequestError(f"{where}.replace_default: must be true or false")
    if replace_default and gateway is None:
        raise RequestError(f"{where}.replace_default: needs a gateway")
    return NetworkRequest(pool=pool, interface=ifname, vf=VfSettings(**vf), mtu=mtu,
                          ips=ips, gateway=gateway, routes=routes, pci=pci,
                          replace_default=replace_default)


def _int(val: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(val, bool) or not isinstance(val, int) or not lo <= val <= hi:
        raise RequestError(f"{where}: must be an integer in {lo}..{hi}")
    return val


def _mac(val: Any, where: str) -> str:
    if not isinstance(val, str) or not _MAC.match(val):
        raise RequestError(f"{where}: {str(val)[:40]!r} is not a MAC like 02:00:00:00:00:01")
    mac = val.lower()
    first = int(mac[:2], 16)
    if first & 1:
        raise RequestError(f"{where}: {mac} is a multicast address")
    if mac == "00:00:00:00:00:00":
        raise RequestError(f"{where}: the all-zero MAC is not allowed")
    return mac


def _addr(val: Any, where: str) -> IPAddress:
    if not isinstance(val, str) or len(val) > 64:
        raise RequestError(f"{where}: must be an IP address string")
    try:
        return ipaddress.ip_address(val)
    except ValueError:
        raise RequestError(f"{where}: {val[:64]!r} is not an IP address") from None


def _ips(val: Any, where: str) -> List[IPInterface]:
    if not isinstance(val, list) or len(val) > MAX_IPS:
        raise RequestError(f"{where}: must be a list of at most {MAX_IPS} CIDR strings")
    out: List[IPInterface] = []
    for i, s in enumerate(val):
        if not isinstance(s, str) or "/" not in s or len(s) > 64:
            raise RequestError(f"{where}[{i}]: must be a CIDR string like 10.0.0.2/24")
        try:
            iface = ipaddress.ip_interface(s)
        except ValueError:
            raise RequestError(f"{where}[{i}]: {s!r} is not a valid CIDR") from None
        if iface.ip.is_multicast or iface.ip.is_unspecified or iface.ip.is_loopback:
            raise RequestError(f"{where}[{i}]: {s!r} is not a unicast host address")
        if iface in out:
            raise RequestError(f"{where}[{i}]: {s!r} is listed twice")
        out.append(iface)
    return out


def _routes(val: Any, where: str) -> List[Route]:
    if not isinstance(val, list) or len(val) > MAX_ROUTES:
        raise RequestError(f"{where}: must be a list of at most {MAX_ROUTES} routes")
    out = []
    for i, r in enumerate(val):
        if isinstance(r, str):
            r = {"dst": r}
        if not isinstance(r, dict) or set(r) - {"dst", "via", "gw"} or "dst" not in r:
            raise RequestError(f"{where}[{i}]: must be {{'dst': CIDR, 'via': IP}} or a CIDR string")
        dst_s = r["dst"]
        if not isinstance(dst_s, str) or len(dst_s) > 64:
            raise RequestError(f"{where}[{i}].dst: must be a CIDR string")
        try:
            dst = ipaddress.ip_network(dst_s, strict=True)
        except ValueError:
            raise RequestError(f"{where}[{i}].dst: {dst_s[:64]!r} is not a network CIDR") from None
        via_s = r.get("via", r.get("gw"))
        via = _addr(via_s, f"{where}[{i}].via") if via_s is not None else None
        if via is not None and via.version != dst.version:
            raise RequestError(f"{where}[{i}]: via {via} and dst {dst} differ in family")
        out.append(Route(dst, via))
    return out


def apply_policy(cfg: Config, reqs: List[NetworkRequest],
                 container: "Optional[Container]" = None) -> List[NetworkRequest]:
    """Check requests against each pool's policy; return them with pool defaults merged.

    A container may override a pool default only for fields in ``allow``. A
    pool with ``namespaces`` admits only a ``container`` whose CRI runtime
    vouches for one of them; without a container it admits nobody.
    """
    counts: Dict[str, int] = {}
    out = []
    for pos, req in enumerate(reqs):
        pool = cfg.pool(req.pool)
        if pool.namespaces is not None:
            _check_namespace(pool, container)
        counts[pool.name] = counts.get(pool.name, 0) + 1
        if counts[pool.name] > pool.max_per_container:
            raise RequestError(f"pool {pool.name} allows at most {pool.max_per_container} VFs per container")
        asked = req.vf.requested()
        if req.mtu is not None:
            asked.append("mtu")
        for key in asked:
            policy_key = "rate" if key.endswith("_tx_rate") else key
            if policy_key not in pool.allow:
                raise RequestError(f"networks[{pos}].{key}: pool {pool.name} does not let containers set {key}")
        if req.vf.vlan is not None and not pool.vlan_allowed(req.vf.vlan):
            raise RequestError(f"networks[{pos}].vlan: VLAN {req.vf.vlan} is not allowed in pool {pool.name}")
        out.append(_merge(pool, req))
    return out


def _check_namespace(pool: Pool, container: "Optional[Container]") -> None:
    allowed = ", ".join(sorted(pool.namespaces or ()))
    if container is None:
        raise RequestError(f"pool {pool.name} admits only Kubernetes namespaces {allowed}, "
                           f"and this request comes with no container to check")
    namespace = container.k8s_namespace
    if namespace is None:
        raise RequestError(f"pool {pool.name} admits only Kubernetes namespaces {allowed}; "
                           f"this container was not made by a CRI runtime (CRI-O, containerd) "
                           f"that vouches for its namespace")
    if namespace not in (pool.namespaces or ()):
        raise RequestError(f"pool {pool.name} does not admit Kubernetes namespace {namespace} "
                           f"(only {allowed})")


def _merge(pool: Pool, req: NetworkRequest) -> NetworkRequest:
    merged = {k: (v if v is not None else getattr(pool.defaults, k))
              for k, v in req.vf.__dict__.items()}
    return replace(req, vf=VfSettings(**merged),
                   mtu=req.mtu if req.mtu is not None else pool.mtu)
