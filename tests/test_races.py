"""Races between hooks, replayed in a fixed order.

``SRIOV_HOOK_PAUSE=<point>`` stops a hook (SIGSTOP) at a named point; the
test runs another hook in exactly that window, then lets the first go on.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import pytest

from sriov_hook import faults
from tests.conftest import ROOT, Sim, netns_process, nsfs_mounts

pytestmark = pytest.mark.root


def _wait_stopped(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} never reached its pause point")


def _start(sim: Sim, args: List[str], state: Optional[Dict[str, Any]] = None,
           pause: Optional[str] = None) -> "subprocess.Popen[bytes]":
    env = {**os.environ, faults.PAUSE_ENV: pause or ""}
    proc = subprocess.Popen([sys.executable, "-m", "sriov_hook", "--config", sim.config, *args],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(state).encode() if state else b"")
    proc.stdin.close()
    proc.stdin = None    # communicate() must not flush it again
    if pause:
        _wait_stopped(proc.pid)
    return proc


def _state(cid: str, bundle: str, pid: Optional[int] = None) -> Dict[str, Any]:
    return {"ociVersion": "1.0.2", "id": cid, "status": "creating" if pid else "stopped",
            "bundle": bundle, **({"pid": pid} if pid else {})}


def test_gc_never_unpins_a_prestart_that_came_in_between(sim: Sim) -> None:
    """gc lists the records, then looks for pins without one. A prestart that
    reserves and pins in between must keep its pin (gc once unpinned it)."""
    with netns_process() as proc:
        gc = _start(sim, ["gc"], pause="gc_records_done")
        try:
            r = sim.prestart("n", sim.bundle("fast"), pid=proc.pid)
            assert r.rc == 0, r.stderr
        finally:
            os.kill(gc.pid, signal.SIGCONT)
            out, err = gc.communicate(timeout=60)
        assert gc.returncode == 0, err
        pin = os.path.join(sim.host.state_dir, "netns", sim.vfs[0].bdf)
        assert pin in nsfs_mounts(), out.decode()
        assert sim.hook("check").rc == 0
    assert sim.poststop("n").rc == 0
    sim.assert_clean()


def test_a_prestart_waits_for_a_release_under_way(make_sim) -> None:  # type: ignore[no-untyped-def]
    """A poststop stopped halfway through its undo holds the pool's one VF: a
    prestart meanwhile must not get it, nor fail at once; it gets the VF as
    soon as the release is over."""
    sim = make_sim(nvfs=1)
    rec = os.path.join(sim.host.state_dir, "reservations", f"{sim.vfs[0].bdf}.json")
    with netns_process() as a, netns_process() as b:
        bundle = sim.bundle("fast")
        assert sim.prestart("a", bundle, pid=a.pid).rc == 0
        stop = _start(sim, ["poststop"], _state("a", bundle), pause="undo:move")
        try:
            start = _start(sim, ["prestart"], _state("b", bundle, b.pid))
            time.sleep(1.0)
            assert start.poll() is None                       # waiting, not refused
            assert json.load(open(rec))["owner"] == "a"        # and not given a's VF
        finally:
            os.kill(stop.pid, signal.SIGCONT)
        assert stop.wait(timeout=60) == 0
        out, err = start.communicate(timeout=60)
        assert start.returncode == 0, err.decode()
        assert json.load(open(rec))["owner"] == "b"
        assert sim.poststop("b").rc == 0
    sim.assert_clean()
