"""The SR-IOV lab: every mode against a real kernel's SR-IOV stack, with traffic.

Runs inside the QEMU guest (make lab), where an emulated Intel 82576 (igb)
is a real SR-IOV PF: real igb/igbvf/vfio-pci drivers, real sysfs, real
netlink, real IOMMU groups. PF0 (00:02.0) has its own group per VF; PF1
sits below a PCIe switch without ACS, so its VFs share a group with it.
The two NICs' ports are cabled to one QEMU hub, so frames cross between
them. Every data-path test asserts what crosses the wire (pings answered,
counters moving), not only the configuration; results/traffic.txt keeps
the figures and make lab prints them.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from typing import Any, Dict, Iterator, List, Optional

import pytest
import yaml

from tests.containers import Runc, hook_entry, runc_bundle

pytestmark = [pytest.mark.lab,
              pytest.mark.skipif(os.environ.get("SRIOV_LAB") != "1",
                                 reason="runs inside the SR-IOV lab guest (make lab)")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "lab", "cache", "results")
HOOK = os.path.join(os.path.dirname(sys.executable), "sriov-hook")
PF0, PF1 = "0000:00:02.0", "0000:03:00.0"
SYS = "/sys/bus/pci/devices"
NUMVFS = 7
TRAFFIC = os.path.join(RESULTS, "traffic.txt")


def sh(*cmd: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, **kw)


def hook(cfg: str, *args: str, state: Optional[Dict[str, Any]] = None) -> subprocess.CompletedProcess:
    return subprocess.run([HOOK, "--config", cfg, *args], capture_output=True, text=True,
                          input=json.dumps(state) if state is not None else "", timeout=120)


def vf(pf: str, i: int) -> str:
    return os.path.basename(os.readlink(f"{SYS}/{pf}/virtfn{i}"))


def driver(bdf: str) -> Optional[str]:
    p = f"{SYS}/{bdf}/driver"
    return os.path.basename(os.readlink(p)) if os.path.lexists(p) else None


def override(bdf: str) -> str:
    return open(f"{SYS}/{bdf}/driver_override").read().strip()


def netdev(bdf: str) -> Optional[str]:
    d = f"{SYS}/{bdf}/net"
    names = os.listdir(d) if os.path.isdir(d) else []
    return names[0] if names else None


def pf_vf_line(pf_if: str, idx: int) -> str:
    out = sh("ip", "link", "show", pf_if).stdout
    m = re.search(rf"^\s+vf {idx} .*$", out, re.M)
    return m.group(0) if m else ""


def note(title: str, text: str) -> None:
    """Keep what crossed the wire for make lab to print."""
    with open(TRAFFIC, "a") as fh:
        fh.write(f"== {title}\n{text.strip()}\n")


def received(ping_out: str) -> int:
    m = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", ping_out)
    return int(m.group(2)) if m else 0


def link_state(name: str) -> Dict[str, Any]:
    """What a user sees of a host netdev: name, MAC, MTU, admin state."""
    info = json.loads(sh("ip", "-j", "link", "show", "dev", name).stdout)[0]
    return {k: info[k] for k in ("ifname", "address", "mtu")} | {"up": "UP" in info["flags"]}


def annotated(pool: str, **fields: Any) -> Dict[str, str]:
    return {"sriov-hook.io/networks": json.dumps([{"pool": pool, **fields}])}


def runc_hooks(cfg: str, timeout: int = 60) -> Dict[str, Any]:
    return {"prestart": [hook_entry(HOOK, cfg, "prestart", timeout=timeout)],
            "poststop": [hook_entry(HOOK, cfg, "poststop", timeout=timeout)]}


class Netns:
    """A named netns that gets a VF from the hook (as a runtime would hand
    it over: state on stdin, the netns path in the bundle's spec)."""

    def __init__(self, lab: Dict[str, Any], annotation: Dict[str, str]) -> None:
        self.cfg = lab["config"]
        self.name = f"ln{uuid.uuid4().hex[:6]}"
        self.bundle = os.path.join(lab["base"], self.name)
        self.state = {"ociVersion": "1.0.2", "id": self.name, "status": "creating",
                      "bundle": self.bundle}
        os.makedirs(self.bundle)
        with open(os.path.join(self.bundle, "config.json"), "w") as fh:
            json.dump({"annotations": annotation,
                       "linux": {"namespaces": [{"type": "network",
                                                 "path": f"/run/netns/{self.name}"}]}}, fh)

    def __enter__(self) -> "Netns":
        sh("ip", "netns", "add", self.name)
        r = hook(self.cfg, "prestart", state=self.state)
        if r.returncode != 0:
            sh("ip", "netns", "del", self.name, check=False)
            raise AssertionError(r.stderr)
        return self

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.name, *cmd, check=False)

    def __exit__(self, *exc: object) -> None:
        r = hook(self.cfg, "poststop", state={**self.state, "status": "stopped"})
        sh("ip", "netns", "del", self.name, check=False)
        assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def lab() -> Iterator[Dict[str, Any]]:
    base = f"/run/sriov-lab-{uuid.uuid4().hex[:6]}"
    os.makedirs(base)
    open(TRAFFIC, "w").close()
    pf0_if = os.listdir(f"{SYS}/{PF0}/net")[0]
    pf1_if = os.listdir(f"{SYS}/{PF1}/net")[0]
    cfg = {"sysfs_root": "/sys", "state_dir": f"{base}/state",
           "log_file": os.path.join(RESULTS, "hook.log"), "log_level": "debug",
           "numvfs": {PF0: NUMVFS, PF1: 2},
           "pools": [
               {"name": "fast", "mode": "netdev", "pfs": [f"{PF0}#0-1"],
                "allow": ["mac", "vlan", "mtu"]},
               {"name": "vm", "mode": "vfio", "pfs": [f"{PF0}#2"], "allow": ["mac", "vlan"]},
               {"name": "kata", "mode": "kata", "pfs": [f"{PF0}#3"], "allow": ["mac"]},
               {"name": "dp", "mode": "dpdk", "pfs": [f"{PF0}#4"], "hugepages": "64M",
                "allow": ["mac", "vlan"]},
               # kernel VFs that talk to the others
               {"name": "peer", "mode": "netdev", "pfs": [f"{PF0}#5-6"],
                "allow": ["mac", "vlan"]},
               {"name": "shared", "mode": "vfio", "pfs": [f"{PF1}#0"]},
               {"name": "far", "mode": "netdev", "pfs": [f"{PF1}#1"], "allow": ["mac", "vlan"]},
           ]}
    path = f"{base}/config.yaml"
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh)
    r = hook(path, "setup")   # also brings the PFs up before their VFs exist
    assert r.returncode == 0, r.stderr
    yield {"config": path, "base": base, "pf0_if": pf0_if, "pf1_if": pf1_if, "cfg": cfg}
    hook(path, "gc")


