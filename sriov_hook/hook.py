"""The stages: prestart/createRuntime (reserve + attach) and poststop (release).

Attach is the mode's composition of journal steps (journal.py); release is
that journal replayed backwards, here and nowhere else, so poststop, the
rollback of a failed prestart, gc and the reclaim of a stale record all
undo exactly what was done.

The VF's lock is held from the reservation through the attach (and through
a release), so a record that is not ``attached`` while its lock is free
was left by a hook that died: whoever needs the VF next rolls it back.
"""
from __future__ import annotations

import importlib
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import faults, modes, owners
from . import netns as nsmod
from .config import Pool
from .context import Ctx
from .errors import HookError, LockTimeout, PoolExhausted, ReservationError, StateError
from .inventory import Candidate
from .oci import Container, State
from .request import ANNOTATION, NetworkRequest, apply_policy, parse
from .reservations import ATTACHED, RELEASING, Reservation

_RETRY_SLEEP = 0.01
# journal step -> (module, undo function); imported on first use.
_UNDO: Dict[str, Tuple[str, str]] = {
    "vf_settings": ("pfside", "undo_settings"),
    "admin_mac": ("pfside", "undo_admin_mac"),
    "reprobe": ("pfside", "undo_reprobe"),
    "netdev": ("hostdev", "undo_netdev"),
    "pin": ("hostdev", "undo_pin"),
    "move": ("hostdev", "undo_move"),
    "driver_guard": ("binding", "undo_guard"),
    "bind": ("binding", "undo_bind"),
    "hugepages": ("modes.dpdk", "undo_hugepages"),
}
UndoFn = Callable[[Ctx, Reservation, Dict[str, Any]], None]


def _undo_fn(kind: str) -> UndoFn:
    module, name = _UNDO[kind]
    fn: UndoFn = getattr(importlib.import_module(f".{module}", __package__), name)
    return fn


# -- prestart ----------------------------------------------------------------------------
def prestart(ctx: Ctx, container: Container, value: Optional[str] = None) -> List[Reservation]:
    """``value`` overrides the annotation (CDI devices name their VF or pool on argv)."""
    if value is None:
        value = container.annotations.get(ANNOTATION)
    if value is None:
        ctx.log.info(f"no {ANNOTATION} annotation: nothing to do")
        return []
    reqs = apply_policy(ctx.cfg, parse(value), container)
    ctx.log.info(f"request: {[r.to_json() for r in reqs]}")
    shared = all(modes.get(ctx.cfg.pool(r.pool).mode).per_sandbox for r in reqs)
    owner = (container.sandbox_id or container.id) if shared else container.id
    held = ctx.store.by_owner(owner)
    named = {r.pci for r in reqs}
    if None not in named:
        # Each request names its VF: one of several CDI devices' hooks for one
        # container (assigned mode). The others' VFs are theirs to attach.
        held = [r for r in held if r.bdf in named]
    if held:
        if shared:
            return _join(ctx, held, container, reqs)
        if _already_attached(ctx, held, container, len(reqs)):
            return held
        _clear_earlier_attempt(ctx, held, container)
    netns_path, netns_fd = _open_container_netns(ctx, container, reqs)
    done: List[Reservation] = []
    try:
        for req in reqs:
            done.append(_reserve_and_attach(ctx, req, container, netns_path, netns_fd, owner))
    except BaseException as err:
        ctx.log.error(f"prestart failed: {err}; rolling back {len(done)} attached VF(s)")
        for res in reversed(done):
            _rollback(ctx, res)
        raise
    finally:
        if netns_fd is not None:
            os.close(netns_fd)
    return done


