"""Raw rtnetlink: the few fixed-format messages a hook sends on every container start.

pyroute2 runs an asyncio loop per request and decodes every attribute of
every answer through its generic machinery: ~0.35 ms a call, eight calls a
prestart, and ~55 ms to import. Links, addresses, routes, moves and the
PF's VF table are small fixed structures, so they are packed and parsed
here directly (~0.03 ms a call). Only writing VF settings still goes through
pyroute2 (netlink.py imports it when the first one is asked for).

This module knows the wire only. ``RtnlError`` carries the kernel's errno;
netlink.py stays the one boundary that turns it into a typed error.
"""
from __future__ import annotations

import errno as _errno
import os
import socket
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_GETADDR, RTM_NEWROUTE = 16, 18, 20, 22, 24
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_VFINFO_LIST = 1, 3, 4, 22
IFLA_NET_NS_FD, IFLA_EXT_MASK, IFLA_ALT_IFNAME, IFLA_PARENT_DEV_NAME = 28, 29, 53, 56
IFLA_VF_INFO = 1
IFLA_VF_MAC, IFLA_VF_VLAN, IFLA_VF_SPOOFCHK, IFLA_VF_LINK_STATE = 1, 2, 4, 5
IFLA_VF_RATE, IFLA_VF_TRUST = 6, 9
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
RT_TABLE_MAIN, RTPROT_STATIC, RTN_UNICAST = 254, 4, 1
RT_SCOPE_UNIVERSE = 0
IFF_UP = 0x1
RTEXT_FILTER_VF, RTEXT_FILTER_SKIP_STATS = 1, 8
IFNAMSIZ = 16
NLA_TYPE_MASK = 0x3FFF            # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
SOL_NETLINK, NETLINK_GET_STRICT_CHK = 270, 12
NOT_REPORTED = 0xFFFFFFFF         # a VF setting the driver does not report

_HDR = struct.Struct("=IHHII")     # nlmsghdr
_IFI = struct.Struct("=BxHiII")    # ifinfomsg
_IFA = struct.Struct("=BBBBI")     # ifaddrmsg
_RTM = struct.Struct("=BBBBBBBBI")  # rtmsg
_RTA = struct.Struct("=HH")        # rtattr
_U32 = struct.Struct("=I")
_ERR = struct.Struct("=i")
_VF3 = struct.Struct("=III")       # vf + two u32 settings (vlan/qos, min/max rate)
_VF2 = struct.Struct("=II")        # vf + one u32 setting


class RtnlError(Exception):
    """The kernel refused a request; ``code`` is its errno."""

    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.code = code


@dataclass(frozen=True)
class LinkMsg:
    index: int
    flags: int
    attrs: Dict[int, bytes]


@dataclass(frozen=True)
class AddrMsg:
    family: int
    prefixlen: int
    scope: int
    index: int
    attrs: Dict[int, bytes]


# -- attributes ---------------------------------------------------------------------------
def attr(kind: int, payload: bytes) -> bytes:
    size = _RTA.size + len(payload)
    return _RTA.pack(size, kind) + payload + b"\0" * (-size % 4)


def u32(kind: int, value: int) -> bytes:
    return attr(kind, _U32.pack(value))


