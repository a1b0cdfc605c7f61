"""Hugepage accounting through sysfs, per NUMA node.

Reads and writes ``devices/system/node/nodeN/hugepages/hugepages-<kB>kB/
nr_hugepages``, falling back to ``kernel/mm/hugepages`` where the kernel
has no node directories. Reservations are increments: pages other users
reserved are never taken away, and nothing is ever "cleared" the way
``dpdk-hugepages.py --clear`` does. A reservation the kernel cannot fully
satisfy is undone and reported, leaving the count where it was.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from typing import List, Optional

from sriov_hook.errors import HookError
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

    def _set(self, size_kb: int, node: Optional[int], count: int) -> int:
        path = os.path.join(self._dir(size_kb, node), "nr_hugepages")
        self.fs.write(path, str(count))
        return int(self.fs.read(path))

    def add(self, pages: int, size_kb: int, node: Optional[int]) -> int:
        """Reserve ``pages`` more pages; all or nothing. Returns the new total."""
        if pages <= 0:
            return self.pool(size_kb, node).total
        before = self.pool(size_kb, node).total
        want = before + pages
        got = self._set(size_kb, node, want)
        if got < want:
            self._set(size_kb, node, before)   # leave the count where it was
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
        return self._set(size_kb, node, cur.total - take) if take else cur.total

    def ensure_free(self, pages: int, size_kb: int, node: Optional[int]) -> int:
        """Make ``pages`` free pages available; return how many were added."""
        cur = self.pool(size_kb, node)
        missing = max(0, pages - cur.free)
        if missing:
            self.add(missing, size_kb, node)
        return missing


def mount_hugetlbfs(directory: str, size_kb: int) -> None:
    os.makedirs(directory, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "hugetlbfs", "-o", f"pagesize={fmt_kb(size_kb)}",
                           "nodev", directory], capture_output=True, text=True)
    if proc.returncode != 0:
        raise HugepageError(f"cannot mount hugetlbfs on {directory}: {proc.stderr.strip()}")
