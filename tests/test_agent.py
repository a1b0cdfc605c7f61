"""The node agent (``sriov-hook agent``) and the thin client, on the simulated host.

Each test starts its own agent on a private socket, with the simulated host's
config; hooks go through the real client (``python -m sriov_hook``), which
reads the config's ``agent_socket``. A hook served by the agent logs the
agent's pid; one run in-process logs its own.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from sriov_hook import client, faults
from sriov_hook.agent.reclaim import GRACE
from tests import simhost
from tests.conftest import (NATIVE, ROOT, HookResult, Sim, imported_modules, link_info,
                            netns_process, run_hook)

pytestmark = [pytest.mark.root, pytest.mark.agent]

ADDR = json.dumps([{"pool": "fast", "ips": ["10.61.0.2/24"]}])
# Both thin clients: the Python one (python -m sriov_hook) and the compiled one runtimes start.
CLIENTS = pytest.mark.parametrize("client_kind", ["sriov_hook", NATIVE])
WAIT = 30.0   # bound on waiting for something that happens in well under a second


def wait_until(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Agent:
    proc: subprocess.Popen
    socket: str
    stderr: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def output(self) -> str:
        with open(self.stderr) as fh:
            return fh.read()


class Agents:
    """Starts agents for one simulated host; stops every one of them at the end."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.dir = f"/run/sriov-hook-test-{uuid.uuid4().hex[:8]}"   # short: sun_path is 108 bytes
        self.socket = os.path.join(self.dir, "agent.sock")
        self.metrics = ""
        self.started: List[Agent] = []
        self.configure()

    def configure(self, **extra: Any) -> None:
        simhost.write_config(self.sim.host, pools=extra.pop("pools", None), extra={
            "agent_socket": self.socket, "metrics_address": self.metrics, **extra})

    def start(self, env: Optional[Dict[str, str]] = None) -> Agent:
        err = os.path.join(self.sim.tmp, f"agent-{len(self.started)}.err")
        with open(err, "w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "sriov_hook", "--config",
                                     self.sim.config, "agent"], cwd=ROOT, stdin=subprocess.DEVNULL,
                                    stdout=fh, stderr=fh, env={**os.environ, **(env or {})})
        agent = Agent(proc, self.socket, err)
        self.started.append(agent)
        wait_until(lambda: "serving" in agent.output() or proc.poll() is not None,
                   "the agent to listen")
        assert proc.poll() is None, agent.output()
        return agent

    def cleanup(self) -> None:
        for agent in self.started:
            if agent.proc.poll() is None:
                agent.proc.kill()
            agent.proc.wait()
        subprocess.run(["rm", "-rf", self.dir])


@pytest.fixture
def agents(sim: Sim) -> Iterator[Agents]:
    a = Agents(sim)
    try:
        yield a
    finally:
        a.cleanup()


def served_by(sim: Sim, pid: int, stage: str, cid: str) -> bool:
    with open(sim.host.log_file) as fh:
        return f"pid={pid} stage={stage} cid={cid} " in fh.read()


def in_process(sim: Sim, *args: str, state: Any = None) -> HookResult:
    return run_hook(sim.config, *args, state=state,
                    env={**os.environ, client.ENV_NO_AGENT: "1"})


def vf_records(sim: Sim) -> List[str]:
    """Reservation records; a temp file a killed writer left is gc's to remove."""
    return [n for n in sim.records() if not n.startswith(".")]


def state(cid: str, bundle: str = "/nonexistent", pid: Optional[int] = None) -> Dict[str, Any]:
    out: Dict[str, Any] = {"ociVersion": "1.0.2", "id": cid, "status": "creating",
                           "bundle": bundle}
    if pid:
        out["pid"] = pid
    return out


