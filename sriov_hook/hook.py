"""The stages: prestart/createRuntime (reserve + attach) and poststop (detach + release)."""
from __future__ import annotations

import os
import time
from typing import List, Optional

from . import faults, modes, owners
from . import netns as nsmod
from .config import Pool
from .context import Ctx
from .errors import HookError, LockTimeout, PoolExhausted, ReservationError, StateError
from .inventory import Candidate
from .oci import Container, State
from .request import ANNOTATION, NetworkRequest, apply_policy, parse
from .reservations import Reservation

_RETRY_SLEEP = 0.01


def prestart(ctx: Ctx, container: Container, value: Optional[str] = None) -> List[Reservation]:
    """``value`` overrides the annotation (CDI devices name their VF or pool on argv)."""
    if value is None:
        value = container.annotations.get(ANNOTATION)
    if value is None:
        ctx.log.info(f"no {ANNOTATION} annotation: nothing to do")
        return []
    reqs = apply_policy(ctx.cfg, parse(value))
    ctx.log.info(f"request: {[r.to_json() for r in reqs]}")
    shared = all(modes.get(ctx.cfg.pool(r.pool).mode).per_sandbox for r in reqs)
    owner = (container.sandbox_id or container.id) if shared else container.id
    held = ctx.store.by_owner(owner)
    if held:
        if shared:
            return _join(ctx, held, container.id)
        raise ReservationError(f"container {container.id} already holds VF "
                               f"{held[0].bdf}; run poststop for it first")
    netns_path, netns_fd = _open_container_netns(ctx, container, reqs)
    done: List[Reservation] = []
    try:
        for req in reqs:
            pool = ctx.cfg.pool(req.pool)
            mode = modes.get(pool.mode)
            res = reserve(ctx, pool, req, container, netns_path, netns_fd, owner)
            done.append(res)
            ctx.log.info(f"reserved {res.bdf} (PF {res.pf_ifname or res.pf_bdf} VF {res.vf_index}) "
                         f"from pool {pool.name} for {res.ifname}")
            mode.attach(ctx, res, req, netns_fd)
            faults.point("attached")
            ctx.log.info(f"attached {res.bdf} as {res.ifname} ({pool.mode} mode)")
    except BaseException as err:
        ctx.log.error(f"prestart failed: {err}; rolling back {len(done)} VF(s)")
        for res in reversed(done):
            release(ctx, res, reason="rollback")
        raise
    finally:
        if netns_fd is not None:
            os.close(netns_fd)
    return done


def _open_container_netns(ctx: Ctx, container: Container,
                          reqs: List[NetworkRequest]) -> "tuple[Optional[str], Optional[int]]":
    if not any(modes.get(ctx.cfg.pool(r.pool).mode).needs_netns for r in reqs):
        return None, None
    path = container.netns_path()
    fd = nsmod.open_netns(path)
    if nsmod.identity(fd) == nsmod.identity("/proc/self/ns/net"):
        os.close(fd)
        raise StateError(f"network namespace {path} is the host's own; refusing to move a VF there")
    return path, fd


def _join(ctx: Ctx, held: List[Reservation], cid: str) -> List[Reservation]:
    """A later container of a sandbox: count a reference, hand out nothing new."""
    out = []
    for res in held:
        with ctx.store.lock(res.bdf, ctx.cfg.lock_timeout):
            current = ctx.store.read(res.bdf)
            if current is None:
                raise ReservationError(f"sandbox VF {res.bdf} was released meanwhile")
            if cid not in current.refs:
                current.refs.append(cid)
                ctx.store.write(current)
            out.append(current)
        ctx.log.info(f"{cid} joins sandbox {res.owner} on {res.bdf} (refs {len(current.refs)})")
    return out