def test_1_vfs_enabled_from_config(lab: Dict[str, Any]) -> None:
    assert int(open(f"{SYS}/{PF0}/sriov_numvfs").read()) == NUMVFS
    rows = json.loads(hook(lab["config"], "status", "--json").stdout)["vfs"]
    assert len(rows) == NUMVFS + 2
    for row in rows:
        assert row["driver"] == "igbvf" and row["netdev"] and row["iommu_group"]
        assert row["state"] == "free"
    groups = [r["iommu_group"] for r in rows if r["pool"] not in ("shared", "far")]
    assert len(set(groups)) == len(groups)  # one group per VF on PF0
    assert hook(lab["config"], "setup").stdout.count("unchanged") == 2   # idempotent
    for pf in (lab["pf0_if"], lab["pf1_if"]):
        assert "UP" in json.loads(sh("ip", "-j", "link", "show", pf).stdout)[0]["flags"]


def two_containers_ping(lab: Dict[str, Any], tmp_path: Any, title: str,
                        sides: List[Dict[str, Any]]) -> None:
    """Two runc containers, each given a VF by the hook with an explicit MAC,
    a VLAN and an address, ping each other; the PF shows each VF's MAC and
    VLAN meanwhile, and both the PF's line and the VF netdev are exactly
    what they were once the containers are gone."""
    runc = Runc(f"/run/lab-runc-{uuid.uuid4().hex[:6]}")
    hooks = runc_hooks(lab["config"])
    before = {}
    for side in sides:
        bdf = vf(side["pf"], side["vf"])
        side["bdf"] = bdf
        before[bdf] = (pf_vf_line(side["pf_if"], side["vf"]), link_state(netdev(bdf) or ""))
    ids: List[str] = []
    try:
        for n, side in enumerate(sides, 1):
            ann = annotated(side["pool"], mac=side["mac"], vlan=side["vlan"], ips=[side["ip"]])
            bundle = runc_bundle(str(tmp_path / f"c{n}"), ["sleep", "300"], ann, hooks)
            ids.append(f"ping{n}-{uuid.uuid4().hex[:6]}")
            r = runc.start_detached(ids[-1], bundle)
            assert r.returncode == 0, r.stderr
        for n, side in enumerate(sides):
            link = runc.exec(ids[n], "ip", "-o", "link", "show", "net1").stdout
            assert f"link/ether {side['mac']}" in link, link
            line = pf_vf_line(side["pf_if"], side["vf"])
            assert side["mac"] in line and f"vlan {side['vlan']}" in line, line
        peer_ip = sides[1]["ip"].split("/")[0]
        ping = runc.exec(ids[0], "ping", "-c", "5", "-W", "2", peer_ip)
        dev = runc.exec(ids[1], "cat", "/proc/net/dev").stdout
        row = next((ln.split(":", 1)[1].split() for ln in dev.splitlines()
                    if ln.strip().startswith("net1:")), [])
        stats = f"net1 of the peer: rx_packets={row[1] if row else '?'} " \
                f"tx_packets={row[9] if row else '?'}"
        note(title, f"{ping.stdout}\n{stats}\n" + "\n".join(
            pf_vf_line(s["pf_if"], s["vf"]) for s in sides))
        assert received(ping.stdout) >= 4, ping.stdout + ping.stderr
    finally:
        for cid in ids:
            runc.delete(cid)
        runc.cleanup()
    for side in sides:
        line, state = before[side["bdf"]]
        assert pf_vf_line(side["pf_if"], side["vf"]) == line   # byte for byte
        assert netdev(side["bdf"]) == state["ifname"]           # home, under its own name
        assert link_state(state["ifname"]) == state
    assert hook(lab["config"], "check").returncode == 0