# -- serving ---------------------------------------------------------------------------
@CLIENTS
def test_agent_serves_hooks_with_the_in_process_answers(sim: Sim, agents: Agents,
                                                        client_kind: str) -> None:
    sim.module = client_kind
    agent = agents.start()
    ns = sim.netns()
    with netns_process() as ctr:   # a live owner: the reclaimer leaves its VF alone
        r = sim.prestart("a1", sim.bundle(ADDR), pid=ctr.pid)
        assert r.rc == 0, r.stderr
        assert served_by(sim, agent.pid, "prestart", "a1")
        inside = subprocess.run(["nsenter", "-t", str(ctr.pid), "-n", "ip", "-br", "addr"],
                                capture_output=True, text=True).stdout
        assert "net1" in inside and "10.61.0.2/24" in inside
    assert sim.poststop("a1").rc == 0
    wait_until(lambda: sim.records() == [], "the release")
    sim.assert_clean()
    # Failures: the same status and the same one line, from the agent and in-process.
    bad = [("prestart", state("a2", sim.bundle("nosuchpool", ns))),
           ("prestart", b"{not json"),
           ("poststop", {"id": "../../etc", "bundle": "/x"}),
           ("prestart", "--vf", "0000:10:10.0", state("a3", sim.bundle(ADDR, ns)))]
    for case in bad:
        *args, st = case
        via_agent, local = sim.hook(*args, state=st), in_process(sim, *args, state=st)
        assert via_agent.rc != 0 and via_agent.stderr.startswith("sriov-hook: ")
        assert (via_agent.rc, via_agent.stdout, via_agent.stderr) == \
            (local.rc, local.stdout, local.stderr)
    assert served_by(sim, agent.pid, "prestart", "a2")
    sim.assert_clean()


def test_poststop_answered_first_never_hands_out_a_busy_vf(make_sim: Callable[..., Sim]) -> None:
    sim = make_sim(nvfs=1)
    agents = Agents(sim)
    try:
        agent = agents.start()
        for i in range(3):
            # The same container id right after its poststop, then another one:
            # both wait for the release instead of failing on the busy VF.
            for cid in (f"p{i}", f"p{i}", f"q{i}"):
                with netns_process() as ctr:
                    r = sim.prestart(cid, sim.bundle(ADDR), pid=ctr.pid)
                    assert r.rc == 0, r.stderr
                    assert served_by(sim, agent.pid, "prestart", cid)
                assert sim.poststop(cid).rc == 0
        wait_until(lambda: sim.records() == [], "the last release")
        sim.assert_clean()
    finally:
        agents.cleanup()


def test_a_hung_hook_holds_up_only_its_own_vf(sim: Sim, agents: Agents) -> None:
    import fcntl
    agents.configure(lock_timeout=60)
    agent = agents.start()
    lock = os.path.join(sim.host.state_dir, "locks", f"{sim.vfs[0].bdf}.lock")
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    with netns_process() as ctr1, netns_process() as ctr2, open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)   # "a netlink call that never returns" on VF 0
        stuck = subprocess.Popen([sys.executable, "-m", "sriov_hook", "--config", sim.config,
                                  "prestart", "--pool", "fast", "--vf", sim.vfs[0].bdf],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, cwd=ROOT)
        try:
            assert stuck.stdin is not None
            stuck.stdin.write(json.dumps(state("h1", sim.bundle(ADDR), ctr1.pid)).encode())
            stuck.stdin.close()
            stuck.stdin = None   # communicate() must not flush it again
            wait_until(lambda: served_by(sim, agent.pid, "prestart", "h1"), "the stuck hook")
            r = sim.prestart("h2", sim.bundle(ADDR), pid=ctr2.pid)   # another VF, meanwhile
            assert r.rc == 0, r.stderr
            assert stuck.poll() is None
            fcntl.flock(held, fcntl.LOCK_UN)
            _, err = stuck.communicate(timeout=WAIT)
            assert stuck.returncode == 0, err
        finally:
            if stuck.poll() is None:
                stuck.kill()
                stuck.communicate()
    for cid in ("h1", "h2"):
        assert sim.poststop(cid).rc == 0
    wait_until(lambda: sim.records() == [], "the releases")
    sim.assert_clean()


