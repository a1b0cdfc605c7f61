"""Installing like a real tool (packaging/install.py), ``check`` on broken installs,
and the operator commands' polish (--version, nothing-to-do lines, cdi, status, log).

The install tests put a real wheel into a real venv under a staging root
and drive podman with the installed hooks.d files (--hooks-dir).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from typing import Any, Callable, Dict, List

import pytest

from sriov_hook import __version__
from sriov_hook.log import StepLog
from tests import simhost
from tests.conftest import HOOK, ROOT, HookResult, Sim
from tests.installing import Installed, installed, wheelhouse  # noqa: F401  (fixtures)
from tests.test_podman import PODMAN_RUN, render_hooks

pytestmark = pytest.mark.root



def problems(r: HookResult) -> List[str]:
    """check's problem lines (all but the closing count)."""
    lines = r.stdout.splitlines()
    assert lines and (lines[-1].endswith("problem(s)") or lines[-1].startswith("ok:")), r.stdout
    return lines[:-1]


# -- a real install --------------------------------------------------------------------
@pytest.mark.install
@pytest.mark.slow
def test_installed_layout(installed: Installed) -> None:  # noqa: F811
    release = os.path.realpath(installed.at("/opt/sriov-hook/current"))
    assert os.path.dirname(release) == installed.at("/opt/sriov-hook/releases")
    for name in ("sriov-hook", "sriov-dpdk", "sriov-hook-runtime"):
        assert os.path.realpath(installed.bin(name)) == os.path.join(release, "bin", name)
    assert installed.hook("--version").stdout.strip() == __version__
    # The hook runtimes start is the compiled client; --version went through the
    # release's own Python beside it.
    with open(installed.bin("sriov-hook"), "rb") as fh:
        assert fh.read(4) == b"\x7fELF"
    assert subprocess.run([installed.bin("sriov-dpdk"), "--help"],
                          capture_output=True).returncode == 0
    runc = subprocess.run(["runc", "--version"], capture_output=True, text=True).stdout
    assert subprocess.run([installed.bin("sriov-hook-runtime"), "--version"],
                          capture_output=True, text=True).stdout == runc
    # hooks.d: the installed program and config filled in, both stages.
    specs = {}
    for path in sorted(glob.glob(os.path.join(installed.hooks_dir, "*.json"))):
        with open(path) as fh:
            specs[os.path.basename(path)] = json.load(fh)
    assert sorted(specs) == ["50-sriov-hook-create.json", "50-sriov-hook-poststop.json"]
    for spec in specs.values():
        assert spec["hook"]["path"] == installed.bin("sriov-hook")
        assert f"SRIOV_HOOK_CONFIG={installed.config}" in spec["hook"]["env"]
    # The example config is commented, and a staging root keeps its state inside.
    with open(installed.config) as fh:
        example = fh.read()
    assert "# pools:" in example and f"state_dir: {installed.at('/var/lib/sriov-hook')}" in example
    # Units: the installed paths, enabled at boot.
    unitdir = installed.at("/etc/systemd/system")
    for unit in ("sriov-hook-setup.service", "sriov-hook-gc.service"):
        with open(os.path.join(unitdir, unit)) as fh:
            text = fh.read()
        assert f"ExecStart={installed.bin('sriov-hook')} --config {installed.config} " in text
        assert os.path.islink(os.path.join(unitdir, "multi-user.target.wants", unit))
    settings = os.path.join(release, "sriov-hook-runtime.conf")
    with open(settings) as fh:
        assert f"hook={installed.bin('sriov-hook')}\n" in fh.read()


@pytest.mark.install
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_installed_units_verify(installed: Installed) -> None:  # noqa: F811
    units = sorted(glob.glob(installed.at("/etc/systemd/system/*.service")))
    assert len(units) >= 2
    r = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.install