def test_2_mac_vlan_ping_through_the_nic_switch(lab: Dict[str, Any], tmp_path: Any) -> None:
    pf = {"pf": PF0, "pf_if": lab["pf0_if"], "pool": "fast", "vlan": 100}
    two_containers_ping(lab, tmp_path, "same NIC (PF0 VF0 <-> PF0 VF1, VLAN 100)", [
        {**pf, "vf": 0, "mac": "02:00:00:1a:b0:01", "ip": "10.55.0.1/24"},
        {**pf, "vf": 1, "mac": "02:00:00:1a:b0:02", "ip": "10.55.0.2/24"}])


def test_3_mac_vlan_ping_across_the_two_nics(lab: Dict[str, Any], tmp_path: Any) -> None:
    two_containers_ping(lab, tmp_path, "across NICs (PF0 VF0 <-> PF1 VF1, VLAN 200)", [
        {"pf": PF0, "pf_if": lab["pf0_if"], "pool": "fast", "vf": 0, "vlan": 200,
         "mac": "02:00:00:1a:c0:01", "ip": "10.56.0.1/24"},
        {"pf": PF1, "pf_if": lab["pf1_if"], "pool": "far", "vf": 1, "vlan": 200,
         "mac": "02:00:00:1a:c0:02", "ip": "10.56.0.2/24"}])


