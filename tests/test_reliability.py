"""Reliability: concurrency, crash points, hostile corpus, bounded waits, check/gc.

The full-size run is ``make stress``; these run the same phases smaller.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from typing import Callable

import pytest

from tests import simhost, stress
from tests.conftest import Sim, netns_process
from tests.test_netdev import one_line_error

pytestmark = pytest.mark.root


@pytest.mark.slow
def test_burst_and_random_interleaving(tmp_path) -> None:  # type: ignore[no-untyped-def]
    fig = stress.Figures()
    sim = Sim(simhost.build(str(tmp_path / "s"), nvfs=8), str(tmp_path))
    try:
        simhost.write_config(sim.host, extra={"lock_timeout": 30})
        stress.phase_burst(sim, 16, fig)
        stress.phase_random(sim, 40, fig)
        assert fig.problems == []
        assert fig.double_reservations == 0 and stress.leaked(sim) == 0
        assert fig.max_concurrency == 16
    finally:
        sim.cleanup()


@pytest.mark.slow
def test_every_crash_point_recovers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    fig = stress.Figures()
    sim = Sim(simhost.build(str(tmp_path / "f"), nvfs=8), str(tmp_path))
    from tests.kernelsim import KernelSim
    ks = KernelSim(simhost.fake_sysfs(sim.host), sim.host.dev_dir)
    try:
        simhost.write_config(sim.host, pools=stress.fault_pools(sim))
        stress.phase_faults(sim, fig)
        assert fig.problems == []
        assert fig.fault_points >= 30 and fig.fault_points == fig.fault_points_recovered
        for mode in ("netdev", "kata", "vfio", "dpdk"):
            assert any(d.startswith(f"{mode}/prestart") for d in fig.fault_details)
            assert any(d.startswith(f"{mode}/poststop") for d in fig.fault_details)
    finally:
        ks.stop()
        sim.cleanup()


def test_hostile_corpus(sim: Sim) -> None:
    fig = stress.Figures()
    stress.phase_hostile(sim, fig)
    assert fig.hostile_inputs >= 60
    assert fig.problems == [] and fig.hostile_rejected == fig.hostile_inputs


def test_lock_wait_is_bounded_and_leaks_nothing(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim(nvfs=1)
    simhost.write_config(sim.host, extra={"lock_timeout": 0.5})
    lock = os.path.join(sim.host.state_dir, "locks", f"{sim.vfs[0].bdf}.lock")
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)   # another hook is "stuck" holding the VF
        t0 = time.monotonic()
        r = sim.prestart("w", sim.bundle("fast", sim.netns()))
        took = time.monotonic() - t0
    one_line_error(r, "stayed locked by other hooks for 0.5s")
    assert took < 5
    sim.assert_clean()


def test_torn_record_is_reported_not_reused(sim: Sim) -> None:
    ns = sim.netns()
    assert sim.prestart("t", sim.bundle("fast", ns)).rc == 0
    path = os.path.join(sim.host.state_dir, "reservations", f"{sim.vfs[0].bdf}.json")
    data = open(path).read()
    with open(path, "w") as fh:       # a filesystem that tore the write
        fh.write(data[: len(data) // 2])
    rows = {r["pci"]: r for r in sim.status()}
    assert rows[sim.vfs[0].bdf]["state"] == "corrupt"
    r = sim.hook("check")
    assert r.rc == 1 and "unreadable" in r.stdout
    # The corrupt VF is never handed out again; the next container gets VF 1.
    ns2 = sim.netns()
    assert sim.prestart("t2", sim.bundle("fast", ns2)).rc == 0
    assert json.load(open(os.path.join(sim.host.state_dir, "reservations",
                                       f"{sim.vfs[1].bdf}.json")))["owner"] == "t2"
    with open(path, "w") as fh:       # the operator restores it
        fh.write(data)
    assert sim.poststop("t").rc == 0 and sim.poststop("t2").rc == 0
    sim.assert_clean()


def test_check_reports_and_changes_nothing(sim: Sim) -> None:
    assert sim.hook("check").rc == 0
    with netns_process() as proc:
        assert sim.prestart("c", sim.bundle("fast"), pid=proc.pid).rc == 0
    stray = os.path.join(sim.host.state_dir, "netns", "0000:99:00.0")
    open(stray, "w").close()
    with open(os.path.join(sim.host.sysfs_root, "bus/pci/devices", sim.vfs[2].bdf,
                           "driver_override"), "w") as fh:
        fh.write("vfio-pci\n")
    before = sorted(os.listdir(os.path.join(sim.host.state_dir, "reservations")))
    r = sim.hook("check")
    assert r.rc == 1
    assert "owner is gone" in r.stdout and "pin without a reservation" in r.stdout
    assert "driver_override is still 'vfio-pci'" in r.stdout
    assert sorted(os.listdir(os.path.join(sim.host.state_dir, "reservations"))) == before
    r = sim.hook("gc")
    assert r.rc == 0 and "released=1" in r.stdout and "pins_removed=1" in r.stdout
    with open(os.path.join(sim.host.sysfs_root, "bus/pci/devices", sim.vfs[2].bdf,
                           "driver_override"), "w") as fh:
        fh.write("(null)\n")
    assert sim.hook("check").rc == 0
    sim.assert_clean()


def test_gc_ignores_reused_pid(sim: Sim) -> None:
    # Record with a live pid but a different start time: the pid was reused.
    with netns_process() as proc:
        assert sim.prestart("p", sim.bundle("fast"), pid=proc.pid).rc == 0
        path = os.path.join(sim.host.state_dir, "reservations", f"{sim.vfs[0].bdf}.json")
        rec = json.load(open(path))
        assert sim.hook("gc").stdout.startswith("checked=1 released=0")
        rec["pid_start"] -= 100.0
        with open(path, "w") as fh:
            json.dump(rec, fh)
        assert "released=1" in sim.hook("gc").stdout
    sim.assert_clean()


def test_state_dir_is_private(sim: Sim) -> None:
    assert sim.prestart("m", sim.bundle("fast", sim.netns())).rc == 0
    for d in ("", "reservations", "locks", "netns"):
        mode = os.stat(os.path.join(sim.host.state_dir, d)).st_mode & 0o777
        assert mode == 0o700, (d, oct(mode))
    assert sim.poststop("m").rc == 0
