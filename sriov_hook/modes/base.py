"""The interface every mode implements.

A mode only hands a VF over: ``attach`` is a short composition of journal
steps (journal.py). Taking it back is the same for every mode: the
journal replayed backwards (hook.release), so a mode never carries undo
code of its own and rollback after a failed attach is the same replay.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from ..context import Ctx
    from ..inventory import Candidate
    from ..request import NetworkRequest
    from ..reservations import Reservation


class Mode(ABC):
    name: str = ""
    needs_netns: bool = True
    per_sandbox: bool = False   # one reservation per sandbox, shared by its containers

    @abstractmethod
    def prepare(self, ctx: "Ctx", cand: "Candidate", res: "Reservation",
                req: "NetworkRequest") -> Optional[str]:
        """Under the VF lock, before the record is written: check the VF is
        usable and capture its original state into ``res``. Returns a reason
        to skip this VF, or None. Must not change anything."""

    @abstractmethod
    def attach(self, ctx: "Ctx", res: "Reservation", req: "NetworkRequest",
               netns_fd: Optional[int]) -> None:
        """Hand the VF to the container, each change a journal step."""
