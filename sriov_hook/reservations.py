"""Crash-safe VF reservations under ``state_dir``.

Layout (all 0700/0600, root only)::

    state_dir/reservations/<bdf>.json   one record per reserved VF
    state_dir/locks/<bdf>.lock          flock target, one per VF
    state_dir/netns/<bdf>               bind mount pinning the owner's netns

A record is written whole (temp file, then rename over the old one), so
a hook killed at any point leaves the old record or the new one, never half
of one. There is no fsync: a killed process leaves the page cache intact,
and what a power loss could tear is a record of an earlier boot, which
describes nothing that survived the reboot (gc drops it; hook.py ignores
such records). That saves ~1 ms per write, seven writes per prestart.

A Store keeps the versions it replaced (and the records it deleted) open
until it is closed, at the end of the command: freeing an inode goes through
RCU, and moving a netdev to another netns waits in rcu_barrier() for every
pending RCU callback, so a record replaced just before the move made the
move ~3.5 ms slower (bench/agent.py sees it; the replaced inodes are freed
when the hook is done instead).

A record holds a snapshot of the VF as it was (``orig_*``) and a journal
(``steps``): each change is appended *before* it is made, and release is
the journal replayed backwards (hook.py), so whatever point a hook dies
at, the next poststop, prestart or gc knows exactly what to undo.

Locks are per VF: held from the check-and-write of a record through the
attach, and through a release, never across VFs, so parallel hooks
overlap. A free lock on a record still ``attaching`` or ``releasing``
means its worker died (the kernel drops a flock with its holder).
"""
from __future__ import annotations

import contextlib
import errno as _errno
import fcntl
import json
import os
import time
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Iterator, List, Optional, Tuple

from . import faults
from .errors import LockTimeout, ReservationError

RECORD_VERSION = 2
ATTACHING, ATTACHED, RELEASING = "attaching", "attached", "releasing"


@dataclass
class Reservation:
    bdf: str
    pool: str
    mode: str
    owner: str                       # container id, or sandbox id for shared modes
    pf_bdf: str
    pf_ifname: Optional[str]
    vf_index: int
    ifname: str                      # the interface name asked for in the container
    host_ifname: Optional[str] = None  # the VF netdev's host name before we took it
    netns: Optional[str] = None      # netns path resolved at prestart
    netns_id: Optional[Tuple[int, int]] = None
    pin: Optional[str] = None
    pid: Optional[int] = None
    pid_start: Optional[float] = None
    orig_mac: Optional[str] = None
    orig_mtu: Optional[int] = None
    orig_up: Optional[bool] = None
    orig_vf: Optional[Dict[str, Any]] = None   # netlink.VfInfo as JSON; None: PF has no VF ops
    orig_driver: Optional[str] = None
    vfio_group: Optional[str] = None
    device_node: Optional[str] = None        # host node, e.g. /dev/vfio/42
    steps: List[Dict[str, Any]] = field(default_factory=list)  # the undo journal, oldest first
    phase: str = ATTACHING
    boot_id: str = ""                        # records of an earlier boot describe nothing real
    request: Dict[str, Any] = field(default_factory=dict)
    refs: List[str] = field(default_factory=list)  # container ids sharing a sandbox VF
    created: float = 0.0
    version: int = RECORD_VERSION

    def step(self, kind: str) -> Optional[Dict[str, Any]]:
        """The journal entry of ``kind`` (each kind appears at most once)."""
        for entry in self.steps:
            if entry["kind"] == kind:
                return entry
        return None

    def to_json(self) -> Dict[str, Any]:
        # Shallow: every field is JSON already (asdict's deep copy cost ~0.2 ms a write).
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "Reservation":
        if data.get("version") != RECORD_VERSION:
            raise ValueError(f"record version {data.get('version')!r} is not "
                             f"{RECORD_VERSION} (written by another sriov-hook version)")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in known}
        if kw.get("netns_id") is not None:
            kw["netns_id"] = tuple(kw["netns_id"])
        return cls(**kw)


_FIELDS = tuple(f.name for f in fields(Reservation))
MAX_HELD = 16   # replaced versions kept open at most (long gc runs write many)


