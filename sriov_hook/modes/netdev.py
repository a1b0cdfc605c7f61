"""netdev mode (runc, crun, podman): the VF's kernel netdev goes into the
container's network namespace, configured.

attach:  name free in the container? -> PF side (settings, admin MAC, and a
         driver reload if the VF must pick the MAC up) -> down/MTU on the
         host -> pin netns -> move+rename -> driver guard -> addresses,
         up, routes inside
release: the journal backwards: driver repaired if a runtime rebound it ->
         home under its old name -> unpin -> name/MTU/state -> admin MAC
         cleared and the netdev's own MAC back -> PF settings
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from .. import binding, faults, hostdev, pfside
from ..netlink import Netlink
from .base import Mode

if TYPE_CHECKING:
    from ..context import Ctx
    from ..inventory import Candidate
    from ..request import NetworkRequest
    from ..reservations import Reservation


class NetdevMode(Mode):
    name = "netdev"

    def prepare(self, ctx: "Ctx", cand: "Candidate", res: "Reservation",
                req: "NetworkRequest") -> Optional[str]:
        why = hostdev.capture(ctx, cand, res, required=True)
        if why is None:
            pfside.capture(ctx, cand, res, req, mac_on_netdev_ok=True)
        return why

    def attach(self, ctx: "Ctx", res: "Reservation", req: "NetworkRequest",
               netns_fd: Optional[int]) -> None:
        assert netns_fd is not None
        with Netlink(netns_fd, label=f"container {res.owner}") as cnl:
            hostdev.refuse_name_clash(cnl, res.ifname)
            pfside.apply(ctx, res, req)
            pfside.pickup(ctx, res)
            # Without VF ops on the PF, a requested MAC can only go on the netdev.
            own_mac = req.vf.mac if not pfside.has_vf_ops(res) else None
            host = hostdev.prepare(ctx, res, req, own_mac)
            hostdev.pin(ctx, res, netns_fd)
            link = hostdev.move_in(ctx, res, netns_fd, cnl, host)
            binding.guard(ctx, res)
            hostdev.configure_inside(ctx, res, req, cnl, link)
        faults.point("configured")


MODE = NetdevMode()
