"""sriov-hook-runtime: argv pass-through, the config.json rewrite, and real engines.

The engines are Debian's: runc directly, containerd 1.6 (``ctr run
--runc-binary``, and ``ctr run --config`` with the hook in the spec, no
wrapper) and Docker 20.10 (daemon.json ``runtimes``), each daemon private
to the test module. The containerd and Docker tests use a real install of
the package into a staging root (tests/installing.py), as an operator would.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from sriov_hook import runtime
from tests.conftest import HOOK, Sim
from tests.containers import Runc, busybox_rootfs, hook_entry, rootfs_tar, runc_bundle
from tests.engines import Containerd, Dockerd, oci_archive
from tests.installing import Installed, installed, wheelhouse  # noqa: F401  (fixtures)

pytestmark = pytest.mark.root

VENV_BIN = os.path.dirname(sys.executable)
WRAPPER = os.path.join(VENV_BIN, "sriov-hook-runtime")
IMAGE = "localhost/sriov-hook-test:1"
ANN = "sriov-hook.io/networks"


def write_settings(path: str, runtime_bin: str = "/usr/sbin/runc", hook: str = HOOK,
                   config: str = "/etc/sriov-hook/config.yaml") -> str:
    with open(path, "w") as fh:
        fh.write(f"# test settings\nruntime={runtime_bin}\nhook={hook}\nconfig={config}\n")
    return path


def recorder(tmp: str) -> str:
    """A stand-in runtime that records its argv (NUL-separated) and succeeds."""
    path = os.path.join(tmp, "fake-runc")
    with open(path, "w") as fh:
        fh.write(f"#!/bin/sh\n: > {tmp}/argv\n"
                 f"for a in \"$@\"; do printf '%s\\0' \"$a\" >> {tmp}/argv; done\n")
    os.chmod(path, 0o755)
    return path


def recorded(tmp: str) -> Optional[List[str]]:
    try:
        with open(os.path.join(tmp, "argv"), "rb") as fh:
            return fh.read().decode().split("\0")[:-1]
    except FileNotFoundError:
        return None


def wrap(args: List[str], settings: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, **{runtime.SETTINGS_ENV: settings})
    return subprocess.run([WRAPPER, *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=120, **kw)


def bundle(tmp: str, annotations: Optional[Dict[str, str]] = None,
           env: Optional[List[str]] = None, hooks: Optional[Dict[str, Any]] = None) -> str:
    d = runc_bundle(os.path.join(tmp, f"b-{uuid.uuid4().hex[:6]}"), ["sh", "-c", "true"],
                    annotations, hooks)
    if env:
        path = os.path.join(d, "config.json")
        with open(path) as fh:
            spec = json.load(fh)
        spec["process"]["env"] += env
        with open(path, "w") as fh:
            json.dump(spec, fh)
    return d


def spec_of(b: str) -> Dict[str, Any]:
    with open(os.path.join(b, "config.json")) as fh:
        data: Dict[str, Any] = json.load(fh)
    return data


# -- argv ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, cmd, bundle_dir", [
    # containerd's runc shim (go-runc)
    (["--root", "/run/containerd/runc/k8s.io", "--log", "/b/log.json", "--log-format", "json",
      "create", "--bundle", "/b", "--pid-file", "/b/init.pid", "abc"], "create", "/b"),
    (["--root=/r", "--systemd-cgroup", "run", "--bundle=/x", "--detach", "id"], "run", "/x"),
    (["--debug", "create", "-b", "/y", "--console-socket", "/s.sock", "id"], "create", "/y"),
    # a log file named like a command is not the command
    (["--log", "create", "state", "id"], "state", None),
    (["--version"], None, None),
])
def test_command_and_bundle_are_found(argv: List[str], cmd: Optional[str],
                                      bundle_dir: Optional[str]) -> None:
    found, at = runtime.find_command(argv)
    assert found == cmd
    if bundle_dir is not None:
        assert runtime.find_bundle(argv[at + 1:]) == bundle_dir


def test_create_without_bundle_uses_the_working_directory(tmp_path: Any) -> None:
    assert runtime.find_bundle(["--pid-file", "/p", "id"]) == os.getcwd()


def test_every_command_passes_through_unchanged(tmp_path: Any) -> None:
    tmp = str(tmp_path)
    settings = write_settings(os.path.join(tmp, "rt.conf"), runtime_bin=recorder(tmp))
    plain = bundle(tmp)
    before = os.stat(os.path.join(plain, "config.json"))
    with open(os.path.join(plain, "config.json"), "rb") as fh:
        raw = fh.read()
    for argv in (["--root", "/r", "--log", "/l", "--log-format", "json", "create", "--bundle",
                  plain, "--pid-file", f"{tmp}/pid", "c 1"],
                 ["--root", "/r", "start", "c1"], ["state", "c1"], ["kill", "c1", "9"],
                 ["delete", "--force", "c1"], ["features"], ["--version"], []):
        r = wrap(argv, settings)
        assert r.returncode == 0, r.stderr
        assert recorded(tmp) == argv
    after = os.stat(os.path.join(plain, "config.json"))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    with open(os.path.join(plain, "config.json"), "rb") as fh:
        assert fh.read() == raw


def test_real_runc_answers_through_the_wrapper(tmp_path: Any) -> None:
    settings = write_settings(str(tmp_path / "rt.conf"))
    direct = subprocess.run(["runc", "--version"], capture_output=True, text=True)
    r = wrap(["--version"], settings)
    assert (r.returncode, r.stdout) == (0, direct.stdout)
    args = ["--root", str(tmp_path / "state"), "state", "nosuch"]
    direct = subprocess.run(["runc", *args], capture_output=True, text=True)
    r = wrap(args, settings)
    # runc's own error, untouched (past its timestamp)
    assert r.returncode == direct.returncode == 1
    assert r.stderr.split(" level=")[1] == direct.stderr.split(" level=")[1]


# -- the rewrite -----------------------------------------------------------------------
def test_annotated_bundle_gets_both_hooks_once(tmp_path: Any) -> None:
    tmp = str(tmp_path)
    settings = write_settings(os.path.join(tmp, "rt.conf"), runtime_bin=recorder(tmp),
                              config="/etc/x.yaml")
    b = bundle(tmp, annotations={ANN: "fast@net1", "other": "kept"})
    os.chmod(os.path.join(b, "config.json"), 0o640)
    before = spec_of(b)
    ino = os.stat(os.path.join(b, "config.json")).st_ino
    for _ in range(2):   # idempotent: a retried create adds nothing more
        r = wrap(["create", "--bundle", b, "cid"], settings)
        assert r.returncode == 0, r.stderr
    after = spec_of(b)
    hooks = after.pop("hooks")
    assert {k: v for k, v in after.items()} == {k: v for k, v in before.items() if k != "hooks"}
    assert [h["args"] for h in hooks["createRuntime"]] == \
        [["sriov-hook", "--config", "/etc/x.yaml", "createRuntime"]]
    assert [h["args"] for h in hooks["poststop"]] == \
        [["sriov-hook", "--config", "/etc/x.yaml", "poststop"]]
    assert hooks["createRuntime"][0]["path"] == HOOK and hooks["poststop"][0]["timeout"] == 30
    st = os.stat(os.path.join(b, "config.json"))
    assert st.st_ino != ino and stat.S_IMODE(st.st_mode) == 0o640   # renamed over, mode kept
    assert sorted(os.listdir(b)) == ["config.json"]                 # no temp file left
    assert recorded(tmp) == ["create", "--bundle", b, "cid"]


def test_env_request_is_copied_into_the_annotation(tmp_path: Any) -> None:
    tmp = str(tmp_path)
    settings = write_settings(os.path.join(tmp, "rt.conf"), runtime_bin=recorder(tmp))
    b = bundle(tmp, env=["SRIOV_HOOK_NETWORKS=fast@net3"])
    assert wrap(["run", "-b", b, "cid"], settings).returncode == 0
    assert spec_of(b)["annotations"][ANN] == "fast@net3"
    assert len(spec_of(b)["hooks"]["createRuntime"]) == 1
    both = bundle(tmp, annotations={ANN: "fast@net1"}, env=["SRIOV_HOOK_NETWORKS=slow"])
    assert wrap(["create", "--bundle", both, "c2"], settings).returncode == 0
    assert spec_of(both)["annotations"][ANN] == "fast@net1"   # the annotation wins


def test_hooks_already_there_are_not_added_twice(tmp_path: Any) -> None:
    tmp = str(tmp_path)
    settings = write_settings(os.path.join(tmp, "rt.conf"), runtime_bin=recorder(tmp))
    # As podman's hooks.d puts them: prestart + poststop, another path to sriov-hook.
    existing = {"prestart": [hook_entry("/usr/local/bin/sriov-hook", "/c.yaml", "prestart")],
                "poststop": [hook_entry("/usr/local/bin/sriov-hook", "/c.yaml", "poststop")]}
    b = bundle(tmp, annotations={ANN: "fast"}, hooks=existing)
    assert wrap(["create", "--bundle", b, "cid"], settings).returncode == 0
    hooks = spec_of(b)["hooks"]
    assert "createRuntime" not in hooks and len(hooks["poststop"]) == 1


def test_refuses_clearly_when_the_hook_is_missing(tmp_path: Any) -> None:
    tmp = str(tmp_path)
    settings = write_settings(os.path.join(tmp, "rt.conf"), runtime_bin=recorder(tmp),
                              hook=os.path.join(tmp, "gone", "sriov-hook"))
    b = bundle(tmp, annotations={ANN: "fast"})
    with open(os.path.join(b, "config.json"), "rb") as fh:
        raw = fh.read()
    log = os.path.join(tmp, "log.json")
    r = wrap(["--log", log, "--log-format", "json", "create", "--bundle", b, "cid"], settings)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sriov-hook: ") and "not installed" in lines[0]
    assert recorded(tmp) is None                     # runc never ran: no container without VF
    with open(log) as fh:
        entry = json.loads(fh.readlines()[-1])       # where containerd looks for the reason
    assert entry["level"] == "error" and entry["msg"] == lines[0]
    with open(os.path.join(b, "config.json"), "rb") as fh:
        assert fh.read() == raw
    # A container that asks for nothing still runs without the hook installed.
    plain = bundle(tmp)
    assert wrap(["create", "--bundle", plain, "c2"], settings).returncode == 0


@pytest.mark.parametrize("mutate, message", [
    (lambda p: open(p, "w").write('{"annotations": {"sriov-hook.io/networks": '),
     "is not valid JSON"),
    (lambda p: open(p, "w").write('{"annotations": ["sriov-hook.io/networks"]}'),
     "annotations must be an object"),
])
def test_refuses_a_spec_it_cannot_read(tmp_path: Any, mutate: Callable[[str], Any],
                                       message: str) -> None:
    tmp = str(tmp_path)
    settings = write_settings(os.path.join(tmp, "rt.conf"), runtime_bin=recorder(tmp))
    b = bundle(tmp)
    mutate(os.path.join(b, "config.json"))
    r = wrap(["create", "--bundle", b, "cid"], settings)
    assert r.returncode == 1 and r.stderr.startswith("sriov-hook: ") and message in r.stderr
    assert recorded(tmp) is None


def test_missing_runtime_is_one_line(tmp_path: Any) -> None:
    settings = write_settings(str(tmp_path / "rt.conf"), runtime_bin=str(tmp_path / "no-runc"))
    r = wrap(["state", "x"], settings)
    assert r.returncode == 1
    assert r.stderr.startswith("sriov-hook: cannot run the OCI runtime") and \
        len(r.stderr.splitlines()) == 1


# -- runc, for real --------------------------------------------------------------------
@pytest.mark.runc
def test_runc_through_the_wrapper(sim: Sim, tmp_path: Any) -> None:
    settings = write_settings(str(tmp_path / "rt.conf"), config=sim.config)
    runc = Runc(f"/run/sriov-test-wrap-{uuid.uuid4().hex[:8]}")
    try:
        ann = json.dumps([{"pool": "fast", "ips": ["10.50.0.2/24"]}])
        b = runc_bundle(str(tmp_path / "a"), ["sh", "-c", "ip -o addr show dev net1"],
                        {ANN: ann})
        cid = f"wr-{uuid.uuid4().hex[:8]}"
        runc.ids.append(cid)
        r = wrap(["--root", runc.root, "run", "--bundle", b, cid], settings)
        assert r.returncode == 0, r.stderr
        assert "inet 10.50.0.2/24" in r.stdout
        sim.assert_clean()
        plain = runc_bundle(str(tmp_path / "p"), ["ls", "/sys/class/net"])
        cid2 = f"wp-{uuid.uuid4().hex[:8]}"
        runc.ids.append(cid2)
        r = wrap(["--root", runc.root, "run", "--bundle", plain, cid2], settings)
        assert r.returncode == 0 and r.stdout.split() == ["lo"], r.stderr
        assert "hooks" not in spec_of(plain)
        with open(sim.host.log_file) as fh:
            assert f"cid={cid2}" not in fh.read()
    finally:
        runc.cleanup()


# -- real engines ----------------------------------------------------------------------
def use_config(inst: Installed, sim: Sim) -> None:
    """The installed tree's config becomes the simulated host's (written whole)."""
    tmp = inst.config + ".new"
    shutil.copyfile(sim.config, tmp)
    os.replace(tmp, inst.config)


def parallel(n: int, start: Callable[[int], subprocess.CompletedProcess[str]]
             ) -> List[subprocess.CompletedProcess[str]]:
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(start, range(n)))


def assert_refused_for_exhaustion(results: List[subprocess.CompletedProcess[str]], ok: int) -> None:
    good = [r for r in results if r.returncode == 0]
    bad = [r for r in results if r.returncode != 0]
    assert len(good) == ok, [r.stderr for r in results]
    for r in bad:
        assert "sriov-hook: pool fast is exhausted" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def ctd(tmp_path_factory: Any) -> Iterator[Containerd]:
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        pytest.skip("containerd not installed")
    base = str(tmp_path_factory.mktemp("containerd"))
    daemon = Containerd(base)
    left: List[str] = []
    try:
        r = daemon.ctr("images", "import", oci_archive(os.path.join(base, "img.tar"), IMAGE))
        assert r.returncode == 0, r.stderr
        yield daemon
    finally:
        left = daemon.stop()
    assert left == []   # no shim, no mount outlived its container


def ctr_run(ctd: Containerd, inst: Installed, cid: str, *args: str,
            detach: bool = False) -> subprocess.CompletedProcess[str]:
    mode = ["-d", "--null-io"] if detach else ["--rm"]
    try:
        return ctd.ctr("run", *mode, "--runc-binary", inst.bin("sriov-hook-runtime"), *args)
    finally:
        if not detach:
            ctd.remove(cid)   # ctr leaves the container record behind a failed create


@pytest.mark.containerd
@pytest.mark.slow
def test_containerd_runc_binary(sim: Sim, ctd: Containerd, installed: Installed) -> None:  # noqa: F811
    use_config(installed, sim)
    ann = json.dumps([{"pool": "fast", "ips": ["10.60.0.2/24"], "mac": "02:00:00:cc:00:02"}])
    cid = f"ca-{uuid.uuid4().hex[:8]}"
    r = ctr_run(ctd, installed, cid, "--annotation", f"{ANN}={ann}", IMAGE, cid,
                "sh", "-c", "ip -o addr show dev net1; cat /sys/class/net/net1/address")
    assert r.returncode == 0, r.stderr
    assert "inet 10.60.0.2/24" in r.stdout and "02:00:00:cc:00:02" in r.stdout
    sim.assert_clean()
    # Without the annotation: no hook, no VF, not a line in the log.
    cid2 = f"cu-{uuid.uuid4().hex[:8]}"
    r = ctr_run(ctd, installed, cid2, IMAGE, cid2, "ls", "/sys/class/net")
    assert r.returncode == 0 and r.stdout.split() == ["lo"], r.stderr
    # The environment variable instead of the annotation.
    cid3 = f"ce-{uuid.uuid4().hex[:8]}"
    r = ctr_run(ctd, installed, cid3, "--env", "SRIOV_HOOK_NETWORKS=fast@eth9", IMAGE, cid3,
                "ls", "/sys/class/net")
    assert r.returncode == 0 and "eth9" in r.stdout.split(), r.stderr
    sim.assert_clean()
    with open(sim.host.log_file) as fh:
        log = fh.read()
    assert f"cid={cid} " in log and f"cid={cid3} " in log and f"cid={cid2}" not in log


@pytest.mark.containerd
@pytest.mark.slow
def test_containerd_config_spec_carries_the_hook(sim: Sim, ctd: Containerd,  # noqa: F811
                                                 installed: Installed, tmp_path: Any) -> None:
    use_config(installed, sim)
    b = runc_bundle(str(tmp_path / "spec"), ["sh", "-c", "ip -o link show dev net1"],
                    {ANN: "fast"},
                    {"createRuntime": [hook_entry(installed.bin("sriov-hook"),
                                                  installed.config, "createRuntime")],
                     "poststop": [hook_entry(installed.bin("sriov-hook"),
                                             installed.config, "poststop")]})
    spec = spec_of(b)
    spec["root"] = {"path": busybox_rootfs(), "readonly": True}
    path = str(tmp_path / "spec.json")
    with open(path, "w") as fh:
        json.dump(spec, fh)
    cid = f"cs-{uuid.uuid4().hex[:8]}"
    try:
        r = ctd.ctr("run", "--rm", "--config", path, cid)   # plain runc: no wrapper
    finally:
        ctd.remove(cid)
    assert r.returncode == 0, r.stderr
    assert "net1" in r.stdout
    sim.assert_clean()


@pytest.mark.containerd
@pytest.mark.slow
def test_containerd_failed_create_leaks_nothing(make_sim: Callable[..., Sim],  # noqa: F811
                                                ctd: Containerd, installed: Installed) -> None:
    sim = make_sim(nvfs=1)
    use_config(installed, sim)
    cid = f"cf-{uuid.uuid4().hex[:8]}"
    r = ctr_run(ctd, installed, cid, "--annotation", f"{ANN}=fast,fast", IMAGE, cid, "true")
    assert r.returncode != 0
    assert "sriov-hook: pool fast is exhausted" in r.stderr
    sim.assert_clean()
    assert ctd.containers() == [] and ctd.ctr("tasks", "list", "-q").stdout.split() == []
    # The hook gone (a half-removed install): refused by the wrapper, with why.
    hook = installed.bin("sriov-hook")
    os.rename(hook, hook + ".away")
    try:
        cid2 = f"cm-{uuid.uuid4().hex[:8]}"
        r = ctr_run(ctd, installed, cid2, "--env", "SRIOV_HOOK_NETWORKS=fast", IMAGE, cid2, "true")
    finally:
        os.rename(hook + ".away", hook)
    assert r.returncode != 0
    assert f"sriov-hook: the container asks for VFs ({ANN}) but the hook {hook} is not " \
        "installed" in r.stderr
    sim.assert_clean()


@pytest.mark.containerd
@pytest.mark.slow
def test_containerd_parallel_starts_beyond_the_pool(make_sim: Callable[..., Sim],  # noqa: F811
                                                    ctd: Containerd,
                                                    installed: Installed) -> None:
    sim = make_sim(nvfs=2)
    use_config(installed, sim)
    ids = [f"cp{i}-{uuid.uuid4().hex[:6]}" for i in range(5)]
    try:
        results = parallel(len(ids), lambda i: ctr_run(
            ctd, installed, ids[i], "--annotation", f"{ANN}=fast", IMAGE, ids[i],
            "sleep", "300", detach=True))
        assert_refused_for_exhaustion(results, ok=2)
        running = ctd.ctr("tasks", "list", "-q").stdout.split()
        assert sorted(running) == sorted(i for i, r in zip(ids, results) if r.returncode == 0)
    finally:
        for cid in ids:
            ctd.remove(cid)
    sim.assert_clean()


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory: Any, installed: Installed) -> Iterator[Dockerd]:  # noqa: F811
    if shutil.which("dockerd") is None or not os.path.exists("/usr/bin/docker"):
        pytest.skip("docker.io not installed")
    base = str(tmp_path_factory.mktemp("docker"))
    daemon = Dockerd(base, {"sriov": installed.bin("sriov-hook-runtime")})
    left: List[str] = []
    try:
        r = daemon.docker("import", rootfs_tar(os.path.join(base, "rootfs.tar")), IMAGE)
        assert r.returncode == 0, r.stderr
        yield daemon
    finally:
        left = daemon.stop()
    assert left == []   # no shim, no mount (the netns pins included) outlived its container


def docker_run(dk: Dockerd, name: str, *args: str, detach: bool = False,
               env: Optional[str] = None) -> subprocess.CompletedProcess[str]:
    opts = ["-d"] if detach else ["--rm"]
    if env is not None:
        opts += ["-e", f"SRIOV_HOOK_NETWORKS={env}"]
    return dk.docker("run", *opts, "--name", name, "--runtime", "sriov", "--network", "none",
                     *args)


@pytest.mark.docker
@pytest.mark.slow
def test_docker_env_request_gets_its_vf(sim: Sim, dockerd: Dockerd,  # noqa: F811
                                        installed: Installed) -> None:
    use_config(installed, sim)
    req = json.dumps([{"pool": "fast", "ips": ["10.70.0.2/24"], "mac": "02:00:00:dd:00:02"}])
    name = f"da-{uuid.uuid4().hex[:8]}"
    r = docker_run(dockerd, name, IMAGE, "sh", "-c",
                   "ip -o addr show dev net1; cat /sys/class/net/net1/address", env=req)
    assert r.returncode == 0, r.stderr
    assert "inet 10.70.0.2/24" in r.stdout and "02:00:00:dd:00:02" in r.stdout
    sim.assert_clean()
    plain = f"du-{uuid.uuid4().hex[:8]}"
    r = docker_run(dockerd, plain, IMAGE, "ls", "/sys/class/net")
    assert r.returncode == 0 and r.stdout.split() == ["lo"], r.stderr
    sim.assert_clean()


@pytest.mark.docker
@pytest.mark.slow
def test_docker_restart_stop_start_rm(sim: Sim, dockerd: Dockerd,  # noqa: F811
                                      installed: Installed) -> None:
    use_config(installed, sim)
    name = f"dl-{uuid.uuid4().hex[:8]}"

    def has_its_vf() -> bool:
        got = dockerd.docker("exec", name, "ip", "-o", "link", "show", "net1")
        return got.returncode == 0 and "net1" in got.stdout and len(sim.records()) == 1

    try:
        r = docker_run(dockerd, name, IMAGE, "sleep", "300", detach=True, env="fast@net1")
        assert r.returncode == 0, r.stderr
        assert has_its_vf()
        assert dockerd.docker("restart", "-t", "1", name).returncode == 0
        assert has_its_vf()           # released at the stop, reserved again at the start
        assert dockerd.docker("stop", "-t", "1", name).returncode == 0
        sim.assert_clean()            # poststop ran on the way down
        assert dockerd.docker("start", name).returncode == 0
        assert has_its_vf()
    finally:
        dockerd.docker("rm", "-f", name)
    sim.assert_clean()


@pytest.mark.docker
@pytest.mark.slow
def test_docker_failed_create_leaks_nothing(make_sim: Callable[..., Sim],  # noqa: F811
                                            dockerd: Dockerd, installed: Installed) -> None:
    sim = make_sim(nvfs=1)
    use_config(installed, sim)
    name = f"df-{uuid.uuid4().hex[:8]}"
    try:
        r = docker_run(dockerd, name, IMAGE, "true", env="fast,fast")
        assert r.returncode != 0
        assert "sriov-hook: pool fast is exhausted" in r.stderr
        sim.assert_clean()
    finally:
        dockerd.docker("rm", "-f", name)


@pytest.mark.docker
@pytest.mark.slow
def test_docker_parallel_starts_beyond_the_pool(make_sim: Callable[..., Sim],  # noqa: F811
                                                dockerd: Dockerd, installed: Installed) -> None:
    sim = make_sim(nvfs=2)
    use_config(installed, sim)
    names = [f"dp{i}-{uuid.uuid4().hex[:6]}" for i in range(5)]
    try:
        results = parallel(len(names), lambda i: docker_run(
            dockerd, names[i], IMAGE, "sleep", "300", detach=True, env="fast"))
        assert_refused_for_exhaustion(results, ok=2)
        assert len(sim.records()) == 2
    finally:
        dockerd.docker("rm", "-f", *names)
    sim.assert_clean()
