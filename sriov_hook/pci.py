"""PCI addresses and PF/VF selectors such as ``ens1f0#0-3`` or ``0000:3b:00.0#0,2-5``."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

# domain:bus:slot.function, with the kernel's limits (slot <= 0x1f, func <= 7).
_BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]$")
_SHORT_BDF = re.compile(r"^[0-9a-f]{2}:[01][0-9a-f]\.[0-7]$")
# Linux dev_valid_name(): 1..15 bytes, not . or .., no '/', ':' or whitespace.
# dev_get_valid_name() then takes a name with '%' as a pattern ("net%d" becomes
# net0, net1, ...), so a VF would come up under a name nobody asked for and the
# hook would wait for the literal one; and it refuses "all" and "default", the
# names of the per-netns sysctl directories (EINVAL).
IFNAMSIZ = 16
_BAD_IFNAME_CHARS = re.compile(r"[/:%\s]")
_KERNEL_RESERVED = ("all", "default")
MAX_VF_INDEX = 4095  # generous: no NIC exposes more than a few hundred VFs


def is_bdf(text: str) -> bool:
    return bool(_BDF.match(text))


def normalize_bdf(text: str) -> str:
    """Return the canonical ``dddd:bb:ss.f`` form, or raise ValueError."""
    low = text.strip().lower()
    if _SHORT_BDF.match(low):
        low = "0000:" + low
    if not _BDF.match(low):
        raise ValueError(f"malformed PCI address {text!r} (want dddd:bb:ss.f)")
    return low


def ifname_problem(name: object) -> Optional[str]:
    """Why ``name`` is not a valid Linux interface name, or None if it is."""
    if not isinstance(name, str):
        return "must be a string"
    raw = name.encode("utf-8", "surrogateescape")
    if not raw:
        return "must not be empty"
    if len(raw) >= IFNAMSIZ:
        return f"is {len(raw)} bytes; at most {IFNAMSIZ - 1} allowed"
    if name in (".", ".."):
        return "must not be . or .."
    if name in _KERNEL_RESERVED:
        return "is refused by the kernel (it names a sysctl directory)"
    if _BAD_IFNAME_CHARS.search(name):
        return "must not contain '/', ':', '%' (a kernel name pattern) or whitespace"
    if not name.isprintable() or not name.isascii():
        return "must be printable ASCII"
    return None


@dataclass(frozen=True)
class PfSelector:
    """One entry of a pool's ``pfs`` list: a PF and optionally a VF index set."""

    pf: str                                   # netdev name or canonical BDF
    ranges: Optional[Tuple[Tuple[int, int], ...]] = None  # inclusive; None = all

    @property
    def by_pci(self) -> bool:
        return is_bdf(self.pf)

    def indices(self, numvfs: int) -> Iterator[int]:
        """VF indices this selector allows, ascending, below ``numvfs``."""
        if self.ranges is None:
            yield from range(numvfs)
            return
        seen = set()
        for lo, hi in sorted(self.ranges):
            for idx in range(lo, min(hi, numvfs - 1) + 1):
                if idx not in seen:
                    seen.add(idx)
                    yield idx

    def allows(self, index: int) -> bool:
        return self.ranges is None or any(lo <= index <= hi for lo, hi in self.ranges)

    def __str__(self) -> str:
        if self.ranges is None:
            return self.pf
        parts = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges]
        return f"{self.pf}#{','.join(parts)}"


def parse_selector(text: object) -> PfSelector:
    """Parse ``pf`` or ``pf#0-3,7``; raise ValueError with a reason."""
    if not isinstance(text, str):
        raise ValueError("must be a string like ens1f0 or 0000:3b:00.0#0-3")
    if len(text) > 256:
        raise ValueError("is too long")
    pf, sep, spec = text.partition("#")
    pf = pf.strip()
    if is_bdf(pf.lower()) or _SHORT_BDF.match(pf.lower()):
        pf = normalize_bdf(pf)
    else:
        why = ifname_problem(pf)
        if why:
            raise ValueError(f"PF {pf!r} is neither a PCI address nor an interface name: it {why}")
    if not sep:
        return PfSelector(pf)
    ranges = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d{1,4})(?:-(\d{1,4}))?", part)
        if not m:
            raise ValueError(f"VF range {part!r} is not N or N-M")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo > hi or hi > MAX_VF_INDEX:
            raise ValueError(f"VF range {part!r} is empty or above {MAX_VF_INDEX}")
        ranges.append((lo, hi))
    return PfSelector(pf, tuple(ranges))
