"""rootfs.Root: file work inside a container rootfs never leaves it.

Hostile layouts are real symlinks, FIFOs and device nodes on disk; the
mounts happen in a stand-in container's mount namespace (tests/standin.py),
through mountns.run_in as dpdk mode does it.
"""
from __future__ import annotations

import os
import stat
import uuid
from typing import Iterator, Tuple

import pytest

from sriov_hook import mountns
from sriov_hook.rootfs import Root, RootfsError
from tests import standin

pytestmark = pytest.mark.root


@pytest.fixture
def tree(tmp_path) -> Iterator[Tuple[str, str]]:  # type: ignore[no-untyped-def]
    """(rootfs, host dir): a small image tree, and a host directory outside
    it holding one file, which no test may change."""
    root = str(tmp_path / "rootfs")
    for d in ("etc", "run", "dev", "tmp"):
        os.makedirs(os.path.join(root, d))
    host = str(tmp_path / f"host-{uuid.uuid4().hex[:6]}")
    os.makedirs(host)
    with open(os.path.join(host, "keep"), "w") as fh:
        fh.write("host data\n")
    before = standin.snapshot(host)
    yield root, host
    assert standin.snapshot(host) == before, "a file outside the rootfs changed"


@pytest.mark.parametrize("layout", sorted(standin.LAYOUTS))
def test_hostile_layout_is_refused_and_names_the_link(tree: Tuple[str, str],
                                                      layout: str) -> None:
    root, host = tree
    standin.plant(root, standin.LAYOUTS[layout], host)
    link = next(iter(standin.LAYOUTS[layout]))
    etc_before = standin.snapshot(os.path.join(root, "etc"))
    with Root.open(root) as r:
        with pytest.raises(RootfsError) as err:
            if link.startswith("dev/vfio") or link == "dev":
                r.mknod_char("/dev/vfio/vfio", 10, 196)
            elif link.startswith("dev"):
                r.makedirs("/dev/hugepages")
            else:
                r.makedirs("/run/sriov-hook")
                r.write_file("/run/sriov-hook/net1.json", b"{}")
    msg = str(err.value)
    assert f"/{link} in the container is a symlink" in msg and "\n" not in msg
    # Nothing was made through the link, in the rootfs or outside it.
    assert standin.snapshot(os.path.join(root, "etc")) == etc_before
    assert not os.path.exists("/etc/sriov-hook")


def test_write_replaces_planted_names_without_opening_them(tree: Tuple[str, str]) -> None:
    root, host = tree
    run = os.path.join(root, "run/sriov-hook")
    os.makedirs(run)
    os.mkfifo(os.path.join(run, "net1.json"))          # opening it would block
    os.symlink(os.path.join(host, "keep"), os.path.join(run, "net2.json"))
    os.mknod(os.path.join(run, "net3.json"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
    with Root.open(root) as r:
        for name in ("net1", "net2", "net3"):
            r.write_file(f"/run/sriov-hook/{name}.json", b'{"pci": "x"}\n')
    for name in ("net1", "net2", "net3"):
        path = os.path.join(run, f"{name}.json")
        assert stat.S_ISREG(os.lstat(path).st_mode)
        assert open(path, "rb").read() == b'{"pci": "x"}\n'
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]


def test_plain_layout_works_and_refuses_what_it_must(tree: Tuple[str, str]) -> None:
    root, _ = tree
    with Root.open(root) as r:
        r.makedirs("/run/sriov-hook")
        assert os.path.isdir(os.path.join(root, "run/sriov-hook"))
        assert r.is_empty_dir("/run/sriov-hook") and not r.is_empty_dir("/dev/none")
        assert not r.is_empty_dir("/run")
        assert not r.is_mount_point("/run")
        r.mknod_char("/dev/vfio/vfio", 10, 196)
        r.mknod_char("/dev/vfio/vfio", 10, 196)          # the same node again: fine
        st = os.lstat(os.path.join(root, "dev/vfio/vfio"))
        assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 10
        with pytest.raises(RootfsError, match="already exists .* something else"):
            r.mknod_char("/dev/vfio/vfio", 10, 197)
        os.mkdir(os.path.join(root, "run/sriov-hook/net1.json"))
        with pytest.raises(RootfsError, match="cannot write /run/sriov-hook/net1.json"):
            r.write_file("/run/sriov-hook/net1.json", b"{}")
        open(os.path.join(root, "tmp/file"), "w").close()
        with pytest.raises(RootfsError, match="/tmp/file in the container is not a directory"):
            r.makedirs("/tmp/file/x")
        with pytest.raises(RootfsError, match="bad path"):
            r.makedirs("/run/../etc")


def test_mounts_land_in_the_containers_namespace_only(tree: Tuple[str, str]) -> None:
    """Through mountns.run_in, as dpdk mode does: a tmpfs on /run/sriov-hook
    in the stand-in's mount namespace, the file inside it; the host sees an
    empty directory, the container the file."""
    root, _ = tree

    def inside() -> str:
        with Root.open(root) as r:
            r.makedirs("/run/sriov-hook")
            assert not r.is_mount_point("/run/sriov-hook")
            r.mount("/run/sriov-hook", "tmpfs", "tmpfs", 0, "size=64k")
            assert r.is_mount_point("/run/sriov-hook")
            r.write_file("/run/sriov-hook/net1.json", b"{}")
        return "made"

    with standin.container() as proc:
        assert mountns.run_in(proc.pid, inside) == "made"
        assert os.listdir(os.path.join(root, "run/sriov-hook")) == []
        seen = f"/proc/{proc.pid}/root{root}/run/sriov-hook"
        assert os.listdir(seen) == ["net1.json"]
    with open("/proc/self/mountinfo") as fh:
        assert f"{root}/run/sriov-hook" not in fh.read()


def test_child_errors_come_back_as_one_line(tree: Tuple[str, str]) -> None:
    root, host = tree
    standin.plant(root, {"run": "/etc"}, host)

    def inside() -> None:
        with Root.open(root) as r:
            r.makedirs("/run/sriov-hook")

    with standin.container() as proc:
        with pytest.raises(mountns.MountNsError) as err:
            mountns.run_in(proc.pid, inside)
    assert str(err.value) == ("/run in the container is a symlink (to '/etc'); "
                              "the hook never follows the image's symlinks")
