"""Put sriov-hook on a host, or take it off again: ``make install`` / ``make uninstall``.

Standard packaging underneath: the wheel (``pip wheel .``, which also
fetches the dependencies' wheels into one wheelhouse) is installed with
``pip --no-index`` into a venv of its own, so the host's Python stays
untouched (Debian's pip refuses system installs) and installing needs no
network. Layout, every path under ``--root`` (a staging root: the tree
works in place there, which is how the tests drive podman with it)::

    /opt/sriov-hook/releases/<stamp>-<version>/   one venv per install (upgrade = a new one)
    /opt/sriov-hook/current -> releases/...       switched atomically; the previous release is kept
    /opt/sriov-hook/manifest.json                 everything install added, for uninstall
    /usr/local/bin/{sriov-hook,sriov-dpdk,sriov-hook-runtime} -> /opt/sriov-hook/current/bin/...
    /etc/sriov-hook/config.yaml                   commented example; never overwritten
    /usr/share/containers/oci/hooks.d/50-sriov-hook-*.json   hook path and config filled in
    /etc/systemd/system/sriov-hook-*.service      every unit in packaging/systemd/, enabled

The release's ``bin/sriov-hook`` is then compiled from ``native/sriov-hook.c``
(the thin client runtimes start; it runs the release's Python when the agent
does not answer). Without a C compiler the Python client stays in its place.

``sriov-hook-runtime`` finds its settings (the real runtime, the hook, the
config) in ``sriov-hook-runtime.conf`` inside the release's venv.

Uninstall removes exactly what the manifest lists. The config, the state
directory and the log stay unless ``--purge`` (refused while VFs are reserved).

Standard library only: it runs before any venv exists.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Set, Tuple

SRC = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE_CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11")   # as the Makefile's
UNITS_SRC = os.path.join(SRC, "packaging", "systemd")
HOOKS_SRC = os.path.join(SRC, "hooks.d")
EXAMPLE_CONFIG = os.path.join(SRC, "packaging", "config.example.yaml")
COMMANDS = ("sriov-hook", "sriov-dpdk", "sriov-hook-runtime")
# The units and hooks.d templates are written for the default layout; these
# are rewritten to the installed paths.
DEFAULT_BIN = "/usr/local/bin/"
DEFAULT_CONFIG = "/etc/sriov-hook/config.yaml"
SETTINGS_FILE = "sriov-hook-runtime.conf"   # sriov_hook.runtime.SETTINGS_FILE
_WHEEL = re.compile(r"^sriov_hook-([0-9][^-]*)-.*\.whl$")


class InstallError(Exception):
    pass


@dataclass(frozen=True)
class Layout:
    """Where things go, as the host will see them (before ``root`` is applied)."""

    root: str = "/"
    prefix: str = "/opt/sriov-hook"
    bindir: str = "/usr/local/bin"
    confdir: str = "/etc/sriov-hook"
    hooks_dir: str = "/usr/share/containers/oci/hooks.d"
    unitdir: str = "/etc/systemd/system"

    def at(self, path: str) -> str:
        """``path`` under the staging root."""
        return os.path.join(self.root, path.lstrip("/")) if self.root != "/" else path

    @property
    def base(self) -> str:
        return self.at(self.prefix)

    @property
    def manifest(self) -> str:
        return os.path.join(self.base, "manifest.json")

    @property
    def current(self) -> str:
        return os.path.join(self.base, "current")

    @property
    def config(self) -> str:
        return self.at(os.path.join(self.confdir, "config.yaml"))

    def command(self, name: str) -> str:
        return self.at(os.path.join(self.bindir, name))


@dataclass
class Manifest:
    """What install added; uninstall removes exactly this."""

    layout: Dict[str, str]
    version: str = ""
    release: str = ""                 # the release dir 'current' points at
    files: List[str] = field(default_factory=list)   # bin links, hooks.d files, units
    dirs: List[str] = field(default_factory=list)    # directories created, parents first
    config: str = ""
    config_created: bool = False
    units: List[str] = field(default_factory=list)
    enabled: List[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str) -> Optional["Manifest"]:
        try:
            with open(path) as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise InstallError(f"cannot read the install manifest {path}: {err}") from None
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def save(self, path: str) -> None:
        _write(path, json.dumps(asdict(self), indent=2) + "\n", 0o644)

    def add_file(self, path: str) -> None:
        if path not in self.files:
            self.files.append(path)


def say(msg: str) -> None:
    print(f"sriov-hook install: {msg}")


def _write(path: str, text: str, mode: int) -> None:
    """Whole file or nothing: a hook read mid-upgrade sees the old or the new one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode),
              "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _symlink(target: str, path: str) -> None:
    """Point ``path`` at ``target`` in one rename: never a moment without the link."""
    tmp = f"{path}.{os.getpid()}.tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)   # left by an install that died here
    os.symlink(target, tmp)
    os.replace(tmp, path)