def reserve(ctx: Ctx, pool: Pool, req: NetworkRequest, container: Container,
            netns_path: Optional[str], netns_fd: Optional[int],
            owner: Optional[str] = None) -> Reservation:
    """Pick the first free usable VF of ``pool`` and write its record.

    The per-VF lock is held only for check-record-write; VFs another hook
    holds right now are skipped and retried until the lock timeout.
    """
    mode = modes.get(pool.mode)
    deadline = time.monotonic() + ctx.cfg.lock_timeout
    while True:
        busy, seen, skipped = 0, 0, []
        for cand in ctx.inventory.candidates(pool):
            if req.pci is not None and cand.bdf != req.pci:
                continue
            seen += 1
            if ctx.store.is_reserved(cand.bdf):
                continue
            fd = ctx.store.try_lock(cand.bdf)
            if fd is None:
                busy += 1
                continue
            try:
                if ctx.store.is_reserved(cand.bdf):  # lost the race before our lock
                    continue
                res = _new_record(ctx, pool, req, container, cand, netns_path, netns_fd,
                                  owner or container.id)
                why = mode.prepare(ctx, cand, res, req)
                if why is not None:
                    skipped.append(f"{cand.bdf}: {why}")
                    ctx.log.info(f"skipping {cand.bdf}: {why}")
                    continue
                ctx.store.write(res)
                faults.point("record_written")
                return res
            finally:
                ctx.store.unlock(fd)
        if busy == 0:
            if req.pci is not None:
                if seen == 0:
                    raise PoolExhausted(f"VF {req.pci} is not in pool {pool.name}")
                if not skipped:
                    raise PoolExhausted(f"VF {req.pci} of pool {pool.name} is already reserved")
            detail = f"; unusable: {skipped[0]}" if skipped else ""
            raise PoolExhausted(f"pool {pool.name} is exhausted: no free VF among {seen}{detail}")
        if time.monotonic() >= deadline:
            raise LockTimeout(f"pool {pool.name}: {busy} VF(s) stayed locked by other hooks "
                              f"for {ctx.cfg.lock_timeout:g}s")
        time.sleep(_RETRY_SLEEP)


def _new_record(ctx: Ctx, pool: Pool, req: NetworkRequest, container: Container,
                cand: Candidate, netns_path: Optional[str],
                netns_fd: Optional[int], owner: str) -> Reservation:
    pid = container.state.pid
    return Reservation(
        bdf=cand.bdf, pool=pool.name, mode=pool.mode, owner=owner, refs=[container.id],
        pf_bdf=cand.pf_bdf, pf_ifname=cand.pf_ifname, vf_index=cand.index,
        ifname=req.interface, netns=netns_path,
        netns_id=nsmod.identity(netns_fd) if netns_fd is not None else None,
        pin=ctx.store.pin_path(cand.bdf) if netns_path else None,
        pid=pid, pid_start=owners.start_time(pid) if pid else None,
        request=req.to_json(), created=time.time())


def release(ctx: Ctx, res: Reservation, reason: str) -> bool:
    """Detach and delete one reservation under its VF lock; True when released.

    Failures are logged; they are re-raised for poststop and gc, but not for
    a rollback, which must never mask the error that caused it.
    """
    try:
        with ctx.store.lock(res.bdf, ctx.cfg.lock_timeout):
            current = ctx.store.read(res.bdf)
            if current is None or current.owner != res.owner:
                ctx.log.info(f"{res.bdf} already released")
                return True
            faults.point("release_locked")
            modes.get(current.mode).detach(ctx, current)
            ctx.store.delete(res.bdf)
            faults.point("record_deleted")
            ctx.log.info(f"released {res.bdf} ({reason})")
            return True
    except HookError as err:
        ctx.log.error(f"release of {res.bdf} ({reason}) failed: {err}")
        if reason == "rollback":
            return False
        raise


def _leave(ctx: Ctx, res: Reservation, cid: str) -> None:
    """One container of a sandbox stops; the VF stays while others hold it."""
    with ctx.store.lock(res.bdf, ctx.cfg.lock_timeout):
        current = ctx.store.read(res.bdf)
        if current is not None and cid in current.refs:
            current.refs.remove(cid)
            ctx.store.write(current)
            ctx.log.info(f"{cid} leaves sandbox {res.owner} on {res.bdf} "
                         f"({len(current.refs)} refs left)")


def poststop(ctx: Ctx, state: State) -> int:
    """Release every VF the container (or sandbox) holds. Idempotent."""
    held = ctx.store.by_owner(state.id)
    if not held:
        ctx.log.info("no reservation for this container: nothing to do")
        return 0
    errors: List[HookError] = []
    for res in held:
        try:
            if state.id != res.owner and set(res.refs) - {state.id}:
                _leave(ctx, res, state.id)
                continue
            release(ctx, res, reason="poststop")
        except HookError as err:
            errors.append(err)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise type(errors[0])(f"{errors[0]}{more}")
    return len(held)
