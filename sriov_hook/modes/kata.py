"""kata mode: the physical-endpoint handoff for Kata / Clear Containers.

The hook moves the VF netdev into the sandbox netns exactly as netdev mode
does; the VM runtime then finds a physical interface there, binds it to
vfio-pci itself and plugs it into the guest. At release the VF may still be
on vfio-pci, and driver_override may hold the host driver's name (Kata
leaves it there): the journal's driver guard repairs both before the
netdev is brought home.

Reservations are per sandbox, shared by every container of the sandbox
that carries the annotation, and released with the last of them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from . import netdev
from .base import Mode

if TYPE_CHECKING:
    from ..context import Ctx
    from ..inventory import Candidate
    from ..request import NetworkRequest
    from ..reservations import Reservation


class KataMode(Mode):
    name = "kata"
    needs_netns = True
    per_sandbox = True

    def prepare(self, ctx: "Ctx", cand: "Candidate", res: "Reservation",
                req: "NetworkRequest") -> Optional[str]:
        return netdev.MODE.prepare(ctx, cand, res, req)

    def attach(self, ctx: "Ctx", res: "Reservation", req: "NetworkRequest",
               netns_fd: Optional[int]) -> None:
        netdev.MODE.attach(ctx, res, req, netns_fd)


MODE = KataMode()