def _reserve_and_attach(ctx: Ctx, req: NetworkRequest, container: Container,
                        netns_path: Optional[str], netns_fd: Optional[int],
                        owner: str) -> Reservation:
    pool = ctx.cfg.pool(req.pool)
    mode = modes.get(pool.mode)
    res, lock_fd = reserve(ctx, pool, req, container, netns_path, netns_fd, owner)
    try:
        ctx.log.info(f"reserved {res.bdf} (PF {res.pf_ifname or res.pf_bdf} VF {res.vf_index}) "
                     f"from pool {pool.name} for {res.ifname}")
        try:
            mode.attach(ctx, res, req, netns_fd)
            res.phase = ATTACHED
            ctx.store.write(res)
            faults.point("attached")
        except BaseException as err:
            # Still under the VF's lock: nobody can see it half-attached.
            ctx.log.error(f"attach of {res.bdf} failed: {err}; undoing it")
            try:
                _release_locked(ctx, res, "rollback")
            except BaseException as again:  # noqa: BLE001 - the attach error is the one to report
                ctx.log.error(f"rollback of {res.bdf} failed: {again}; its record is kept "
                              f"for the next hook or gc")
            raise
    finally:
        ctx.store.unlock(lock_fd)
    ctx.log.info(f"attached {res.bdf} as {res.ifname} ({pool.mode} mode)")
    return res


def _rollback(ctx: Ctx, res: Reservation) -> None:
    """Release an attached VF after a later one failed; never raises."""
    try:
        release(ctx, res, reason="rollback")
    except BaseException as err:  # noqa: BLE001 - go on with the others, keep the first error
        ctx.log.error(f"rollback of {res.bdf} failed: {err}; its record is kept for gc")


def _already_attached(ctx: Ctx, held: List[Reservation], container: Container,
                      wanted: int) -> bool:
    """The same container asked again (a hook that died after its work but
    before its answer, retried): its VFs are in place; apply nothing twice."""
    same = len(held) == wanted and all(
        r.phase == ATTACHED and _same_container(r, container) for r in held)
    if same:
        ctx.log.info(f"{container.id} already holds {', '.join(r.bdf for r in held)}, "
                     f"attached by an earlier run: nothing to do")
    return same


def _same_container(res: Reservation, container: Container) -> bool:
    pid = container.state.pid
    if pid is not None:
        return res.pid == pid and res.pid_start == owners.start_time(pid)
    return res.netns_id is not None and _netns_id(container) == tuple(res.netns_id)


def _netns_id(container: Container) -> Optional[Tuple[int, int]]:
    try:
        return nsmod.identity(container.netns_path())
    except HookError:
        return None


def _clear_earlier_attempt(ctx: Ctx, held: List[Reservation], container: Container) -> None:
    """A container id used again after a failed create (podman and crun run
    no poststop then): what the earlier attempt left is released first,
    unless a live container still holds it."""
    for res in held:
        if res.phase == ATTACHED and owners.owner_alive(res) and \
                not _same_container(res, container):
            raise ReservationError(f"container {container.id} already holds VF {res.bdf} "
                                   f"and is still running")
        ctx.log.info(f"{res.bdf}: releasing what an earlier attempt of {container.id} left "
                     f"({res.phase})")
        release(ctx, res, reason="retry")


def _open_container_netns(ctx: Ctx, container: Container,
                          reqs: List[NetworkRequest]) -> Tuple[Optional[str], Optional[int]]:
    if not any(modes.get(ctx.cfg.pool(r.pool).mode).needs_netns for r in reqs):
        return None, None
    path = container.netns_path()
    fd = nsmod.open_netns(path)
    if nsmod.identity(fd) == nsmod.identity("/proc/self/ns/net"):
        os.close(fd)
        raise StateError(f"network namespace {path} is the host's own; refusing to move a VF there")
    return path, fd