@pytest.mark.podman
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed")
def test_fresh_install_podman_gets_its_vf_uninstall_leaves_state_and_config(
        make_sim: Callable[..., Sim], wheelhouse: str, tmp_path: Any) -> None:  # noqa: F811
    inst = Installed(str(tmp_path / "root"), wheelhouse)
    os.makedirs(inst.root)
    inst.install()
    # Unconfigured: check says so in one line, and finds nothing else wrong.
    r = inst.hook("check", "--hooks-dir", inst.hooks_dir)
    assert r.returncode == 1
    assert [p for p in r.stdout.splitlines()[:-1]] == \
        [f"config {inst.config}: pools: must be a non-empty list"]
    # Configure it: the simulated host's PF, state and log in the root.
    sim = make_sim(nvfs=2)
    sim.host.state_dir = inst.at("/var/lib/sriov-hook")
    sim.host.log_file = inst.at("/var/log/sriov-hook.log")
    simhost.write_config(sim.host)
    shutil.copyfile(sim.config, inst.config)
    r = inst.hook("check", "--hooks-dir", inst.hooks_dir)
    assert (r.returncode, r.stdout.strip()) == (0, "ok: no inconsistencies"), r.stdout + r.stderr
    tar = str(tmp_path / "rootfs.tar")
    from tests.containers import rootfs_tar
    tag = f"localhost/sriov-install-test:{uuid.uuid4().hex[:8]}"
    name = f"inst-{uuid.uuid4().hex[:8]}"
    subprocess.run(["podman", "import", rootfs_tar(tar), tag], check=True, capture_output=True)
    try:
        ann = '"sriov-hook.io/networks=' + \
            json.dumps([{"pool": "fast", "ips": ["10.80.0.2/24"]}]).replace('"', '""') + '"'
        out = subprocess.run(PODMAN_RUN + ["--name", name, "--hooks-dir", inst.hooks_dir,
                                           "--annotation", ann, tag, "ip", "-o", "addr", "show",
                                           "dev", "net1"],
                             capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True)
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)
    assert out.returncode == 0, out.stderr
    assert "inet 10.80.0.2/24" in out.stdout
    sim.assert_clean()
    log = inst.at("/var/log/sriov-hook.log")
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o640
    inst.uninstall()
    left = inst.files()
    state = os.path.relpath(sim.host.state_dir, inst.root)
    assert [f for f in left if not f.startswith(state + "/")] == \
        ["etc/sriov-hook/config.yaml", "var/log/sriov-hook.log"]
    kept = {"etc", "etc/sriov-hook", "var", "var/log", "var/lib"}
    assert [d for d in inst.dirs() if d not in kept and not d.startswith(state)] == []


@pytest.mark.install
@pytest.mark.slow
def test_upgrade_keeps_config_and_one_previous_release_purge_removes_all(
        wheelhouse: str, tmp_path: Any) -> None:  # noqa: F811
    inst = Installed(str(tmp_path / "root"), wheelhouse)
    os.makedirs(inst.root)
    inst.install()
    with open(inst.config, "a") as fh:
        fh.write("# edited by the operator\n")
    with open(inst.config) as fh:
        edited = fh.read()
    releases = inst.at("/opt/sriov-hook/releases")
    first = sorted(os.listdir(releases))
    for _ in range(2):
        out = inst.install().stdout
        assert "kept the existing config" in out
    with open(inst.config) as fh:
        assert fh.read() == edited
    now = sorted(os.listdir(releases))
    assert len(now) == 2 and first[0] not in now           # current + the one before it
    assert os.path.realpath(inst.at("/opt/sriov-hook/current")) == os.path.join(releases, now[-1])
    assert inst.hook("--version").stdout.strip() == __version__
    assert len(inst.manifest["files"]) == len(set(inst.manifest["files"]))
    # Purge is refused while a VF is reserved, then removes everything.
    held = inst.at("/var/lib/sriov-hook/reservations")
    os.makedirs(held)
    with open(os.path.join(held, "0000:10:10.0.json"), "w") as fh:
        fh.write("{}")
    r = inst.installer("uninstall", "--purge")
    assert r.returncode == 1 and "still reserved" in r.stderr
    assert os.path.exists(inst.bin("sriov-hook"))           # refused before removing anything
    os.unlink(os.path.join(held, "0000:10:10.0.json"))
    inst.uninstall("--purge")
    assert inst.files() == [] and inst.dirs() == ["var", "var/lib"]   # these two are the test's


