"""``sriov-hook agent``: serve hook requests on a unix socket.

One long-lived process loads the config and the hook's modules once; the thin
client (native/sriov-hook.c, or client.py) forwards each hook to it. Every
request runs cli.run(), the very function the in-process hook runs, under the
same per-VF flocks and records, so agent-served and in-process hooks may run
side by side on one host.

- Who may ask: the socket is 0600 in a 0700 directory, and each peer's uid is
  checked with SO_PEERCRED (root only); others get a one-line refusal.
- Which config: only hooks naming the agent's own config file are served;
  others are refused and the client runs them in-process. The file is
  reloaded when it changes (checked by stat on every request) and on SIGHUP;
  while it does not load, every hook is refused, so the in-process path
  reports the error exactly as it would without an agent.
- Concurrency: a thread per request (up to MAX_WORKERS), so one hung netlink
  call holds up only its own hook; at most CPUs + 1 run their heavy part at
  once, as admission.py allows hook processes, with the same bounded wait.
- Poststop answers first: once the container's records are found, the hook
  is told "done" and the release runs right after. The records keep the VFs
  out of every other hook's reach until they are released, a crash leaves
  them to the reclaimer or gc, and a prestart for the same container id (or
  one that finds its pool exhausted) waits for releases under way here.
  A release that fails is logged and counted, and the reclaimer retries it.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .. import cli, client, oci
from .. import config as cfgmod
from ..config import Config
from ..errors import HookError, StateError, UsageError
from ..log import StepLog
from ..reservations import Store
from .metrics import Metrics, count_vfs
from .reclaim import Reclaimer

MAX_WORKERS = 64
ADMIT_TIMEOUT = 10.0         # as the hook process's admission wait: then go ahead anyway
READ_TIMEOUT = 10.0          # a client sends its whole request at once
MAX_REQUEST = 4 << 20
STOP_GRACE = 30.0            # on SIGTERM, how long requests under way may take to finish


class _Stop(Exception):
    pass


class ConfigHolder:
    """The agent's config: reloaded when the file changes or on SIGHUP."""

    def __init__(self, path: str, log: StepLog) -> None:
        self.path = os.path.abspath(path)
        self.real = os.path.realpath(self.path)
        self.log = log
        self._lock = threading.Lock()
        self._key: Optional[Tuple[int, int, int, int]] = None
        self._cfg: Optional[Config] = None
        self.error: Optional[str] = None
        self.hup = False

    def _stat_key(self) -> Optional[Tuple[int, int, int, int]]:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def current(self) -> Optional[Config]:
        """The config to serve with, or None while the file does not load."""
        key = self._stat_key()
        with self._lock:
            if key != self._key or self.hup or (self._cfg is None and self.error is None):
                self.hup = False
                self._key = key
                self._reload()
            return self._cfg

    def _reload(self) -> None:
        first = self._cfg is None and self.error is None
        try:
            cfg = cfgmod.load(self.path)
        except HookError as err:
            if self.error != str(err):
                self.log.error(f"config does not load; hooks run in-process meanwhile: {err}")
            self._cfg, self.error = None, str(err)
            return
        if not first:
            self.log.info(f"config {self.path} reloaded")
        old, self._cfg, self.error = self._cfg, cfg, None
        if old is not None and (old.agent_socket, old.metrics_address) != \
                (cfg.agent_socket, cfg.metrics_address):
            self.log.warning("agent_socket and metrics_address change only when the agent "
                             "restarts")

    def names(self, path: str) -> bool:
        """Does the hook's config path name this agent's config file?"""
        return os.path.realpath(path) == self.real


