"""Driver journal steps: a VF moved to another driver comes back to its own.

* ``bind``: vfio/dpdk modes put the VF on a userspace driver; undo: back
  on the driver it had, ``driver_override`` cleared.
* ``driver_guard``: netdev/kata modes change no driver, but a VM runtime
  (Kata) binds the VF to vfio-pci itself and may leave ``driver_override``
  set; undo repairs that before the netdev is looked for.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

from . import drivers, journal

if TYPE_CHECKING:
    from .context import Ctx
    from .reservations import Reservation


def bind(ctx: "Ctx", res: "Reservation", driver: str) -> None:
    journal.record(ctx, res, "bind", driver=driver)
    drivers.bind(ctx.sysfs, res.bdf, driver, ctx.cfg.device_timeout, ctx.log)
    journal.done("bind")


def undo_bind(ctx: "Ctx", res: "Reservation", step: Dict[str, Any]) -> None:
    drivers.restore(ctx.sysfs, res.bdf, res.orig_driver, ctx.cfg.device_timeout)
    ctx.log.info(f"{res.bdf} back on {res.orig_driver}, driver_override cleared")


def guard(ctx: "Ctx", res: "Reservation") -> None:
    journal.record(ctx, res, "driver_guard")
    journal.done("driver_guard")


def undo_guard(ctx: "Ctx", res: "Reservation", step: Dict[str, Any]) -> None:
    current = ctx.sysfs.driver(res.bdf)
    stale = ctx.sysfs.driver_override(res.bdf)
    if current != res.orig_driver or stale is not None:
        ctx.log.info(f"{res.bdf}: found driver={current} override={stale}; "
                     f"returning it to {res.orig_driver}")
        drivers.restore(ctx.sysfs, res.bdf, res.orig_driver, ctx.cfg.device_timeout)
