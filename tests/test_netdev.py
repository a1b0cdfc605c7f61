"""netdev mode on the simulated host: real netns, real veth VFs, the real CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from typing import List

import pytest

from tests.conftest import Sim, addrs, link_info, netns_process, nsfs_mounts

pytestmark = pytest.mark.root

FULL = json.dumps([{"pool": "fast", "ips": ["10.9.0.2/24"], "mtu": 1400,
                    "mac": "02:11:22:33:44:55", "gateway": "10.9.0.1",
                    "routes": [{"dst": "10.10.0.0/16", "via": "10.9.0.1"}]}])


def routes(ns: str) -> List[str]:
    out = subprocess.run(["ip", "-n", ns, "route"], capture_output=True, text=True, check=True)
    return [" ".join(line.split()[:5]) for line in out.stdout.splitlines()]


def one_line_error(r: object, needle: str = "") -> None:
    assert r.rc != 0, r.stdout  # type: ignore[attr-defined]
    lines = r.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("sriov-hook: "), r.stderr  # type: ignore
    assert "Traceback" not in r.stderr  # type: ignore[attr-defined]
    assert needle in lines[0], lines[0]


def test_roundtrip_configures_and_restores(sim: Sim) -> None:
    ns = sim.netns()
    r = sim.prestart("c1", sim.bundle(FULL, ns))
    assert r.rc == 0, r.stderr
    inside = link_info("net1", ns)
    assert inside is not None and inside["address"] == "02:11:22:33:44:55"
    assert inside["mtu"] == 1400 and "UP" in inside["flags"]
    assert addrs("net1", ns) == ["10.9.0.2/24"]
    assert "default via 10.9.0.1 dev net1" in routes(ns)
    assert "10.10.0.0/16 via 10.9.0.1 dev net1" in routes(ns)
    vf0 = sim.vfs[0]
    assert link_info(vf0.ifname) is None  # gone from the host
    rows = {row["pci"]: row for row in sim.status()}
    assert rows[vf0.bdf]["state"] == "reserved" and rows[vf0.bdf]["owner"] == "c1"
    assert rows[vf0.bdf]["vf_index"] == 0  # VF 0 is a real VF

    r = sim.poststop("c1")
    assert r.rc == 0, r.stderr
    assert link_info("net1", ns) is None
    sim.assert_clean()
    log = open(sim.host.log_file).read()
    assert "cid=c1" in log and "moved" in log and "released" in log


def test_short_form_two_interfaces(sim: Sim) -> None:
    ns = sim.netns()
    r = sim.prestart("c2", sim.bundle("fast@net1,fast@net2", ns))
    assert r.rc == 0, r.stderr
    assert link_info("net1", ns) and link_info("net2", ns)
    assert len(sim.records()) == 2
    assert sim.poststop("c2").rc == 0
    sim.assert_clean()


def test_pid_netns_is_pinned_after_the_container_dies(sim: Sim) -> None:
    # The container's netns comes from /proc/<pid>/ns/net; after its last
    # process exits only our pin keeps the netns (and the veth VF) alive.
    with netns_process() as proc:
        r = sim.prestart("c3", sim.bundle('[{"pool":"fast","ips":["10.9.1.2/24"]}]'), pid=proc.pid)
        assert r.rc == 0, r.stderr
        out = subprocess.run(["nsenter", "-t", str(proc.pid), "-n", "ip", "-o", "addr", "show",
                              "net1"], capture_output=True, text=True)
        assert "10.9.1.2/24" in out.stdout
    assert sim.poststop("c3").rc == 0
    sim.assert_clean()


def test_exhausted_pool_leaves_winners_alone(make_sim) -> None:  # type: ignore[no-untyped-def]
    sim = make_sim(nvfs=2)
    nss = [sim.netns() for _ in range(3)]
    assert sim.prestart("a", sim.bundle("fast", nss[0])).rc == 0
    assert sim.prestart("b", sim.bundle("fast", nss[1])).rc == 0
    r = sim.prestart("c", sim.bundle("fast", nss[2]))
    one_line_error(r, "exhausted")
    assert link_info("net1", nss[0]) and link_info("net1", nss[1])
    assert link_info("net1", nss[2]) is None
    assert len(sim.records()) == 2
    assert sim.poststop("a").rc == 0 and sim.poststop("b").rc == 0
    sim.assert_clean()


def test_concurrent_prestarts_never_share_a_vf(make_sim) -> None:  # type: ignore[no-untyped-def]
    sim = make_sim(nvfs=4)
    nss = [sim.netns() for _ in range(8)]
    procs = []
    import sys
    for i, ns in enumerate(nss):
        state = json.dumps({"id": f"k{i}", "bundle": sim.bundle("fast", ns)}).encode()
        p = subprocess.Popen([sys.executable, "-m", "sriov_hook", "--config", sim.config,
                              "prestart"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append((p, state))
    for p, state in procs:
        p.stdin.write(state)  # type: ignore[union-attr]
        p.stdin.close()  # type: ignore[union-attr]
    results = [(p.wait(timeout=60), p.stderr.read().decode()) for p, _ in procs]  # type: ignore
    won = [i for i, (rc, _) in enumerate(results) if rc == 0]
    lost = [err for rc, err in results if rc != 0]
    assert len(won) == 4, results
    assert all("exhausted" in e for e in lost), lost
    owners = {row["owner"] for row in sim.status()}
    assert owners == {f"k{i}" for i in won}
    for i in won:
        assert link_info("net1", nss[i]) is not None
    for i in range(8):
        assert sim.poststop(f"k{i}").rc == 0
    sim.assert_clean()


@pytest.mark.parametrize("case", ["bad_json", "no_bundle", "no_config_json", "unknown_pool",
                                  "bad_mac", "bad_vlan", "bad_cidr", "bad_ifname", "long_ifname"])
def test_bad_input_changes_nothing(sim: Sim, case: str) -> None:
    ns = sim.netns()
    good = {"ociVersion": "1.0.2", "id": "bad", "status": "creating"}
    ann = {"bad_mac": '[{"pool":"fast","mac":"02:00:00:00:00"}]',
           "bad_vlan": '[{"pool":"fast","vlan":9999}]',
           "bad_cidr": '[{"pool":"fast","ips":["10.0.0.1/33"]}]',
           "bad_ifname": "fast@a/b",
           "long_ifname": "fast@abcdefghijklmnop",
           "unknown_pool": "nosuchpool"}.get(case, "fast")
    if case == "bad_json":
        r = sim.hook("prestart", state=b'{"id": "bad", "bundle": ')
    elif case == "no_bundle":
        r = sim.hook("prestart", state={**good})
    elif case == "no_config_json":
        r = sim.hook("prestart", state={**good, "bundle": "/nonexistent/bundle"})
    else:
        r = sim.hook("prestart", state={**good, "bundle": sim.bundle(ann, ns)})
    one_line_error(r)
    sim.assert_clean()
    assert link_info("net1", ns) is None


def test_malformed_config_names_file_and_key(sim: Sim) -> None:
    from tests import simhost
    simhost.write_config(sim.host, pools=[{"name": "fast", "pfs": ["x"]},
                                          {"name": "broken", "pfs": ["y"], "mode": "teleport"}])
    r = sim.hook("status")
    one_line_error(r, f"config {sim.config}: pools[1].mode")


def test_missing_config_file(sim: Sim) -> None:
    r = sim.hook("status", "--config", "/nonexistent.yaml")
    one_line_error(r, "config /nonexistent.yaml: cannot read")


def test_pf_without_vf_ops_fails_clearly(make_sim) -> None:  # type: ignore[no-untyped-def]
    sim = make_sim(nvfs=2, pools=None)
    from tests import simhost
    simhost.write_config(sim.host, pools=[{"name": "fast", "pfs": [sim.host.nics[0].pf],
                                           "allow": ["mac", "vlan", "mtu"]}])
    ns = sim.netns()
    r = sim.prestart("v", sim.bundle('[{"pool":"fast","vlan":100}]', ns))
    one_line_error(r, "reports no VF settings")
    assert "vlan" in r.stderr
    sim.assert_clean()
    # A MAC alone is fine: with no PF-side VF ops it goes on the VF netdev.
    r = sim.prestart("v", sim.bundle('[{"pool":"fast","mac":"02:00:00:00:00:09"}]', ns))
    assert r.rc == 0, r.stderr
    assert link_info("net1", ns)["address"] == "02:00:00:00:00:09"
    assert sim.poststop("v").rc == 0
    sim.assert_clean()


def test_policy_refuses_vlan_by_default(sim: Sim) -> None:
    r = sim.prestart("p", sim.bundle('[{"pool":"fast","vlan":10}]', sim.netns()))
    one_line_error(r, "does not let containers set vlan")
    sim.assert_clean()


def test_name_clash_in_container_rolls_back(sim: Sim) -> None:
    ns = sim.netns()
    subprocess.run(["ip", "-n", ns, "link", "add", "net1", "type", "veth", "peer", "name", "x1"],
                   check=True)
    r = sim.prestart("clash", sim.bundle(FULL, ns))
    one_line_error(r, "already has an interface named net1")
    sim.assert_clean()  # MAC and MTU set before the move were put back too


def test_second_request_failure_rolls_back_the_first(make_sim) -> None:  # type: ignore
    sim = make_sim(nvfs=1)
    ns = sim.netns()
    r = sim.prestart("two", sim.bundle("fast,fast", ns))
    one_line_error(r, "exhausted")
    assert link_info("net1", ns) is None
    sim.assert_clean()


def test_poststop_is_idempotent_and_tolerates_strangers(sim: Sim) -> None:
    assert sim.poststop("never-started").rc == 0
    ns = sim.netns()
    assert sim.prestart("i", sim.bundle("fast", ns)).rc == 0
    assert sim.poststop("i").rc == 0
    assert sim.poststop("i").rc == 0
    sim.assert_clean()


def test_poststop_when_vf_already_home_and_netns_gone(sim: Sim) -> None:
    ns = sim.netns()
    assert sim.prestart("h", sim.bundle(FULL, ns)).rc == 0
    vf = sim.vfs[0]
    # Someone (an earlier, interrupted poststop) already moved it home...
    subprocess.run(["ip", "-n", ns, "link", "set", "net1", "netns", "1", "name", vf.ifname],
                   check=True)
    # ...and the pin and netns are gone too.
    pin = os.path.join(sim.host.state_dir, "netns", vf.bdf)
    subprocess.run(["umount", pin], check=True)
    subprocess.run(["ip", "netns", "del", ns], check=True)
    r = sim.poststop("h")
    assert r.rc == 0, r.stderr
    sim.assert_clean()  # MAC/MTU restored from the record


def test_poststop_when_vf_renamed_inside(sim: Sim) -> None:
    ns = sim.netns()
    assert sim.prestart("r", sim.bundle("fast", ns)).rc == 0
    subprocess.run(["ip", "-n", ns, "link", "set", "net1", "name", "weird"], check=True)
    r = sim.poststop("r")
    # A veth has no PCI parent, so a renamed one can't be identified: the
    # hook must say so and keep the record rather than guess.
    assert r.rc != 0 and "found neither" in r.stderr
    assert len(sim.records()) == 1
    subprocess.run(["ip", "-n", ns, "link", "set", "weird", "name", "net1"], check=True)
    assert sim.poststop("r").rc == 0
    sim.assert_clean()


def test_prestart_twice_for_the_same_container_applies_nothing_twice(sim: Sim) -> None:
    # A hook that finished its work but died before answering is run again
    # (the thin client falls back in-process): the same container, the same
    # netns: its VF is in place, nothing is applied twice.
    ns = sim.netns()
    assert sim.prestart("dup", sim.bundle("fast", ns)).rc == 0
    r = sim.prestart("dup", sim.bundle("fast", ns))
    assert r.rc == 0, r.stderr
    assert len(sim.records()) == 1 and link_info("net1", ns) is not None
    assert "attached by an earlier run" in open(sim.host.log_file).read()
    # The same id for another, live container (another netns) is refused.
    other = sim.netns()
    one_line_error(sim.prestart("dup", sim.bundle("fast", other)), "still running")
    assert len(sim.records()) == 1 and link_info("net1", ns) is not None
    assert sim.poststop("dup").rc == 0
    sim.assert_clean()


def test_gc_reclaims_dead_owner_and_orphan_pins(sim: Sim) -> None:
    with netns_process() as proc:
        assert sim.prestart("g", sim.bundle("fast"), pid=proc.pid).rc == 0
        r = sim.hook("gc")
        assert r.rc == 0 and "released=0" in r.stdout  # owner alive: untouched
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        r = sim.hook("gc")
        assert r.rc == 0 and "released=1" in r.stdout, r.stdout + r.stderr
    sim.assert_clean()


def test_no_annotation_is_a_no_op(sim: Sim) -> None:
    r = sim.prestart("plain", sim.bundle(None, sim.netns()))
    assert r.rc == 0 and r.stderr == ""
    sim.assert_clean()


def test_host_netns_is_refused(sim: Sim) -> None:
    r = sim.prestart("hostnet", sim.bundle("fast"), pid=os.getpid())
    one_line_error(r, "host's own")
    sim.assert_clean()


def test_vf_in_use_on_host_is_skipped(make_sim) -> None:  # type: ignore[no-untyped-def]
    sim = make_sim(nvfs=2)
    subprocess.run(["ip", "addr", "add", "192.0.2.10/24", "dev", sim.vfs[0].ifname], check=True)
    try:
        ns = sim.netns()
        assert sim.prestart("u", sim.bundle("fast", ns)).rc == 0
        assert sim.status()[1]["owner"] == "u" and sim.status()[0]["state"] == "free"
        assert sim.poststop("u").rc == 0
    finally:
        subprocess.run(["ip", "addr", "del", "192.0.2.10/24", "dev", sim.vfs[0].ifname])
    sim.assert_clean()


def test_status_json_contract(sim: Sim) -> None:
    rows = sim.status()
    assert len(rows) == 4
    for row in rows:
        assert {"pci", "pf", "vf_index", "pool", "netdev", "driver", "state", "owner"} <= set(row)
        assert row["driver"] == "igbvf" and row["state"] == "free" and row["owner"] is None


def test_create_runtime_alias_and_console_script(sim: Sim) -> None:
    ns = sim.netns()
    state = json.dumps({"id": "alias", "bundle": sim.bundle("fast", ns)}).encode()
    import shutil
    import sys
    exe = shutil.which("sriov-hook", path=os.path.dirname(sys.executable))
    assert exe, "console script not installed"
    p = subprocess.run([exe, "--config", sim.config, "createRuntime"], input=state,
                       capture_output=True)
    assert p.returncode == 0, p.stderr
    assert link_info("net1", ns) is not None
    assert sim.poststop("alias").rc == 0
    sim.assert_clean()


def test_unknown_command_and_usage(sim: Sim) -> None:
    # Only this sim's pins: other tests may pin and unpin meanwhile.
    pins = os.path.join(sim.host.state_dir, "netns")

    def ours() -> list:
        return [m for m in nsfs_mounts() if m.startswith(pins)]
    before = ours()
    one_line_error(sim.hook("explode"), "unknown command")
    one_line_error(sim.hook("status", "--bogus"), "unexpected argument")
    one_line_error(sim.hook("prestart", "--vf", "0000:10:10.0", state={}), "--vf needs --pool")
    r = sim.hook("--help")
    assert r.rc == 0 and "usage: sriov-hook" in r.stdout
    assert ours() == before and sim.records() == []


def test_setup_checks_before_touching_sriov_numvfs(sim: Sim) -> None:
    from tests import simhost
    pf = sim.host.nics[0].pf
    numvfs = os.path.join(sim.host.sysfs_root, "bus/pci/devices", sim.host.nics[0].pf_bdf,
                          "sriov_numvfs")
    simhost.write_config(sim.host, extra={"numvfs": {pf: 4}})
    r = sim.hook("setup")
    assert r.rc == 0 and "4 VFs (unchanged)" in r.stdout
    simhost.write_config(sim.host, extra={"numvfs": {pf: 99}})
    one_line_error(sim.hook("setup"), "supports 8 VFs (sriov_totalvfs); the config asks for 99")
    ns = sim.netns()
    simhost.write_config(sim.host, extra={"numvfs": {pf: 2}})
    assert sim.prestart("s", sim.bundle("fast", ns)).rc == 0
    one_line_error(sim.hook("setup"), "is reserved; release it before changing the VF count")
    assert open(numvfs).read().strip() == "4"
    assert sim.poststop("s").rc == 0
    sim.assert_clean()


def test_a_vf_that_routes_point_at_is_in_use_and_skipped(sim: Sim) -> None:
    """dpdk-devbind.py's "active": routes name the netdev (no address needed)."""
    vf0 = sim.vfs[0]
    subprocess.run(["ip", "link", "set", vf0.ifname, "up"], check=True)
    subprocess.run(["ip", "route", "add", "198.51.100.0/24", "dev", vf0.ifname], check=True)
    try:
        r = sim.prestart("busy", sim.bundle("fast", sim.netns()))
        assert r.rc == 0, r.stderr
        assert sim.records() == [f"{sim.vfs[1].bdf}.json"]
        assert "routes point at it" in open(sim.host.log_file).read()
        assert sim.poststop("busy").rc == 0
    finally:
        subprocess.run(["ip", "route", "del", "198.51.100.0/24", "dev", vf0.ifname])
        subprocess.run(["ip", "link", "set", vf0.ifname, "down"])
    sim.assert_clean()
