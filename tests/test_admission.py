"""Admission control: slots are taken, waited for with a bound, and released on exit."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

from sriov_hook import admission


def test_free_slot_is_taken_at_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    fd = admission.acquire(2, timeout=1, directory=str(tmp_path))
    assert fd is not None
    fd2 = admission.acquire(2, timeout=1, directory=str(tmp_path))
    assert fd2 is not None and fd2 != fd
    os.close(fd)
    os.close(fd2)


def test_wait_is_bounded_and_never_fails_the_hook(tmp_path) -> None:  # type: ignore
    holders = []
    for i in range(2):
        fd = os.open(os.path.join(str(tmp_path), str(i)), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        holders.append(fd)
    t0 = time.monotonic()
    assert admission.acquire(2, timeout=0.3, directory=str(tmp_path)) is None
    assert 0.25 < time.monotonic() - t0 < 3
    for fd in holders:
        os.close(fd)


def test_slot_is_released_when_the_holder_dies(tmp_path) -> None:  # type: ignore
    code = ("import sys, time; from sriov_hook import admission; "
            f"fd = admission.acquire(1, 1, {str(tmp_path)!r}); print(fd is not None, flush=True); "
            "time.sleep(30)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "True"  # type: ignore[union-attr]
        assert admission.acquire(1, timeout=0.2, directory=str(tmp_path)) is None
        p.kill()
        p.wait()
        fd = admission.acquire(1, timeout=2, directory=str(tmp_path))
        assert fd is not None
        os.close(fd)
    finally:
        p.kill()