def _join(ctx: Ctx, held: List[Reservation], container: Container,
          reqs: List[NetworkRequest]) -> List[Reservation]:
    """A later container of a sandbox: count a reference, hand out nothing new.

    Only a container in the sandbox's own netns asking for the same pools may
    join: the sandbox id comes from an annotation a runtime sets, but a user
    who can forge that runtime's marks must still not reach another pod's VF.
    """
    cid = container.id
    pools = sorted(r.pool for r in reqs)
    if pools != sorted(r.pool for r in held):
        raise ReservationError(f"sandbox {held[0].owner} holds VFs of pools "
                               f"{', '.join(sorted(r.pool for r in held))}; container {cid} "
                               f"asks for {', '.join(pools)}")
    here = _netns_id(container)
    if any(r.netns_id is None or tuple(r.netns_id) != here for r in held):
        raise ReservationError(f"container {cid} names sandbox {held[0].owner}, whose VFs "
                               f"are in another network namespace: refusing to share them")
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


# -- reservation --------------------------------------------------------------------------
def reserve(ctx: Ctx, pool: Pool, req: NetworkRequest, container: Container,
            netns_path: Optional[str], netns_fd: Optional[int],
            owner: Optional[str] = None) -> Tuple[Reservation, int]:
    """Pick the first free usable VF of ``pool``, write its record and return
    it with its lock held (the caller unlocks after the attach).

    VFs another hook holds right now are retried until the lock timeout. When
    none is free, stale records of the pool (owner gone, worker dead, earlier
    boot) are reclaimed first.
    """
    deadline = time.monotonic() + ctx.cfg.lock_timeout
    while True:
        busy, seen, skipped, taken = 0, 0, [], []
        for cand in ctx.inventory.candidates(pool):
            if req.pci is not None and cand.bdf != req.pci:
                continue
            seen += 1
            if ctx.store.is_reserved(cand.bdf):
                taken.append(cand.bdf)
                continue
            got = _try_take(ctx, pool, req, container, cand, netns_path, netns_fd,
                            owner or container.id)
            if isinstance(got, tuple):
                return got
            if got == "busy":
                busy += 1
            elif got:
                skipped.append(f"{cand.bdf}: {got}")
        # Nothing free: one stale record reclaimed is enough. A VF another hook
        # is attaching or releasing right now may be free in a moment: wait
        # for it (bounded) before calling the pool exhausted.
        freed = False
        for bdf in taken:
            outcome = reclaim_status(ctx, bdf, "needed by " + container.id)
            if outcome in ("free", "released"):
                freed = True
                break
            busy += outcome == "busy"
        if freed:
            continue
        if busy == 0:
            raise _exhausted(pool, req, seen, skipped)
        if time.monotonic() >= deadline:
            raise LockTimeout(f"pool {pool.name}: {busy} VF(s) stayed locked by other hooks "
                              f"for {ctx.cfg.lock_timeout:g}s")
        time.sleep(_RETRY_SLEEP)


def _try_take(ctx: Ctx, pool: Pool, req: NetworkRequest, container: Container,
              cand: Candidate, netns_path: Optional[str], netns_fd: Optional[int],
              owner: str) -> "Tuple[Reservation, int] | str":
    """(record, lock fd) if the VF is ours now; else "busy", a reason it is
    unusable, or "" if another hook reserved it first."""
    fd = ctx.store.try_lock(cand.bdf)
    if fd is None:
        return "busy"
    try:
        if ctx.store.is_reserved(cand.bdf):  # lost the race before our lock
            ctx.store.unlock(fd)
            return ""
        res = _new_record(ctx, pool, req, container, cand, netns_path, netns_fd, owner)
        why = modes.get(pool.mode).prepare(ctx, cand, res, req)
        if why is not None:
            ctx.log.info(f"skipping {cand.bdf}: {why}")
            ctx.store.unlock(fd)
            return why
        ctx.store.write(res)
        faults.point("record_written")
        return res, fd
    except BaseException:
        ctx.store.unlock(fd)
        raise


def _exhausted(pool: Pool, req: NetworkRequest, seen: int, skipped: List[str]) -> HookError:
    if req.pci is not None:
        if seen == 0:
            return PoolExhausted(f"VF {req.pci} is not in pool {pool.name}")
        if not skipped:
            return PoolExhausted(f"VF {req.pci} of pool {pool.name} is already reserved")
    detail = f"; unusable: {skipped[0]}" if skipped else ""
    return PoolExhausted(f"pool {pool.name} is exhausted: no free VF among {seen}{detail}")


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
        boot_id=owners.boot_id(), request=req.to_json(), created=time.time())


