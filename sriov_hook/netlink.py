"""The one boundary to rtnetlink: typed calls in, typed errors out.

``Netlink`` is an rtnetlink socket bound to one network namespace. Links,
addresses, routes, moves and the PF's VF table go through rtnl.py's raw
messages; writing VF settings goes through pyroute2, imported on the first
such call (most hooks never make one). Kernel errors from either become
typed errors here and nowhere else, and the few transient ones (EBUSY/EAGAIN
from drivers that apply VF settings asynchronously) are retried a bounded
number of times.

A socket for another namespace is opened by ``setns``-ing this thread there,
creating the socket, and ``setns``-ing back: a netlink socket stays bound to
the namespace it was created in. This avoids the fork pyroute2's own
``netns=`` argument costs, and it never creates a namespace by accident
(pyroute2's default ``flags=O_CREAT`` would).
"""
from __future__ import annotations

import errno as _errno
import ipaddress
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Type, TypeVar

from . import rtnl
from .errors import (DeviceBusy, InvalidArgument, LinkExists, LinkNotFound, NetlinkError,
                     NotSupported, Refused)
from .netns import enter_netns


def _import_rtnl() -> "tuple[Any, Any]":
    """IPRoute and pyroute2's NetlinkError, without pyroute2's package __init__.

    ``pyroute2/__init__.py`` eagerly imports the whole library (NDB, IPDB,
    conntrack, nftables, ...): ~115 ms and 6 MB that the hook never uses.
    Its submodules import each other by absolute name and need nothing from
    that __init__, so we register a bare package module carrying pyroute2's
    real search path and import only ``pyroute2.iproute.linux``. If pyroute2
    is already imported, or anything about this fails, we use the ordinary
    import.
    """
    import sys
    if "pyroute2" not in sys.modules:
        import importlib.util
        import types
        spec = importlib.util.find_spec("pyroute2")
        if spec is not None and spec.submodule_search_locations:
            pkg = types.ModuleType("pyroute2")
            pkg.__path__ = list(spec.submodule_search_locations)
            pkg.__spec__ = spec
            pkg.__file__ = spec.origin
            sys.modules["pyroute2"] = pkg
            try:
                from pyroute2.iproute.linux import IPRoute as lean_ipr
                from pyroute2.netlink.exceptions import NetlinkError as lean_err
                return lean_ipr, lean_err
            except Exception:  # noqa: BLE001 - fall back to the full package
                for name in [m for m in sys.modules if m == "pyroute2" or
                             m.startswith("pyroute2.")]:
                    del sys.modules[name]
    from pyroute2 import IPRoute as full_ipr
    from pyroute2.netlink.exceptions import NetlinkError as full_err
    return full_ipr, full_err


# The kernel's refusals, as each path reports them; pyroute2's joins on import.
_KERNEL_ERRORS: Tuple[Type[BaseException], ...] = (rtnl.RtnlError,)
_PYROUTE2: Optional[Any] = None


def load_pyroute2() -> Any:
    """pyroute2's IPRoute class, imported on first use (the agent imports it at start)."""
    global _PYROUTE2, _KERNEL_ERRORS
    if _PYROUTE2 is None:
        ipr, err = _import_rtnl()
        _KERNEL_ERRORS = (rtnl.RtnlError, err)
        _PYROUTE2 = ipr
    return _PYROUTE2


LINK_STATES = {"auto": 0, "enable": 1, "disable": 2}
LINK_STATE_NAMES = {v: k for k, v in LINK_STATES.items()}
_TRANSIENT = (_errno.EBUSY, _errno.EAGAIN)
_RETRIES = 10
_RETRY_DELAY = 0.05
T = TypeVar("T")


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mac: Optional[str]
    mtu: int
    up: bool
    parent: Optional[str]  # IFLA_PARENT_DEV_NAME: the PCI address on real NICs


@dataclass(frozen=True)
class VfInfo:
    """PF-side view of one VF (IFLA_VF_INFO)."""

    vf: int
    mac: Optional[str] = None
    vlan: Optional[int] = None
    qos: Optional[int] = None
    spoofchk: Optional[bool] = None
    trust: Optional[bool] = None
    link_state: Optional[str] = None
    min_tx_rate: Optional[int] = None
    max_tx_rate: Optional[int] = None

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "VfInfo":
        return cls(vf=int(data["vf"]), **{k: data.get(k) for k in cls.__dataclass_fields__
                                          if k != "vf"})


