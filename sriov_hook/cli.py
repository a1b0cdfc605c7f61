"""Command line: ``sriov-hook [--config PATH] COMMAND``.

Stages (prestart, createRuntime, poststop) read the OCI state on stdin and
take the stage from argv, never from the state's ``status``. Every failure
ends in one ``sriov-hook: ...`` line on stderr and a non-zero exit.
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator, List, Optional, TextIO, Union

from .errors import HookError, UsageError

if TYPE_CHECKING:
    from .config import Config
    from .context import Ctx

STAGES = {"prestart": "prestart", "createRuntime": "prestart", "poststop": "poststop"}
COMMANDS = ("prestart", "createRuntime", "poststop", "status", "gc", "check", "setup", "cdi",
            "forget", "agent", "version")
USAGE = """usage: sriov-hook [--config PATH] COMMAND
       sriov-hook --version

commands:
  prestart | createRuntime   reserve and attach VFs (OCI state JSON on stdin)
  poststop                   detach and release them (OCI state JSON on stdin)
  status [--json]            every VF the config covers, free or reserved
  gc                         release reservations whose owner is gone
  check [--hooks-dir DIR]... report every inconsistency, change nothing (exit 1 if any):
                             reservations and VFs, the config, state_dir and log_file
                             (root's, not world-writable, not symlinks), sriov-hook's
                             hooks.d files (default: podman's and CRI-O's dirs; a named
                             DIR must hold them) and sriov-hook-runtime's settings
  setup                      enable the VFs the config's numvfs asks for (sriov_numvfs)
  forget PCI                 drop the record of a VF that no longer exists (checked first)
  cdi [--output DIR|FILE.json] [--prebind] [--hook PATH]
                             write a CDI spec for the vfio pools: into DIR (an existing
                             directory) as sriov-hook.json, or to FILE.json (its directory
                             must exist); default /var/run/cdi/ (created if missing).
                             Refused when no vfio pool has a VF to describe
  agent                      serve hooks on the config's agent_socket (foreground)

prestart/createRuntime options (used by CDI devices):
  --pool NAME [--vf PCI]     reserve from this pool (this VF); with --vf (assigned mode:
                             kubelet's choice) the annotation still gives its settings
  --inject-nodes             also create /dev/vfio/<group> inside the container

version | --version          print the version

config: --config PATH, else $SRIOV_HOOK_CONFIG, else /etc/sriov-hook/config.yaml"""


class _Terminated(HookError):
    pass


class _Help(Exception):
    """--help: print the usage and succeed, without leaving the caller's process."""


@dataclass
class Outcome:
    """What one command produced: the exit status and both output streams."""

    status: int
    stdout: str = ""
    stderr: str = ""
    error: Optional[str] = None   # the error class when it failed (metrics use it)


Stdin = Union[bytes, Callable[[], bytes]]
Admit = Callable[[str], ContextManager[object]]


def _on_term(signum: int, _frame: object) -> None:
    # Turn SIGTERM/SIGINT into an exception so rollback runs. (SIGKILL can't
    # be caught; the record on disk lets poststop or gc finish the job.)
    raise _Terminated(f"terminated by signal {signum}")


def _parse(argv: List[str]) -> "tuple[Optional[str], str, List[str]]":
    config: Optional[str] = None
    rest: List[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-c", "--config"):
            if i + 1 >= len(argv):
                raise UsageError("--config needs a path")
            config = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg in ("-h", "--help"):
            raise _Help()
        elif arg in ("-V", "--version") and not rest:
            rest.append("version")
        else:
            rest.append(arg)
        i += 1
    if not rest:
        raise UsageError("no command given (try --help)")
    cmd, opts = rest[0], rest[1:]
    if cmd not in COMMANDS:
        raise UsageError(f"unknown command {cmd!r} (one of {', '.join(COMMANDS)})")
    if cmd == "forget":
        if len(opts) != 1 or opts[0].startswith("-"):
            raise UsageError("forget: give the PCI address of one VF, e.g. 0000:3b:02.1")
        return config, cmd, opts
    flags = {"status": {"--json"}, "cdi": {"--prebind"}, "prestart": {"--inject-nodes"},
             "createRuntime": {"--inject-nodes"}}.get(cmd, set())
    valued = {"cdi": {"--output", "--hook"}, "prestart": {"--pool", "--vf"},
              "createRuntime": {"--pool", "--vf"}, "check": {"--hooks-dir"}}.get(cmd, set())
    j = 0
    while j < len(opts):
        if opts[j] in valued:
            if j + 1 >= len(opts):
                raise UsageError(f"{cmd}: {opts[j]} needs a value")
            j += 2
        elif opts[j] in flags:
            j += 1
        else:
            raise UsageError(f"{cmd}: unexpected argument {opts[j]!r}")
    return config, cmd, opts


def _opt(opts: List[str], name: str) -> Optional[str]:
    return opts[opts.index(name) + 1] if name in opts else None


def main(argv: Optional[List[str]] = None, stdin: Optional[bytes] = None) -> int:
    """The process entry: what only a short-lived hook process may do, then run().

    ``stdin``: the state bytes when the thin client has already read them.
    """
    # A hook lives for a fraction of a second and makes no reference cycles
    # worth collecting; the cyclic GC only slows the pyroute2 import (~15 ms).
    gc.disable()
    argv = sys.argv[1:] if argv is None else argv
    if _is_agent(argv):
        gc.enable()   # the agent lives long: it needs the GC, and streams its own output
        return _serve_agent(argv)
    out = run(argv, stdin if stdin is not None else sys.stdin.buffer.read, admit=_admit_process)
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
    return out.status


def run(argv: List[str], stdin: Stdin = b"", config: "Optional[Config]" = None,
        admit: Optional[Admit] = None, reuse_host: bool = False) -> Outcome:
    """Run one command in this process and return what it printed, never raising.

    Touches no process-wide state (signals, GC, sys.stdout), so the agent
    calls it from many threads at once; the hook process calls it from main().
    ``stdin``: the state bytes, or a function reading them only if a stage
    needs them. ``config``: an already loaded config (the agent's), instead of
    loading the one argv names. ``admit(cmd)``: a context held around the
    heavy part (admission control). ``reuse_host``: keep this thread's host
    netlink socket open for its next command (the agent's worker threads).
    """
    out, err = io.StringIO(), io.StringIO()
    log = None
    try:
        config_path, cmd, opts = _parse(argv)
        if cmd == "version":
            from . import __version__
            print(__version__, file=out)
            return Outcome(0, out.getvalue())
        if cmd == "agent":
            raise UsageError("agent: runs only as its own process")
        with admit(cmd) if admit is not None else contextlib.nullcontext():
            from . import config as cfgmod
            from .context import Ctx
            from .log import StepLog
            if cmd == "check" and config is None:   # reports a config that does not load, too
                return Outcome(_check(config_path, opts, out), out.getvalue())
            cfg = config if config is not None else cfgmod.load(config_path)
            log = StepLog(cfg.log_file, cfg.log_level, stage=STAGES.get(cmd, cmd))
            ctx = Ctx(cfg, log, reuse_host=reuse_host)
            try:
                status = _run(ctx, cmd, opts, stdin, out)
            finally:
                ctx.close()
        return Outcome(status, out.getvalue(), err.getvalue())
    except _Help:
        return Outcome(0, USAGE + "\n")
    except HookError as e:
        if log is not None:
            log.error(f"failed: {e}")
        print(f"sriov-hook: {e}", file=err)
        return Outcome(e.exit_code, out.getvalue(), err.getvalue(), type(e).__name__)
    except Exception as e:  # a bug: full trace to the log, one line to the user
        if log is not None:
            import traceback
            log.error("internal error: " + traceback.format_exc().replace("\n", " | "))
        print(f"sriov-hook: internal error: {type(e).__name__}: {e}"
              + (" (traceback in the log file)" if log is not None else ""), file=err)
        return Outcome(70, out.getvalue(), err.getvalue(), type(e).__name__)
    finally:
        if log is not None:
            log.close()


def parse(argv: List[str]) -> "tuple[Optional[str], str, List[str]]":
    """(config path or None, command, its options); raises UsageError (the agent uses it)."""
    try:
        return _parse(argv)
    except _Help:
        return None, "--help", []


def _is_agent(argv: List[str]) -> bool:
    try:
        return _parse(argv)[1] == "agent"
    except (HookError, _Help):
        return False


def _serve_agent(argv: List[str]) -> int:
    config_path = _parse(argv)[0]
    from .agent.server import serve
    try:
        return serve(config_path)
    except HookError as e:
        print(f"sriov-hook: {e}", file=sys.stderr)
        return e.exit_code


@contextlib.contextmanager
def _admit_process(cmd: str) -> "Iterator[None]":
    """Process-wide set-up for a hook process: SIGTERM/SIGINT become errors
    (so rollback runs), and a CPU slot is taken (admission.py); its fd, and
    the flock, stay with the process until it exits."""
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    _admit(cmd)
    yield


def _admit(cmd: str) -> Optional[int]:
    """Stages wait for a CPU slot before their heavy imports (admission.py).

    SRIOV_HOOK_MAX_PARALLEL: slots (default: usable CPUs + 1, since a slot
    holder sleeps in the kernel's netns-move RCU wait); -1 turns it off.
    The fd stays open, and the flock held, until the process exits.
    """
    if cmd not in STAGES:
        return None
    try:
        slots = int(os.environ.get("SRIOV_HOOK_MAX_PARALLEL", "0"))
    except ValueError:
        slots = 0
    if slots < 0:
        return None
    from .admission import acquire
    return acquire(slots or len(os.sched_getaffinity(0)) + 1, timeout=10.0)


def _check(config_path: Optional[str], opts: List[str], out: TextIO) -> int:
    """``check``: the installation (install_check) and the state (admin.check), one
    line per problem. A config that does not load is one problem, not the end."""
    from . import admin, install_check
    from . import config as cfgmod
    from .context import Ctx
    from .errors import ConfigError
    from .log import StepLog
    path = cfgmod.resolve_path(config_path)
    problems: List[str] = []
    cfg: "Optional[Config]" = None
    try:
        cfg = cfgmod.load(path)
    except ConfigError as e:
        problems.append(str(e))
    dirs = [opts[i + 1] for i, o in enumerate(opts[:-1]) if o == "--hooks-dir"]
    problems += install_check.problems(path, cfg, dirs)
    if cfg is not None:
        ctx = Ctx(cfg, StepLog(cfg.log_file, cfg.log_level, stage="check"))
        try:
            problems += admin.check(ctx)
        finally:
            ctx.close()
            ctx.log.close()
    for line in problems:
        print(line, file=out)
    print(f"{len(problems)} problem(s)" if problems else "ok: no inconsistencies", file=out)
    return 1 if problems else 0


def _installed_hook() -> str:
    """The sriov-hook script beside this interpreter (a venv), else the usual place."""
    here = os.path.join(os.path.dirname(sys.executable), "sriov-hook")
    return here if os.access(here, os.X_OK) else "/usr/local/bin/sriov-hook"


def _forced_request(opts: List[str]) -> Optional[str]:
    """--pool/--vf from a CDI device's hook args, as an annotation value."""
    pool, vf = _opt(opts, "--pool"), _opt(opts, "--vf")
    if pool is None:
        if vf is not None:
            raise UsageError("--vf needs --pool")
        return None
    entry = {"pool": pool}
    if vf is not None:
        entry["pci"] = vf
    return json.dumps([entry])


def _run(ctx: "Ctx", cmd: str, opts: List[str], stdin: Stdin, out: TextIO) -> int:
    if cmd in STAGES:
        from . import hook, oci
        forced = _forced_request(opts)   # usage errors before reading stdin
        state = oci.parse_state(stdin() if callable(stdin) else stdin)
        ctx.log.bind(state.id)
        ctx.log.info(f"{cmd}: bundle={state.bundle} pid={state.pid} status={state.status!r}")
        if STAGES[cmd] == "prestart":
            container = oci.load_container(state)
            ctx.container = container
            ctx.inject_nodes = "--inject-nodes" in opts
            from . import assigned   # --pool/--vf: kubelet's VF, with the annotation's settings
            value = assigned.prestart_value(ctx, container, _opt(opts, "--pool"),
                                            _opt(opts, "--vf"), forced)
            if value is not None:
                hook.prestart(ctx, container, value)
            else:
                ctx.log.info("no request for this hook: nothing to do")
        else:
            hook.poststop(ctx, state)
        ctx.log.info(f"{cmd}: done")
        return 0
    from . import admin
    if cmd == "cdi":
        from . import cdi
        if "--prebind" in opts:
            bound = cdi.prebind(ctx)
            print(f"bound to vfio-pci: {', '.join(bound) or 'none'}", file=out)
        hook_path = _opt(opts, "--hook") or _installed_hook()
        path = cdi.write(cdi.build(ctx, hook_path), _opt(opts, "--output") or cdi.DEFAULT_DIR)
        print(f"wrote {path}", file=out)
        return 0
    if cmd == "status":
        data = admin.status(ctx)
        from .agent import query
        agent = query.summary(ctx.cfg)   # the agent's own figures, when one serves this config
        if agent is not None:
            data["agent"] = agent
        print(json.dumps(data, indent=2) if "--json" in opts else admin.format_status(data)
              + (f"\n{query.describe(agent)}" if agent is not None else ""), file=out)
        return 1 if any("error" in row for row in data["vfs"]) else 0   # e.g. a PF is missing
    if cmd == "setup":
        lines = admin.setup(ctx)
        for line in lines:
            print(line, file=out)
        if not lines:
            print(f"setup: nothing to do: {ctx.cfg.path} sets no numvfs", file=out)
        return 0
    if cmd == "forget":
        print(admin.forget(ctx, opts[0]), file=out)
        return 0
    if cmd == "gc":
        stats = admin.gc(ctx)
        print(" ".join(f"{k}={v}" for k, v in stats.items()), file=out)
        if not any(v for k, v in stats.items() if k != "checked"):
            print("gc: nothing to do: no reservation, pin or temp file is orphaned", file=out)
        return 1 if stats["failed"] else 0
    if cmd == "check":   # reached with a config already loaded (the agent's)
        return _check(ctx.cfg.path, opts, out)
    raise UsageError(f"unknown command {cmd}")