def test_3b_vlans_isolate(lab: Dict[str, Any]) -> None:
    """The VLAN is really applied by the NIC: the same two VFs on different
    VLANs cannot reach each other, on the same VLAN they can."""
    a = annotated("fast", vlan=300, ips=["10.57.0.1/24"])
    with Netns(lab, a) as left:
        with Netns(lab, annotated("peer", vlan=301, ips=["10.57.0.2/24"])):
            apart = left.run("busybox", "ping", "-c", "2", "-W", "1", "10.57.0.2")
        with Netns(lab, annotated("peer", vlan=300, ips=["10.57.0.2/24"])):
            together = left.run("busybox", "ping", "-c", "3", "-W", "2", "10.57.0.2")
    note("VLAN 300 vs 301, then 300 vs 300", apart.stdout + together.stdout)
    assert received(apart.stdout) == 0, apart.stdout
    assert received(together.stdout) >= 2, together.stdout


def qmp_query_pci(sock_path: str) -> List[Dict[str, Any]]:
    s = socket.socket(socket.AF_UNIX)
    for _ in range(300):
        try:
            s.connect(sock_path)
            break
        except OSError:
            time.sleep(0.1)
    f = s.makefile("rw")
    json.loads(f.readline())  # greeting
    for cmd in ("qmp_capabilities", "query-pci"):
        f.write(json.dumps({"execute": cmd}) + "\n")
        f.flush()
        while True:
            msg = json.loads(f.readline())
            if "return" in msg or "error" in msg:
                break
    s.close()
    return [d for bus in msg.get("return", []) for d in bus.get("devices", [])]


def test_4_vfio_mode_and_a_vm_consumes_it(lab: Dict[str, Any]) -> None:
    cfg = lab["config"]
    bdf = vf(PF0, 2)
    name = netdev(bdf)
    state = {"ociVersion": "", "status": "", "id": "vm1", "bundle": lab["base"]}
    with open(os.path.join(lab["base"], "config.json"), "w") as fh:
        json.dump({"annotations": {"sriov-hook.io/networks": "vm"}}, fh)
    r = hook(cfg, "prestart", state=state)
    assert r.returncode == 0, r.stderr
    group = os.path.basename(os.readlink(f"{SYS}/{bdf}/iommu_group"))
    assert driver(bdf) == "vfio-pci" and os.path.exists(f"/dev/vfio/{group}")
    assert override(bdf) in ("", "(null)")
    # What Kata's hypervisor does with it: a QEMU with -device vfio-pci.
    qmp = f"/run/qmp-{uuid.uuid4().hex[:6]}.sock"
    vm = subprocess.Popen(["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "64",
                           "-nodefaults", "-display", "none", "-S",
                           "-qmp", f"unix:{qmp},server=on,wait=off",
                           "-device", f"vfio-pci,host={bdf}"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        devices = qmp_query_pci(qmp)
    finally:
        vm.kill()
        out = vm.communicate()[0]
    ids = [(d.get("id", {}).get("vendor"), d.get("id", {}).get("device")) for d in devices]
    assert (0x8086, 0x10CA) in ids, (ids, out)
    r = hook(cfg, "poststop", state=state)
    assert r.returncode == 0, r.stderr
    assert driver(bdf) == "igbvf" and override(bdf) in ("", "(null)")
    assert netdev(bdf) == name and not os.path.exists(f"/dev/vfio/{group}")


def test_5_kata_mode_runtime_binds_and_hook_repairs(lab: Dict[str, Any]) -> None:
    cfg = lab["config"]
    bdf = vf(PF0, 3)
    name = netdev(bdf)
    assert name is not None
    before = link_state(name)
    ns = f"sbx{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", ns)
    try:
        with open(os.path.join(lab["base"], "config.json"), "w") as fh:
            json.dump({"annotations": annotated("kata", mac="02:00:00:1a:d0:01"),
                       "linux": {"namespaces": [{"type": "network",
                                                 "path": f"/run/netns/{ns}"}]}}, fh)
        state = {"ociVersion": "", "status": "", "id": "sbx1", "bundle": lab["base"]}
        r = hook(cfg, "prestart", state=state)
        assert r.returncode == 0, r.stderr
        assert "02:00:00:1a:d0:01" in sh("ip", "-n", ns, "-o", "link", "show", "net1").stdout
        # The runtime's part (Kata's bindNICToVFIO): override, unbind, probe;
        # it leaves driver_override set.
        with open(f"{SYS}/{bdf}/driver_override", "w") as fh:
            fh.write("vfio-pci")
        with open("/sys/bus/pci/drivers/igbvf/unbind", "w") as fh:
            fh.write(bdf)
        with open("/sys/bus/pci/drivers_probe", "w") as fh:
            fh.write(bdf)
        assert driver(bdf) == "vfio-pci" and override(bdf) == "vfio-pci"
        r = hook(cfg, "poststop", state=state)
        assert r.returncode == 0, r.stderr
    finally:
        sh("ip", "netns", "del", ns, check=False)
    assert driver(bdf) == "igbvf" and override(bdf) in ("", "(null)")
    assert netdev(bdf) == name and link_state(name) == before
    # The repair is real: the VF passes traffic again. Take it by hand into
    # a netns and ping a VF the hook gives to another one.
    probe = f"kp{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", probe)
    try:
        sh("ip", "link", "set", name, "netns", probe)
        sh("ip", "-n", probe, "addr", "add", "10.58.0.1/24", "dev", name)
        sh("ip", "-n", probe, "link", "set", name, "up")
        with Netns(lab, annotated("peer", ips=["10.58.0.2/24"])):
            ping = sh("ip", "netns", "exec", probe, "busybox", "ping", "-c", "3", "-W", "2",
                      "10.58.0.2", check=False)
        sh("ip", "-n", probe, "link", "set", name, "down")
        sh("ip", "-n", probe, "addr", "flush", "dev", name)
        sh("ip", "-n", probe, "link", "set", name, "netns", "1")
    finally:
        sh("ip", "netns", "del", probe, check=False)
    note("kata VF on the host after the repair", ping.stdout)
    assert received(ping.stdout) >= 2, ping.stdout + ping.stderr
    assert netdev(bdf) == name


