"""The agent's Prometheus metrics, on ``metrics_address`` (empty: off).

  sriov_hook_vfs{pool,state}                 free / reserved / unhealthy, computed per scrape
  sriov_hook_stage_seconds{stage}            time the agent spent on each hook it served
  sriov_hook_failures_total{stage,reason}    failed hooks and reclaims, by error class
  sriov_hook_reclaimed_vfs_total             VFs released because their container died
  sriov_hook_requests_total{stage}           hooks served

Every metric lives in this object's own registry, never the library's global one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..config import Config

VF_STATES = ("free", "reserved", "unhealthy")
# Hook latency on a 2-core VM spans ~10 ms (poststop answered first) to seconds
# (a VF whose driver is slow to rebind).
BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0)

VfCounts = Callable[[], Tuple[Iterable[str], Iterable[Tuple[str, str]]]]


class _VfCollector(Collector):
    """``sriov_hook_vfs``: counted from sysfs and the records at scrape time, so it
    is right whoever changed them (the agent, an in-process hook, gc)."""

    def __init__(self, counts: VfCounts) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("sriov_hook_vfs", "VFs by pool and state",
                                   labels=["pool", "state"])
        pools, rows = self._counts()
        tally: Dict[Tuple[str, str], int] = {(p, s): 0 for p in pools for s in VF_STATES}
        for pool, state in rows:
            tally[(pool, state)] = tally.get((pool, state), 0) + 1
        for (pool, state), n in sorted(tally.items()):
            family.add_metric([pool, state], n)
        yield family


class Metrics:
    def __init__(self, vf_counts: VfCounts) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram("sriov_hook_stage_seconds", "Time the agent spent on a hook",
                                 ["stage"], registry=self.registry, buckets=BUCKETS)
        self.failures = Counter("sriov_hook_failures", "Failed hooks and reclaims",
                                ["stage", "reason"], registry=self.registry)
        self.reclaimed = Counter("sriov_hook_reclaimed_vfs",
                                 "VFs released because their container died without a poststop",
                                 registry=self.registry)
        self.requests = Counter("sriov_hook_requests", "Hooks served by the agent", ["stage"],
                                registry=self.registry)
        self.registry.register(_VfCollector(vf_counts))
        self._server: Optional[Any] = None

    def observe(self, stage: str, seconds: float, error: Optional[str]) -> None:
        self.requests.labels(stage).inc()
        self.latency.labels(stage).observe(seconds)
        if error is not None:
            self.failures.labels(stage, error).inc()

    def serve(self, address: str) -> None:
        """Serve /metrics on ``host:port`` in a daemon thread."""
        host, _, port = address.rpartition(":")
        self._server, _ = start_http_server(int(port), host.strip("[]"), registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def totals(self) -> Dict[str, int]:
        """A few figures for ``sriov-hook status`` (the counters only: no VF walk)."""
        def total(counter: Counter) -> int:
            return int(sum(s.value for m in counter.collect() for s in m.samples
                           if s.name.endswith("_total")))
        return {"requests": total(self.requests), "failures": total(self.failures),
                "reclaimed": total(self.reclaimed)}


def count_vfs(cfg: "Config") -> Tuple[List[str], List[Tuple[str, str]]]:
    """(pool names, (pool, state) per VF), from the same walk as ``sriov-hook status``.

    unhealthy: an unreadable record, or a free VF that could not be handed out
    as it is (netdev/kata VF with no host netdev or on a userspace driver, a
    stale driver_override): what ``sriov-hook check`` reports about free VFs.
    """
    from .. import admin
    from ..context import Ctx
    from ..log import StepLog
    ctx = Ctx(cfg, StepLog(None))
    try:
        out = []
        for row in admin.status(ctx, where=False)["vfs"]:
            if "pci" not in row:
                continue
            state = row["state"]
            if state == "free" and admin.free_vf_problems(ctx, row):
                state = "unhealthy"
            out.append((row["pool"], state if state in ("free", "reserved") else "unhealthy"))
        return list(cfg.pools), out
    finally:
        ctx.close()