def test_install_refuses_a_prefix_that_is_not_its_own(tmp_path: Any) -> None:
    inst = Installed(str(tmp_path / "root"), str(tmp_path / "no-wheels"))
    os.makedirs(inst.at("/opt/sriov-hook"))
    with open(inst.at("/opt/sriov-hook/something"), "w") as fh:
        fh.write("not ours")
    r = inst.installer("install")
    assert r.returncode == 1
    assert r.stderr.startswith("sriov-hook: install failed: ") and "not ours" in r.stderr
    assert inst.files() == ["opt/sriov-hook/something"]


def test_uninstall_with_nothing_installed_says_so(tmp_path: Any) -> None:
    inst = Installed(str(tmp_path), "")
    r = inst.installer("uninstall")
    assert r.returncode == 0 and "nothing to uninstall" in r.stdout


# -- check: one line per problem -------------------------------------------------------
def hooks_dir(tmp: str, config: str, hook: str = HOOK) -> str:
    """hooks.d/ rendered for ``hook`` (this venv's) and the test config."""
    return render_hooks(os.path.join(tmp, f"hooks-{uuid.uuid4().hex[:6]}"), config, hook)


def edit_hook_file(d: str, name: str, change: Callable[[Dict[str, Any]], None]) -> None:
    path = os.path.join(d, name)
    with open(path) as fh:
        spec = json.load(fh)
    change(spec)
    with open(path, "w") as fh:
        json.dump(spec, fh)


def copy_of_hook(tmp: str, mode: int, shebang: str = "") -> str:
    """The venv's hook (the compiled client) copied alone; with ``shebang``, the
    Python client (bin/sriov-hook) under that interpreter line."""
    path = os.path.join(tmp, f"hook-{uuid.uuid4().hex[:6]}", "sriov-hook")
    os.makedirs(os.path.dirname(path))
    if shebang:
        with open(os.path.join(ROOT, "bin", "sriov-hook")) as fh:
            text = shebang + "\n" + fh.read().split("\n", 1)[1]
        with open(path, "w") as fh:
            fh.write(text)
    else:
        shutil.copyfile(HOOK, path)
    os.chmod(path, mode)
    return path


def _set_path(path: str) -> Callable[[Dict[str, Any]], None]:
    return lambda spec: spec["hook"].update(path=path)


def _break_binary(sim: Sim, d: str, tmp: str) -> None:
    edit_hook_file(d, "50-sriov-hook-create.json", _set_path(f"{tmp}/gone/sriov-hook"))


def _break_exec_bit(sim: Sim, d: str, tmp: str) -> None:
    edit_hook_file(d, "50-sriov-hook-create.json", _set_path(copy_of_hook(tmp, 0o644)))


def _break_interpreter(sim: Sim, d: str, tmp: str) -> None:
    copy = copy_of_hook(tmp, 0o755, shebang="#!/nonexistent/venv/bin/python")
    edit_hook_file(d, "50-sriov-hook-poststop.json", _set_path(copy))


def _native_without_venv(sim: Sim, d: str, tmp: str) -> None:
    edit_hook_file(d, "50-sriov-hook-poststop.json", _set_path(copy_of_hook(tmp, 0o755)))


def _drop_poststop(sim: Sim, d: str, tmp: str) -> None:
    os.unlink(os.path.join(d, "50-sriov-hook-poststop.json"))


def _swap_stage(sim: Sim, d: str, tmp: str) -> None:
    edit_hook_file(d, "50-sriov-hook-poststop.json",
                   lambda spec: spec["hook"].update(args=["sriov-hook", "createRuntime"]))


