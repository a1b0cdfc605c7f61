"""The kubelet device plugin API v1beta1: one resource per pool, ``sriov-hook.io/<pool>``.

The agent runs this when the config says ``device_plugin: true``. Per pool, a
gRPC server on ``<device_plugin_dir>/sriov-hook-<pool>.sock``, registered with
kubelet on ``kubelet.sock`` in the same directory. Device IDs are the VFs' PCI
addresses, with the NUMA node from sysfs (``numa_node``; -1: no topology).

It decides nothing the hook would decide differently: Allocate checks the VFs
and answers with CDI devices (cdi.kubelet_edits) whose createRuntime hook
names the VF, so the hook, in assigned mode (assigned.py), reserves exactly
kubelet's choice under the usual locks and records.

One thread (``tick`` every INTERVAL seconds) does everything periodic:
- surveys each pool's VFs and their health (devices.py); ListAndWatch streams
  get a new list whenever it changes. Unhealthy: a record held outside
  Kubernetes (holdings.py), the PF's netdev down or gone, the VF's driver gone
  (or a netdev/kata VF without its netdev);
- keeps each pool's CDI spec in ``cdi_dir`` current (written before the pool
  is registered, so kubelet never hands out a device no spec describes);
- serves and registers: kubelet deletes every socket in its directory when it
  starts, so a plugin socket that is gone (or replaced), or a kubelet.sock
  that is new, means: serve again on a fresh socket and register again.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import grpc

from .. import cdi
from ..config import Config, Pool
from ..context import Ctx
from ..errors import HookError
from ..log import StepLog
from . import deviceplugin_pb2 as pb
from . import deviceplugin_pb2_grpc as pb_grpc
from .devices import Vf, prefer, survey
from .holdings import Holdings

DOMAIN = "sriov-hook.io"
API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
HEALTHY, UNHEALTHY = "Healthy", "Unhealthy"
INTERVAL = 1.0
REGISTER_TIMEOUT = 5.0


def hook_path(cfg: Config) -> str:
    """The hook the CDI specs name: ``cdi_hook_path``, else the one beside this
    interpreter (a venv: the installed layout), else /usr/local/bin/sriov-hook."""
    if cfg.cdi_hook_path:
        return cfg.cdi_hook_path
    here = os.path.join(os.path.dirname(sys.executable), "sriov-hook")
    return here if os.access(here, os.X_OK) else "/usr/local/bin/sriov-hook"


def resource_name(pool: str) -> str:
    return f"{DOMAIN}/{pool}"


def socket_name(pool: str) -> str:
    return f"sriov-hook-{pool}.sock"


class AllocateError(Exception):
    def __init__(self, code: Any, message: str) -> None:
        super().__init__(message)
        self.code = code


def device(vf: Vf) -> Any:
    """A VF as kubelet's Device: its PCI address, health and NUMA node."""
    topology = pb.TopologyInfo(nodes=[pb.NUMANode(ID=vf.numa)]) if vf.numa >= 0 else None
    return pb.Device(ID=vf.pci, health=HEALTHY if vf.problem is None else UNHEALTHY,
                     topology=topology)


# -- the gRPC service, one per pool --------------------------------------------------------
class PoolPlugin(pb_grpc.DevicePluginServicer):  # type: ignore[misc]  # an Any base (glue not followed)
    def __init__(self, plugins: "DevicePlugins", pool: str) -> None:
        self.plugins = plugins
        self.pool = pool

    def GetDevicePluginOptions(self, request: Any, context: Any) -> Any:
        return pb.DevicePluginOptions(pre_start_required=False,
                                      get_preferred_allocation_available=True)

    def ListAndWatch(self, request: Any, context: Any) -> Iterator[Any]:
        seen = -1
        while context.is_active() and not self.plugins.stopping:
            version, vfs = self.plugins.wait_change(self.pool, seen, INTERVAL)
            if version != seen and context.is_active():
                seen = version
                yield pb.ListAndWatchResponse(devices=[device(vf) for vf in vfs])

    def GetPreferredAllocation(self, request: Any, context: Any) -> Any:
        where = {vf.pci: (vf.numa, vf.pf) for vf in self.plugins.devices(self.pool)}
        return pb.PreferredAllocationResponse(container_responses=[
            pb.ContainerPreferredAllocationResponse(deviceIDs=prefer(
                list(req.available_deviceIDs), list(req.must_include_deviceIDs),
                req.allocation_size, where))
            for req in request.container_requests])

    def Allocate(self, request: Any, context: Any) -> Any:
        answers = []
        for req in request.container_requests:
            try:
                answers.append(self.plugins.allocate(self.pool, list(req.devices_ids)))
            except AllocateError as err:
                context.abort(err.code, str(err))
        return pb.AllocateResponse(container_responses=answers)

    def PreStartContainer(self, request: Any, context: Any) -> Any:
        return pb.PreStartContainerResponse()