# -- falling back to in-process ----------------------------------------------------------
@CLIENTS
def test_no_agent_means_in_process(sim: Sim, agents: Agents, client_kind: str) -> None:
    sim.module = client_kind
    ns = sim.netns()
    r = sim.prestart("n1", sim.bundle(ADDR, ns))          # no socket at all
    assert r.rc == 0, r.stderr
    os.makedirs(agents.dir, mode=0o700)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(agents.socket)   # a socket file nobody listens on: ECONNREFUSED
    dead.close()
    assert sim.poststop("n1").rc == 0
    sim.assert_clean()


@CLIENTS
def test_agent_of_another_config_refuses(make_sim: Callable[..., Sim], client_kind: str) -> None:
    sim, other = make_sim(), make_sim()
    other.module = client_kind
    agents = Agents(sim)
    try:
        agent = agents.start()
        # The other host's config names the same socket: its hooks reach this
        # agent, which refuses them, and they run in-process.
        simhost.write_config(other.host, extra={"agent_socket": agents.socket})
        ns = other.netns()
        r = other.prestart("o1", other.bundle(ADDR, ns))
        assert r.rc == 0, r.stderr
        with open(other.host.log_file) as fh:
            log = fh.read()
        assert "stage=prestart cid=o1" in log and f"pid={agent.pid} " not in log
        assert other.poststop("o1").rc == 0
        other.assert_clean()
    finally:
        agents.cleanup()


def test_config_changes_are_picked_up(sim: Sim, agents: Agents) -> None:
    agent = agents.start()
    ns = sim.netns()
    pf = sim.host.nics[0].pf
    agents.configure(pools=[{"name": "renamed", "mode": "netdev", "pfs": [pf]}])
    with netns_process() as ctr:
        r = sim.prestart("r1", sim.bundle("renamed"), pid=ctr.pid)   # a new mtime: reloaded
        assert r.rc == 0, r.stderr
        assert served_by(sim, agent.pid, "prestart", "r1")
    assert sim.poststop("r1").rc == 0
    good = open(sim.config).read()
    with open(sim.config, "a") as fh:
        fh.write("bogus_key: 1\n")
    broken, local = sim.prestart("r2", sim.bundle("renamed", ns)), \
        in_process(sim, "prestart", state=state("r2", sim.bundle("renamed", ns)))
    assert broken.rc != 0 and "bogus_key" in broken.stderr
    assert (broken.rc, broken.stderr) == (local.rc, local.stderr)
    with open(sim.config, "w") as fh:
        fh.write(good)
    agent.proc.send_signal(signal.SIGHUP)
    with netns_process() as ctr:
        assert sim.prestart("r3", sim.bundle("renamed"), pid=ctr.pid).rc == 0
        assert served_by(sim, agent.pid, "prestart", "r3")
    assert sim.poststop("r3").rc == 0
    wait_until(lambda: sim.records() == [], "the releases")
    sim.assert_clean()


# -- security --------------------------------------------------------------------------
def test_socket_and_directory_are_root_only(sim: Sim, agents: Agents) -> None:
    os.makedirs(agents.dir, mode=0o755)
    os.chmod(agents.dir, 0o755)    # made too open by someone else: tightened
    agents.start()
    assert os.stat(agents.dir).st_mode & 0o777 == 0o700
    st = os.stat(agents.socket)
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == 0