def string(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def parse_attrs(data: bytes, offset: int = 0) -> Dict[int, bytes]:
    """type -> payload (the last one of a type wins)."""
    return {kind: payload for kind, payload in iter_attrs(data, offset)}


def iter_attrs(data: bytes, offset: int = 0) -> Iterator[Tuple[int, bytes]]:
    end = len(data)
    while offset + _RTA.size <= end:
        size, kind = _RTA.unpack_from(data, offset)
        if size < _RTA.size or offset + size > end:
            return
        yield kind & NLA_TYPE_MASK, data[offset + _RTA.size:offset + size]
        offset += (size + 3) & ~3


def u32_value(payload: bytes) -> int:
    return int(_U32.unpack_from(payload)[0])


def text(payload: Optional[bytes]) -> Optional[str]:
    return None if payload is None else payload.split(b"\0", 1)[0].decode("utf-8", "replace")


def hwaddr(payload: Optional[bytes]) -> Optional[str]:
    return None if not payload else ":".join(f"{b:02x}" for b in payload)


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def ip_text(family: int, payload: bytes) -> str:
    return socket.inet_ntop(family, payload)


def name_attr(name: str) -> bytes:
    """A link name to look up: names past IFNAMSIZ can only be alternative names."""
    raw = name.encode()
    return attr(IFLA_IFNAME if len(raw) < IFNAMSIZ else IFLA_ALT_IFNAME, raw + b"\0")


# -- messages -----------------------------------------------------------------------------
def ifinfo(index: int = 0, flags: int = 0, change: int = 0, family: int = 0) -> bytes:
    return _IFI.pack(family, 0, index, flags, change)


def link_msg(payload: bytes) -> LinkMsg:
    _family, _type, index, flags, _change = _IFI.unpack_from(payload)
    return LinkMsg(index, flags, parse_attrs(payload, _IFI.size))


def addr_msg(payload: bytes) -> AddrMsg:
    family, prefixlen, _flags, scope, index = _IFA.unpack_from(payload)
    return AddrMsg(family, prefixlen, scope, index, parse_attrs(payload, _IFA.size))


def vf_table(msg: LinkMsg) -> Optional[List[Dict[int, bytes]]]:
    """The attributes of each IFLA_VF_INFO, or None if the link reports no VFs."""
    vflist = msg.attrs.get(IFLA_VFINFO_LIST)
    if vflist is None:
        return None
    return [parse_attrs(payload) for kind, payload in iter_attrs(vflist) if kind == IFLA_VF_INFO]


def vf_number(info: Dict[int, bytes]) -> Optional[int]:
    mac = info.get(IFLA_VF_MAC)
    return _U32.unpack_from(mac)[0] if mac is not None and len(mac) >= 4 else None


def vf_fields(info: Dict[int, bytes]) -> Dict[str, Optional[int]]:
    """The raw u32 settings of one VF (NOT_REPORTED where the driver has none)."""
    out: Dict[str, Optional[int]] = {}
    for kind, names, layout in ((IFLA_VF_VLAN, ("vlan", "qos"), _VF3),
                                (IFLA_VF_RATE, ("min_tx_rate", "max_tx_rate"), _VF3),
                                (IFLA_VF_SPOOFCHK, ("spoofchk",), _VF2),
                                (IFLA_VF_TRUST, ("trust",), _VF2),
                                (IFLA_VF_LINK_STATE, ("link_state",), _VF2)):
        payload = info.get(kind)
        if payload is not None and len(payload) >= layout.size:
            values = layout.unpack_from(payload)[1:]
            out.update(zip(names, values))
    return out


def vf_mac(info: Dict[int, bytes]) -> Optional[str]:
    """struct ifla_vf_mac: u32 vf, then 32 bytes of which Ethernet uses 6."""
    payload = info.get(IFLA_VF_MAC)
    return hwaddr(payload[4:10]) if payload is not None and len(payload) >= 10 else None


# -- the socket ---------------------------------------------------------------------------
class Socket:
    """One NETLINK_ROUTE socket, bound to the netns of the thread that opens it."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   socket.NETLINK_ROUTE)
        try:
            # Dumps filtered by the kernel (addresses of one link); older
            # kernels ignore the filter, and callers filter again anyway.
            self._sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            self._sock.bind((0, 0))
        except OSError:
            self._sock.close()
            raise
        self._seq = 0
        self._buf = bytearray(65536)

    def close(self) -> None:
        self._sock.close()

    def request(self, kind: int, body: bytes, flags: int = 0) -> List[Tuple[int, bytes]]:
        """Send one request; (type, payload) of every answer before its ack or DONE.

        Requests are acked (NLM_F_ACK) and dumps end with NLMSG_DONE (the kernel
        acks no dump), so an answer never runs into the next request's.
        """
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        seq = self._seq
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        flags |= NLM_F_REQUEST | (0 if dump else NLM_F_ACK)
        self._sock.send(_HDR.pack(_HDR.size + len(body), kind, flags, seq, 0) + body)
        out: List[Tuple[int, bytes]] = []
        while True:
            data = self._recv()
            at = 0
            while at + _HDR.size <= len(data):
                size, mtype, _flags, mseq, _pid = _HDR.unpack_from(data, at)
                if size < _HDR.size or at + size > len(data):
                    raise RtnlError(_errno.EPROTO)
                payload = data[at + _HDR.size:at + size]
                at += (size + 3) & ~3
                if mseq != seq:
                    continue   # a late answer to a request abandoned mid-way
                if mtype == NLMSG_ERROR or mtype == NLMSG_DONE:
                    code = -_ERR.unpack_from(payload)[0] if len(payload) >= 4 else 0
                    if code:
                        raise RtnlError(code)
                    return out
                out.append((mtype, payload))

    def _recv(self) -> bytes:
        # The datagram's size first, so no answer is ever cut (a PF's VF table
        # with 64 VFs passes 16 KB).
        size = self._sock.recv_into(self._buf, 0, socket.MSG_PEEK | socket.MSG_TRUNC)
        if size > len(self._buf):
            self._buf = bytearray(size)
        got = self._sock.recv_into(self._buf)
        return bytes(self._buf[:got])

    # -- links ----------------------------------------------------------------------------
    def get_link(self, index: int = 0, name: Optional[str] = None,
                 ext_mask: int = RTEXT_FILTER_SKIP_STATS) -> LinkMsg:
        body = ifinfo(index) + (name_attr(name) if name is not None else b"") \
            + u32(IFLA_EXT_MASK, ext_mask)
        return link_msg(self._one(self.request(RTM_GETLINK, body), RTM_NEWLINK))

    def dump_links(self) -> List[LinkMsg]:
        body = ifinfo() + u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
        return [link_msg(p) for t, p in self.request(RTM_GETLINK, body, NLM_F_DUMP)
                if t == RTM_NEWLINK]

    def set_link(self, index: int, up: Optional[bool] = None, name: Optional[str] = None,
                 mac: Optional[str] = None, mtu: Optional[int] = None,
                 netns_fd: Optional[int] = None) -> None:
        """RTM_NEWLINK on an existing link, as ``ip link set`` sends it. With
        ``netns_fd`` the kernel moves the link and gives it ``name`` there."""
        body = ifinfo(index, IFF_UP if up else 0, IFF_UP if up is not None else 0)
        if netns_fd is not None:
            body += u32(IFLA_NET_NS_FD, netns_fd)
        if name is not None:
            body += string(IFLA_IFNAME, name)
        if mac is not None:
            body += attr(IFLA_ADDRESS, mac_bytes(mac))
        if mtu is not None:
            body += u32(IFLA_MTU, mtu)
        self.request(RTM_NEWLINK, body)

    # -- addresses and routes -------------------------------------------------------------
    def dump_addrs(self, index: int) -> List[AddrMsg]:
        msgs = self.request(RTM_GETADDR, _IFA.pack(0, 0, 0, 0, index), NLM_F_DUMP)
        return [a for a in (addr_msg(p) for t, p in msgs if t == RTM_NEWADDR) if a.index == index]

    def add_addr(self, index: int, family: int, packed: bytes, prefixlen: int) -> None:
        body = _IFA.pack(family, prefixlen, 0, RT_SCOPE_UNIVERSE, index) \
            + attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed)
        self.request(RTM_NEWADDR, body, NLM_F_CREATE | NLM_F_EXCL)

    def add_route(self, family: int, dst: Optional[bytes], dst_len: int, oif: int,
                  gateway: Optional[bytes] = None, replace: bool = False) -> None:
        """A static unicast route in the main table, scope global (as pyroute2 made them)."""
        body = _RTM.pack(family, dst_len, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE,
                         RTN_UNICAST, 0)
        if dst is not None and dst_len:
            body += attr(RTA_DST, dst)
        body += u32(RTA_OIF, oif)
        if gateway is not None:
            body += attr(RTA_GATEWAY, gateway)
        self.request(RTM_NEWROUTE, body,
                     NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_EXCL))

    @staticmethod
    def _one(msgs: List[Tuple[int, bytes]], kind: int) -> bytes:
        for mtype, payload in msgs:
            if mtype == kind:
                return payload
        raise RtnlError(_errno.ENODATA)
