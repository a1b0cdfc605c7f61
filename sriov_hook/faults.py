"""Named crash points for fault-injection tests.

``SRIOV_HOOK_FAULT=<point>`` makes the hook SIGKILL itself when it reaches
that point, exactly as runc or Kata kill a hook past its timeout. Recovery
(the next poststop, or ``gc``) must then leave the host clean. Unset, a
point costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

ENV = "SRIOV_HOOK_FAULT"

PRESTART = ("record_written", "pf_applied", "pinned", "moved", "configured", "bound",
            "hugepages", "equipped", "attached")
POSTSTOP = ("release_locked", "moved_home", "netdev_restored", "pf_restored",
            "driver_restored", "unpinned", "record_deleted")
RECORD = ("record_tmp_written",)
ALL = PRESTART + POSTSTOP + RECORD


def point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