def _ask_as(uid: int, path: str, request: bytes) -> "Optional[client.Answer]":
    """client.ask() from a child process running as ``uid``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # pragma: no cover - the child
        os.close(r)
        code = 0
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            answer = client.ask(path, request, timeout=10)
            os.write(w, json.dumps(None if answer is None else
                                   [answer[0].decode(), answer[1], answer[3].decode()]).encode())
        except BaseException:   # noqa: BLE001 - the child must never return into pytest
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    got = json.loads(data)
    return None if got is None else (got[0].encode(), got[1], b"", got[2].encode())


def test_non_root_peer_is_refused(sim: Sim, agents: Agents) -> None:
    agents.start()
    req = client.encode_request(b"hook", sim.config.encode(), [b"poststop"],
                                json.dumps(state("u1")).encode())
    assert _ask_as(65534, agents.socket, req) is None   # 0700 dir: it cannot even connect
    os.chmod(agents.dir, 0o755)   # an operator loosened the permissions: SO_PEERCRED still holds
    os.chmod(agents.socket, 0o666)
    answer = _ask_as(65534, agents.socket, req)
    assert answer is not None and answer[0] == b"done" and answer[1] == 1
    assert answer[3] == b"sriov-hook: the agent serves root only (your uid is 65534)\n"
    with open(sim.host.log_file) as fh:
        assert "refused a request from uid 65534" in fh.read()


# -- crashes and restarts ------------------------------------------------------------------
def test_agent_restart_keeps_state(sim: Sim, agents: Agents) -> None:
    first = agents.start()
    with netns_process() as ctr:
        r = sim.prestart("k1", sim.bundle(ADDR), pid=ctr.pid)
        assert r.rc == 0, r.stderr
        before = sim.records()
        assert first.stop() == 0
        assert not os.path.exists(agents.socket)
        second = agents.start()
        time.sleep(GRACE + 2.0)   # past the reclaimer's grace: a live container keeps its VF
        assert sim.records() == before
        r = sim.poststop("k1")
        assert r.rc == 0, r.stderr
    wait_until(lambda: sim.records() == [], "the release")
    assert served_by(sim, second.pid, "poststop", "k1")
    sim.assert_clean()


# Without VF settings (this PF has no VF ops) netdev mode takes no PF-side
# steps, binds no driver and claims no hugepages: every other point must kill.
_NOT_NETDEV = {"vf_settings", "admin_mac", "reprobe", "bind", "hugepages", "equipped"}
NETDEV_POINTS = [p for p in faults.PRESTART + faults.RECORD + faults.POSTSTOP
                 if p.removeprefix("undo:").split(":")[0] not in _NOT_NETDEV]


@pytest.mark.slow
@CLIENTS
@pytest.mark.parametrize("point", NETDEV_POINTS)
def test_agent_killed_mid_request_leaks_nothing(sim: Sim, agents: Agents, point: str,
                                                client_kind: str) -> None:
    sim.module = client_kind
    agent = agents.start(env={faults.ENV: point})
    prestart_point = point not in faults.POSTSTOP
    with netns_process() as ctr:
        bundle = sim.bundle(ADDR)
        r = sim.prestart("x1", bundle, pid=ctr.pid)
        if prestart_point:
            assert agent.proc.wait(timeout=10) == -signal.SIGKILL, f"{point} never reached"
            # The client saw the agent die and ran the hook in-process: it
            # finishes or rolls back what the agent started, and succeeds.
            assert r.rc == 0, r.stderr
        else:
            assert r.rc == 0, r.stderr
            assert sim.poststop("x1").rc == 0      # answered before the work
            assert agent.proc.wait(timeout=10) == -signal.SIGKILL, f"{point} never reached"
    # The container is gone now. A fresh agent reclaims whatever is left.
    agents.start()
    if prestart_point:
        assert sim.poststop("x1").rc == 0
    wait_until(lambda: vf_records(sim) == [], "the VF to be released")
    wait_until(lambda: all(link_info(vf.ifname) for vf in sim.vfs), "the VFs to be home")
    if point == "record_tmp_written":
        assert sim.hook("gc").rc == 0   # the killed agent's temp file: gc's job, as for a hook
    sim.assert_clean()
    with netns_process() as ctr:   # the next hook succeeds
        assert sim.prestart("x2", sim.bundle(ADDR), pid=ctr.pid).rc == 0
        assert sim.poststop("x2").rc == 0
    wait_until(lambda: sim.records() == [], "the last release")
    sim.assert_clean()


# -- reclaim -----------------------------------------------------------------------------
def test_reclaim_when_a_container_dies_without_poststop(sim: Sim, agents: Agents) -> None:
    agent = agents.start()
    with netns_process() as ctr, netns_process() as other:
        assert sim.prestart("d1", sim.bundle(ADDR), pid=ctr.pid).rc == 0
        assert sim.prestart("d2", sim.bundle(ADDR), pid=other.pid).rc == 0   # stays alive
        ctr.kill()
        ctr.wait()
        wait_until(lambda: len(sim.records()) == 1, "the dead container's VF", timeout=5 * 4)
        assert sim.records() == [f"{sim.vfs[1].bdf}.json"]
        with open(sim.host.log_file) as fh:
            assert f"released {sim.vfs[0].bdf} (reclaim)" in fh.read()
        assert sim.poststop("d2").rc == 0
    wait_until(lambda: sim.records() == [], "the release")
    sim.assert_clean()
    r = sim.hook("status")
    assert f"agent: pid {agent.pid}" in r.stdout and "1 VF(s) reclaimed" in r.stdout


@pytest.mark.podman
@pytest.mark.skipif(subprocess.run(["which", "podman"], capture_output=True).returncode != 0,
                    reason="podman not installed")
def test_reclaim_after_podman_failed_create(sim: Sim, agents: Agents, tmp_path: Any) -> None:
    from tests.containers import rootfs_tar
    from tests.test_podman import annotation, podman, render_hooks
    agents.start()
    hooks = render_hooks(str(tmp_path / "hooks.d"), sim.config)
    tag = f"localhost/sriov-agent-test:{uuid.uuid4().hex[:8]}"
    subprocess.run(["podman", "import", rootfs_tar(str(tmp_path / "rootfs.tar")), tag],
                   check=True, capture_output=True)
    try:
        name = f"sriov-{uuid.uuid4().hex[:8]}"
        out = podman(["--runtime", "runc", "--hooks-dir", hooks, "--annotation",
                      annotation("fast"), tag, "/no/such/entrypoint"], name)
        assert out.returncode != 0     # create failed: podman runs no poststop
        with open(sim.host.log_file) as fh:
            assert "createRuntime: done" in fh.read()   # the VF was handed out first
        wait_until(lambda: sim.records() == [], "the reclaim", timeout=5 * 4)
        with open(sim.host.log_file) as fh:
            assert "(reclaim)" in fh.read()
        sim.assert_clean()
    finally:
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)


# -- metrics -----------------------------------------------------------------------------
def scrape(address: str) -> Dict[str, float]:
    """GET /metrics and parse it with prometheus-client's own text parser."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {f"{s.name}{sorted(s.labels.items())}": s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_scraped_over_http(sim: Sim, agents: Agents) -> None:
    agents.metrics = f"127.0.0.1:{free_port()}"
    agents.configure()
    agents.start()
    vfs = "sriov_hook_vfs[('pool', 'fast'), ('state', '{}')]"
    with netns_process() as ctr:
        assert sim.prestart("m1", sim.bundle(ADDR), pid=ctr.pid).rc == 0
        assert sim.prestart("m2", sim.bundle("nosuchpool"), pid=ctr.pid).rc == 1
        m = scrape(agents.metrics)
        assert m[vfs.format("reserved")] == 1
        assert m[vfs.format("free")] == len(sim.vfs) - 1
        assert m[vfs.format("unhealthy")] == 0
        assert m["sriov_hook_stage_seconds_count[('stage', 'prestart')]"] == 2
        assert m["sriov_hook_failures_total[('reason', 'UnknownPool'), ('stage', 'prestart')]"] == 1
        assert m["sriov_hook_reclaimed_vfs_total[]"] == 0
    assert sim.poststop("m1").rc == 0
    wait_until(lambda: sim.records() == [], "the release")
    m = scrape(agents.metrics)
    assert m[vfs.format("free")] == len(sim.vfs)
    assert m["sriov_hook_stage_seconds_count[('stage', 'poststop')]"] == 1
    # A free VF left with a driver_override is not fit to hand out: unhealthy.
    override = os.path.join(sim.host.sysfs_root, "bus/pci/devices", sim.vfs[3].bdf,
                            "driver_override")
    with open(override, "w") as fh:
        fh.write("vfio-pci\n")
    m = scrape(agents.metrics)
    assert m[vfs.format("unhealthy")] == 1 and m[vfs.format("free")] == len(sim.vfs) - 1
    with open(override, "w") as fh:
        fh.write("(null)\n")
    sim.assert_clean()


