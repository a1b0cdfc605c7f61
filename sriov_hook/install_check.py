"""Is sriov-hook installed so that it can work? The installation half of ``check``.

podman loads a hooks.d file only if its ``hook.path`` exists, and skips it
without a word otherwise: a hooks.d file copied without the program (or
whose venv was removed) starts every container with no VF and no error.
So each check here names one way an installation silently stops working,
or lets someone other than root steer a program that runs as root:

* hooks.d files that name sriov-hook: valid, ``hook.path`` an existing
  executable (and its ``#!`` interpreter too), ``args`` matching
  ``stages``, and both halves present (createRuntime/prestart *and*
  poststop, or VFs are never given back);
* the config file, ``state_dir`` and ``log_file``: owned by root, not
  world-writable, not symlinks (the log is appended to by root);
* sriov-hook-runtime's settings, if this install has them.

Every problem is one line. Nothing is changed.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set

from .config import Config

# Where podman and CRI-O look by default, lowest precedence first.
DEFAULT_HOOKS_DIRS = ("/usr/share/containers/oci/hooks.d", "/etc/containers/oci/hooks.d")
CREATE_STAGES = {"createRuntime", "prestart"}
HOOK_STAGES = CREATE_STAGES | {"poststop"}


@dataclass
class HookFile:
    path: str
    stages: Set[str] = field(default_factory=set)   # sriov-hook stages it runs
    problems: List[str] = field(default_factory=list)


def problems(config_path: str, cfg: Optional[Config], hooks_dirs: Sequence[str] = (),
             runtime_settings: Optional[str] = None) -> List[str]:
    """Everything wrong with the installation around ``config_path``.

    ``cfg``: the loaded config, or None when it did not load (the caller
    reports why). ``hooks_dirs``: directories to check instead of the
    default ones; naming one says sriov-hook's files must be there.
    """
    out = safe_file("config", config_path, must_exist=False)
    if cfg is not None:
        out += safe_path("state_dir", cfg.state_dir, directory=True)
        if cfg.log_file:
            out += safe_path("log_file", cfg.log_file, directory=False)
    out += hooks_d(list(hooks_dirs) or list(DEFAULT_HOOKS_DIRS), required=bool(hooks_dirs))
    out += wrapper(runtime_settings)
    return out


def safe_file(label: str, path: str, must_exist: bool = True) -> List[str]:
    """A file root reads and trusts (it may be a symlink, as a ConfigMap's are)."""
    try:
        st = os.stat(path)
    except OSError as err:
        return [f"{label} {path}: {err.strerror}"] if must_exist else []
    return _owner_mode(label, path, st)


def _owner_mode(label: str, path: str, st: os.stat_result) -> List[str]:
    who = f"{label} {path}" if label else path
    out = []
    if st.st_uid != 0:
        out.append(f"{who} is owned by uid {st.st_uid}, not root")
    if st.st_mode & stat.S_IWOTH:
        out.append(f"{who} is world-writable")
    return out


def safe_path(label: str, path: str, directory: bool) -> List[str]:
    """A path root writes to: no symlink, root's, not world-writable, nor its directory."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = _existing_parent(path)
        if os.stat(parent).st_mode & stat.S_IWOTH:
            return [f"{label} {path} does not exist yet and {parent} is world-writable: "
                    "anyone can create it first"]
        return []
    if stat.S_ISLNK(st.st_mode):
        return [f"{label} {path} is a symlink (to {os.readlink(path)}); root would follow it"]
    out = _owner_mode(label, path, st)
    kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    if not kind_ok:
        out.append(f"{label} {path} is not a {'directory' if directory else 'regular file'}")
    parent = os.path.dirname(path)
    pst = os.stat(parent)
    if pst.st_mode & stat.S_IWOTH and not pst.st_mode & stat.S_ISVTX:
        out.append(f"{label} {path}: its directory {parent} is world-writable")
    return out


def _existing_parent(path: str) -> str:
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent


def hooks_d(dirs: List[str], required: bool) -> List[str]:
    """sriov-hook's hooks.d files across ``dirs`` (later dirs mask earlier ones, as podman's)."""
    effective: Dict[str, HookFile] = {}
    for d in dirs:
        for name in _json_files(d):
            hf = read_hook_file(os.path.join(d, name))
            if hf is not None:
                effective[name] = hf
            else:
                effective.pop(name, None)   # a foreign file masks ours
    where = ", ".join(dirs)
    if not effective:
        return [f"hooks.d: no sriov-hook files in {where}"] if required else []
    out = [p for hf in effective.values() for p in hf.problems]
    stages = set().union(*(hf.stages for hf in effective.values()))
    if not stages & CREATE_STAGES:
        out.append(f"hooks.d: no createRuntime (or prestart) file for sriov-hook in {where}: "
                   "containers get no VF")
    if "poststop" not in stages:
        out.append(f"hooks.d: no poststop file for sriov-hook in {where}: "
                   "VFs are not given back when containers stop")
    return out


def _json_files(d: str) -> List[str]:
    try:
        return sorted(n for n in os.listdir(d) if n.endswith(".json"))
    except OSError:
        return []


def read_hook_file(path: str) -> Optional[HookFile]:
    """The file's problems, if it is sriov-hook's; None if it belongs to something else."""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as fh:
            spec = json.loads(fh.read(1 << 20))
    except (OSError, ValueError) as err:
        if "sriov-hook" not in name:
            return None
        return HookFile(path, problems=[f"hooks.d {path}: unreadable or not JSON: {err}"])
    if not _names_us(spec, name):
        return None
    hf = HookFile(path)
    bad = hf.problems.append
    if spec.get("version") != "1.0.0":
        bad(f"hooks.d {path}: version must be \"1.0.0\"")
    hook = _dict(spec.get("hook"))
    args = _list(hook.get("args"))
    for problem in executable_problems(hook.get("path")):
        bad(f"hooks.d {path}: hook.path {problem}")
    stages = _list(spec.get("stages"))
    hf.stages = {s for s in stages if s in HOOK_STAGES}
    other = [s for s in stages if s not in HOOK_STAGES]
    if other or not stages:
        bad(f"hooks.d {path}: stages {stages}: sriov-hook runs at createRuntime "
            "(or prestart) and poststop only")
    command = next((a for a in args if a in HOOK_STAGES), None)
    if command is None:
        bad(f"hooks.d {path}: hook.args name no stage (createRuntime or poststop)")
    elif any((command == "poststop") != (s == "poststop") for s in hf.stages):
        bad(f"hooks.d {path}: runs 'sriov-hook {command}' at stage "
            f"{', '.join(sorted(hf.stages))}")
    if not isinstance(spec.get("when"), dict) or not spec["when"]:
        bad(f"hooks.d {path}: 'when' is missing: podman refuses the file")
    config = _config_of(hook, args)
    if config is not None and not os.path.exists(config):
        bad(f"hooks.d {path}: its config {config} does not exist")
    return hf


def _dict(val: Any) -> Dict[str, Any]:
    return val if isinstance(val, dict) else {}


def _list(val: Any) -> List[Any]:
    return val if isinstance(val, list) else []


def _names_us(spec: Any, name: str) -> bool:
    if "sriov-hook" in name:
        return True
    path = _dict(_dict(spec).get("hook")).get("path")
    if isinstance(path, str) and os.path.basename(path) == "sriov-hook":
        return True
    ann = _dict(_dict(_dict(spec).get("when")).get("annotations"))
    return any("sriov-hook" in str(k) for k in ann)


def _config_of(hook: Dict[str, Any], args: List[Any]) -> Optional[str]:
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args) and isinstance(args[i + 1], str):
            return str(args[i + 1])
        if isinstance(arg, str) and arg.startswith("--config="):
            return arg.split("=", 1)[1]
    for item in _list(hook.get("env")):
        if isinstance(item, str) and item.startswith("SRIOV_HOOK_CONFIG="):
            return item.split("=", 1)[1]
    return None


def executable_problems(path: Any) -> List[str]:
    """Why ``path`` cannot be run as root's hook; empty if it can."""
    if not isinstance(path, str) or not os.path.isabs(path):
        return [f"{path!r} is not an absolute path"]
    try:
        st = os.stat(path)
    except OSError:
        return [f"{path} does not exist: podman skips this hook without a word "
                "and containers start without their VF"]
    if not stat.S_ISREG(st.st_mode):
        return [f"{path} is not a regular file"]
    if not os.access(path, os.X_OK):
        return [f"{path} is not executable"]
    out = _owner_mode("", path, st)
    interp = _interpreter(path)
    if interp is not None and not os.access(interp, os.X_OK):
        out.append(f"{path}: its interpreter {interp} does not exist "
                   "(copied without its venv?)")
    if interp is None and _is_elf(path):
        # The compiled client (native/) runs the hook with the Python beside its real path.
        beside = os.path.join(os.path.dirname(os.path.realpath(path)), "python")
        if not os.access(beside, os.X_OK):
            out.append(f"{path}: the Python beside it ({beside}) does not exist, so hooks "
                       "fail whenever the agent does not answer (copied without its venv?)")
    return out


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"\x7fELF"
    except OSError:
        return False


def _interpreter(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as fh:
            first = fh.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    parts = first[2:].split()
    return parts[0].decode("utf-8", "replace") if parts else None


def wrapper(settings: Optional[str] = None) -> List[str]:
    """sriov-hook-runtime's settings, when this install has some."""
    from . import runtime
    path = settings or runtime.settings_path()
    if not os.path.exists(path):
        return []
    try:
        s = runtime.load_settings(path)
    except runtime.WrapperError as err:
        return [f"sriov-hook-runtime: {err}"]
    out = []
    for label, target in (("runtime", s.runtime), ("hook", s.hook)):
        if not os.access(target, os.X_OK):
            out.append(f"sriov-hook-runtime settings {path}: {label} {target} "
                       "is not an executable: containers asking for VFs are refused")
    if not os.path.exists(s.config):
        out.append(f"sriov-hook-runtime settings {path}: config {s.config} does not exist")
    return out
