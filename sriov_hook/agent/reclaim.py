"""Continuous reclaim: release a VF as soon as its container is gone.

podman and crun skip poststop after a failed create, and a killed runtime
skips it too; without the agent such a VF waits for ``sriov-hook gc``. Here
each record's owner is watched: a pidfd per owner pid (readable the moment
the process exits), and a scan every ``interval`` seconds that notices new
records (whoever wrote them: the agent or an in-process hook) and checks the
owners that have no pid. Whether an owner is alive is owners.owner_alive(),
today's rule; the release is hook.reclaim_status(), exactly what gc does (the
record's journal replayed by the code poststop uses).
A failed release is retried with a growing delay, never in a tight loop.

An owner must stay gone for GRACE seconds first: a runtime runs poststop
right after the container exits (runc at ``delete``, podman at cleanup), and
that poststop should do the release, not race with it.
"""
from __future__ import annotations

import os
import select
import threading
import time
from typing import Callable, Dict, List, Optional, Set, Tuple

from .. import owners
from ..config import Config
from ..context import Ctx
from ..log import StepLog
from ..reservations import Reservation

OwnerKey = Tuple[str, str, int, Optional[float]]   # bdf, owner, pid, pid start
RETRY_MIN, RETRY_MAX = 1.0, 60.0
GRACE = 2.0   # + at most one pass interval: released within 5 s of the owner's death


class Reclaimer(threading.Thread):
    def __init__(self, config: Callable[[], Optional[Config]],
                 on_reclaimed: Callable[[str], None], on_failed: Callable[[str], None],
                 busy: Callable[[str], bool], interval: float = 1.0) -> None:
        """``busy(owner)``: a poststop for this owner is under way in the agent."""
        super().__init__(name="reclaim", daemon=True)
        self._config = config
        self._busy = busy
        self._on_reclaimed = on_reclaimed
        self._on_failed = on_failed
        self.interval = interval
        # More passes over the same records, e.g. the device plugin's reclaim from
        # kubelet's view (k8s/holdings.py): called after the owner checks.
        self.also: List[Callable[[Ctx, Dict[str, Reservation]], None]] = []
        self._stop_event = threading.Event()
        self._poller = select.poll()
        self._watches: Dict[int, OwnerKey] = {}     # pidfd -> the owner it watches
        self._gone: Set[OwnerKey] = set()           # owners seen dead: checked every pass
        self._retry: Dict[str, Tuple[float, float]] = {}   # bdf -> (next try, delay)
        self._dead_since: Dict[Tuple[str, str], float] = {}  # (bdf, owner) -> first seen gone

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                cfg = self._config()
                if cfg is None:
                    self._stop_event.wait(self.interval)
                    continue
                try:
                    self._pass(cfg)
                except Exception:  # noqa: BLE001 - a bug must not end reclaiming for good
                    import traceback
                    StepLog(cfg.log_file, cfg.log_level, stage="reclaim").error(
                        "internal error: " + traceback.format_exc().replace("\n", " | "))
                    self._on_failed("internal")
                    self._stop_event.wait(self.interval)
        finally:
            for fd in list(self._watches):
                self._unwatch(fd)

    def _pass(self, cfg: Config) -> None:
        """Check the owners known to be gone, then wait on the live ones' pidfds."""
        log = StepLog(cfg.log_file, cfg.log_level, stage="reclaim")
        ctx = Ctx(cfg, log)
        try:
            records = {bdf: res for bdf, res, _ in ctx.store.all() if res is not None}
            for bdf in sorted(self._sync(records)):
                self._reclaim(ctx, records[bdf])
            for extra in self.also:
                extra(ctx, records)
            for fd, _ in self._poller.poll(self.interval * 1000):
                key = self._watches.get(fd)
                if key is not None:
                    self._unwatch(fd)      # an exited process stays readable: stop polling it
                    self._gone.add(key)
                    self._reclaim(ctx, records[key[0]])
        finally:
            ctx.close()
            log.close()

    def _sync(self, records: Dict[str, Reservation]) -> Set[str]:
        """Watch every owner pid; return the records whose owner may be gone."""
        keys: Dict[str, OwnerKey] = {bdf: (bdf, res.owner, res.pid, res.pid_start)
                                     for bdf, res in records.items() if res.pid is not None}
        live_keys = set(keys.values())
        for fd, key in list(self._watches.items()):
            if key not in live_keys:
                self._unwatch(fd)
        self._gone &= live_keys
        self._dead_since = {k: v for k, v in self._dead_since.items() if k[0] in records}
        watched = set(self._watches.values())
        # No pid to watch: owner_alive() looks for a process in the netns, each pass.
        suspects = {bdf for bdf, res in records.items() if res.pid is None}
        for bdf, key in keys.items():
            if key in self._gone:
                suspects.add(bdf)
            elif key not in watched:
                pidfd = self._pidfd(key)
                if pidfd is None:   # gone already, or the pid now names another process
                    self._gone.add(key)
                    suspects.add(bdf)
                else:
                    self._watches[pidfd] = key
                    self._poller.register(pidfd, select.POLLIN)
        return suspects

    def _unwatch(self, fd: int) -> None:
        self._poller.unregister(fd)
        os.close(fd)
        del self._watches[fd]

    @staticmethod
    def _pidfd(key: OwnerKey) -> Optional[int]:
        _, _, pid, started = key
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return None
        # The pidfd pins this process; check it is the one the record names
        # (pids are reused) and not already a zombie.
        if not owners.pid_alive(pid, started):
            os.close(fd)
            return None
        return fd

    def _reclaim(self, ctx: Ctx, res: Reservation) -> None:
        now = time.monotonic()
        next_try, delay = self._retry.get(res.bdf, (0.0, RETRY_MIN / 2))
        if now < next_try or self._busy(res.owner):
            return
        if owners.owner_alive(res):
            self._dead_since.pop((res.bdf, res.owner), None)
            return
        since = self._dead_since.setdefault((res.bdf, res.owner), now)
        if now - since < GRACE:
            return   # the runtime's own poststop may be on its way
        from ..hook import reclaim_status
        ctx.log.bind(res.owner)
        # Under the VF lock, never waiting for it; it checks staleness again
        # (the record may have changed hands) and releases as gc does.
        ctx.log.debug(f"{res.bdf}: owner {res.owner} gone {now - since:.1f}s, no poststop")
        outcome = reclaim_status(ctx, res.bdf, "reclaim")
        if outcome == "failed":
            delay = min(delay * 2, RETRY_MAX)
            self._retry[res.bdf] = (now + delay, delay)
            ctx.log.error(f"reclaim of {res.bdf} failed; next try in {delay:g}s")
            self._on_failed("ReclaimFailed")
            return
        if outcome == "busy":
            return   # a hook is working on this VF right now: look again next pass
        self._retry.pop(res.bdf, None)
        self._dead_since.pop((res.bdf, res.owner), None)
        if outcome == "released":
            self._on_reclaimed(res.bdf)