# -- the client ------------------------------------------------------------------------------
def test_client_imports_nothing_heavy(sim: Sim, agents: Agents) -> None:
    script = os.path.join(ROOT, "bin", "sriov-hook")
    cmd = [sys.executable, "-X", "importtime", script, "--config", sim.config, "poststop"]
    data = json.dumps(state("i1")).encode()
    heavy = {"pyroute2", "yaml", "re", "json", "socket", "sriov_hook.cli", "sriov_hook.config"}
    without = set(imported_modules(cmd, data))
    assert heavy & without   # no agent: the full CLI, in-process
    agents.start()
    with_agent = set(imported_modules(cmd, data))
    assert "_socket" in with_agent and "sriov_hook.client" in with_agent
    assert not heavy & with_agent, heavy & with_agent


def test_run_leaves_the_process_alone(sim: Sim) -> None:
    import gc
    from sriov_hook import cli
    handler = signal.getsignal(signal.SIGTERM)
    stdout, gc_on = sys.stdout, gc.isenabled()
    out = cli.run(["--config", sim.config, "prestart"], b"{}")
    assert out.status == 1 and out.error == "StateError" and out.stdout == ""
    assert out.stderr.startswith("sriov-hook: state id is missing")
    assert cli.run(["--help"]).stdout.startswith("usage: sriov-hook")
    assert "free of" in cli.run(["--config", sim.config, "status"]).stdout
    assert signal.getsignal(signal.SIGTERM) is handler
    assert sys.stdout is stdout and gc.isenabled() == gc_on