@dataclass
class _Served:
    server: Any
    path: str
    ident: Tuple[int, int]               # the socket file we created
    registered: Optional[Tuple[int, int]] = None   # the kubelet.sock we registered with
    failure: Optional[str] = None        # the last registration error, logged once


def _ident(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class DevicePlugins:
    """Every pool's plugin, kept served, registered and current by one thread."""

    def __init__(self, config: Callable[[], Optional[Config]], hook_path: str,
                 on_failed: Callable[[str], None] = lambda _why: None,
                 on_released: Callable[[str], None] = lambda _pci: None,
                 interval: float = INTERVAL) -> None:
        cfg = config()
        assert cfg is not None
        self._config = config
        self.hook_path = hook_path
        self.on_failed = on_failed
        self.interval = interval
        self.stopping = False
        self._stop_event = threading.Event()
        self._cond = threading.Condition()
        self._vfs: Dict[str, List[Vf]] = {}
        self._versions: Dict[str, int] = {}
        self._specs: Dict[str, Dict[str, Any]] = {}
        self._spec_lock = threading.Lock()   # the tick and Allocate both rewrite specs
        self._served: Dict[str, _Served] = {}
        self._pool_of: Dict[str, str] = {}     # pci -> pool, from the last survey
        self.holdings = Holdings(cfg.pod_resources_socket, self.resource_of,
                                 on_released=on_released, on_failed=on_failed)
        self._thread = threading.Thread(target=self._run, name="device-plugin", daemon=True)

    # -- life --------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self._config()
        if cfg is not None:
            self.tick(cfg)       # served and registered before the agent says it is up
        self._thread.start()

    def stop(self) -> None:
        self.stopping = True
        self._stop_event.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        for pool in list(self._served):
            self._unserve(pool)

    def _run(self) -> None:
        while not self._stop_event.wait(self.interval):
            cfg = self._config()
            if cfg is None:
                continue
            try:
                self.tick(cfg)
            except Exception:  # noqa: BLE001 - a bug must not end the plugin for good
                import traceback
                log = StepLog(cfg.log_file, cfg.log_level, stage="deviceplugin")
                log.error("internal error: " + traceback.format_exc().replace("\n", " | "))
                log.close()
                self.on_failed("internal")

    def tick(self, cfg: Config) -> None:
        log = StepLog(cfg.log_file, cfg.log_level, stage="deviceplugin")
        ctx = Ctx(cfg, log)
        try:
            for pool in cfg.pools.values():
                self._survey(ctx, pool)
                self._write_spec(ctx, pool)
                self._serve_and_register(cfg, log, pool.name)
            for gone in set(self._served) - set(cfg.pools):
                log.info(f"pool {gone} left the config: no longer served")
                self._unserve(gone)
                self._remove_spec(cfg, gone)
        finally:
            ctx.close()
            log.close()

    # -- devices -----------------------------------------------------------------------
    def resource_of(self, pci: str) -> Optional[str]:
        pool = self._pool_of.get(pci)
        return resource_name(pool) if pool is not None else None

    def devices(self, pool: str) -> List[Vf]:
        with self._cond:
            return list(self._vfs.get(pool, []))

    def wait_change(self, pool: str, seen: int, timeout: float) -> Tuple[int, List[Vf]]:
        """(version, VFs) once the pool's version differs from ``seen``, or at the timeout."""
        with self._cond:
            self._cond.wait_for(lambda: self._versions.get(pool, 0) != seen or self.stopping,
                                timeout)
            return self._versions.get(pool, 0), list(self._vfs.get(pool, []))

    def _survey(self, ctx: Ctx, pool: Pool) -> None:
        try:
            vfs = survey(ctx, pool, self.holdings)
        except HookError as err:
            # The PF itself is gone: its VFs stay listed, unhealthy, until it returns.
            why = str(err)
            vfs = [Vf(v.pci, v.pf, v.numa, why) for v in self.devices(pool.name)]
        with self._cond:
            for vf in vfs:
                self._pool_of[vf.pci] = pool.name
            if vfs != self._vfs.get(pool.name):
                before = {v.pci: v.problem for v in self._vfs.get(pool.name, [])}
                for vf in vfs:
                    if before.get(vf.pci, "new") != vf.problem:
                        ctx.log.info(f"{resource_name(pool.name)} {vf.pci}: "
                                     + (f"unhealthy: {vf.problem}" if vf.problem else "healthy"))
                self._vfs[pool.name] = vfs
                self._versions[pool.name] = self._versions.get(pool.name, 0) + 1
                self._cond.notify_all()

    # -- CDI -----------------------------------------------------------------------------
    def _write_spec(self, ctx: Ctx, pool: Pool) -> None:
        with self._spec_lock:
            self._write_spec_locked(ctx, pool)

    def _write_spec_locked(self, ctx: Ctx, pool: Pool) -> None:
        try:
            spec = cdi.build_kubelet(ctx, pool, self.hook_path)
        except HookError as err:
            ctx.log.warning(f"CDI spec of pool {pool.name} not rebuilt: {err}")
            return
        if spec == self._specs.get(pool.name):
            return
        path = cdi.kubelet_spec_path(ctx.cfg.cdi_dir, pool.name)
        try:
            os.makedirs(ctx.cfg.cdi_dir, mode=0o755, exist_ok=True)
            if spec["devices"]:
                cdi.write(spec, path)
            elif os.path.exists(path):
                os.unlink(path)   # engines refuse a spec with no device
        except (HookError, OSError) as err:
            ctx.log.error(f"cannot write the CDI spec {path}: {err}")
            self.on_failed("CdiSpec")
            return
        self._specs[pool.name] = spec
        ctx.log.info(f"CDI spec {path}: {len(spec['devices'])} device(s)")

    def _remove_spec(self, cfg: Config, pool: str) -> None:
        self._specs.pop(pool, None)
        try:
            os.unlink(cdi.kubelet_spec_path(cfg.cdi_dir, pool))
        except OSError:
            pass

    # -- serving and registration -------------------------------------------------------
    def _serve_and_register(self, cfg: Config, log: StepLog, pool: str) -> None:
        path = os.path.join(cfg.device_plugin_dir, socket_name(pool))
        served = self._served.get(pool)
        if served is not None and (served.path != path or _ident(path) != served.ident):
            log.info(f"{path} was removed or replaced (kubelet restarted?): serving again")
            self._unserve(pool)
            served = None
        if served is None:
            served = self._serve(log, pool, path)
            if served is None:
                return
        kubelet = os.path.join(cfg.device_plugin_dir, KUBELET_SOCKET)
        current = _ident(kubelet)
        if current is not None and served.registered != current:
            self._register(log, pool, served, kubelet, current)

    def _serve(self, log: StepLog, pool: str, path: str) -> Optional[_Served]:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if os.path.lexists(path):
                os.unlink(path)
        except OSError as err:
            log.error(f"cannot prepare {path}: {err.strerror}")
            return None
        server = grpc.server(ThreadPoolExecutor(max_workers=8,
                                                thread_name_prefix=f"dp-{pool}"))
        pb_grpc.add_DevicePluginServicer_to_server(PoolPlugin(self, pool), server)
        try:
            server.add_insecure_port(f"unix://{path}")
            server.start()
        except RuntimeError as err:
            server.stop(0)
            log.error(f"cannot serve {resource_name(pool)} on {path}: {err}")
            self.on_failed("Serve")
            return None
        ident = _ident(path)
        if ident is None:
            server.stop(0)
            log.error(f"{path} vanished as soon as it was made")
            return None
        served = _Served(server, path, ident)
        self._served[pool] = served
        log.info(f"serving {resource_name(pool)} on {path}")
        return served

    def _register(self, log: StepLog, pool: str, served: _Served, kubelet: str,
                  kubelet_id: Tuple[int, int]) -> None:
        request = pb.RegisterRequest(
            version=API_VERSION, endpoint=os.path.basename(served.path),
            resource_name=resource_name(pool),
            options=pb.DevicePluginOptions(pre_start_required=False,
                                           get_preferred_allocation_available=True))
        channel = grpc.insecure_channel(f"unix://{kubelet}")
        try:
            pb_grpc.RegistrationStub(channel).Register(request, timeout=REGISTER_TIMEOUT)
        except grpc.RpcError as err:
            why = f"{err.code().name}: {err.details()}" if hasattr(err, "code") else str(err)
            if served.failure != why:
                log.error(f"kubelet refused or did not answer the registration of "
                          f"{resource_name(pool)}: {why}; retrying")
                self.on_failed("Register")
            served.failure = why
            return
        finally:
            channel.close()
        served.registered, served.failure = kubelet_id, None
        log.info(f"registered {resource_name(pool)} with kubelet ({kubelet})")

    def _unserve(self, pool: str) -> None:
        served = self._served.pop(pool, None)
        if served is None:
            return
        served.server.stop(0).wait()
        if _ident(served.path) == served.ident:   # ours still: a new kubelet's is not
            try:
                os.unlink(served.path)
            except OSError:
                pass

    # -- Allocate --------------------------------------------------------------------------
    def allocate(self, pool_name: str, ids: List[str]) -> Any:
        """Check the VFs and answer with their CDI devices and PCIDEVICE variable."""
        cfg = self._config()
        if cfg is None or pool_name not in cfg.pools:
            raise AllocateError(grpc.StatusCode.UNAVAILABLE,
                                f"{resource_name(pool_name)} is not served right now")
        pool = cfg.pools[pool_name]
        resource = resource_name(pool_name)
        if not ids:
            raise AllocateError(grpc.StatusCode.INVALID_ARGUMENT, f"{resource}: no device asked for")
        if len(set(ids)) != len(ids):
            raise AllocateError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{resource}: a device is listed twice in {', '.join(ids)}")
        known = {vf.pci: vf for vf in self.devices(pool_name)}
        log = StepLog(cfg.log_file, cfg.log_level, stage="deviceplugin")
        ctx = Ctx(cfg, log)
        try:
            for pci in ids:
                self._check(ctx, resource, known, pci)
            if cdi.uses_vfio(pool):
                self._bind(ctx, pool, resource, ids)
            self.holdings.granted(ids)
            ctx.log.info(f"Allocate {resource}: {', '.join(sorted(ids))}")
        finally:
            ctx.close()
            log.close()
        return pb.ContainerAllocateResponse(
            envs={cdi.env_var(pool_name): ",".join(sorted(ids))},
            cdi_devices=[pb.CDIDevice(name=cdi.kubelet_device(pool_name, pci))
                         for pci in sorted(ids)])

    def _check(self, ctx: Ctx, resource: str, known: Dict[str, Vf], pci: str) -> None:
        vf = known.get(pci)
        if vf is None:
            raise AllocateError(grpc.StatusCode.NOT_FOUND,
                                f"{resource}: no device {pci[:64]!r} (its devices are the "
                                "PCI addresses of the pool's VFs)")
        try:
            record = ctx.store.read(pci)
        except HookError as err:
            raise AllocateError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{resource}: device {pci}: {err}") from None
        if record is not None and self.holdings.held_by_kubernetes(pci, record) and \
                self.holdings.listed(pci) is None:
            # A pod's VF on its way home (its poststop under way): worth a short wait.
            record = self._wait_gone(ctx, pci)
        if record is not None:
            who = self.holdings.listed(pci) if self.holdings.held_by_kubernetes(pci, record) \
                else None
            raise AllocateError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{resource}: device {pci} is already held by container "
                                f"{record.owner}" + (f" of pod {who}" if who else
                                                     " (outside Kubernetes)"))
        if vf.problem is not None:
            raise AllocateError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{resource}: device {pci} is unhealthy: {vf.problem}")

    @staticmethod
    def _wait_gone(ctx: Ctx, pci: str) -> Any:
        deadline = time.monotonic() + ctx.cfg.lock_timeout
        while True:
            try:
                record = ctx.store.read(pci)
            except HookError:
                return None
            if record is None or time.monotonic() >= deadline:
                return record
            time.sleep(0.05)

    def _bind(self, ctx: Ctx, pool: Pool, resource: str, ids: List[str]) -> None:
        """vfio: the group node must exist before the engine resolves the CDI device."""
        bound = False
        for pci in ids:
            try:
                bound = cdi.bind_for_cdi(ctx, pci) or bound
            except HookError as err:
                raise AllocateError(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"{resource}: device {pci} cannot go to vfio-pci: {err}") \
                    from None
        if bound:
            self._write_spec(ctx, pool)

