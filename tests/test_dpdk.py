"""sriov-dpdk (binder + hugepages) and the hook's dpdk mode."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from typing import Callable, Iterator, List, Tuple

import pytest

from tests import simhost
from tests.conftest import HOOK, ROOT, Sim
from tests.containers import Runc, hook_entry, runc_bundle
from tests.kernelsim import KernelSim

pytestmark = pytest.mark.root


def dpdk(sim: Sim, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpdk", "--sysfs-root", sim.host.sysfs_root,
                           "--state-dir", os.path.join(sim.tmp, "dpdk-state"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def fail_one_line(p: subprocess.CompletedProcess, needle: str) -> None:
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sriov-dpdk: ") and needle in lines[0], p.stderr


@pytest.fixture
def dsim(make_sim: Callable[..., Sim]) -> Iterator[Tuple[Sim, KernelSim]]:
    sim = make_sim(nvfs=3)
    simhost.write_config(sim.host, pools=[
        {"name": "dp", "mode": "dpdk", "pfs": [sim.host.nics[0].pf], "hugepages": "16M",
         "allow": ["mac"]}])
    ks = KernelSim(simhost.fake_sysfs(sim.host), sim.host.dev_dir)
    yield sim, ks
    ks.stop()


def driver(sim: Sim, bdf: str) -> str:
    link = os.path.join(sim.host.sysfs_root, "bus/pci/devices", bdf, "driver")
    return os.path.basename(os.readlink(link)) if os.path.lexists(link) else "-"


def fake_pages(sim: Sim, node: bool = True) -> Tuple[int, int]:
    d = ("devices/system/node/node0/hugepages" if node else "kernel/mm/hugepages")
    base = os.path.join(sim.host.sysfs_root, d, "hugepages-2048kB")
    return tuple(int(open(os.path.join(base, f)).read()) for f in  # type: ignore[return-value]
                 ("nr_hugepages", "free_hugepages"))


def test_status_groups(dsim: Tuple[Sim, KernelSim]) -> None:
    sim, _ = dsim
    p = dpdk(sim, "status", "--json")
    assert p.returncode == 0, p.stderr
    devs = {d["pci"]: d for d in json.loads(p.stdout)["devices"]}
    vf = sim.vfs[0]
    assert devs[vf.bdf]["group"] == "kernel" and devs[vf.bdf]["interface"] == vf.ifname
    assert devs[vf.bdf]["vendor"] == "8086" and devs[vf.bdf]["iommu_group"] == "101"
    text = dpdk(sim, "status").stdout
    assert "Network devices using DPDK-compatible driver" in text and "Other network devices" in text


def test_bind_unbind_roundtrip(dsim: Tuple[Sim, KernelSim]) -> None:
    sim, _ = dsim
    a, b = sim.vfs[0].bdf, sim.vfs[1].bdf
    p = dpdk(sim, "bind", "vfio-pci", a, b[5:])  # short BDF form accepted
    assert p.returncode == 0, p.stderr
    assert driver(sim, a) == driver(sim, b) == "vfio-pci"
    groups = json.loads(dpdk(sim, "status", "--json").stdout)["devices"]
    assert {d["pci"] for d in groups if d["group"] == "dpdk"} == {a, b}
    p = dpdk(sim, "unbind", a, b)
    assert p.returncode == 0, p.stderr
    assert driver(sim, a) == driver(sim, b) == "igbvf"
    p = dpdk(sim, "bind", "uio_pci_generic", a)
    assert p.returncode == 0 and driver(sim, a) == "uio_pci_generic"
    assert dpdk(sim, "unbind", "--driver", "igbvf", a).returncode == 0
    assert driver(sim, a) == "igbvf"


@pytest.mark.parametrize("args,needle", [
    (["bind", "e1000e_magic", "0000:10:10.0"], "unknown driver"),
    (["bind", "vfio-pci", "10:10"], "malformed PCI address"),
    (["bind", "vfio-pci", "0000:77:00.0"], "does not exist"),
    (["unbind", "0000:10:10.0"], "no record of the driver"),
])
def test_bad_binds(dsim: Tuple[Sim, KernelSim], args: List[str], needle: str) -> None:
    sim, _ = dsim
    fail_one_line(dpdk(sim, *args), needle)
    assert driver(sim, sim.vfs[0].bdf) == "igbvf"


def test_active_interface_needs_force(dsim: Tuple[Sim, KernelSim]) -> None:
    sim, _ = dsim
    vf = sim.vfs[0]
    subprocess.run(["ip", "addr", "add", "192.0.2.7/24", "dev", vf.ifname], check=True)
    try:
        fail_one_line(dpdk(sim, "bind", "vfio-pci", vf.bdf), "is active")
        assert driver(sim, vf.bdf) == "igbvf"
        assert dpdk(sim, "bind", "--force", "vfio-pci", vf.bdf).returncode == 0
        assert driver(sim, vf.bdf) == "vfio-pci"
        assert dpdk(sim, "unbind", vf.bdf).returncode == 0
    finally:
        subprocess.run(["ip", "addr", "del", "192.0.2.7/24", "dev", vf.ifname])


def test_failed_bind_rolls_back_the_whole_command(dsim: Tuple[Sim, KernelSim]) -> None:
    sim, ks = dsim
    a, b = sim.vfs[0].bdf, sim.vfs[1].bdf
    ks.fail_bind[b] = "vfio-pci"
    fail_one_line(dpdk(sim, "bind", "vfio-pci", a, b), "did not bind")
    assert driver(sim, a) == driver(sim, b) == "igbvf"


def test_hugepages_show_reserve_release(dsim: Tuple[Sim, KernelSim]) -> None:
    sim, ks = dsim
    p = dpdk(sim, "hugepages", "reserve", "8M", "--node", "0")
    assert p.returncode == 0, p.stderr
    assert fake_pages(sim) == (4, 4)
    assert dpdk(sim, "hugepages", "reserve", "4M", "--node", "0").returncode == 0
    assert fake_pages(sim) == (6, 6)   # increments, never a reset
    rows = json.loads(dpdk(sim, "hugepages", "show", "--json").stdout)
    assert {"node": 0, "size_kb": 2048, "total": 6, "free": 6} in rows
    ks.max_hugepages = 10
    fail_one_line(dpdk(sim, "hugepages", "reserve", "20M", "--node", "0"), "gave 4 of 10")
    assert fake_pages(sim) == (6, 6)   # the count is left where it was
    fail_one_line(dpdk(sim, "hugepages", "reserve", "8M", "--pagesize", "4M"), "not offered")
    fail_one_line(dpdk(sim, "hugepages", "reserve", "lots"), "malformed size")
    fail_one_line(dpdk(sim, "hugepages", "reserve", "2M", "--node", "3"), "node 3 does not exist")
    assert dpdk(sim, "hugepages", "release", "12M", "--node", "0").returncode == 0
    assert fake_pages(sim) == (0, 0)


@pytest.mark.skipif(shutil.which("dpdk-hugepages.py") is None, reason="Debian dpdk not installed")
def test_real_kernel_hugepages_agree_with_dpdk_tools() -> None:
    """On the real /sys: reserve 2 pages, let dpdk-hugepages.py confirm, give them back."""
    path = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
    before = int(open(path).read())
    try:
        p = subprocess.run([sys.executable, "-m", "dpdk", "hugepages", "reserve", "4M"],
                           capture_output=True, text=True, cwd=ROOT)
        if p.returncode != 0 and "gave" in p.stderr:
            pytest.skip("kernel could not spare 2 hugepages")
        assert p.returncode == 0, p.stderr
        show = subprocess.run(["dpdk-hugepages.py", "--show"], capture_output=True, text=True)
        # "Node Pages Size Total" rows, e.g. "0    2     2Mb    4Mb"
        rows = [line.split() for line in show.stdout.splitlines()[1:] if line.strip()]
        pages_2m = sum(int(r[1]) for r in rows if len(r) == 4 and r[2] == "2Mb")
        assert pages_2m == before + 2, show.stdout
        mnt = f"/tmp/sriov-huge-{uuid.uuid4().hex[:6]}"
        p = subprocess.run([sys.executable, "-m", "dpdk", "hugepages", "mount", mnt],
                           capture_output=True, text=True, cwd=ROOT)
        try:
            assert p.returncode == 0, p.stderr
            assert f"{mnt} hugetlbfs" in open("/proc/mounts").read()
        finally:
            subprocess.run(["umount", mnt], capture_output=True)
            os.rmdir(mnt)
        p = subprocess.run([sys.executable, "-m", "dpdk", "hugepages", "release", "4M"],
                           capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 0, p.stderr
        assert int(open(path).read()) == before
    finally:
        with open(path, "w") as fh:
            fh.write(str(before))


@pytest.mark.runc
@pytest.mark.skipif(shutil.which("runc") is None, reason="runc not installed")
def test_dpdk_mode_in_runc(dsim: Tuple[Sim, KernelSim], tmp_path) -> None:  # type: ignore
    sim, _ = dsim
    runc = Runc(f"/run/sriov-test-runc-{uuid.uuid4().hex[:8]}")
    try:
        hooks = {"prestart": [hook_entry(HOOK, sim.config, "prestart")],
                 "poststop": [hook_entry(HOOK, sim.config, "poststop")]}
        script = ("ls -l /dev/vfio; grep hugetlbfs /proc/mounts; cat /run/sriov-hook/net1.json")
        bundle = runc_bundle(str(tmp_path / "b"), ["sh", "-c", script],
                             {"sriov-hook.io/networks": '[{"pool":"dp"}]'},
                             hooks)
        vf = sim.vfs[0]
        out = runc.run(f"dp-{uuid.uuid4().hex[:8]}", bundle)
        assert out.returncode == 0, out.stderr
        assert " 101" in out.stdout and "vfio" in out.stdout
        assert "/dev/hugepages hugetlbfs" in out.stdout
        info = json.loads(out.stdout[out.stdout.index("{"):])
        assert info["pci"] == vf.bdf and info["numa_node"] == 0
        assert info["device"] == "/dev/vfio/101" and info["hugepages"]["added"] == 8
        # Poststop: driver back, hugepages the hook took given back.
        assert driver(sim, vf.bdf) == "igbvf"
        assert fake_pages(sim) == (0, 0)
        sim.assert_clean()
    finally:
        runc.cleanup()


def test_dpdk_mode_keeps_pages_others_reserved(dsim: Tuple[Sim, KernelSim]) -> None:
    sim, _ = dsim
    assert dpdk(sim, "hugepages", "reserve", "4M", "--node", "0").returncode == 0  # someone else
    r = sim.prestart("d1", sim.bundle("dp"))
    assert r.rc == 0, r.stderr
    assert fake_pages(sim) == (8, 8)   # 2 already free + 6 added for the 16M
    assert sim.poststop("d1").rc == 0
    assert fake_pages(sim) == (2, 2)   # only the hook's own pages went back
    assert driver(sim, sim.vfs[0].bdf) == "igbvf"


# -- hostile images: nothing is written outside the rootfs ----------------------------------
def _hostile_bundle(sim: Sim, tmp: str, layout: str, host: str, script: str) -> str:
    """A runc bundle over a writable busybox copy laid out as ``layout`` says.
    Layouts below /dev run without runc's /dev tmpfs, so the image's own /dev
    is what the hook meets."""
    from tests import standin
    rootfs = standin.busybox_tree(os.path.join(tmp, "rootfs"))
    standin.plant(rootfs, standin.LAYOUTS[layout], host)
    hooks = {"prestart": [hook_entry(HOOK, sim.config, "prestart")],
             "poststop": [hook_entry(HOOK, sim.config, "poststop")]}
    bundle = runc_bundle(os.path.join(tmp, "b"), ["sh", "-c", script],
                         {"sriov-hook.io/networks": '[{"pool":"dp"}]'}, hooks)
    path = os.path.join(bundle, "config.json")
    with open(path) as fh:
        spec = json.load(fh)
    spec["root"] = {"path": rootfs, "readonly": False}
    if layout.startswith(("dev-vfio", "dev-hugepages")):
        spec["mounts"] = [m for m in spec["mounts"] if m["destination"] != "/dev"]
    with open(path, "w") as fh:
        json.dump(spec, fh)
    return bundle


@pytest.mark.runc
@pytest.mark.skipif(shutil.which("runc") is None, reason="runc not installed")
# Not "dev-to-host" here: Debian's runc 1.1 itself makes /dev/fd, /dev/ptmx, ...
# through an image's /dev link, on the host (tests/test_rootfs.py covers the
# hook's side of it).
@pytest.mark.parametrize("layout", ["run-to-etc", "run-to-host-dir", "run-dotdot-escape",
                                    "run-sriov-hook-to-host", "run-sriov-hook-relative",
                                    "dev-to-image-dir", "dev-vfio-to-host",
                                    "dev-hugepages-to-host", "dev-hugepages-to-etc"])
def test_hostile_image_gets_nothing_outside_its_rootfs(dsim: Tuple[Sim, KernelSim], tmp_path,  # type: ignore[no-untyped-def]
                                                       layout: str) -> None:
    from tests import standin
    sim, _ = dsim
    host = f"/tmp/sriov-host-{uuid.uuid4().hex[:8]}"   # a host path, as an attacker would aim
    os.makedirs(host)
    runc = Runc(f"/run/sriov-test-runc-{uuid.uuid4().hex[:8]}")
    try:
        with open(os.path.join(host, "keep"), "w") as fh:
            fh.write("host data\n")
        before = standin.snapshot(host)
        assert not os.path.exists("/etc/sriov-hook")
        bundle = _hostile_bundle(sim, str(tmp_path), layout, host, "cat /run/sriov-hook/net1.json")
        etc = os.path.join(str(tmp_path), "rootfs", "etc")
        etc_before = standin.snapshot(etc)
        out = runc.run(f"hx-{uuid.uuid4().hex[:8]}", bundle)
        assert out.returncode != 0, out.stdout
        link = next(iter(standin.LAYOUTS[layout]))
        assert f"sriov-hook: /{link} in the container is a symlink" in out.stderr, out.stderr
        assert standin.snapshot(host) == before
        assert not os.path.exists("/etc/sriov-hook")
        assert standin.snapshot(etc) == etc_before
        # The failed create gave everything back.
        assert driver(sim, sim.vfs[0].bdf) == "igbvf"
        assert fake_pages(sim) == (0, 0)
        sim.assert_clean()
    finally:
        runc.cleanup()
        shutil.rmtree(host, ignore_errors=True)


@pytest.mark.runc
@pytest.mark.skipif(shutil.which("runc") is None, reason="runc not installed")
def test_planted_info_file_is_replaced_not_followed(dsim: Tuple[Sim, KernelSim], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An image whose /run/sriov-hook/net1.json is a link to a host file: the
    hook's own tmpfs hides it, the container reads the real description."""
    from tests import standin
    sim, _ = dsim
    host = f"/tmp/sriov-host-{uuid.uuid4().hex[:8]}"
    os.makedirs(host)
    runc = Runc(f"/run/sriov-test-runc-{uuid.uuid4().hex[:8]}")
    try:
        with open(os.path.join(host, "keep"), "w") as fh:
            fh.write("host data\n")
        bundle = _hostile_bundle(sim, str(tmp_path), "run-to-etc", host,
                                 "cat /run/sriov-hook/net1.json")
        rootfs = os.path.join(str(tmp_path), "rootfs")
        os.unlink(os.path.join(rootfs, "run"))
        os.makedirs(os.path.join(rootfs, "run/sriov-hook"))
        os.symlink(os.path.join(host, "keep"), os.path.join(rootfs, "run/sriov-hook/net1.json"))
        out = runc.run(f"hp-{uuid.uuid4().hex[:8]}", bundle)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["pci"] == sim.vfs[0].bdf
        assert open(os.path.join(host, "keep")).read() == "host data\n"
        assert os.path.islink(os.path.join(rootfs, "run/sriov-hook/net1.json"))
        sim.assert_clean()
    finally:
        runc.cleanup()
        shutil.rmtree(host, ignore_errors=True)