def test_wire_format_round_trips() -> None:
    req = client.encode_request(b"hook", b"/etc/c.yaml", [b"--config", b"x y", b""], b"\n\0{}")
    assert client.decode_request(req) == (b"hook", b"/etc/c.yaml", [b"--config", b"x y", b""],
                                          b"\n\0{}")
    with pytest.raises(ValueError):
        client.decode_request(req[:-1])
    ans = client.encode_answer(b"done", 2, b"out\n", b"sriov-hook: x\n")
    assert client.decode_answer(ans) == (b"done", 2, b"out\n", b"sriov-hook: x\n")
    assert client.decode_answer(ans[:-1]) is None and client.decode_answer(b"") is None


def test_client_finds_the_socket_without_a_yaml_parser(tmp_path: Any) -> None:
    cfg = tmp_path / "c.yaml"
    for text, want in (("agent_socket: /run/x.sock  # here\n", "/run/x.sock"),
                       ("pools: []\nagent_socket: '/run/y z.sock'\n", "/run/y z.sock"),
                       ("  agent_socket: /nested\n", client.DEFAULT_SOCKET),
                       ("agent_socket: relative\n", client.DEFAULT_SOCKET)):
        cfg.write_text(text)
        assert client.socket_path(str(cfg)) == want
    assert client.socket_path(str(tmp_path / "missing")) == client.DEFAULT_SOCKET


def test_client_constants_match_the_full_cli() -> None:
    """The client repeats a few constants so as not to import their modules."""
    from sriov_hook import cli, config, oci
    assert client.DEFAULT_CONFIG == config.DEFAULT_PATH
    assert client.DEFAULT_SOCKET == config.DEFAULT_AGENT_SOCKET
    assert client.MAX_STATE == oci.MAX_STATE_BYTES
    assert set(client.STAGES) == set(cli.STAGES)
    assert client.scan_argv(["--config", "/c", "poststop"]) == ("/c", "poststop")
    assert client.scan_argv(["--config=/c", "--help", "prestart"]) == ("/c", None)
