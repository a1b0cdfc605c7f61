"""``sriov-hook-runtime``: an OCI runtime that adds the hook, then runs runc.

For engines with no hooks.d (containerd, Docker): register this program as
the runtime (``ctr run --runc-binary``, a containerd runtime's
``BinaryName``, ``dockerd --add-runtime``). Every command goes to the real
runtime (runc unless configured) with ``exec``, unchanged. On ``create`` and
``run`` it first reads the bundle's ``config.json``; if the container asks
for VFs (the ``sriov-hook.io/networks`` annotation, or
``SRIOV_HOOK_NETWORKS=`` in ``process.env`` for engines that cannot set
annotations, copied into the annotation) it adds the hook's
``createRuntime`` and ``poststop`` entries and replaces the file
atomically. Other containers are left byte for byte as they were.

It runs on every container start and every runc call after it, so it
imports nothing outside the standard library and reads JSON only when the
bundle mentions the annotation or the variable at all. When it cannot do its
job for a container that asks for VFs, it fails that container with one line
(also in runc's ``--log`` file, where containerd looks for the reason):
never a container started silently without its VF.

Settings, ``KEY=VALUE`` lines (the installer writes them into the install's
own venv; ``$SRIOV_HOOK_RUNTIME_CONF`` names another file)::

    runtime=/usr/sbin/runc                 # the real runtime
    hook=/usr/local/bin/sriov-hook         # put into config.json
    config=/etc/sriov-hook/config.yaml     # passed to the hook with --config
"""
from __future__ import annotations

import os
import sys

# typing and dataclasses cost ~17 ms to import, more than the rest of this
# program: every runc call pays for what this module imports.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Tuple

ANNOTATION = "sriov-hook.io/networks"
ENV_NAME = "SRIOV_HOOK_NETWORKS"
SETTINGS_ENV = "SRIOV_HOOK_RUNTIME_CONF"
SETTINGS_FILE = "sriov-hook-runtime.conf"
HOOK_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
HOOK_TIMEOUT = 30
MAX_SPEC_BYTES = 16 << 20
# Global options of runc (and crun) that take a value: their value must not
# be taken for the command. Booleans (--debug, --systemd-cgroup) need nothing.
_VALUED_GLOBALS = frozenset({"--log", "--log-format", "--root", "--criu", "--rootless",
                             "--cgroup-manager"})
_VALUED_CREATE = frozenset({"--bundle", "-b", "--console-socket", "--pid-file",
                            "--preserve-fds"})
# Cheap pre-check on the raw bytes: JSON may escape '/' but never these.
_MARKERS = (b"sriov-hook.io", ENV_NAME.encode())


class WrapperError(Exception):
    """A container asked for VFs and the wrapper cannot give it the hook."""


class Settings:
    __slots__ = ("runtime", "hook", "config")

    def __init__(self, runtime: str, hook: str, config: str) -> None:
        self.runtime = runtime   # the real OCI runtime
        self.hook = hook         # the sriov-hook executable put into config.json
        self.config = config     # the hook's --config


def settings_path() -> str:
    return os.environ.get(SETTINGS_ENV) or os.path.join(sys.prefix, SETTINGS_FILE)


def load_settings(path: Optional[str] = None) -> Settings:
    """The settings file if there is one, else defaults found beside this program."""
    path = path or settings_path()
    values: Dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                key, eq, value = line.partition("=")
                if not eq or key.strip() not in ("runtime", "hook", "config"):
                    raise WrapperError(f"{path} line {number}: expected runtime=, hook= or config=")
                values[key.strip()] = value.strip()
    except FileNotFoundError:
        if os.environ.get(SETTINGS_ENV):
            raise WrapperError(f"settings file {path} does not exist") from None
    except OSError as err:
        raise WrapperError(f"cannot read settings {path}: {err.strerror}") from None
    here = os.path.dirname(os.path.abspath(sys.argv[0]))
    return Settings(
        runtime=values.get("runtime") or _find_runc(),
        hook=values.get("hook") or os.path.join(here, "sriov-hook"),
        config=values.get("config") or os.environ.get("SRIOV_HOOK_CONFIG")
        or "/etc/sriov-hook/config.yaml")