def _translate(err: BaseException, what: str) -> NetlinkError:
    code = getattr(err, "code", 0) or 0
    text = os.strerror(code) if code else str(err)
    msg = f"{what}: {text}"
    if code == _errno.ENODEV or code == _errno.ENOENT:
        return LinkNotFound(msg, code)
    if code == _errno.EEXIST or code == _errno.ENOTEMPTY:
        return LinkExists(msg, code)
    if code in (_errno.EOPNOTSUPP, _errno.ENOTSUP):
        return NotSupported(msg, code)
    if code == _errno.EBUSY:
        return DeviceBusy(msg, code)
    if code in (_errno.EPERM, _errno.EACCES, _errno.EADDRNOTAVAIL):
        return Refused(msg, code)
    if code in (_errno.EINVAL, _errno.ERANGE):
        return InvalidArgument(msg, code)
    return NetlinkError(msg, code)


class Netlink:
    """An rtnetlink socket in one namespace; always use it as a context manager."""

    def __init__(self, netns_fd: Optional[int] = None, label: str = "host") -> None:
        self.label = label
        self._ipr_obj: Optional[Any] = None
        self._host = netns_fd is None   # VF settings are written from the host only
        if netns_fd is None:
            self._rt = rtnl.Socket()
        else:
            with enter_netns(netns_fd):
                self._rt = rtnl.Socket()

    def __enter__(self) -> "Netlink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._rt.close()
        if self._ipr_obj is not None:
            self._ipr_obj.close()
            self._ipr_obj = None

    @property
    def _ipr(self) -> Any:
        """pyroute2's socket (the host's: only set_vf uses it), opened on first use."""
        if not self._host:
            raise AssertionError(f"VF settings are written on the host, not in {self.label}")
        if self._ipr_obj is None:
            self._ipr_obj = load_pyroute2()()
        return self._ipr_obj

    # -- plumbing ------------------------------------------------------------
    def _call(self, what: str, fn: Callable[..., T], *args: Any, retry: bool = False,
              **kwargs: Any) -> T:
        attempts = _RETRIES if retry else 1
        for attempt in range(attempts):
            try:
                return fn(*args, **kwargs)
            except _KERNEL_ERRORS as err:
                code = getattr(err, "code", 0) or 0
                if retry and code in _TRANSIENT and attempt + 1 < attempts:
                    time.sleep(_RETRY_DELAY)
                    continue
                raise _translate(err, f"{what} (netns {self.label})") from None
        raise AssertionError("unreachable")

    @staticmethod
    def _link(msg: rtnl.LinkMsg) -> Link:
        a = msg.attrs
        mtu = a.get(rtnl.IFLA_MTU)
        return Link(index=msg.index, name=rtnl.text(a.get(rtnl.IFLA_IFNAME)) or "",
                    mac=rtnl.hwaddr(a.get(rtnl.IFLA_ADDRESS)),
                    mtu=rtnl.u32_value(mtu) if mtu else 0,
                    up=bool(msg.flags & rtnl.IFF_UP),
                    parent=rtnl.text(a.get(rtnl.IFLA_PARENT_DEV_NAME)))

    # -- links ---------------------------------------------------------------
    def link(self, name: str) -> Optional[Link]:
        return self._get(f"get link {name}", name=name)

    def link_by_index(self, index: int) -> Optional[Link]:
        return self._get(f"get link #{index}", index=index)

    def _get(self, what: str, **query: Any) -> Optional[Link]:
        try:
            msg = self._call(what, self._rt.get_link, **query)
        except LinkNotFound:
            return None
        return self._link(msg)

    def links(self) -> Iterator[Link]:
        for msg in self._call("dump links", self._rt.dump_links):
            yield self._link(msg)

    def require(self, name: str) -> Link:
        link = self.link(name)
        if link is None:
            raise LinkNotFound(f"no interface {name} in netns {self.label}", _errno.ENODEV)
        return link

    def set_link(self, index: int, **attrs: Any) -> None:
        """Set link attributes: any of ``address``, ``mtu``, ``state``, ``ifname``."""
        unknown = set(attrs) - {"address", "mtu", "state", "ifname"}
        if unknown:
            raise TypeError(f"set_link: unknown attributes {sorted(unknown)}")
        state = attrs.get("state")
        desc = ", ".join(f"{k}={v}" for k, v in attrs.items())
        self._call(f"set link #{index} {desc}", self._rt.set_link, index,
                   up=None if state is None else state == "up", name=attrs.get("ifname"),
                   mac=attrs.get("address"), mtu=attrs.get("mtu"), retry=True)

    def move(self, index: int, target_fd: int, ifname: str) -> None:
        """Move a link to another netns and rename it there in one request.

        The kernel applies IFLA_IFNAME as the name in the target namespace, so
        the old name never clashes there (rtnetlink do_setlink).
        """
        self._call(f"move link #{index} to netns as {ifname}", self._rt.set_link, index,
                   netns_fd=target_fd, name=ifname)

    # -- addresses and routes -------------------------------------------------
    def add_addr(self, index: int, address: str, prefixlen: int) -> None:
        ip = ipaddress.ip_address(address)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        try:
            self._call(f"add address {address}/{prefixlen}", self._rt.add_addr, index, family,
                       ip.packed, prefixlen)
        except LinkExists:
            pass  # ensure(): already there is what we wanted

    def global_addrs(self, index: int) -> List[str]:
        out = []
        for msg in self._call(f"dump addresses of #{index}", self._rt.dump_addrs, index):
            addr = msg.attrs.get(rtnl.IFA_ADDRESS)
            if msg.scope == rtnl.RT_SCOPE_UNIVERSE and addr is not None:  # not link-local or host
                out.append(f"{rtnl.ip_text(msg.family, addr)}/{msg.prefixlen}")
        return out

    def add_route(self, dst: str, oif: int, gateway: Optional[str] = None,
                  replace: bool = False) -> None:
        """Add a route; EEXIST (a route to ``dst`` exists) raises LinkExists
        unless ``replace`` says to take its place."""
        net = ipaddress.ip_network(dst, strict=False)
        family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
        via = ipaddress.ip_address(gateway).packed if gateway else None
        self._call(f"{'replace' if replace else 'add'} route {dst}"
                   + (f" via {gateway}" if gateway else ""),
                   self._rt.add_route, family, net.network_address.packed, net.prefixlen, oif,
                   via, replace)

    # -- VFs, from the PF ---------------------------------------------------------
    def vf_info(self, pf_index: int, vf: int) -> Optional[VfInfo]:
        """The PF-side settings of VF ``vf``, or None if the PF reports no VFs."""
        msg = self._call(f"get VF info of PF #{pf_index}", self._rt.get_link, index=pf_index,
                         ext_mask=rtnl.RTEXT_FILTER_VF | rtnl.RTEXT_FILTER_SKIP_STATS)
        table = rtnl.vf_table(msg)
        if table is None:
            return None
        for info in table:
            if rtnl.vf_number(info) == vf:
                return _vfinfo(vf, info)
        return None

    def set_vf(self, pf_index: int, vf: int, **attrs: Any) -> None:
        """Set one VF attribute per request, so a failure names its attribute.

        pyroute2 pops keys from the dict it gets, so each request gets a new one.
        """
        for key, val in attrs.items():
            if key == "vlan":
                spec: Dict[str, Any] = {"vf": vf, "vlan": {"vlan": val[0], "qos": val[1]}}
            elif key == "rate":
                spec = {"vf": vf, "rate": {"min_tx_rate": val[0], "max_tx_rate": val[1]}}
            elif key == "link_state":
                spec = {"vf": vf, "link_state": LINK_STATES[val]}
            elif key in ("spoofchk", "trust"):
                spec = {"vf": vf, key: int(bool(val))}
            else:
                spec = {"vf": vf, key: val}
            self._call(f"set VF {vf} {key}={val} on PF #{pf_index}", self._ipr.link, "set",
                       index=pf_index, vf=spec, retry=True)


def _vfinfo(vf: int, info: Dict[int, bytes]) -> VfInfo:
    raw = rtnl.vf_fields(info)

    def flag(key: str) -> Optional[bool]:
        # The kernel reports -1 (as u32) for "not supported by this driver".
        val = raw.get(key)
        return None if val is None or val == rtnl.NOT_REPORTED else bool(val)

    state = raw.get("link_state")
    return VfInfo(
        vf=vf,
        mac=rtnl.vf_mac(info),
        vlan=raw.get("vlan"),
        qos=raw.get("qos"),
        spoofchk=flag("spoofchk"),
        trust=flag("trust"),
        link_state=LINK_STATE_NAMES.get(state) if state is not None else None,
        min_tx_rate=raw.get("min_tx_rate"),
        max_tx_rate=raw.get("max_tx_rate"),
    )
