"""Hugepage accounting under concurrency and crashes (dpdk/hugepages.Accounting).

The kernel side is tests/kernelsim.py: nr_hugepages follows writes through
fanotify, capped at max_hugepages. Writers are separate processes, as hooks
and sriov-dpdk are.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Tuple

import pytest

from tests import standin
from tests.conftest import ROOT, Sim
from tests.kernelsim import KernelSim
from tests.stress import run_many
from tests.test_dpdk import dpdk, driver, dsim, fake_pages  # noqa: F401 - dsim is a fixture

pytestmark = pytest.mark.root

# One writer: K rounds of its part, through the real Accounting, in its own process.
_WRITER = """
import sys
from dpdk.hugepages import Accounting, Hugepages, HugepageError
root, state, who, rounds, mode = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
acct = Accounting(Hugepages(root), state, timeout=60)
refused = 0
for i in range(rounds):
    if mode == "reserve":
        acct.reserve(1, 2048, 0)
    else:   # hold up to 3 claims of 3 pages, then give them back
        held = []
        for j in range(3):
            try:
                acct.claim(f"{who}-{i}-{j}", 3, 2048, 0)
                held.append(f"{who}-{i}-{j}")
            except HugepageError:
                refused += 1
        for key in held:
            acct.release(key)
print(refused)
"""


def writers(sim: Sim, state: str, n: int, rounds: int, mode: str) -> List[int]:
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, sim.host.sysfs_root, state,
                               f"w{i}", str(rounds), mode],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
             for i in range(n)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr.decode()
        out.append(int(stdout))
    return out


def ledger(state: str) -> Dict[str, Any]:
    path = os.path.join(state, "hugepages.json")
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        claims: Dict[str, Any] = json.load(fh)["claims"]
    return claims


def test_parallel_increments_are_never_lost(dsim: Tuple[Sim, KernelSim]) -> None:
    """4 writers x 25 increments of one page: read-modify-write without the
    lock loses some of them (2 writers read 7, both write 8)."""
    sim, _ = dsim
    state = os.path.join(sim.tmp, "acct")
    writers(sim, state, 4, 25, "reserve")
    assert fake_pages(sim) == (100, 100)


def test_rollbacks_never_erase_another_writers_pages(dsim: Tuple[Sim, KernelSim]) -> None:
    """Claims of 3 pages against a kernel that grants at most 8: every third
    claim of a writer (sooner, when others hold pages too) gets only part of
    its pages and is rolled back while other writers hold theirs. Every claim
    is released, so the count must come back to exactly where it was (2 pages
    an operator reserved) and the ledger must be empty."""
    sim, ks = dsim
    state = os.path.join(sim.tmp, "acct")
    assert dpdk(sim, "--state-dir", state, "hugepages", "reserve", "4M",
                "--node", "0").returncode == 0
    ks.max_hugepages = 8
    refused = writers(sim, state, 4, 10, "claim")
    assert fake_pages(sim) == (2, 2)
    assert ledger(state) == {}
    assert sum(refused) > 0, "the cap never bit: the test proved nothing"


def test_parallel_dpdk_hooks_each_get_their_pages(dsim: Tuple[Sim, KernelSim]) -> None:
    """Three dpdk containers start at once, each wanting 16M (8 pages): 24
    pages, each reservation adding 8; all stop at once: back to 0. (The VFs
    are put on vfio-pci first, one after the other: the simulator's single
    drivers_probe file would lose binds written at the same instant.)"""
    sim, _ = dsim
    bdfs = [vf.bdf for vf in sim.vfs]
    assert dpdk(sim, "bind", "vfio-pci", *bdfs).returncode == 0
    jobs = [("prestart", {"ociVersion": "1.0.2", "id": f"hp{i}", "status": "creating",
                          "bundle": sim.bundle("dp")}) for i in range(3)]
    results = run_many(sim, jobs)
    assert [rc for rc, _ in results] == [0, 0, 0], results
    assert fake_pages(sim) == (24, 24)
    recs = [json.load(open(os.path.join(sim.host.state_dir, "reservations", f"{vf.bdf}.json")))
            for vf in sim.vfs]
    assert sorted(next(s for s in r["steps"] if s["kind"] == "hugepages")["added"]
                  for r in recs) == [8, 8, 8]
    stops = [("poststop", {"ociVersion": "1.0.2", "id": f"hp{i}", "status": "stopped",
                           "bundle": "/nonexistent"}) for i in range(3)]
    assert [rc for rc, _ in run_many(sim, stops)] == [0, 0, 0]
    assert fake_pages(sim) == (0, 0)
    assert ledger(os.path.join(sim.host.state_dir, "dpdk")) == {}
    assert dpdk(sim, "unbind", *bdfs).returncode == 0
    sim.assert_clean()


@pytest.mark.parametrize("recover", ["poststop", "gc"])
def test_crash_after_the_removal_never_removes_twice(dsim: Tuple[Sim, KernelSim],
                                                     recover: str) -> None:
    """A's poststop is killed right after the kernel took A's pages back, before
    the books say so. Replaying A's release (its poststop again, or gc) must
    leave the 8 pages of B, a live container, alone."""
    sim, _ = dsim
    with standin.container() as b:
        bundle_b = sim.bundle("dp")
        os.makedirs(os.path.join(bundle_b, "rootfs"))
        assert sim.prestart("A", sim.bundle("dp")).rc == 0
        r = sim.prestart("B", bundle_b, pid=b.pid)
        assert r.rc == 0, r.stderr
        assert fake_pages(sim) == (16, 16)
        env = {**os.environ, "SRIOV_HOOK_FAULT": "hugepages:release_written"}
        r = sim.hook("poststop", state={"ociVersion": "1.0.2", "id": "A", "status": "stopped",
                                        "bundle": "/nonexistent"}, env=env)
        assert r.rc == -9, r.stderr      # killed at that point
        assert fake_pages(sim) == (8, 8)
        if recover == "poststop":
            assert sim.poststop("A").rc == 0
        else:
            r = sim.hook("gc")
            assert r.rc == 0 and "released=1" in r.stdout, r.stdout
        assert fake_pages(sim) == (8, 8), "B's pages were taken by a replay"
        assert len(sim.records()) == 1
        assert sim.poststop("B").rc == 0
    assert fake_pages(sim) == (0, 0)
    sim.assert_clean()


@pytest.mark.parametrize("point", ["hugepages:recorded", "hugepages:claim_written",
                                   "hugepages:done"])
def test_crash_around_the_claim_gives_back_exactly_once(dsim: Tuple[Sim, KernelSim],
                                                        point: str) -> None:
    """Killed before, right after, or well after the kernel granted the pages:
    the next poststop gives back exactly what was added, no more."""
    sim, _ = dsim
    assert dpdk(sim, "--state-dir", os.path.join(sim.host.state_dir, "dpdk"), "hugepages",
                "reserve", "4M", "--node", "0").returncode == 0    # an operator's 2 pages
    env = {**os.environ, "SRIOV_HOOK_FAULT": point}
    r = sim.hook("prestart", state={"ociVersion": "1.0.2", "id": "C", "status": "creating",
                                    "bundle": sim.bundle("dp")}, env=env)
    assert r.rc == -9, r.stderr
    assert sim.poststop("C").rc == 0
    assert fake_pages(sim) == (2, 2)
    assert driver(sim, sim.vfs[0].bdf) == "igbvf"
    sim.assert_clean()


def test_operator_release_keeps_pages_a_container_counts_on(dsim: Tuple[Sim, KernelSim]) -> None:
    sim, _ = dsim
    state = os.path.join(sim.host.state_dir, "dpdk")    # what sriov-dpdk --config uses
    assert dpdk(sim, "--state-dir", state, "hugepages", "reserve", "4M",
                "--node", "0").returncode == 0
    assert sim.prestart("D", sim.bundle("dp")).rc == 0   # wants 8: uses the 2, adds 6
    assert fake_pages(sim) == (8, 8)
    p = dpdk(sim, "--state-dir", state, "hugepages", "release", "16M", "--node", "0")
    assert p.returncode == 0, p.stderr
    assert "released 0 of 8" in p.stdout
    assert fake_pages(sim) == (8, 8)
    assert sim.poststop("D").rc == 0
    assert fake_pages(sim) == (2, 2)                     # the operator's own stay
    p = dpdk(sim, "--state-dir", state, "hugepages", "release", "4M", "--node", "0")
    assert "released 2 of 2" in p.stdout and fake_pages(sim) == (0, 0)