def _state_symlink(sim: Sim, d: str, tmp: str) -> None:
    os.makedirs(os.path.join(tmp, "elsewhere"))
    shutil.rmtree(sim.host.state_dir, ignore_errors=True)
    os.symlink(os.path.join(tmp, "elsewhere"), sim.host.state_dir)


def _state_world_writable(sim: Sim, d: str, tmp: str) -> None:
    os.makedirs(sim.host.state_dir, exist_ok=True)
    os.chmod(sim.host.state_dir, 0o777)


def _state_not_roots(sim: Sim, d: str, tmp: str) -> None:
    os.makedirs(sim.host.state_dir, exist_ok=True)
    os.chown(sim.host.state_dir, 1000, 1000)


def _log_symlink(sim: Sim, d: str, tmp: str) -> None:
    os.symlink(os.path.join(tmp, "victim"), sim.host.log_file)


BREAKAGES: Dict[str, Any] = {
    "hook binary missing": (_break_binary, ["does not exist: podman skips this hook"]),
    "hook not executable": (_break_exec_bit, ["is not executable"]),
    "hook's venv gone": (_break_interpreter,
                         ["its interpreter /nonexistent/venv/bin/python does not exist"]),
    "compiled hook without its venv": (_native_without_venv, ["python) does not exist"]),
    "no poststop file": (_drop_poststop, ["no poststop file for sriov-hook"]),
    "args and stage differ": (_swap_stage, ["runs 'sriov-hook createRuntime' at stage poststop"]),
    "state_dir a symlink": (_state_symlink, ["is a symlink"]),
    "state_dir world-writable": (_state_world_writable, ["is world-writable"]),
    "state_dir not root's": (_state_not_roots, ["is owned by uid 1000, not root"]),
    "log_file a symlink": (_log_symlink, ["is a symlink"]),
}


def test_check_passes_a_good_installation(sim: Sim, tmp_path: Any) -> None:
    r = sim.hook("check", "--hooks-dir", hooks_dir(str(tmp_path), sim.config))
    assert (r.rc, problems(r)) == (0, []), r.stdout + r.stderr


@pytest.mark.parametrize("what", sorted(BREAKAGES))
def test_check_catches_a_broken_installation(sim: Sim, tmp_path: Any, what: str) -> None:
    tmp = str(tmp_path)
    d = hooks_dir(tmp, sim.config)
    breakage, expected = BREAKAGES[what]
    breakage(sim, d, tmp)
    r = sim.hook("check", "--hooks-dir", d)
    found = problems(r)
    assert r.rc == 1 and r.stderr == "", r.stdout + r.stderr
    assert len(found) == len(expected), found                 # one line per problem
    for line, text in zip(found, expected):
        assert text in line, found
    if what == "log_file a symlink":
        assert not os.path.exists(os.path.join(tmp, "victim"))   # and check wrote nothing there


def test_check_reports_a_bad_config_and_still_checks_the_rest(sim: Sim, tmp_path: Any) -> None:
    d = hooks_dir(str(tmp_path), sim.config)
    _break_binary(sim, d, str(tmp_path))
    simhost.write_config(sim.host, pools=[{"name": "fast", "mode": "teleport", "pfs": ["x"]}])
    r = sim.hook("check", "--hooks-dir", d)
    found = problems(r)
    assert r.rc == 1 and len(found) == 2, r.stdout + r.stderr
    assert found[0].startswith(f"config {sim.config}: pools[0].mode")
    assert "does not exist" in found[1]


def test_check_names_an_empty_hooks_dir_and_a_broken_wrapper(sim: Sim, tmp_path: Any) -> None:
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    settings = str(tmp_path / "rt.conf")
    with open(settings, "w") as fh:
        fh.write(f"runtime=/nonexistent/runc\nhook={HOOK}\nconfig={sim.config}\n")
    r = sim.hook("check", "--hooks-dir", empty,
                 env=dict(os.environ, SRIOV_HOOK_RUNTIME_CONF=settings))
    found = problems(r)
    assert r.rc == 1 and len(found) == 2, r.stdout + r.stderr
    assert found[0] == f"hooks.d: no sriov-hook files in {empty}"
    assert "runtime /nonexistent/runc is not an executable" in found[1]


