"""Hugepage accounting through sysfs, per NUMA node.

Reads and writes ``devices/system/node/nodeN/hugepages/hugepages-<kB>kB/
nr_hugepages``, falling back to ``kernel/mm/hugepages`` where the kernel
has no node directories. Reservations are increments: pages other users
reserved are never taken away, and nothing is ever "cleared" the way
``dpdk-hugepages.py --clear`` does. A reservation the kernel cannot fully
satisfy is undone and reported, leaving the count where it was.

``nr_hugepages`` is one number that many writers read, change and write
back, so every such read-modify-write goes through ``Accounting``: under one
flock (``<state_dir>/hugepages.lock``, taken by the hook's dpdk mode and by
``sriov-dpdk hugepages reserve|release`` alike), with a ledger
(``<state_dir>/hugepages.json``) that names each dpdk reservation's claim,
what it added, and the kernel write in flight (its count before and after),
written before that write and settled after it. Whoever takes the lock next
settles a write its writer died in, from the count the kernel shows, so a
replay never adds or removes the same pages twice.
"""
from __future__ import annotations

import contextlib
import errno as _errno
import fcntl
import json
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from sriov_hook import faults
from sriov_hook.errors import HookError
from sriov_hook.owners import boot_id
from sriov_hook.sysfs import Sysfs

_SIZE = re.compile(r"^(\d+)\s*([kKmMgG]?)[bB]?$")
_UNITS = {"": 1, "k": 1, "m": 1024, "g": 1024 * 1024}   # in kB


class HugepageError(HookError):
    pass


