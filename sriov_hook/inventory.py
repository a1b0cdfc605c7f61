"""Which VFs a pool covers, found in sysfs lazily.

The allocator walks candidates in order and stops at the first free one,
so a pool on a PF with 256 VFs costs a readlink per VF looked at, not a
scan of the whole PCI tree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

from .config import Pool
from .errors import DeviceNotFound
from .pci import PfSelector
from .sysfs import Sysfs


@dataclass(frozen=True)
class Candidate:
    bdf: str
    pf_bdf: str
    pf_ifname: Optional[str]
    index: int


class Inventory:
    def __init__(self, sysfs: Sysfs) -> None:
        self.sysfs = sysfs
        self._pfs: Dict[str, Tuple[str, Optional[str]]] = {}

    def resolve_pf(self, sel: PfSelector) -> Tuple[str, Optional[str]]:
        """(PF PCI address, PF netdev name or None) for a selector."""
        if sel.pf not in self._pfs:
            if sel.by_pci:
                if not self.sysfs.device_exists(sel.pf):
                    raise DeviceNotFound(f"PF {sel.pf} does not exist under {self.sysfs.root}")
                self._pfs[sel.pf] = (sel.pf, self.sysfs.netdev(sel.pf))
            else:
                self._pfs[sel.pf] = (self.sysfs.pf_of_netdev(sel.pf), sel.pf)
        return self._pfs[sel.pf]

    def candidates(self, pool: Pool) -> Iterator[Candidate]:
        for sel in pool.pfs:
            pf_bdf, pf_ifname = self.resolve_pf(sel)
            numvfs = self.sysfs.numvfs(pf_bdf)
            for idx in sel.indices(numvfs):
                bdf = self.sysfs.virtfn(pf_bdf, idx)
                if bdf is not None:
                    yield Candidate(bdf, pf_bdf, pf_ifname, idx)