class Releases:
    """Poststops answered but still releasing, by container id."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._owners: Dict[str, int] = {}
        self.finished = 0   # releases done so far: a VF may have come home since

    @contextlib.contextmanager
    def running(self, owner: str) -> Iterator[None]:
        with self._cond:
            self._owners[owner] = self._owners.get(owner, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._owners[owner] -= 1
                if not self._owners[owner]:
                    del self._owners[owner]
                self.finished += 1
                self._cond.notify_all()

    def busy(self, owner: Optional[str] = None) -> bool:
        with self._cond:
            return owner in self._owners if owner is not None else bool(self._owners)

    def wait(self, owner: Optional[str], timeout: float) -> None:
        """Until no release runs for ``owner`` (None: for anyone), at most ``timeout``."""
        with self._cond:
            self._cond.wait_for(lambda: not (owner in self._owners if owner is not None
                                             else self._owners), timeout)


class Agent:
    def __init__(self, holder: ConfigHolder, log: StepLog) -> None:
        self.holder = holder
        self.log = log
        self.started = time.time()
        self.releases = Releases()
        self.metrics = Metrics(lambda: count_vfs(self._config()))
        self.slots = threading.BoundedSemaphore(len(os.sched_getaffinity(0)) + 1)
        self.pool = ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="hook")
        self._inflight = 0
        self._inflight_cond = threading.Condition()
        self.reclaimer = Reclaimer(holder.current, self._reclaimed, self._reclaim_failed,
                                   self.releases.busy)

    def _config(self) -> Config:
        cfg = self.holder.current()
        if cfg is None:
            raise HookError(self.holder.error or "config does not load")
        return cfg

    def _reclaimed(self, bdf: str) -> None:
        self.metrics.reclaimed.inc()

    def _reclaim_failed(self, reason: str) -> None:
        self.metrics.failures.labels("reclaim", reason).inc()

    # -- connections ---------------------------------------------------------------
    def serve(self, listener: socket.socket) -> None:
        """Accept until SIGTERM/SIGINT (raised here as _Stop by the handlers)."""
        self.reclaimer.start()
        try:
            while True:
                conn, _ = listener.accept()
                with self._inflight_cond:
                    self._inflight += 1
                self.pool.submit(self._connection, conn)
        except _Stop:
            pass
        finally:
            self.reclaimer.stop()
            self._drain()
            self.metrics.close()

    def _drain(self) -> None:
        """Let requests under way finish (bounded), then stop the workers."""
        deadline = time.monotonic() + STOP_GRACE
        with self._inflight_cond:
            self._inflight_cond.wait_for(lambda: self._inflight == 0,
                                         max(0.0, deadline - time.monotonic()))
            left = self._inflight
        if left:
            self.log.warning(f"stopping with {left} request(s) unfinished; "
                             f"their records let poststop, gc or the next agent finish them")
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _connection(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._serve_one(conn)
        except Exception as err:  # noqa: BLE001 - a bug must not kill the worker silently
            import traceback
            self.log.error("agent: internal error: "
                           + traceback.format_exc().replace("\n", " | "))
            self.metrics.failures.labels("agent", type(err).__name__).inc()
        finally:
            with self._inflight_cond:
                self._inflight -= 1
                self._inflight_cond.notify_all()

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            data = _read_all(conn)   # whole, first: the client must not see a reset mid-send
        except (ValueError, OSError) as err:
            self.log.warning(f"dropped a request: {err}")
            return
        uid = peer_uid(conn)
        if uid != 0:
            self.log.warning(f"refused a request from uid {uid}: the agent serves root only")
            _answer(conn, b"done", cli.Outcome(
                1, stderr=f"sriov-hook: the agent serves root only (your uid is {uid})\n"))
            return
        try:
            op, config_path, argv_b, stdin = client.decode_request(data)
        except ValueError as err:
            self.log.warning(f"dropped a malformed request: {err}")
            return
        path = config_path.decode("utf-8", "surrogateescape")
        if op not in (b"hook", b"summary") or not self.holder.names(path):
            _answer(conn, b"refuse", cli.Outcome(1, stderr=f"agent serves {self.holder.path}"))
            return
        if op == b"summary":
            _answer(conn, b"done", cli.Outcome(0, json.dumps(self.summary())))
            return
        cfg = self.holder.current()
        if cfg is None:
            _answer(conn, b"refuse", cli.Outcome(1, stderr=self.holder.error or ""))
            return
        argv = [a.decode("utf-8", "surrogateescape") for a in argv_b]
        self._hook(conn, cfg, argv, stdin)

    # -- hooks ---------------------------------------------------------------------
    def _hook(self, conn: socket.socket, cfg: Config, argv: List[str], stdin: bytes) -> None:
        stage, cid = _stage_and_id(argv, stdin)
        t0 = time.perf_counter()
        if stage == "poststop" and cid is not None and self._holds(cfg, cid):
            # Answer first; the records keep the VFs reserved until released.
            with self.releases.running(cid):
                _answer(conn, b"done", cli.Outcome(0))
                out = cli.run(argv, stdin, cfg, self._admit, reuse_host=True)
        else:
            if stage == "prestart" and cid is not None:
                self.releases.wait(cid, cfg.lock_timeout)
            seen = self.releases.finished
            out = cli.run(argv, stdin, cfg, self._admit, reuse_host=True)
            if out.error == "PoolExhausted":
                # A VF may be on its way home from a poststop answered early.
                self.releases.wait(None, cfg.lock_timeout)
                if self.releases.finished != seen:
                    out = cli.run(argv, stdin, cfg, self._admit, reuse_host=True)
            _answer(conn, b"done", out)
        if stage is not None:
            self.metrics.observe(stage, time.perf_counter() - t0, out.error)

    @staticmethod
    def _holds(cfg: Config, cid: str) -> bool:
        try:
            return bool(Store(cfg.state_dir).by_owner(cid))
        except HookError:
            return False   # let the ordinary path report it

    @contextlib.contextmanager
    def _admit(self, _cmd: str) -> Iterator[None]:
        got = self.slots.acquire(timeout=ADMIT_TIMEOUT)   # never fails a hook
        try:
            yield
        finally:
            if got:
                self.slots.release()

    def summary(self) -> Dict[str, Any]:
        return {"pid": os.getpid(), "since": self.started, "config": self.holder.path,
                "config_error": self.holder.error,
                "metrics": self._config_or_none("metrics_address"), **self.metrics.totals()}

    def _config_or_none(self, key: str) -> Any:
        cfg = self.holder.current()
        return getattr(cfg, key) if cfg is not None else None


def _stage_and_id(argv: List[str], stdin: bytes) -> Tuple[Optional[str], Optional[str]]:
    """('prestart' or 'poststop', container id) when argv and state parse; else Nones."""
    try:
        _, cmd, _ = cli.parse(argv)
    except UsageError:
        return None, None
    stage = cli.STAGES.get(cmd)
    if stage is None:
        return None, None
    try:
        return stage, oci.parse_state(stdin).id
    except StateError:
        return stage, None


def _read_all(conn: socket.socket) -> bytes:
    conn.settimeout(READ_TIMEOUT)
    chunks: List[bytes] = []
    size = 0
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_REQUEST:
            raise ValueError(f"request larger than {MAX_REQUEST} bytes")
        chunks.append(chunk)


def _answer(conn: socket.socket, kind: bytes, out: "cli.Outcome") -> None:
    try:
        conn.sendall(client.encode_answer(kind, out.status, out.stdout.encode(),
                                          out.stderr.encode()))
    except OSError:
        pass   # the hook was killed meanwhile (runtime timeout): nobody to tell
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def listen(path: str) -> socket.socket:
    """Bind ``path`` (0600) in a root-only directory (0700); refuse if an agent answers there."""
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.lstat(directory)
    except OSError as err:
        raise HookError(f"agent: cannot create {directory}: {err.strerror}") from None
    import stat as stmod
    if not stmod.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise HookError(f"agent: {directory} must be a directory owned by this user, "
                        f"not a link or someone else's")
    if st.st_mode & 0o077:
        os.chmod(directory, 0o700)   # nobody else may reach, or replace, the socket
    if os.path.lexists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            raise HookError(f"agent: another agent already serves {path}")
        except OSError:
            os.unlink(path)   # a stale socket of an agent that died
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)   # no window in which the socket is more open than 0600
    try:
        sock.bind(path)
    except OSError as err:
        sock.close()
        raise HookError(f"agent: cannot listen on {path}: {err.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def _warm(cfg: Config) -> None:
    """Import what hooks need now, not in the first container's hook: pyroute2 too,
    which only hooks that set VF settings use (~55 ms to import)."""
    from .. import admin, hook, modes, netlink, request  # noqa: F401
    for pool in cfg.pools.values():
        modes.get(pool.mode)
    netlink.load_pyroute2()


def _device_plugins(agent: Agent, cfg: Config, log: StepLog) -> Any:
    """The kubelet device plugin (k8s/), when the config asks for it; grpcio is imported
    only then. Its reclaim from kubelet's view runs in the reclaim thread. Turning it
    on or off takes an agent restart."""
    if not cfg.device_plugin:
        return None
    from ..k8s.deviceplugin import DevicePlugins, hook_path
    plugins = DevicePlugins(agent.holder.current, hook_path(cfg),
                            on_failed=lambda why: agent.metrics.failures.labels(
                                "deviceplugin", why).inc(),
                            on_released=agent._reclaimed)
    agent.reclaimer.also.append(plugins.holdings.pass_)
    plugins.start()
    log.info(f"device plugin: pools {', '.join(sorted(cfg.pools))} in {cfg.device_plugin_dir}")
    return plugins


def serve(config_path: Optional[str]) -> int:
    """Run the agent in the foreground until SIGTERM or SIGINT."""
    boot_log = StepLog(None)
    holder = ConfigHolder(cfgmod.resolve_path(config_path), boot_log)
    cfg = holder.current()
    if cfg is None:
        raise HookError(holder.error or "config does not load")
    log = StepLog(cfg.log_file, cfg.log_level, stage="agent")
    holder.log = log
    _warm(cfg)
    agent = Agent(holder, log)
    listener = listen(cfg.agent_socket)
    ident = os.stat(cfg.agent_socket).st_ino

    def stop(signum: int, _frame: object) -> None:
        # A second signal stops at once (default action); the records cover it.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        raise _Stop()

    def hup(_signum: int, _frame: object) -> None:
        holder.hup = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hup)
    plugins = None
    try:
        plugins = _device_plugins(agent, cfg, log)
        if cfg.metrics_address:
            try:
                agent.metrics.serve(cfg.metrics_address)
            except OSError as err:
                raise HookError(f"agent: cannot serve metrics on {cfg.metrics_address}: "
                                f"{err.strerror}") from None
        where = f"; metrics on http://{cfg.metrics_address}/metrics" if cfg.metrics_address else ""
        log.info(f"agent {os.getpid()} serving {cfg.agent_socket} for {holder.path}{where}")
        print(f"sriov-hook agent: pid {os.getpid()}, serving {cfg.agent_socket} for "
              f"{holder.path}{where}", file=sys.stderr, flush=True)
        # Everything loaded so far lives as long as the agent: out of the collector's
        # sight, a full collection no longer walks pyroute2 and grpc in a hook's time.
        gc.collect()
        gc.freeze()
        agent.serve(listener)
    except _Stop:
        pass
    finally:
        if plugins is not None:
            plugins.stop()
        listener.close()
        with contextlib.suppress(OSError):
            if os.stat(cfg.agent_socket).st_ino == ident:   # still ours, not a successor's
                os.unlink(cfg.agent_socket)
        log.info("agent stopped")
        log.close()
    return 0
