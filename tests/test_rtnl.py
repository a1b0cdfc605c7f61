"""The raw rtnetlink path (sriov_hook/rtnl.py behind netlink.Netlink), on the real kernel.

pyroute2 is the reference: the same requests made through it leave the
kernel in the same state, and a VF table it encodes reads back the same.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from typing import Any, Callable, Iterator, List

import pytest

from sriov_hook import rtnl
from sriov_hook.errors import InvalidArgument, LinkExists, LinkNotFound
from sriov_hook.netlink import Netlink, VfInfo, _vfinfo
from tests.conftest import Sim, imported_modules, netns_process

pytestmark = pytest.mark.root


@contextlib.contextmanager
def scratch_netns(pairs: int = 1) -> Iterator[str]:
    """A named netns with ``pairs`` veth pairs (va<i>/vb<i>, peers up), DAD off."""
    name = f"rt{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                        "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"],
                       check=True)
        batch = "".join(f"link add va{i} type veth peer name vb{i}\nlink set vb{i} up\n"
                        for i in range(pairs))
        subprocess.run(["ip", "-n", name, "-batch", "-"], input=batch, text=True, check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name])


@contextlib.contextmanager
def netlink_in(ns: str) -> Iterator[Netlink]:
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with Netlink(fd, label=ns) as nl:
            yield nl
    finally:
        os.close(fd)


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True,
                          check=True).stdout


MAC = "02:11:22:33:44:55"


def via_raw(ns: str) -> None:
    with netlink_in(ns) as nl:
        idx = nl.require("va0").index
        nl.set_link(idx, address=MAC)
        nl.set_link(idx, mtu=1400)
        nl.set_link(idx, state="up")
        nl.add_addr(idx, "10.9.0.2", 24)
        nl.add_addr(idx, "10.9.0.2", 24)            # ensure(): already there is fine
        nl.add_addr(idx, "fd00:9::2", 64)
        nl.add_route("10.50.0.0/16", idx)
        nl.add_route("10.60.0.0/16", idx, "10.9.0.1")
        nl.add_route("0.0.0.0/0", idx, "10.9.0.1")
        nl.add_route("0.0.0.0/0", idx, "10.9.0.254", replace=True)
        nl.add_route("fd00:50::/48", idx)
        nl.add_route("::/0", idx, "fd00:9::1")
        nl.set_link(idx, ifname="net1")


def via_pyroute2(ns: str) -> None:
    """What netlink.py sent through pyroute2 before rtnl.py."""
    from pyroute2 import NetNS
    with NetNS(ns, flags=0) as ipr:
        idx = ipr.link_lookup(ifname="va0")[0]
        ipr.link("set", index=idx, address=MAC)
        ipr.link("set", index=idx, mtu=1400)
        ipr.link("set", index=idx, state="up")
        ipr.addr("add", index=idx, address="10.9.0.2", prefixlen=24)
        ipr.addr("add", index=idx, address="fd00:9::2", prefixlen=64)
        ipr.route("add", dst="10.50.0.0/16", oif=idx)
        ipr.route("add", dst="10.60.0.0/16", oif=idx, gateway="10.9.0.1")
        ipr.route("add", dst="0.0.0.0/0", oif=idx, gateway="10.9.0.1")
        ipr.route("replace", dst="0.0.0.0/0", oif=idx, gateway="10.9.0.254")
        ipr.route("add", dst="fd00:50::/48", oif=idx)
        ipr.route("add", dst="::/0", oif=idx, gateway="fd00:9::1")
        ipr.link("set", index=idx, ifname="net1")


def kernel_view(ns: str) -> List[Any]:
    """Addresses, routes and the link, as the kernel reports them (the peer's random MAC aside)."""
    link = json.loads(ip(ns, "-j", "-d", "link", "show", "dev", "net1"))[0]
    addrs = json.loads(ip(ns, "-j", "addr", "show", "dev", "net1"))[0]["addr_info"]
    routes = [json.loads(ip(ns, "-j", "-d", fam, "route", "show", "dev", "net1"))
              for fam in ("-4", "-6")]
    keep = ("ifname", "mtu", "flags", "operstate", "address", "link_type")
    return [{k: link.get(k) for k in keep}, addrs, routes]


def test_requests_leave_the_kernel_as_pyroute2_left_it() -> None:
    with scratch_netns() as a, scratch_netns() as b:
        via_raw(a)
        via_pyroute2(b)
        assert kernel_view(a) == kernel_view(b)
        assert "10.9.0.2/24" in ip(a, "-br", "addr")   # and the view is not empty


def test_links_and_addresses_read_back() -> None:
    with scratch_netns() as ns:
        via_raw(ns)
        with netlink_in(ns) as nl:
            link = nl.require("net1")
            assert (link.mac, link.mtu, link.up, link.parent) == (MAC, 1400, True, None)
            assert nl.link_by_index(link.index) == link
            assert sorted(nl.global_addrs(link.index)) == ["10.9.0.2/24", "fd00:9::2/64"]
            assert sorted(x.name for x in nl.links()) == ["lo", "net1", "vb0"]
            assert nl.link("nosuch0") is None and nl.link_by_index(999999) is None
            assert nl.link("an-alternative-name-only") is None   # past IFNAMSIZ
            assert nl.vf_info(link.index, 0) is None              # a veth has no VF table


def test_kernel_refusals_become_typed_errors() -> None:
    with scratch_netns() as ns, netlink_in(ns) as nl:
        idx = nl.require("va0").index
        with pytest.raises(LinkNotFound, match=r"set link #999999 state=up \(netns rt"):
            nl.set_link(999999, state="up")
        with pytest.raises(InvalidArgument):
            nl.set_link(idx, mtu=10)                     # below the minimum: EINVAL
        nl.set_link(idx, state="up")
        nl.add_route("10.50.0.0/16", idx)
        with pytest.raises(LinkExists, match="add route 10.50.0.0/16"):
            nl.add_route("10.50.0.0/16", idx)
        with pytest.raises(LinkExists, match="ifname=vb0"):
            nl.set_link(idx, ifname="vb0")
        with pytest.raises(TypeError):
            nl.set_link(idx, carrier=1)                  # a typo must not pass silently


def test_long_dumps_and_a_small_buffer_lose_nothing() -> None:
    with scratch_netns(pairs=40) as ns, netlink_in(ns) as nl:
        want = sorted(["lo"] + [f"v{s}{i}" for i in range(40) for s in "ab"])
        assert sorted(x.name for x in nl.links()) == want    # several datagrams
        nl._rt._buf = bytearray(64)                          # every datagram larger than it
        assert sorted(x.name for x in nl.links()) == want
        assert nl.require("va7").name == "va7"


def test_a_late_answer_to_an_abandoned_request_is_skipped() -> None:
    with scratch_netns() as ns, netlink_in(ns) as nl:
        lo = nl.require("lo")
        # A request whose answer nobody read (a call interrupted mid-way).
        sock = nl._rt._sock
        body = rtnl.ifinfo(lo.index) + rtnl.u32(rtnl.IFLA_EXT_MASK, rtnl.RTEXT_FILTER_SKIP_STATS)
        sock.send(rtnl._HDR.pack(rtnl._HDR.size + len(body), rtnl.RTM_GETLINK,
                                 rtnl.NLM_F_REQUEST | rtnl.NLM_F_ACK, 0xABCDEF, 0) + body)
        assert nl.require("va0").name == "va0"


def test_a_vf_table_reads_back_as_pyroute2_encodes_it() -> None:
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    vfs = [VfInfo(0, "02:00:00:00:00:0a", 100, 3, True, False, "disable", 0, 1000),
           VfInfo(1, "00:00:00:00:00:00", 0, 0, None, None, "auto", 0, 0),
           VfInfo(63, "02:00:00:00:00:3f", 4094, 7, False, True, "enable", 10, 20)]
    unknown = 0xFFFFFFFF
    msg = ifinfmsg()
    msg["index"] = 7
    msg["attrs"] = [("IFLA_IFNAME", "pf0"), ("IFLA_VFINFO_LIST", {"attrs": [
        ("IFLA_VF_INFO", {"attrs": [
            ("IFLA_VF_MAC", {"vf": v.vf, "mac": v.mac}),
            ("IFLA_VF_VLAN", {"vf": v.vf, "vlan": v.vlan, "qos": v.qos}),
            ("IFLA_VF_TX_RATE", {"vf": v.vf, "tx_rate": v.max_tx_rate}),
            ("IFLA_VF_SPOOFCHK", {"vf": v.vf, "spoofchk": unknown if v.spoofchk is None
                                  else int(v.spoofchk)}),
            ("IFLA_VF_LINK_STATE", {"vf": v.vf, "link_state": {"auto": 0, "enable": 1,
                                                               "disable": 2}[v.link_state]}),
            ("IFLA_VF_RATE", {"vf": v.vf, "min_tx_rate": v.min_tx_rate,
                              "max_tx_rate": v.max_tx_rate}),
            ("IFLA_VF_TRUST", {"vf": v.vf, "trust": unknown if v.trust is None
                               else int(v.trust)}),
        ]}) for v in vfs]})]
    msg.encode()
    parsed = rtnl.link_msg(bytes(msg.data)[rtnl._HDR.size:])
    table = rtnl.vf_table(parsed)
    assert table is not None
    got = [_vfinfo(rtnl.vf_number(info) or 0, info) for info in table]
    assert got == vfs
    assert rtnl.vf_table(rtnl.link_msg(rtnl.ifinfo(3))) is None   # no table: no VF ops


def test_an_in_process_hook_without_vf_settings_never_imports_pyroute2(sim: Sim) -> None:
    bundle = sim.bundle(json.dumps([{"pool": "fast", "ips": ["10.62.0.2/24"]}]))
    run: Callable[[str], List[str]] = lambda stage: imported_modules(
        [sys.executable, "-X", "importtime", "-m", "sriov_hook.inprocess", "--config",
         sim.config, stage],
        json.dumps({"ociVersion": "1.0.2", "id": "r1", "status": stage, "bundle": bundle,
                    "pid": ctr.pid}).encode())
    with netns_process() as ctr:
        pre = run("prestart")
        inside = subprocess.run(["nsenter", "-t", str(ctr.pid), "-n", "ip", "-br", "addr"],
                                capture_output=True, text=True).stdout
        assert "10.62.0.2/24" in inside     # it did the work
        post = run("poststop")
    assert "sriov_hook.rtnl" in pre
    assert not [m for m in pre + post if m.startswith("pyroute2")]
    sim.assert_clean()
