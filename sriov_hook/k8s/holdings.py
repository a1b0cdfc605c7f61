"""Which VFs kubelet handed to pods, and their release once no pod holds them.

Allocate tells the plugin that kubelet gave a VF to *some* container (it names
no pod); the record the hook writes at that container's createRuntime names the
container. A grant ties the two: the first record written on the VF after the
Allocate is the pod's, and its owner is remembered. PodResources (List) says
which devices running pods hold: after an agent restart it re-creates grants
for the VFs it lists.

A record is *held by Kubernetes* when its owner is a grant's. Any other record
is held outside Kubernetes (podman, runc, a hand-run hook): the plugin then
reports the VF unhealthy, so kubelet does not hand it out.

Reclaim from kubelet's view (the agent's reclaim thread runs ``pass_`` next to
its owner watch): a VF held by Kubernetes is released when no pod holds it any
more, judged conservatively, because a mistake takes a VF from a running pod:
- only an ``attached`` record (a hook at work, or one that died, is the owner
  watch's and gc's);
- only from a successful listing by a kubelet whose socket has been the same
  (same inode: kubelet recreates it when it restarts) for RECLAIM_GRACE;
- only after every listing over RECLAIM_GRACE left the VF out. A VF allocated
  to a pod whose container is still being created is listed (kubelet lists a
  pod's devices from admission on), and a grant younger than the grace counts
  as held in any case.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Set, Tuple

from ..context import Ctx
from ..errors import HookError
from ..reservations import ATTACHED, Reservation
from . import podresources

RECLAIM_GRACE = 10.0   # seconds a VF must stay unlisted before it is released
CLOCK_SKEW = 1.0       # a record written within this before its Allocate still counts


@dataclass
class Grant:
    at: float                       # time.time() of the Allocate (records use it too)
    owner: Optional[str] = None     # the container whose record took the VF since


class Holdings:
    def __init__(self, pod_resources_socket: str,
                 resource_of: Callable[[str], Optional[str]],
                 on_released: Callable[[str], None] = lambda _pci: None,
                 on_failed: Callable[[str], None] = lambda _why: None,
                 grace: float = RECLAIM_GRACE) -> None:
        """``resource_of(pci)``: the resource name the plugin advertises the VF
        under, or None if it advertises it under none."""
        self.socket = pod_resources_socket
        self.resource_of = resource_of
        self.on_released = on_released
        self.on_failed = on_failed
        self.grace = grace
        self._lock = threading.Lock()
        self._grants: Dict[str, Grant] = {}
        self._listing: Optional[podresources.Listing] = None
        self._socket_since: Tuple[Optional[Tuple[int, int]], float] = (None, 0.0)
        self._absent_since: Dict[str, float] = {}

    # -- what the plugin tells it -----------------------------------------------------
    def granted(self, pcis: Iterable[str]) -> None:
        now = time.time()
        with self._lock:
            for pci in pcis:
                self._grants[pci] = Grant(now)
                self._absent_since.pop(pci, None)

    def held_by_kubernetes(self, pci: str, record: Reservation) -> bool:
        """Is this record (on ``pci``) a pod's? Binds a fresh grant to its owner."""
        with self._lock:
            grant = self._grants.get(pci)
            if grant is None:
                return False
            if grant.owner is None and record.created >= grant.at - CLOCK_SKEW:
                grant.owner = record.owner
            return grant.owner == record.owner

    def granted_recently(self, pci: str) -> bool:
        with self._lock:
            grant = self._grants.get(pci)
            return grant is not None and time.time() - grant.at < self.grace

    def listed(self, pci: str) -> Optional[str]:
        """Where the last listing says ``pci`` is held (namespace/pod/container), or None."""
        resource = self.resource_of(pci)
        with self._lock:
            listing = self._listing
        if listing is None or resource is None or not listing.holds(resource, pci):
            return None
        return listing.where.get((resource, pci), "a pod")

    # -- the reclaim thread's pass ----------------------------------------------------
    def pass_(self, ctx: Ctx, records: Dict[str, Reservation]) -> None:
        """List PodResources (after the records were read), update the grants, and
        release what no pod holds any more."""
        listing = podresources.list_held(self.socket)
        now = time.monotonic()
        with self._lock:
            self._listing = listing
            ident = listing.socket_id if listing is not None else None
            if ident != self._socket_since[0]:
                self._socket_since = (ident, now)
                self._absent_since.clear()   # a new kubelet: start judging afresh
            steady = ident is not None and now - self._socket_since[1] >= self.grace
            self._update_grants(records, listing)
        if listing is None:
            return
        for pci in sorted(self._unheld(records, listing, now, steady)):
            self._release(ctx, records[pci])

    def _update_grants(self, records: Dict[str, Reservation],
                       listing: Optional[podresources.Listing]) -> None:
        """Under the lock: grants for VFs a pod is listed with (an agent restarted),
        and grants dropped once their VF came home or was never used."""
        if listing is not None:
            for pci, held in records.items():
                resource = self.resource_of(pci)
                if resource is not None and listing.holds(resource, pci) \
                        and pci not in self._grants:
                    self._grants[pci] = Grant(held.created, held.owner)
        for pci, grant in list(self._grants.items()):
            res = records.get(pci)
            if grant.owner is None and res is not None and res.created >= grant.at - CLOCK_SKEW:
                grant.owner = res.owner      # the first record since the Allocate: the pod's
            if grant.owner is not None and (res is None or res.owner != grant.owner):
                del self._grants[pci]        # the pod's VF came home; a new owner is not the pod
            elif grant.owner is None and res is None and listing is not None and \
                    not listing.holds(self.resource_of(pci) or "", pci) and \
                    time.time() - grant.at >= self.grace:
                del self._grants[pci]        # allocated, never used, and no pod holds it now

    def _unheld(self, records: Dict[str, Reservation], listing: podresources.Listing,
                now: float, steady: bool) -> Set[str]:
        """Pod VFs absent from every listing for the grace period (kubelet steady)."""
        out: Set[str] = set()
        with self._lock:
            for pci, res in records.items():
                grant = self._grants.get(pci)
                resource = self.resource_of(pci)
                if grant is None or grant.owner != res.owner or resource is None or \
                        listing.holds(resource, pci) or res.phase != ATTACHED or \
                        time.time() - grant.at < self.grace:
                    self._absent_since.pop(pci, None)
                    continue
                since = self._absent_since.setdefault(pci, now)
                if steady and now - since >= self.grace:
                    out.add(pci)
        return out

    def _release(self, ctx: Ctx, res: Reservation) -> None:
        from ..hook import release
        ctx.log.bind(res.owner)
        ctx.log.info(f"{res.bdf}: no pod holds it in kubelet's PodResources for "
                     f"{self.grace:g}s; releasing it from {res.owner}")
        try:
            release(ctx, res, reason="kubelet: no pod holds it")
        except HookError as err:
            ctx.log.error(f"release of {res.bdf} (kubelet's view) failed: {err}")
            self.on_failed(type(err).__name__)
            return
        with self._lock:
            self._grants.pop(res.bdf, None)
            self._absent_since.pop(res.bdf, None)
        self.on_released(res.bdf)
