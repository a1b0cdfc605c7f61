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
_boot_id: Optional[str] = None


def boot_id() -> str:
    """This boot's identity: a record from another boot describes state
    (pins, moves, driver bindings, hugepage increments) that is gone."""
    global _boot_id
    if _boot_id is None:
        try:
            with open("/proc/sys/kernel/random/boot_id", "rb") as fh:
                _boot_id = fh.read().decode().strip()
        except OSError:
            _boot_id = ""
    return _boot_id


def boot_time() -> float:
    """When this boot began (seconds since the epoch)."""
    return _boot_time()


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


def netns_path_alive(path: str, netns_id: Tuple[int, int]) -> bool:
    """The namespace file the spec named (e.g. /run/netns/x) still holds the
    namespace the record was made for. (Our own pin keeps the namespace
    alive, so the path, not the namespace, says whether its owner is.)"""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == tuple(netns_id)


def owner_alive(res: Reservation) -> bool:
    if res.pid is not None:
        return pid_alive(res.pid, res.pid_start)
    if res.netns_id is not None and res.netns and not res.netns.startswith("/proc/"):
        return netns_path_alive(res.netns, res.netns_id)
    if res.netns_id is not None:
        return netns_has_process(res.netns_id)
    return False