# -- operator commands -----------------------------------------------------------------
def one_line_error(r: HookResult, text: str) -> None:
    assert r.rc != 0 and r.stderr.startswith("sriov-hook: ") and text in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr


def test_version_flag(sim: Sim) -> None:
    for argv in (["--version"], ["version"]):
        r = sim.hook(*argv)
        assert (r.rc, r.stdout.strip()) == (0, __version__)


def test_commands_say_when_there_is_nothing_to_do(sim: Sim) -> None:
    r = sim.hook("setup")
    assert r.rc == 0 and "nothing to do" in r.stdout and "numvfs" in r.stdout
    r = sim.hook("gc")
    assert r.rc == 0 and "gc: nothing to do" in r.stdout


def test_status_flags_a_missing_pf(sim: Sim) -> None:
    simhost.write_config(sim.host, pools=[
        {"name": "fast", "pfs": [sim.host.nics[0].pf]},
        {"name": "gone", "pfs": ["nosuchpf0"]}])
    r = sim.hook("status")
    assert r.rc == 1 and "pool gone: no PCI device behind netdev nosuchpf0" in r.stdout
    assert sim.hook("status", "--json").rc == 1


def vfio_config(sim: Sim, pfs: str) -> None:
    simhost.write_config(sim.host, pools=[{"name": "vf", "mode": "vfio", "pfs": [pfs]}])


def test_cdi_refuses_to_describe_nothing(sim: Sim, tmp_path: Any) -> None:
    out = str(tmp_path / "spec.json")
    one_line_error(sim.hook("cdi", "--output", out), "has no vfio pool")
    vfio_config(sim, f"{sim.host.nics[0].pf}#6-7")      # a range past the VFs there are
    one_line_error(sim.hook("cdi", "--output", out), "no VF in vfio pool(s) vf")
    assert not os.path.exists(out)


def test_cdi_output_is_a_directory_or_a_json_file(sim: Sim, tmp_path: Any) -> None:
    vfio_config(sim, sim.host.nics[0].pf)
    missing = str(tmp_path / "newdir")
    one_line_error(sim.hook("cdi", "--output", missing), "neither an existing directory")
    one_line_error(sim.hook("cdi", "--output", missing + "/"), "no such directory")
    one_line_error(sim.hook("cdi", "--output", missing + "/spec.json"),
                   f"directory {missing} does not exist")
    assert not os.path.exists(missing)
    r = sim.hook("cdi", "--output", str(tmp_path))
    assert r.rc == 0 and r.stdout.strip() == f"wrote {tmp_path}/sriov-hook.json", r.stderr
    r = sim.hook("cdi", "--output", str(tmp_path / "mine.json"))
    assert r.rc == 0 and os.path.isfile(tmp_path / "mine.json")
    with open(tmp_path / "mine.json") as fh:
        assert json.load(fh)["kind"] == "sriov-hook.io/vf"


def test_log_is_0640_and_never_follows_a_symlink(tmp_path: Any,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "hook.log")
    log = StepLog(path)
    log.info("hello")
    log.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    os.chmod(path, 0o644)            # as older versions left it
    log = StepLog(path)
    log.info("again")
    log.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    victim = tmp_path / "victim"
    victim.write_text("")
    os.unlink(path)
    os.symlink(victim, path)
    log = StepLog(path)
    log.info("redirected?")
    log.close()
    assert victim.read_text() == ""
    assert "cannot open log" in capsys.readouterr().err


def test_log_refuses_a_fifo_without_hanging(tmp_path: Any) -> None:
    path = str(tmp_path / "hook.log")
    os.mkfifo(path)
    code = f"from sriov_hook.log import StepLog; StepLog({path!r}).info('x')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       cwd=ROOT)
    assert r.returncode == 0 and "cannot open log" in r.stderr
