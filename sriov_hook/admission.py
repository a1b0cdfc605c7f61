"""Admission control: at most one hook per CPU does the heavy part at once.

A pod burst starts dozens of hooks together. Unthrottled, they all start
Python, import the hook and talk netlink on the same few cores, and each burns far more CPU
than it does alone (cache and scheduler thrash: 180 ms instead of 113 ms at
64-way on 2 cores). Waiting on an flock costs nothing, so each hook takes
one of N slots (N = usable CPUs + 1 by default) right after Python starts and
holds it until it exits. This never fails a hook: after ``timeout`` it goes
ahead without a slot. VF reservation has its own, separate locks.
"""
from __future__ import annotations

import fcntl
import os
import signal
from typing import Optional

SLOT_DIR = "/run/sriov-hook/slots"


class _Timeout(Exception):
    pass


def _expire(_signum: int, _frame: object) -> None:
    raise _Timeout()


def acquire(slots: int, timeout: float, directory: str = SLOT_DIR) -> Optional[int]:
    """An fd holding one of ``slots`` flocks, or None (no dir, or timed out).

    A free slot is taken at once; otherwise the hook sleeps in a blocking
    flock on slot pid % N (a poll loop would itself burn the CPU this saves),
    bounded by an interval timer.
    """
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fds = [os.open(os.path.join(directory, str(i)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                       0o600) for i in range(slots)]
    except OSError:
        return None
    chosen: Optional[int] = None
    for fd in fds:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            chosen = fd
            break
        except OSError:
            continue
    if chosen is None:
        fd = fds[os.getpid() % slots]
        old = signal.signal(signal.SIGALRM, _expire)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            chosen = fd
        except (_Timeout, OSError):
            pass
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    for fd in fds:
        if fd != chosen:
            os.close(fd)
    return chosen