def _find_runc() -> str:
    """runc on PATH, never this program itself (it may be installed as 'runc')."""
    me = os.path.realpath(sys.argv[0])
    for d in os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").split(os.pathsep):
        cand = os.path.join(d or ".", "runc")
        if os.access(cand, os.X_OK) and os.path.realpath(cand) != me:
            return cand
    raise WrapperError("no runc found on PATH; set runtime= in " + settings_path())


def find_command(argv: List[str]) -> Tuple[Optional[str], int]:
    """The runtime command (create, run, start, ...) and its index in argv."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-"):
            return arg, i
        i += 2 if arg in _VALUED_GLOBALS else 1
    return None, len(argv)


def find_bundle(args: List[str]) -> str:
    """``--bundle``/``-b`` of create/run; runc's default is the current directory."""
    bundle = "."
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name in ("--bundle", "-b"):
            if eq:
                bundle = value
            elif i + 1 < len(args):
                bundle = args[i + 1]
                i += 1
        elif arg in _VALUED_CREATE:
            i += 1
        i += 1
    return os.path.abspath(bundle)


def global_option(argv: List[str], name: str) -> Optional[str]:
    """A global option's value (``--log PATH`` or ``--log=PATH``), before the command."""
    _, end = find_command(argv)
    for i in range(end):
        if argv[i] == name and i + 1 < end:
            return argv[i + 1]
        if argv[i].startswith(name + "="):
            return argv[i].split("=", 1)[1]
    return None


def _read_spec(path: str) -> bytes:
    try:
        # The bundle is the engine's; a config.json that is a symlink or a
        # FIFO is not something it handed us.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise WrapperError(f"cannot read {path}: {err.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        raw = fh.read(MAX_SPEC_BYTES + 1)
    if len(raw) > MAX_SPEC_BYTES:
        raise WrapperError(f"{path} is larger than {MAX_SPEC_BYTES} bytes")
    return raw


def requested(spec: Dict[str, Any]) -> Optional[str]:
    """The VF request: the annotation, else the last SRIOV_HOOK_NETWORKS= in process.env."""
    ann = spec.get("annotations") or {}
    if not isinstance(ann, dict):
        raise WrapperError("config.json annotations must be an object")
    value = ann.get(ANNOTATION)
    if isinstance(value, str) and value.strip():
        return value
    process = spec.get("process") or {}
    env = process.get("env") if isinstance(process, dict) else None
    found = None
    for item in env if isinstance(env, list) else []:
        if isinstance(item, str) and item.startswith(ENV_NAME + "="):
            found = item[len(ENV_NAME) + 1:]
    return found if found and found.strip() else None


def _is_ours(entry: Any, settings: Settings, stages: Tuple[str, ...]) -> bool:
    """A hook entry that already runs sriov-hook for one of ``stages`` (not a CDI --pool one)."""
    if not isinstance(entry, dict):
        return False
    path, args = entry.get("path"), entry.get("args") or []
    if not isinstance(path, str) or not isinstance(args, list):
        return False
    named = path == settings.hook or os.path.basename(path) == "sriov-hook"
    return named and "--pool" not in args and any(s in args for s in stages)