def test_6_dpdk_testpmd_answers_a_kernel_vf(lab: Dict[str, Any], tmp_path: Any) -> None:
    """testpmd (icmpecho) on the VF the hook bound in dpdk mode answers pings
    from a kernel VF the hook gave to another netns: both ends count."""
    cfg = lab["config"]
    bdf = vf(PF0, 4)
    mac = "02:00:00:1a:e0:01"
    huge = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
    pages_before = int(open(huge).read())
    line_before = pf_vf_line(lab["pf0_if"], 4)
    runc = Runc(f"/run/lab-runc-{uuid.uuid4().hex[:6]}")
    script = ("cat /dev/sriov-hook/net1.json /run/sriov-hook/net1.json 2>/dev/null;"
              " timeout -s INT 40 dpdk-testpmd -l 0-1 -n 1 -a " + bdf +
              " --huge-dir /dev/hugepages --file-prefix lab -m 64 -- --total-num-mbufs=2048"
              " --forward-mode=icmpecho --stats-period 2; echo testpmd-rc=$?")
    bundle = runc_bundle(str(tmp_path / "dp"), ["sh", "-c", script], annotated("dp", mac=mac),
                         runc_hooks(cfg))
    make_testpmd_rootfs(bundle, str(tmp_path / "rootfs"))
    out_path = str(tmp_path / "testpmd.out")
    cid = f"dp-{uuid.uuid4().hex[:6]}"
    try:
        with open(out_path, "w") as out:
            proc = subprocess.Popen(["runc", "--root", runc.root, "run", "--bundle", bundle, cid],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            runc.ids.append(cid)
            deadline = time.monotonic() + 60
            while "icmpecho packet forwarding" not in open(out_path).read():
                assert proc.poll() is None and time.monotonic() < deadline, open(out_path).read()
                time.sleep(0.5)
            with Netns(lab, annotated("peer", ips=["10.59.0.2/24"])) as peer:
                ping = peer.run("busybox", "ping", "-c", "5", "-W", "2", "10.59.0.1")
            proc.wait(timeout=90)
    finally:
        runc.cleanup()
    text = open(out_path).read()
    with open(os.path.join(RESULTS, "testpmd.txt"), "w") as fh:
        fh.write(text)
    totals = re.findall(r"Accumulated forward statistics for all ports.*?RX-packets:\s*(\d+).*?"
                        r"TX-packets:\s*(\d+)", text, re.S)
    note("testpmd icmpecho <- kernel VF ping", ping.stdout + "\n" + (
        f"testpmd RX-packets {totals[-1][0]} TX-packets {totals[-1][1]}" if totals else text[-2000:]))
    assert re.search(r"Probe PCI driver: net_e1000_igb_vf .* device: " + re.escape(bdf), text), \
        text[-3000:]
    assert '"pci": "%s"' % bdf in text
    assert received(ping.stdout) >= 4, ping.stdout + text[-2000:]
    assert totals, text[-3000:]
    rx, tx = int(totals[-1][0]), int(totals[-1][1])
    assert rx >= 4 and tx >= 4, (rx, tx)
    assert driver(bdf) == "igbvf" and override(bdf) in ("", "(null)")
    assert int(open(huge).read()) == pages_before     # the hook's pages went back
    assert pf_vf_line(lab["pf0_if"], 4) == line_before


def make_testpmd_rootfs(bundle: str, rootfs: str) -> None:
    """The host's userland (dpdk-testpmd and its libraries), read-only: an
    empty root with /usr and /etc bound in and merged-/usr symlinks."""
    with open(os.path.join(bundle, "config.json")) as fh:
        spec = json.load(fh)
    for d in ("usr", "etc", "proc", "sys", "dev", "run", "tmp", "var"):
        os.makedirs(os.path.join(rootfs, d))
    for link in ("bin", "sbin", "lib", "lib64"):
        os.symlink(f"usr/{link}", os.path.join(rootfs, link))
    os.symlink("../run", os.path.join(rootfs, "var/run"))
    spec["root"] = {"path": rootfs, "readonly": True}
    spec["mounts"] += [
        {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]},
        {"destination": "/etc", "type": "bind", "source": "/etc", "options": ["rbind", "ro"]},
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["mode=755"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]}]
    spec["process"]["env"] = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
    for kind in ("bounding", "effective", "permitted"):
        spec["process"]["capabilities"][kind] += ["CAP_IPC_LOCK", "CAP_SYS_RAWIO", "CAP_SYS_ADMIN"]
    spec["process"]["rlimits"] = [{"type": "RLIMIT_MEMLOCK", "hard": 1 << 40, "soft": 1 << 40},
                                  {"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    with open(os.path.join(bundle, "config.json"), "w") as fh:
        json.dump(spec, fh)


def test_7_bad_hardware_states(lab: Dict[str, Any]) -> None:
    cfg = lab["config"]
    base = lab["base"]
    # More VFs than sriov_totalvfs: refused before the kernel is asked.
    bad = dict(lab["cfg"], numvfs={PF0: 99})
    with open(f"{base}/bad.yaml", "w") as fh:
        yaml.safe_dump(bad, fh)
    r = hook(f"{base}/bad.yaml", "setup")
    assert r.returncode == 1 and "supports 7 VFs" in r.stderr and "asks for 99" in r.stderr
    assert int(open(f"{SYS}/{PF0}/sriov_numvfs").read()) == NUMVFS
    # The kernel's own EBUSY (a new count without going through 0), typed at the boundary.
    sys.path.insert(0, ROOT)
    from sriov_hook.errors import SysfsError
    from sriov_hook.sysfs import Sysfs
    with pytest.raises(SysfsError, match="busy"):
        Sysfs("/sys").write(f"{SYS}/{PF0}/sriov_numvfs", "2")
    assert int(open(f"{SYS}/{PF0}/sriov_numvfs").read()) == NUMVFS
    # A VF whose IOMMU group also holds its PF (on igb): not viable.
    shared = vf(PF1, 0)
    with open(os.path.join(base, "config.json"), "w") as fh:
        json.dump({"annotations": {"sriov-hook.io/networks": "shared"}}, fh)
    r = hook(cfg, "prestart", state={"id": "nv", "bundle": base})
    assert r.returncode == 1 and "not viable" in r.stderr, r.stderr
    assert driver(shared) == "igbvf"
    # A bind that fails (igb does not drive a VF): rolled back to igbvf.
    from sriov_hook import drivers
    target = vf(PF0, 1)
    with pytest.raises(drivers.BindError):
        drivers.bind(Sysfs("/sys"), target, "igb", timeout=2)
    assert driver(target) == "igbvf" and override(target) in ("", "(null)")
    assert hook(cfg, "check").returncode == 0


def test_8_bind_speed_vs_dpdk_devbind(lab: Dict[str, Any]) -> None:
    """bind to vfio-pci, then unbind back to igbvf: sriov-dpdk vs dpdk-devbind.py,
    timed per phase, with where the time goes: an interpreter starting bare and
    with its site, and the kernel's own part (the same sysfs writes by a shell)."""
    bdf = vf(PF0, 1)
    dpdk = [sys.executable, "-m", "dpdk", "--state-dir", f"{lab['base']}/dpdk"]
    dev = f"{SYS}/{bdf}"
    kernel = {
        "kernel_bind": f"echo vfio-pci > {dev}/driver_override; echo {bdf} > "
                       f"/sys/bus/pci/drivers/igbvf/unbind; echo {bdf} > /sys/bus/pci/drivers_probe;"
                       f" echo > {dev}/driver_override",
        "kernel_unbind": f"echo igbvf > {dev}/driver_override; echo {bdf} > "
                         f"/sys/bus/pci/drivers/vfio-pci/unbind; echo {bdf} > "
                         f"/sys/bus/pci/drivers_probe; echo > {dev}/driver_override"}

    def timed(cmd: List[str]) -> float:
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 0, (cmd, p.stdout, p.stderr)
        return time.perf_counter() - t
    runs: Dict[str, List[float]] = {k: [] for k in (
        "ours_bind", "ours_unbind", "devbind_bind", "devbind_unbind", "kernel_bind",
        "kernel_unbind", "python_bare", "python_site")}
    for _ in range(3):
        runs["ours_bind"].append(timed(dpdk + ["bind", "vfio-pci", bdf]))
        runs["ours_unbind"].append(timed(dpdk + ["unbind", bdf]))
        assert driver(bdf) == "igbvf"
        runs["devbind_bind"].append(timed(["dpdk-devbind.py", "-b", "vfio-pci", bdf]))
        runs["devbind_unbind"].append(timed(["dpdk-devbind.py", "-b", "igbvf", bdf]))
        assert driver(bdf) == "igbvf"
        for key in ("kernel_bind", "kernel_unbind"):
            runs[key].append(timed(["sh", "-c", kernel[key]]))
        assert driver(bdf) == "igbvf" and override(bdf) in ("", "(null)")
        runs["python_bare"].append(timed([sys.executable, "-I", "-S", "-c", "pass"]))
        runs["python_site"].append(timed([sys.executable, "-c", "pass"]))
    med = {k: sorted(v)[1] for k, v in runs.items()}
    res = {**{f"{k}_s": round(v, 3) for k, v in med.items()},
           "sriov_dpdk_s": med["ours_bind"] + med["ours_unbind"],
           "dpdk_devbind_s": med["devbind_bind"] + med["devbind_unbind"],
           "bind_ratio": med["devbind_bind"] / med["ours_bind"], "runs": 3}
    res["ratio"] = res["dpdk_devbind_s"] / res["sriov_dpdk_s"]
    with open(os.path.join(RESULTS, "bench-dpdk.json"), "w") as fh:
        json.dump(res, fh)
    note("sriov-dpdk vs dpdk-devbind.py (bind + unbind, median of 3)",
         json.dumps({k: v for k, v in res.items() if k != "runs"}))
    assert res["ratio"] > 1
