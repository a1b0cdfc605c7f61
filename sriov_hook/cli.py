"""Command line: ``sriov-hook [--config PATH] COMMAND``.

Stages (prestart, createRuntime, poststop) read the OCI state on stdin and
take the stage from argv, never from the state's ``status``. Every failure
ends in one ``sriov-hook: ...`` line on stderr and a non-zero exit.
"""
from __future__ import annotations

import gc
import json
import os
import signal
import sys
from typing import TYPE_CHECKING, List, Optional

from .errors import HookError, UsageError

if TYPE_CHECKING:
    from .context import Ctx

STAGES = {"prestart": "prestart", "createRuntime": "prestart", "poststop": "poststop"}
COMMANDS = ("prestart", "createRuntime", "poststop", "status", "gc", "check", "setup", "cdi",
            "version")
USAGE = """usage: sriov-hook [--config PATH] COMMAND

commands:
  prestart | createRuntime   reserve and attach VFs (OCI state JSON on stdin)
  poststop                   detach and release them (OCI state JSON on stdin)
  status [--json]            every VF the config covers, free or reserved
  gc                         release reservations whose owner is gone
  check                      report every inconsistency, change nothing (exit 1 if any)
  setup                      enable the VFs the config's numvfs asks for (sriov_numvfs)
  cdi [--output PATH] [--prebind] [--hook PATH]
                             write a CDI spec for the vfio pools (default /var/run/cdi/)

prestart/createRuntime options (used by CDI devices):
  --pool NAME [--vf PCI]     reserve from this pool (this VF) instead of the annotation
  --inject-nodes             also create /dev/vfio/<group> inside the container
  version                    print the version

config: --config PATH, else $SRIOV_HOOK_CONFIG, else /etc/sriov-hook/config.yaml"""


class _Terminated(HookError):
    pass


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
            print(USAGE)
            sys.exit(0)
        else:
            rest.append(arg)
        i += 1
    if not rest:
        raise UsageError("no command given (try --help)")
    cmd, opts = rest[0], rest[1:]
    if cmd not in COMMANDS:
        raise UsageError(f"unknown command {cmd!r} (one of {', '.join(COMMANDS)})")
    flags = {"status": {"--json"}, "cdi": {"--prebind"}, "prestart": {"--inject-nodes"},
             "createRuntime": {"--inject-nodes"}}.get(cmd, set())
    valued = {"cdi": {"--output", "--hook"}, "prestart": {"--pool", "--vf"},
              "createRuntime": {"--pool", "--vf"}}.get(cmd, set())
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


def main(argv: Optional[List[str]] = None) -> int:
    # A hook lives for a fraction of a second and makes no reference cycles
    # worth collecting; the cyclic GC only slows the pyroute2 import (~15 ms).
    gc.disable()
    argv = sys.argv[1:] if argv is None else argv
    log = None
    try:
        config_path, cmd, opts = _parse(argv)
        if cmd == "version":
            from . import __version__
            print(__version__)
            return 0
        signal.signal(signal.SIGTERM, _on_term)
        signal.signal(signal.SIGINT, _on_term)
        _admit(cmd)  # its fd stays open, and the flock held, until this process exits
        from . import config as cfgmod
        from .context import Ctx
        from .log import StepLog
        cfg = cfgmod.load(config_path)
        log = StepLog(cfg.log_file, cfg.log_level, stage=STAGES.get(cmd, cmd))
        ctx = Ctx(cfg, log)
        try:
            return _run(ctx, cmd, opts)
        finally:
            ctx.close()
    except HookError as err:
        if log is not None:
            log.error(f"failed: {err}")
        print(f"sriov-hook: {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:  # a bug: full trace to the log, one line to the user
        if log is not None:
            import traceback
            log.error("internal error: " + traceback.format_exc().replace("\n", " | "))
        print(f"sriov-hook: internal error: {type(err).__name__}: {err}"
              + (" (traceback in the log file)" if log is not None else ""), file=sys.stderr)
        return 70
    finally:
        if log is not None:
            log.close()


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


def _run(ctx: "Ctx", cmd: str, opts: List[str]) -> int:
    if cmd in STAGES:
        from . import hook, oci
        forced = _forced_request(opts)   # usage errors before reading stdin
        state = oci.parse_state(sys.stdin.buffer.read())
        ctx.log.bind(state.id)
        ctx.log.info(f"{cmd}: bundle={state.bundle} pid={state.pid} status={state.status!r}")
        if STAGES[cmd] == "prestart":
            container = oci.load_container(state)
            ctx.container = container
            ctx.inject_nodes = "--inject-nodes" in opts
            hook.prestart(ctx, container, forced)
        else:
            hook.poststop(ctx, state)
        ctx.log.info(f"{cmd}: done")
        return 0
    from . import admin
    if cmd == "cdi":
        from . import cdi
        if "--prebind" in opts:
            bound = cdi.prebind(ctx)
            print(f"bound to vfio-pci: {', '.join(bound) or 'none'}")
        hook_path = _opt(opts, "--hook") or _installed_hook()
        path = cdi.write(cdi.build(ctx, hook_path), _opt(opts, "--output") or cdi.DEFAULT_DIR)
        print(f"wrote {path}")
        return 0
    if cmd == "status":
        data = admin.status(ctx)
        print(json.dumps(data, indent=2) if "--json" in opts else admin.format_status(data))
        return 0
    if cmd == "setup":
        for line in admin.setup(ctx):
            print(line)
        return 0
    if cmd == "check":
        problems = admin.check(ctx)
        for line in problems:
            print(line)
        print(f"{len(problems)} problem(s)" if problems else "ok: no inconsistencies")
        return 1 if problems else 0
    if cmd == "gc":
        stats = admin.gc(ctx)
        print(" ".join(f"{k}={v}" for k, v in stats.items()))
        return 1 if stats["failed"] else 0
    raise UsageError(f"unknown command {cmd}")
