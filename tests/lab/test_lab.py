"""The SR-IOV lab: every mode against a real kernel's SR-IOV stack.

Runs inside the QEMU guest (make lab), where an emulated Intel 82576 (igb)
is a real SR-IOV PF: real igb/igbvf/vfio-pci drivers, real sysfs, real
netlink, real IOMMU groups. PF0 (00:02.0) has its own group per VF; PF1
sits below a PCIe switch without ACS, so its VFs share a group with it.
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
NUMVFS = 5


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


@pytest.fixture(scope="module")
def lab() -> Iterator[Dict[str, Any]]:
    base = f"/run/sriov-lab-{uuid.uuid4().hex[:6]}"
    os.makedirs(base)
    pf0_if = os.listdir(f"{SYS}/{PF0}/net")[0]
    # PF up before its VFs exist: igbvf then finds the PF out of reset.
    sh("ip", "link", "set", pf0_if, "up")
    cfg = {"sysfs_root": "/sys", "state_dir": f"{base}/state",
           "log_file": os.path.join(RESULTS, "hook.log"), "log_level": "debug",
           "numvfs": {PF0: NUMVFS, PF1: 1},
           "pools": [
               {"name": "fast", "mode": "netdev", "pfs": [f"{PF0}#0-1"],
                "allow": ["mac", "vlan", "mtu"]},
               {"name": "vm", "mode": "vfio", "pfs": [f"{PF0}#2"], "allow": ["mac", "vlan"]},
               {"name": "kata", "mode": "kata", "pfs": [f"{PF0}#3"], "allow": ["mac"]},
               {"name": "dp", "mode": "dpdk", "pfs": [f"{PF0}#4"], "hugepages": "64M",
                "allow": ["mac", "vlan"]},
               {"name": "shared", "mode": "vfio", "pfs": [f"{PF1}#0"]},
           ]}
    path = f"{base}/config.yaml"
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh)
    r = hook(path, "setup")
    assert r.returncode == 0, r.stderr
    yield {"config": path, "base": base, "pf0_if": pf0_if, "cfg": cfg}
    hook(path, "gc")


def test_1_vfs_enabled_from_config(lab: Dict[str, Any]) -> None:
    assert int(open(f"{SYS}/{PF0}/sriov_numvfs").read()) == NUMVFS
    rows = json.loads(hook(lab["config"], "status", "--json").stdout)["vfs"]
    assert len(rows) == NUMVFS + 1
    for row in rows:
        assert row["driver"] == "igbvf" and row["netdev"] and row["iommu_group"]
        assert row["state"] == "free"
    groups = [r["iommu_group"] for r in rows if r["pool"] != "shared"]
    assert len(set(groups)) == len(groups)  # one group per VF on PF0
    assert hook(lab["config"], "setup").stdout.count("unchanged") == 2   # idempotent


def test_2_netdev_mode_runc(lab: Dict[str, Any], tmp_path: Any) -> None:
    runc = Runc(f"/run/lab-runc-{uuid.uuid4().hex[:6]}")
    cfg = lab["config"]
    bdf = vf(PF0, 0)
    host_name = netdev(bdf)
    before = pf_vf_line(lab["pf0_if"], 0)
    hooks = {"prestart": [hook_entry(HOOK, cfg, "prestart")],
             "poststop": [hook_entry(HOOK, cfg, "poststop")]}
    ann = json.dumps([{"pool": "fast", "mac": "02:00:00:1a:b0:01", "vlan": 100,
                       "ips": ["10.55.0.1/24"]}])
    bundle = runc_bundle(str(tmp_path / "c"), ["sleep", "300"],
                         {"sriov-hook.io/networks": ann}, hooks)
    cid = f"lab-{uuid.uuid4().hex[:6]}"
    try:
        r = runc.start_detached(cid, bundle)
        assert r.returncode == 0, r.stderr
        inside = runc.exec(cid, "ip", "-o", "addr", "show", "net1").stdout
        assert "10.55.0.1/24" in inside
        assert "link/ether 02:00:00:1a:b0:01" in runc.exec(cid, "ip", "-o", "link", "show",
                                                           "net1").stdout
        line = pf_vf_line(lab["pf0_if"], 0)
        assert "vlan 100" in line and "02:00:00:1a:b0:01" in line, line
        assert runc.delete(cid).returncode == 0
    finally:
        runc.cleanup()
    assert netdev(bdf) == host_name              # home, under its own name
    assert sh("ip", "-o", "link", "show", host_name).returncode == 0
    assert pf_vf_line(lab["pf0_if"], 0) == before  # PF-side settings as they were
    assert hook(cfg, "check").returncode == 0


@pytest.mark.xfail(strict=True, reason=(
    "QEMU 10.0 igb: igbvf's reset handshake never sees RSTD/RSTI in its mailbox, so "
    "the VF keeps mbx.timeout=0 and never reports carrier (docs/lab.md); strict: "
    "an emulator that fixes this turns this test red until the marker goes"))
def test_3_two_containers_ping_over_vfs(lab: Dict[str, Any], tmp_path: Any) -> None:
    """The data path through the emulated NIC's switch (VF0 <-> VF1)."""
    runc = Runc(f"/run/lab-runc-{uuid.uuid4().hex[:6]}")
    cfg = lab["config"]

    hooks = {"prestart": [hook_entry(HOOK, cfg, "prestart")],
             "poststop": [hook_entry(HOOK, cfg, "poststop")]}
    ids = []
    try:
        for n in (1, 2):
            ann = json.dumps([{"pool": "fast", "ips": [f"10.56.0.{n}/24"],
                               "mac": f"02:00:00:1a:c0:0{n}"}])
            b = runc_bundle(str(tmp_path / f"p{n}"), ["sleep", "300"],
                            {"sriov-hook.io/networks": ann}, hooks)
            cid = f"ping{n}-{uuid.uuid4().hex[:6]}"
            ids.append(cid)
            r = runc.start_detached(cid, b)
            assert r.returncode == 0, r.stderr
        time.sleep(3)
        link = runc.exec(ids[0], "ip", "-o", "link", "show", "net1").stdout
        ping = runc.exec(ids[0], "ping", "-c", "3", "-W", "2", "10.56.0.2")
        with open(os.path.join(RESULTS, "datapath.txt"), "w") as fh:
            fh.write(f"{link}\n{ping.stdout}\n{ping.stderr}\n"
                     + sh("ip", "-d", "-s", "link", "show", lab["pf0_if"]).stdout
                     + runc.exec(ids[0], "ip", "-s", "link", "show", "net1").stdout
                     + sh("dmesg", check=False).stdout[-6000:])
        assert "NO-CARRIER" not in link and "LOWER_UP" in link, link
        assert ping.returncode == 0, ping.stdout + ping.stderr
    finally:
        for cid in ids:
            runc.delete(cid)
        runc.cleanup()
    assert hook(cfg, "check").returncode == 0


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
    ns = f"sbx{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", ns)
    try:
        with open(os.path.join(lab["base"], "config.json"), "w") as fh:
            json.dump({"annotations": {"sriov-hook.io/networks":
                                       '[{"pool":"kata","mac":"02:00:00:1a:d0:01"}]'},
                       "linux": {"namespaces": [{"type": "network",
                                                 "path": f"/run/netns/{ns}"}]}}, fh)
        state = {"ociVersion": "", "status": "", "id": "sbx1", "bundle": lab["base"]}
        r = hook(cfg, "prestart", state=state)
        assert r.returncode == 0, r.stderr
        assert "net1" in sh("ip", "-n", ns, "-o", "link").stdout
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
        assert driver(bdf) == "igbvf" and override(bdf) in ("", "(null)")
        assert netdev(bdf) == name
        link = sh("ip", "-o", "link", "show", name).stdout
        assert "02:00:00:1a:d0:01" not in link   # the container's MAC is gone
    finally:
        sh("ip", "netns", "del", ns, check=False)


