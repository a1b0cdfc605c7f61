"""PF-side VF settings (``ip link set <pf> vf N ...``): apply with read-back, restore.

Shared by every mode: a VF handed to a VM or to DPDK still gets its MAC
and VLAN from the PF. VF index 0 is a real VF; indices are compared with
``is not None``, never for truth.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

from .config import VfSettings
from .errors import NotSupported, VerifyError
from .log import StepLog
from .netlink import Netlink, VfInfo

ZERO_MAC = "00:00:00:00:00:00"
_VERIFY_TIMEOUT = 1.0  # some drivers (i40e/iavf) apply VF settings asynchronously


def wanted(settings: VfSettings) -> Dict[str, Any]:
    """Netlink attributes for the settings that were asked for, in a safe order."""
    out: Dict[str, Any] = {}
    if settings.vlan is not None or settings.qos is not None:
        out["vlan"] = (settings.vlan or 0, settings.qos or 0)
    if settings.mac is not None:
        out["mac"] = settings.mac
    if settings.min_tx_rate is not None or settings.max_tx_rate is not None:
        out["rate"] = (settings.min_tx_rate or 0, settings.max_tx_rate or 0)
    for key in ("spoofchk", "trust", "link_state"):
        val = getattr(settings, key)
        if val is not None:
            out[key] = val
    return out


def _current(info: VfInfo, key: str) -> Any:
    if key == "vlan":
        return (info.vlan or 0, info.qos or 0)
    if key == "rate":
        return (info.min_tx_rate or 0, info.max_tx_rate or 0)
    return getattr(info, key)


def require_vf_ops(pf_ifname: Optional[str], vf: int, orig: Optional[VfInfo],
                   attrs: Dict[str, Any]) -> None:
    if attrs and orig is None:
        names = ", ".join(sorted(attrs))
        raise NotSupported(f"PF {pf_ifname or '?'} reports no VF settings over netlink "
                           f"(not an SR-IOV PF driver?); cannot set {names} on VF {vf}")


def apply(nl: Netlink, pf_index: int, vf: int, attrs: Dict[str, Any], log: StepLog) -> None:
    """Set each attribute, then read it back until it sticks (bounded)."""
    for key, val in attrs.items():
        nl.set_vf(pf_index, vf, **{key: val})
        log.info(f"PF #{pf_index} VF {vf}: set {key}={val}")
    if attrs:
        _verify(nl, pf_index, vf, attrs)


def _verify(nl: Netlink, pf_index: int, vf: int, attrs: Dict[str, Any]) -> None:
    deadline = time.monotonic() + _VERIFY_TIMEOUT
    while True:
        info = nl.vf_info(pf_index, vf)
        wrong = [k for k, v in attrs.items() if info is None or _current(info, k) != v]
        if not wrong:
            return
        if time.monotonic() >= deadline:
            got = {k: _current(info, k) for k in wrong} if info else "nothing"
            raise VerifyError(f"VF {vf} settings did not read back: wanted "
                              f"{ {k: attrs[k] for k in wrong} }, got {got}")
        time.sleep(0.05)


def restore(nl: Netlink, pf_index: int, vf: int, orig: VfInfo, log: StepLog) -> List[str]:
    """Put back every recorded setting that differs now. Idempotent."""
    now = nl.vf_info(pf_index, vf)
    if now is None:
        return []
    target = wanted(VfSettings(
        mac=orig.mac, vlan=orig.vlan, qos=orig.qos, spoofchk=orig.spoofchk,
        trust=orig.trust, link_state=orig.link_state,
        min_tx_rate=orig.min_tx_rate, max_tx_rate=orig.max_tx_rate))
    changed = [k for k, v in target.items() if _current(now, k) != v]
    # Some drivers refuse a zero admin MAC ("clear"); that is the one failure
    # we tolerate, since the VF's own MAC is restored separately.
    for key in changed:
        try:
            nl.set_vf(pf_index, vf, **{key: target[key]})
            log.info(f"PF #{pf_index} VF {vf}: restored {key}={target[key]}")
        except NotSupported:
            if key == "mac" and target[key] == ZERO_MAC:
                log.warning(f"PF #{pf_index} VF {vf}: driver refuses to clear the admin MAC")
                continue
            raise
    return changed