def add_hooks(spec: Dict[str, Any], request: str, settings: Settings) -> Dict[str, Any]:
    """The spec with the annotation set and the hook's entries present once."""
    spec.setdefault("annotations", {})
    if not isinstance(spec["annotations"], dict):
        raise WrapperError("config.json annotations must be an object")
    spec["annotations"].setdefault(ANNOTATION, request)
    if not (isinstance(spec["annotations"][ANNOTATION], str)
            and spec["annotations"][ANNOTATION].strip()):
        spec["annotations"][ANNOTATION] = request
    hooks = spec.setdefault("hooks", {})
    if not isinstance(hooks, dict):
        raise WrapperError("config.json hooks must be an object")
    # An entry already there (hooks.d under podman, a hand-written spec)
    # counts for its stage: prestart and createRuntime are the same point.
    for stage, same in (("createRuntime", ("prestart", "createRuntime")),
                        ("poststop", ("poststop",))):
        existing = [e for key in same for e in _entries(hooks, key)]
        if not any(_is_ours(e, settings, same) for e in existing):
            hooks.setdefault(stage, []).append({
                "path": settings.hook,
                "args": ["sriov-hook", "--config", settings.config, stage],
                "env": list(HOOK_ENV), "timeout": HOOK_TIMEOUT})
    return spec


def _entries(hooks: Dict[str, Any], key: str) -> List[Any]:
    got = hooks.get(key)
    if got is None:
        return []
    if not isinstance(got, list):
        raise WrapperError(f"config.json hooks.{key} must be a list")
    return got


def prepare(bundle: str, settings: Settings) -> bool:
    """Add the hook to ``bundle``'s config.json if it asks for VFs. True if rewritten."""
    path = os.path.join(bundle, "config.json")
    raw = _read_spec(path)
    if not any(marker in raw for marker in _MARKERS):
        return False   # the common case: no JSON parsing at all
    # Only for a container that asks for VFs: bounded nesting (jsonbound)
    # costs re and typing, ~17 ms, which every other container is spared.
    import json
    from .jsonbound import loads
    try:
        spec = loads(raw.decode("utf-8"), 64)
    except (ValueError, UnicodeDecodeError) as err:
        raise WrapperError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(spec, dict):
        raise WrapperError(f"{path} must hold a JSON object")
    request = requested(spec)
    if request is None:
        return False
    if not os.access(settings.hook, os.X_OK):
        raise WrapperError(f"the container asks for VFs ({ANNOTATION}) but the hook "
                           f"{settings.hook} is not installed or not executable")
    _replace(path, json.dumps(add_hooks(spec, request, settings)).encode())
    return True


def _replace(path: str, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path`` and rename it over ``path``.

    No fsync: a bundle does not outlive a crash of the machine, and every
    container start would pay for it.
    """
    tmp = f"{path}.sriov-hook.{os.getpid()}.tmp"
    try:
        mode = os.stat(path).st_mode & 0o7777
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, mode)   # the umask trimmed it
            os.rename(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as err:
        raise WrapperError(f"cannot rewrite {path}: {err.strerror}") from None


def report(argv: List[str], message: str) -> None:
    """One line on stderr, and in runc's log file (containerd reads the reason there)."""
    line = f"sriov-hook: {' '.join(message.split())}"
    print(line, file=sys.stderr)
    log = global_option(argv, "--log")
    if not log:
        return
    import json
    import time
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if global_option(argv, "--log-format") == "json":
        text = json.dumps({"level": "error", "msg": line, "time": stamp})
    else:
        text = f"time={json.dumps(stamp)} level=error msg={json.dumps(line)}"
    try:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")
    except OSError:
        pass   # stderr has it


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings = load_settings()
        cmd, at = find_command(argv)
        if cmd in ("create", "run"):
            prepare(find_bundle(argv[at + 1:]), settings)
        os.execv(settings.runtime, [settings.runtime, *argv])
    except WrapperError as err:
        report(argv, str(err))
        return 1
    except OSError as err:   # execv failed: the runtime is missing
        report(argv, f"cannot run the OCI runtime: {err.strerror}: {err.filename}")
        return 1
    except Exception as err:  # noqa: BLE001 - a bug: one line, never a traceback
        report(argv, f"internal error: {type(err).__name__}: {err}")
        return 70
    return 0   # not reached: execv replaced this process


if __name__ == "__main__":
    sys.exit(main())