class Store:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.rec_dir = os.path.join(state_dir, "reservations")
        self.lock_dir = os.path.join(state_dir, "locks")
        self.pin_dir = os.path.join(state_dir, "netns")
        self._ready = False
        self._held: List[int] = []   # replaced or deleted record files, freed at close()

    def close(self) -> None:
        """Let go of the replaced record versions (the module docstring says why)."""
        while self._held:
            os.close(self._held.pop())

    def _hold(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return   # nothing to replace (or not ours to hold): nothing to defer
        self._held.append(fd)
        if len(self._held) > MAX_HELD:
            os.close(self._held.pop(0))

    def ensure(self) -> None:
        """Create the layout, root-only. Cheap when it already exists."""
        if self._ready:
            return
        for d in (self.state_dir, self.rec_dir, self.lock_dir, self.pin_dir):
            try:
                os.makedirs(d, mode=0o700, exist_ok=True)
                st = os.stat(d)
                if st.st_mode & 0o077:
                    os.chmod(d, 0o700)  # never let other users read or plant state
            except OSError as err:
                raise ReservationError(f"cannot prepare state dir {d}: {err.strerror}") from None
        self._ready = True

    def record_path(self, bdf: str) -> str:
        return os.path.join(self.rec_dir, f"{bdf}.json")

    def pin_path(self, bdf: str) -> str:
        return os.path.join(self.pin_dir, bdf)

    # -- locks -------------------------------------------------------------------
    def _open_lock(self, bdf: str) -> int:
        self.ensure()
        path = os.path.join(self.lock_dir, f"{bdf}.lock")
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise ReservationError(f"cannot open lock {path}: {err.strerror}") from None

    def try_lock(self, bdf: str) -> Optional[int]:
        """Non-blocking: an fd holding the VF's lock, or None if someone else has it."""
        fd = self._open_lock(bdf)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (_errno.EWOULDBLOCK, _errno.EAGAIN):
                return None
            raise ReservationError(f"cannot lock VF {bdf}: {err.strerror}") from None
        return fd

    @contextlib.contextmanager
    def lock(self, bdf: str, timeout: float) -> Iterator[None]:
        """Hold the VF's lock; wait at most ``timeout`` seconds for it."""
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            fd = self.try_lock(bdf)
            if fd is not None:
                break
            if time.monotonic() >= deadline:
                raise LockTimeout(f"timed out after {timeout:g}s waiting for the lock of VF {bdf}")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        try:
            yield
        finally:
            os.close(fd)  # closing drops the flock

    @staticmethod
    def unlock(fd: int) -> None:
        os.close(fd)

    # -- records -------------------------------------------------------------------
    def is_reserved(self, bdf: str) -> bool:
        return os.path.exists(self.record_path(bdf))

    def read(self, bdf: str) -> Optional[Reservation]:
        path = self.record_path(bdf)
        try:
            with open(path, "rb") as fh:
                data = json.loads(fh.read())
            return Reservation.from_json(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as err:
            raise ReservationError(f"reservation record {path} is unreadable: {err}") from None

    def write(self, res: Reservation) -> None:
        self.ensure()
        path = self.record_path(res.bdf)
        tmp = os.path.join(self.rec_dir, f".{res.bdf}.{os.getpid()}.tmp")
        data = json.dumps(res.to_json(), sort_keys=True).encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            faults.point("record_tmp_written")
            self._hold(path)
            os.rename(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise ReservationError(f"cannot write reservation {path}: {err.strerror}") from None

    def delete(self, bdf: str) -> None:
        self._hold(self.record_path(bdf))
        try:
            os.unlink(self.record_path(bdf))
        except FileNotFoundError:
            return
        except OSError as err:
            raise ReservationError(f"cannot delete reservation of {bdf}: {err.strerror}") from None

    def bdfs(self) -> List[str]:
        try:
            names = os.listdir(self.rec_dir)
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".json") and not n.startswith("."))

    def all(self) -> Iterator[Tuple[str, Optional[Reservation], Optional[str]]]:
        """(bdf, record or None, error or None) for every record file."""
        for bdf in self.bdfs():
            try:
                res = self.read(bdf)
            except ReservationError as err:
                yield bdf, None, str(err)
                continue
            if res is not None:
                yield bdf, res, None

    def by_owner(self, owner: str) -> List[Reservation]:
        """Records owned by ``owner`` or listing it among their refs."""
        return [r for _, r, _ in self.all()
                if r is not None and (r.owner == owner or owner in r.refs)]