def _mkdirs(path: str, man: Manifest) -> None:
    """mkdir -p, recording every directory it creates."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for d in reversed(missing):
        os.mkdir(d, 0o755)
        if d not in man.dirs:
            man.dirs.append(d)


def find_wheel(wheelhouse: str) -> Tuple[str, str]:
    """(path, version) of the newest sriov_hook wheel in the wheelhouse."""
    found = []
    for path in glob.glob(os.path.join(wheelhouse, "sriov_hook-*.whl")):
        m = _WHEEL.match(os.path.basename(path))
        if m:
            key = tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[.+]", m.group(1)))
            found.append((key, m.group(1), path))
    if not found:
        raise InstallError(f"no sriov_hook wheel in {wheelhouse} (run 'make wheel')")
    _, version, path = max(found)
    return path, version


def _run(cmd: List[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise InstallError(f"{what} failed: {detail[-1] if detail else proc.returncode}")


def make_release(layout: Layout, python: str, wheelhouse: str, version: str) -> str:
    """A new venv with the wheel and its dependencies, from the wheelhouse only."""
    releases = os.path.join(layout.base, "releases")
    name = f"{time.strftime('%Y%m%dT%H%M%S')}-{version}"
    release = os.path.join(releases, name)
    n = 1
    while os.path.exists(release):
        n += 1
        release = os.path.join(releases, f"{name}.{n}")
    try:
        _run([python, "-m", "venv", release], f"creating the venv {release} (python3-venv)")
        _run([os.path.join(release, "bin", "python"), "-m", "pip", "install", "--isolated", "-q",
              "--disable-pip-version-check", "--no-index", "--find-links", wheelhouse,
              f"sriov-hook=={version}"], "pip install from the wheelhouse")
        _native_client(os.path.join(release, "bin"))
    except BaseException:
        shutil.rmtree(release, ignore_errors=True)
        raise
    return release


def _native_client(bindir: str) -> None:
    """The compiled thin client (native/sriov-hook.c) in place of the Python one:
    runtimes start it for every container, and an interpreter start alone is a
    third of what a Go CNI plugin takes. Without a C compiler the Python client
    stays; it is correct, only slower to start."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        say("no C compiler (Debian: gcc): sriov-hook stays the Python client")
        return
    target = os.path.join(bindir, "sriov-hook")
    _run([cc, *NATIVE_CFLAGS, "-o", f"{target}.tmp", os.path.join(SRC, "native", "sriov-hook.c")],
         "compiling the hook client (native/sriov-hook.c)")
    os.replace(f"{target}.tmp", target)


def _rewrite_paths(text: str, layout: Layout) -> str:
    return text.replace(DEFAULT_CONFIG, layout.config).replace(DEFAULT_BIN, layout.command(""))


def render_hook(template: str, layout: Layout) -> str:
    """A hooks.d file from hooks.d/: the installed hook and config filled in."""
    with open(template) as fh:
        spec = json.load(fh)
    spec["hook"]["path"] = layout.command("sriov-hook")
    env = [e for e in spec["hook"].get("env", []) if not e.startswith("SRIOV_HOOK_CONFIG=")]
    spec["hook"]["env"] = env + [f"SRIOV_HOOK_CONFIG={layout.config}"]
    return json.dumps(spec, indent=2) + "\n"


def _unit_text(unitdir: str, unit: str) -> str:
    with open(os.path.join(unitdir, unit)) as fh:
        return fh.read()


def _wanted_by(unit_text: str) -> List[str]:
    return [t for line in unit_text.splitlines() if line.startswith("WantedBy=")
            for t in line.split("=", 1)[1].split()]


def _live(layout: Layout) -> bool:
    """Is systemd running the system this layout installs into?"""
    return layout.root == "/" and os.path.isdir("/run/systemd/system")


def _systemctl(layout: Layout, *args: str) -> Optional[str]:
    """Run systemctl: live when systemd runs this root, else offline (--root). None if absent."""
    if shutil.which("systemctl") is None:
        return None
    live = _live(layout)
    cmd = ["systemctl"] + ([] if live else [f"--root={layout.root}"]) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise InstallError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return "live" if live else "offline"