def parse_size_kb(text: str) -> int:
    """'2M' -> 2048, '1G' -> 1048576, '512' (bytes would be silly: kB) -> 512."""
    m = _SIZE.match(str(text).strip())
    if not m or int(m.group(1)) == 0:
        raise HugepageError(f"malformed size {text!r} (want e.g. 512M, 1G, 2048K)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def fmt_kb(kb: int) -> str:
    for unit, mult in (("G", 1024 * 1024), ("M", 1024)):
        if kb % mult == 0:
            return f"{kb // mult}{unit}"
    return f"{kb}K"


@dataclass(frozen=True)
class PagePool:
    node: Optional[int]      # None: the system-wide (no NUMA) counters
    size_kb: int
    total: int
    free: int


class Hugepages:
    def __init__(self, sysfs_root: str = "/sys") -> None:
        self.fs = Sysfs(sysfs_root)
        self.root = self.fs.root

    def _global_dir(self) -> str:
        return os.path.join(self.root, "kernel/mm/hugepages")

    def sizes(self) -> List[int]:
        names = self.fs.listdir(self._global_dir())
        return sorted(int(n[len("hugepages-"):-2]) for n in names
                      if n.startswith("hugepages-") and n.endswith("kB"))

    def nodes(self) -> List[int]:
        base = os.path.join(self.root, "devices/system/node")
        return sorted(int(n[4:]) for n in self.fs.listdir(base)
                      if re.fullmatch(r"node\d+", n)
                      and os.path.isdir(os.path.join(base, n, "hugepages")))

    def default_size(self) -> int:
        sizes = self.sizes()
        if not sizes:
            raise HugepageError(f"no hugepage sizes under {self._global_dir()}")
        return 2048 if 2048 in sizes else sizes[0]

    def _dir(self, size_kb: int, node: Optional[int]) -> str:
        if size_kb not in self.sizes():
            offered = ", ".join(fmt_kb(s) for s in self.sizes()) or "none"
            raise HugepageError(f"hugepage size {fmt_kb(size_kb)} is not offered by the kernel "
                                f"(offered: {offered})")
        if node is None or not self.nodes():
            if node not in (None, 0):
                raise HugepageError(f"NUMA node {node} does not exist (no node directories)")
            return os.path.join(self._global_dir(), f"hugepages-{size_kb}kB")
        if node not in self.nodes():
            raise HugepageError(f"NUMA node {node} does not exist")
        return os.path.join(self.root, f"devices/system/node/node{node}/hugepages",
                            f"hugepages-{size_kb}kB")

    def pool(self, size_kb: int, node: Optional[int]) -> PagePool:
        d = self._dir(size_kb, node)
        return PagePool(node if self.nodes() else None, size_kb,
                        int(self.fs.read(os.path.join(d, "nr_hugepages"))),
                        int(self.fs.read(os.path.join(d, "free_hugepages"))))

    def show(self) -> List[PagePool]:
        nodes: List[Optional[int]] = list(self.nodes()) or [None]
        return [self.pool(s, n) for n in nodes for s in self.sizes()]

    def set_total(self, size_kb: int, node: Optional[int], count: int) -> int:
        """Write the pool's page count; return what the kernel made of it.
        Callers that change a count someone else may change too hold
        Accounting's lock."""
        path = os.path.join(self._dir(size_kb, node), "nr_hugepages")
        self.fs.write(path, str(count))
        return int(self.fs.read(path))

    def add(self, pages: int, size_kb: int, node: Optional[int]) -> int:
        """Reserve ``pages`` more pages; all or nothing. Returns the new total."""
        if pages <= 0:
            return self.pool(size_kb, node).total
        before = self.pool(size_kb, node).total
        want = before + pages
        got = self.set_total(size_kb, node, want)
        if got < want:
            self.set_total(size_kb, node, before)   # leave the count where it was
            where = f"node {node}" if node is not None else "the system"
            raise HugepageError(f"the kernel gave {got - before} of {pages} {fmt_kb(size_kb)} "
                                f"pages on {where} (memory too fragmented or too small); "
                                f"count left at {before}")
        return got

    def remove(self, pages: int, size_kb: int, node: Optional[int]) -> int:
        """Give back up to ``pages`` pages this caller added earlier."""
        cur = self.pool(size_kb, node)
        # Never go below what others still use: only free pages can go.
        take = min(pages, cur.free, cur.total)
        return self.set_total(size_kb, node, cur.total - take) if take else cur.total

    def ensure_free(self, pages: int, size_kb: int, node: Optional[int]) -> int:
        """Make ``pages`` free pages available; return how many were added."""
        cur = self.pool(size_kb, node)
        missing = max(0, pages - cur.free)
        if missing:
            self.add(missing, size_kb, node)
        return missing


LEDGER_VERSION = 1
LOCK_FILE, LEDGER_FILE = "hugepages.lock", "hugepages.json"


@dataclass
class Claim:
    """One dpdk reservation's hold on a page pool."""

    size_kb: int
    node: Optional[int]
    pages: int               # pages the reservation wants free for its container
    added: int = 0           # pages it added to the kernel's count, not yet given back
    # A write to nr_hugepages in flight: the count before it and the count
    # asked for. Written before the write, cleared after it.
    pending: Optional[Dict[str, int]] = None

    @property
    def pool_key(self) -> Tuple[int, Optional[int]]:
        return self.size_kb, self.node


@dataclass
class Ledger:
    boot_id: str
    claims: Dict[str, Claim] = field(default_factory=dict)

    def claimed(self, size_kb: int, node: Optional[int], but: str = "") -> int:
        """Pages the live claims on one pool want (but ``but``'s)."""
        return sum(c.pages for k, c in self.claims.items()
                   if c.pool_key == (size_kb, node) and k != but)


class Accounting:
    """Locked, crash-safe changes of hugepage counts (see the module doc)."""

    def __init__(self, hp: Hugepages, state_dir: str, timeout: float = 10.0) -> None:
        self.hp = hp
        self.state_dir = state_dir
        self.timeout = timeout

    # -- the lock and the ledger ---------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[Ledger]:
        """Hold the lock (waiting at most ``timeout``), with the ledger settled."""
        fd = self._lock()
        try:
            ledger = self._load()
            if self._settle(ledger):
                self._save(ledger)
            yield ledger
        finally:
            os.close(fd)   # drops the flock

    def _lock(self) -> int:
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(self.state_dir, LOCK_FILE),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as err:
            raise HugepageError(f"cannot open the hugepage lock in {self.state_dir}: "
                                f"{err.strerror}") from None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except OSError as err:
                if err.errno not in (_errno.EWOULDBLOCK, _errno.EAGAIN) \
                        or time.monotonic() >= deadline:
                    os.close(fd)
                    raise HugepageError(f"hugepage accounting stayed locked for "
                                        f"{self.timeout:g}s ({self.state_dir}/{LOCK_FILE})") \
                        from None
            time.sleep(0.005)

    def _path(self) -> str:
        return os.path.join(self.state_dir, LEDGER_FILE)

    def _load(self) -> Ledger:
        try:
            with open(self._path(), "rb") as fh:
                data: Any = json.loads(fh.read())
            if data.get("version") != LEDGER_VERSION:
                raise ValueError(f"version {data.get('version')!r} is not {LEDGER_VERSION}")
            ledger = Ledger(data["boot_id"], {k: Claim(**v) for k, v in data["claims"].items()})
        except FileNotFoundError:
            return Ledger(boot_id())
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            raise HugepageError(f"hugepage ledger {self._path()} is unreadable ({err}); "
                                f"move it away once no dpdk container runs") from None
        # Counts a reboot reset mean nothing: an earlier boot's claims go.
        return ledger if ledger.boot_id == boot_id() else Ledger(boot_id())

    def _save(self, ledger: Ledger) -> None:
        data = {"version": LEDGER_VERSION, "boot_id": ledger.boot_id,
                "claims": {k: asdict(c) for k, c in ledger.claims.items()}}
        tmp = f"{self._path()}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, json.dumps(data, sort_keys=True).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self._path())
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise HugepageError(f"cannot write {self._path()}: {err.strerror}") from None

    def _settle(self, ledger: Ledger) -> bool:
        """Finish the books on a write whose writer died (at most one: writers
        hold the lock). The count the kernel shows says how far it got; one
        another program changed meanwhile counts as "added nothing" or
        "removed all": pages may stay allocated, none is taken twice."""
        changed = False
        for claim in ledger.claims.values():
            if claim.pending is None:
                continue
            before, asked = claim.pending["from"], claim.pending["to"]
            now = self.hp.pool(claim.size_kb, claim.node).total
            inside = min(before, asked) <= now <= max(before, asked)
            if asked >= before:
                claim.added += (now - before) if inside else 0
            else:
                claim.added -= (before - now) if inside else (before - asked)
            claim.added = max(claim.added, 0)
            claim.pending = None
            changed = True
        return changed

    def _write(self, ledger: Ledger, claim: Claim, count: int, point: str) -> int:
        """Set the pool's count to ``count``, the ledger saying so before and after."""
        claim.pending = {"from": self.hp.pool(claim.size_kb, claim.node).total, "to": count}
        self._save(ledger)
        got = self.hp.set_total(claim.size_kb, claim.node, count)
        faults.point(point)
        self._settle(ledger)
        self._save(ledger)
        return got

    # -- the hook's claims -----------------------------------------------------------------
    def claim(self, key: str, pages: int, size_kb: int, node: Optional[int]) -> int:
        """Make ``pages`` free pages available to the reservation ``key``,
        adding only the shortfall; return the pages added. Pages other live
        claims want count as taken, used or not. All or nothing."""
        with self.locked() as ledger:
            if key in ledger.claims:   # claimed already: a replay
                return ledger.claims[key].added
            cur = self.hp.pool(size_kb, node)
            spare = max(0, cur.free - ledger.claimed(size_kb, node))
            missing = max(0, pages - spare)
            claim = Claim(size_kb, node, pages)
            ledger.claims[key] = claim
            if missing:
                got = self._write(ledger, claim, cur.total + missing, "hugepages:claim_written")
                if got < cur.total + missing:
                    self._write(ledger, claim, cur.total, "hugepages:claim_undone")
                    del ledger.claims[key]
                    self._save(ledger)
                    where = f"node {node}" if node is not None else "the system"
                    raise HugepageError(
                        f"the kernel gave {got - cur.total} of {missing} {fmt_kb(size_kb)} "
                        f"pages on {where} (memory too fragmented or too small); "
                        f"count left at {cur.total}")
            else:
                self._save(ledger)
            return claim.added

    def release(self, key: str) -> Optional[int]:
        """Give back the pages claim ``key`` added, those that are free; None
        when there is no such claim (given back already: a replay)."""
        with self.locked() as ledger:
            claim = ledger.claims.get(key)
            if claim is None:
                return None
            cur = self.hp.pool(claim.size_kb, claim.node)
            take = min(claim.added, cur.free)
            if take:
                self._write(ledger, claim, cur.total - take, "hugepages:release_written")
            del ledger.claims[key]
            self._save(ledger)
            return take

    def claims(self) -> Dict[str, Claim]:
        """Every live claim, by name (for check and gc: a claim whose
        reservation record is gone is an orphan; release() it)."""
        with self.locked() as ledger:
            return dict(ledger.claims)

    # -- an operator's pages (sriov-dpdk hugepages reserve|release) -------------------------
    def reserve(self, pages: int, size_kb: int, node: Optional[int]) -> int:
        """Add ``pages`` for whoever asks (no claim); return the new total."""
        with self.locked():
            return self.hp.add(pages, size_kb, node)

    def give_back(self, pages: int, size_kb: int, node: Optional[int]) -> Tuple[int, int]:
        """Remove up to ``pages`` free pages, never below what dpdk
        reservations want free; return (pages removed, new total)."""
        with self.locked() as ledger:
            cur = self.hp.pool(size_kb, node)
            take = min(pages, max(0, cur.free - ledger.claimed(size_kb, node)))
            total = self.hp.set_total(size_kb, node, cur.total - take) if take else cur.total
            return take, total

    def remove_unclaimed(self, pages: int, size_kb: int, node: Optional[int]) -> int:
        """For a record written before claims existed: its count, under the lock."""
        with self.locked():
            return self.hp.remove(pages, size_kb, node)


def mount_hugetlbfs(directory: str, size_kb: int) -> None:
    os.makedirs(directory, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "hugetlbfs", "-o", f"pagesize={fmt_kb(size_kb)}",
                           "nodev", directory], capture_output=True, text=True)
    if proc.returncode != 0:
        raise HugepageError(f"cannot mount hugetlbfs on {directory}: {proc.stderr.strip()}")