def test_6_dpdk_testpmd_in_runc(lab: Dict[str, Any], tmp_path: Any) -> None:
    cfg = lab["config"]
    bdf = vf(PF0, 4)
    huge = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
    pages_before = int(open(huge).read())
    runc = Runc(f"/run/lab-runc-{uuid.uuid4().hex[:6]}")
    hooks = {"prestart": [hook_entry(HOOK, cfg, "prestart", timeout=60)],
             "poststop": [hook_entry(HOOK, cfg, "poststop", timeout=60)]}
    script = ("set -x; ls -l /dev/vfio; cat /dev/sriov-hook/net1.json /run/sriov-hook/net1.json"
              " 2>/dev/null; timeout -s INT 15 dpdk-testpmd -l 0-1 -n 1 -a " + bdf +
              " --huge-dir /dev/hugepages --file-prefix lab -m 64 -- --total-num-mbufs=2048"
              " --forward-mode=txonly --stats-period 3; echo testpmd-rc=$?")
    bundle = runc_bundle(str(tmp_path / "dp"), ["sh", "-c", script],
                         {"sriov-hook.io/networks": '[{"pool":"dp","mac":"02:00:00:1a:e0:01"}]'},
                         hooks)
    with open(os.path.join(bundle, "config.json")) as fh:
        spec = json.load(fh)
    # The host's userland (dpdk-testpmd and its libraries), read-only: an
    # empty root with /usr and /etc bound in and merged-/usr symlinks.
    rootfs = str(tmp_path / "rootfs")
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
    try:
        out = runc.run(f"dp-{uuid.uuid4().hex[:6]}", bundle, timeout=180)
    finally:
        runc.cleanup()
    with open(os.path.join(RESULTS, "testpmd.txt"), "w") as fh:
        fh.write(out.stdout + "\n--- stderr ---\n" + out.stderr)
    assert out.returncode == 0, out.stderr[-2000:]
    both = out.stdout + out.stderr
    assert re.search(r"Probe PCI driver: net_e1000_igb_vf .* device: " + re.escape(bdf), both), \
        both[-3000:]
    assert "Configuring Port 0" in both and "txonly packet forwarding" in both
    assert '"pci": "%s"' % bdf in out.stdout
    assert driver(bdf) == "igbvf" and override(bdf) in ("", "(null)")
    assert int(open(huge).read()) == pages_before     # the hook's pages went back


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
    """bind to vfio-pci, then unbind back to igbvf: sriov-dpdk vs dpdk-devbind.py.

    Timed per phase: the unbind is dominated by the kernel's igbvf probe,
    which in this emulator waits out its failing reset handshake for both
    tools alike (docs/lab.md).
    """
    bdf = vf(PF0, 1)
    dpdk = [sys.executable, "-m", "dpdk", "--state-dir", f"{lab['base']}/dpdk"]

    def timed(cmd: List[str]) -> float:
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 0, (cmd, p.stdout, p.stderr)
        return time.perf_counter() - t
    runs: Dict[str, List[float]] = {k: [] for k in ("ours_bind", "ours_unbind",
                                                    "devbind_bind", "devbind_unbind")}
    for _ in range(3):
        runs["ours_bind"].append(timed(dpdk + ["bind", "vfio-pci", bdf]))
        runs["ours_unbind"].append(timed(dpdk + ["unbind", bdf]))
        assert driver(bdf) == "igbvf"
        runs["devbind_bind"].append(timed(["dpdk-devbind.py", "-b", "vfio-pci", bdf]))
        runs["devbind_unbind"].append(timed(["dpdk-devbind.py", "-b", "igbvf", bdf]))
        assert driver(bdf) == "igbvf"
    med = {k: sorted(v)[1] for k, v in runs.items()}
    res = {**{f"{k}_s": round(v, 3) for k, v in med.items()},
           "sriov_dpdk_s": med["ours_bind"] + med["ours_unbind"],
           "dpdk_devbind_s": med["devbind_bind"] + med["devbind_unbind"],
           "bind_ratio": med["devbind_bind"] / med["ours_bind"], "runs": 3}
    res["ratio"] = res["dpdk_devbind_s"] / res["sriov_dpdk_s"]
    with open(os.path.join(RESULTS, "bench-dpdk.json"), "w") as fh:
        json.dump(res, fh)
    assert res["ratio"] > 1