def install_units(layout: Layout, man: Manifest, enable: bool) -> None:
    unitdir = layout.at(layout.unitdir)
    _mkdirs(unitdir, man)
    units = sorted(os.path.basename(p) for p in glob.glob(os.path.join(UNITS_SRC, "*.service")))
    targets = set()
    for unit in units:
        with open(os.path.join(UNITS_SRC, unit)) as fh:
            text = _rewrite_paths(fh.read(), layout)
        path = os.path.join(unitdir, unit)
        _write(path, text, 0o644)
        man.add_file(path)
        targets.update(_wanted_by(text))
        if unit not in man.units:
            man.units.append(unit)
    if not enable or not units:
        return
    # systemctl creates <target>.wants/ itself: record those it will create.
    fresh = [os.path.join(unitdir, f"{t}.wants") for t in sorted(targets)
             if not os.path.isdir(os.path.join(unitdir, f"{t}.wants"))]
    mode = _systemctl(layout, "enable", *units)
    if mode is None:
        say("systemctl not found: units installed but not enabled")
        return
    if mode == "live":
        _systemctl(layout, "daemon-reload")
        # An upgrade: a running daemon (the agent) restarts on the new release;
        # the boot-time oneshots must not run again now.
        daemons = [u for u in units if "Type=oneshot" not in _unit_text(unitdir, u)]
        if daemons:
            _systemctl(layout, "try-restart", *daemons)
    man.dirs.extend(d for d in fresh if os.path.isdir(d) and d not in man.dirs)
    man.enabled = sorted(set(man.enabled) | set(units))
    say(f"enabled at boot ({mode}): {', '.join(units)}")


def install(layout: Layout, wheelhouse: str, python: str, runtime: Optional[str],
            enable: bool = True) -> Manifest:
    prev = Manifest.load(layout.manifest)
    if prev is None and os.path.isdir(layout.base) and os.listdir(layout.base):
        raise InstallError(f"{layout.base} exists and holds no install manifest: not ours, "
                           "refusing to install over it")
    man = prev or Manifest(layout=asdict(layout))
    man.layout = asdict(layout)
    wheel, version = find_wheel(wheelhouse)
    _mkdirs(os.path.join(layout.base, "releases"), man)
    try:
        _install_steps(layout, man, wheel, version, wheelhouse, python, runtime, enable)
    finally:
        # Even a failed install leaves a manifest of what it did add, so
        # uninstall (or the next install) can take it away.
        man.save(layout.manifest)
    return man


def _install_steps(layout: Layout, man: Manifest, wheel: str, version: str, wheelhouse: str,
                   python: str, runtime: Optional[str], enable: bool) -> None:
    release = make_release(layout, python, wheelhouse, version)
    runtime = runtime or shutil.which("runc") or "/usr/sbin/runc"
    _write(os.path.join(release, SETTINGS_FILE),
           "# sriov-hook-runtime settings, written by packaging/install.py\n"
           f"runtime={runtime}\nhook={layout.command('sriov-hook')}\nconfig={layout.config}\n",
           0o644)
    _symlink(os.path.relpath(release, layout.base), layout.current)
    old_release, man.release, man.version = man.release, release, version
    say(f"installed {os.path.basename(wheel)} into {release} (current)")

    _mkdirs(layout.at(layout.bindir), man)
    for name in COMMANDS:
        _symlink(os.path.join(layout.current, "bin", name), layout.command(name))
        man.add_file(layout.command(name))
    say(f"commands: {', '.join(layout.command(n) for n in COMMANDS)}")

    _mkdirs(os.path.dirname(layout.config), man)
    if os.path.lexists(layout.config):
        say(f"kept the existing config {layout.config}")
    else:
        with open(EXAMPLE_CONFIG) as fh:
            text = fh.read()
        for default in ("/var/lib/sriov-hook", "/var/log/sriov-hook.log", DEFAULT_CONFIG):
            text = text.replace(default, layout.at(default))   # a staging root keeps its state
        _write(layout.config, text, 0o644)
        man.config, man.config_created = layout.config, True
        say(f"wrote an example config {layout.config}: configure its pools")
    man.config = layout.config

    hooks_dir = layout.at(layout.hooks_dir)
    _mkdirs(hooks_dir, man)
    for template in sorted(glob.glob(os.path.join(HOOKS_SRC, "*.json"))):
        path = os.path.join(hooks_dir, os.path.basename(template))
        _write(path, render_hook(template, layout), 0o644)
        man.add_file(path)
    say(f"hooks.d files in {hooks_dir}")

    install_units(layout, man, enable)
    _prune(layout, keep={release, old_release})


