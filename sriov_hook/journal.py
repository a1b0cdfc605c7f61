"""The undo journal: every change to a VF is recorded before it is made.

A step is a dict ``{"kind": ..., <what its undo needs>}`` appended to the
reservation's ``steps`` and written to disk (reservations.Store.write)
before the change it names. Release and rollback replay the journal
backwards (hook.release); each undo is idempotent and checks the current
state, so a step that was recorded but never carried out undoes nothing.

Each step also marks two crash points for fault injection:
``<kind>:recorded`` (on disk, not yet done) and ``<kind>:done``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Tuple

from . import faults

if TYPE_CHECKING:
    from .context import Ctx
    from .reservations import Reservation

# Every kind of step, in the order a mode may take them at attach.
KINDS: Tuple[str, ...] = faults.STEP_KINDS


def record(ctx: "Ctx", res: "Reservation", kind: str, **data: Any) -> Dict[str, Any]:
    """Append step ``kind`` to the journal and persist it; return the entry,
    which the caller may fill in further with :func:`update`."""
    if kind not in KINDS:
        raise ValueError(f"unknown journal step {kind!r}")
    if res.step(kind) is not None:
        raise ValueError(f"journal step {kind!r} recorded twice for {res.bdf}")
    entry: Dict[str, Any] = {"kind": kind, **data}
    res.steps.append(entry)
    ctx.store.write(res)
    faults.point(f"{kind}:recorded")
    return entry


def update(ctx: "Ctx", res: "Reservation", entry: Dict[str, Any], **data: Any) -> None:
    """Add what a step learnt while running (e.g. the ifindex after a move)."""
    entry.update(data)
    ctx.store.write(res)


def done(kind: str) -> None:
    faults.point(f"{kind}:done")