# -- staleness and reclaim ----------------------------------------------------------------
def stale_reason(res: Reservation) -> Optional[str]:
    """Why nobody holds ``res`` any more (its VF lock must be free), or None."""
    if res.boot_id != owners.boot_id():
        return "it is from an earlier boot"
    if res.phase != ATTACHED:
        return f"the hook {res.phase} it died"
    if not owners.owner_alive(res):
        return f"its owner {res.owner} is gone"
    return None


def reclaim_status(ctx: Ctx, bdf: str, why: str) -> str:
    """"released" (it was stale), "free" (no record), "held" (its owner
    lives), "busy" (a hook holds its lock: never waited for) or "failed"."""
    fd = ctx.store.try_lock(bdf)
    if fd is None:
        return "busy"
    try:
        res = ctx.store.read(bdf)
        if res is None:
            return "free"
        reason = stale_reason(res)
        if reason is None:
            return "held"
        ctx.log.info(f"reclaiming {bdf} from {res.owner} ({why}): {reason}")
        _release_locked(ctx, res, why)
        return "released"
    except HookError as err:
        ctx.log.error(f"cannot reclaim {bdf}: {err}")
        return "failed"
    finally:
        ctx.store.unlock(fd)


# -- release -------------------------------------------------------------------------------
def release(ctx: Ctx, res: Reservation, reason: str) -> bool:
    """Replay and delete one reservation under its VF lock; True when released.

    Failures are logged and raised; the record then keeps the steps that are
    still to undo, for the next poststop, prestart or gc.
    """
    with ctx.store.lock(res.bdf, ctx.cfg.lock_timeout):
        current = ctx.store.read(res.bdf)
        if current is None or current.owner != res.owner:
            ctx.log.info(f"{res.bdf} already released")
            return True
        faults.point("release_locked")
        try:
            _release_locked(ctx, current, reason)
        except HookError as err:
            ctx.log.error(f"release of {res.bdf} ({reason}) failed: {err}")
            raise
        return True


def _release_locked(ctx: Ctx, res: Reservation, reason: str) -> None:
    if res.boot_id != owners.boot_id():
        # Nothing it recorded survived the reboot (pins, moves, driver
        # bindings, PF settings, hugepage increments); undoing deltas now
        # would take from this boot's owners. Only the stale pin file goes.
        ctx.log.info(f"{res.bdf}: dropping the record of {res.owner} from an earlier boot")
        if res.pin:
            nsmod.unpin(res.pin)
    else:
        res.phase = RELEASING
        ctx.store.write(res)
        while res.steps:
            step = res.steps[-1]
            _undo_fn(step["kind"])(ctx, res, step)
            res.steps.pop()
            ctx.store.write(res)
            faults.point(f"undo:{step['kind']}")
    ctx.store.delete(res.bdf)
    faults.point("record_deleted")
    ctx.log.info(f"released {res.bdf} ({reason})")


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
    """Release every VF the container (or sandbox) holds. Idempotent; goes on
    past a VF that fails and reports the first failure."""
    held = ctx.store.by_owner(state.id)
    if not held:
        ctx.log.info("no reservation for this container: nothing to do")
        return 0
    errors: List[BaseException] = []
    for res in held:
        try:
            if state.id != res.owner and set(res.refs) - {state.id}:
                _leave(ctx, res, state.id)
                continue
            release(ctx, res, reason="poststop")
        except Exception as err:  # noqa: BLE001 - release the others first
            errors.append(err)
    if errors:
        first = errors[0]
        if len(errors) > 1 and isinstance(first, HookError):
            raise type(first)(f"{first} (and {len(errors) - 1} more)")
        raise first
    return len(held)