def _prune(layout: Layout, keep: Set[str]) -> None:
    """Keep the current release and the one before it (a hook may still be running it)."""
    releases = os.path.join(layout.base, "releases")
    for name in os.listdir(releases):
        path = os.path.join(releases, name)
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
            say(f"removed the old release {path}")


def _state_paths(layout: Layout, config: str) -> Tuple[str, str]:
    """state_dir and log_file from the config (read with the installed PyYAML)."""
    state, log = layout.at("/var/lib/sriov-hook"), layout.at("/var/log/sriov-hook.log")
    code = ("import json, sys, yaml\n"
            "d = yaml.safe_load(open(sys.argv[1])) or {}\n"
            "print(json.dumps([d.get('state_dir'), d.get('log_file')]))")
    python = os.path.join(layout.current, "bin", "python")
    if not os.access(python, os.X_OK):
        return state, log
    proc = subprocess.run([python, "-c", code, config], capture_output=True, text=True)
    if proc.returncode == 0:
        got = json.loads(proc.stdout)
        state = got[0] if isinstance(got[0], str) else state
        log = got[1] if isinstance(got[1], str) else log
    return state, log


def _reserved(state_dir: str) -> List[str]:
    try:
        return [n for n in os.listdir(os.path.join(state_dir, "reservations"))
                if n.endswith(".json")]
    except OSError:
        return []


def uninstall(layout: Layout, purge: bool = False) -> bool:
    """Remove what the manifest lists; False if there was nothing installed."""
    man = Manifest.load(layout.manifest)
    if man is None:
        say(f"nothing to uninstall: no manifest at {layout.manifest}")
        return False
    layout = Layout(**man.layout)
    state, log = _state_paths(layout, man.config) if man.config else ("", "")
    held = _reserved(state) if state else []
    if purge and held:
        raise InstallError(f"{len(held)} VF(s) are still reserved in {state}: stop their "
                           "containers (or run 'sriov-hook gc') before purging")
    if man.enabled:
        mode = _systemctl(layout, "disable", *(["--now"] if _live(layout) else []),
                          *man.enabled)
        if mode == "live":
            _systemctl(layout, "daemon-reload")
        say(f"disabled {', '.join(man.enabled)}")
    for path in man.files:
        if os.path.lexists(path):
            os.unlink(path)
            say(f"removed {path}")
    shutil.rmtree(layout.base)
    say(f"removed {layout.base}")
    if purge:
        for path in (man.config, log):
            if path and os.path.lexists(path):
                os.unlink(path)
                say(f"purged {path}")
        if state and os.path.isdir(state) and not os.path.islink(state):
            shutil.rmtree(state)
            say(f"purged {state}")
    elif held:
        say(f"warning: {len(held)} VF(s) are still reserved in {state}; reinstall and run "
            "'sriov-hook gc' once their containers are gone")
    else:
        say(f"kept the config {man.config} and the state in {state}")
    for d in reversed(man.dirs):
        try:
            os.rmdir(d)
        except OSError:
            pass   # not empty: it holds something install did not add
    return True


def _layout(args: argparse.Namespace) -> Layout:
    root = os.path.abspath(args.root)
    return Layout(root=root, prefix=args.prefix, bindir=args.bindir, confdir=args.confdir,
                  hooks_dir=args.hooks_dir, unitdir=args.unitdir)


def main(argv: Optional[List[str]] = None) -> int:
    d = Layout()
    ap = argparse.ArgumentParser(prog="packaging/install.py", description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["install", "uninstall"])
    ap.add_argument("--root", default="/", help="staging root: everything goes under it")
    ap.add_argument("--prefix", default=d.prefix)
    ap.add_argument("--bindir", default=d.bindir)
    ap.add_argument("--confdir", default=d.confdir)
    ap.add_argument("--hooks-dir", default=d.hooks_dir)
    ap.add_argument("--unitdir", default=d.unitdir)
    ap.add_argument("--wheelhouse", default=os.path.join(SRC, "build", "wheelhouse"))
    ap.add_argument("--python", default=sys.executable, help="interpreter for the venv")
    ap.add_argument("--runtime", help="the OCI runtime sriov-hook-runtime runs (default: runc)")
    ap.add_argument("--no-enable", action="store_true", help="install the units, do not enable")
    ap.add_argument("--purge", action="store_true", help="uninstall: config, state and log too")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("sriov-hook: install: needs root", file=sys.stderr)
        return 1
    try:
        if args.action == "install":
            install(_layout(args), os.path.abspath(args.wheelhouse), args.python, args.runtime,
                    enable=not args.no_enable)
        else:
            uninstall(_layout(args), purge=args.purge)
    except (InstallError, OSError) as err:
        print(f"sriov-hook: {args.action} failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
