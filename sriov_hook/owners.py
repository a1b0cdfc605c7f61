"""Is a reservation's owner still alive?

A bare pid can be reused, so a record stores the process start time too,
computed the way psutil computes ``create_time()`` (boot time + start
ticks), without importing psutil on the hot path. gc compares with psutil.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

from .reservations import Reservation

_btime: Optional[float] = None


def _boot_time() -> float:
    global _btime
    if _btime is None:
        with open("/proc/stat", "rb") as fh:
            for line in fh:
                if line.startswith(b"btime"):
                    _btime = float(line.split()[1])
                    break
            else:
                _btime = 0.0
    return _btime


def start_time(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2:].split()
    ticks = int(fields[19])
    return _boot_time() + ticks / os.sysconf("SC_CLK_TCK")


def pid_alive(pid: int, started: Optional[float]) -> bool:
    import psutil
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - started) < 0.05
    except psutil.Error:
        return False


def netns_has_process(netns_id: Tuple[int, int]) -> bool:
    """Any process whose netns is this one? (slow: walks /proc; gc only)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == tuple(netns_id):
            return True
    return False


def owner_alive(res: Reservation) -> bool:
    if res.pid is not None:
        return pid_alive(res.pid, res.pid_start)
    if res.netns_id is not None:
        return netns_has_process(res.netns_id)
    return False
