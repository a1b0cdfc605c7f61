"""Named crash points for fault-injection tests.

``SRIOV_HOOK_FAULT=<point>`` makes the hook SIGKILL itself when it reaches
that point, exactly as runc or Kata kill a hook past its timeout. Recovery
(the next poststop, prestart or ``gc``) must then leave the host clean.
``SRIOV_HOOK_PAUSE=<point>`` makes it SIGSTOP itself there instead, so a
test can run another hook in that exact window and then SIGCONT it.
Unset, a point costs two dict lookups.

Every journal step has two points, ``<kind>:recorded`` (written to disk,
not yet done) and ``<kind>:done``; every undo has ``undo:<kind>``.
"""
from __future__ import annotations

import os
import signal

ENV = "SRIOV_HOOK_FAULT"
PAUSE_ENV = "SRIOV_HOOK_PAUSE"

# The journal's step kinds (journal.KINDS is this tuple), in attach order.
STEP_KINDS = ("vf_settings", "admin_mac", "reprobe", "netdev", "pin", "move",
              "driver_guard", "bind", "hugepages")
PRESTART = ("record_written",) + tuple(f"{k}:{when}" for k in STEP_KINDS
                                       for when in ("recorded", "done")) \
    + ("hugepages:claim_written", "hugepages:claim_undone") \
    + ("configured", "equipped", "attached")
POSTSTOP = ("release_locked", "hugepages:release_written") \
    + tuple(f"undo:{k}" for k in reversed(STEP_KINDS)) + ("record_deleted",)
RECORD = ("record_tmp_written",)
GC = ("gc_records_done",)
ALL = PRESTART + POSTSTOP + RECORD + GC


def point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(PAUSE_ENV) == name:
        os.kill(os.getpid(), signal.SIGSTOP)
