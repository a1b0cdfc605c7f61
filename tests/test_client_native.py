"""The compiled hook client (native/sriov-hook.c) against a stand-in agent.

The stand-in is a unix socket served from a thread here: it records the exact
bytes the client sends, and answers what each test wants. What the client
sent is compared with sriov_hook/client.py's encoding of the same call, so the
two clients cannot drift apart on the wire; what the client then does (replay
the answer, or run the hook in-process through the Python beside it) is read
from its exit status and output. The real agent is behind both clients in
tests/test_agent.py.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from typing import Any, Iterator, List, Optional

import pytest

from sriov_hook import __version__, client
from tests import simhost
from tests.conftest import HOOK, ROOT, Sim

pytestmark = pytest.mark.skipif(not os.path.exists(HOOK) or
                                open(HOOK, "rb").read(4) != b"\x7fELF",
                                reason="the compiled client is not built (make deps)")


class StandIn:
    """A one-connection-at-a-time agent that answers ``answer`` (None: hang up)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.answer: Optional[bytes] = client.encode_answer(b"done", 0, b"", b"")
        self.requests: List[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                chunks = []
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
                self.requests.append(b"".join(chunks))
                if self.answer is not None:
                    conn.sendall(self.answer)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)   # wakes the accept() (close alone would not)
        self.sock.close()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()


@pytest.fixture
def standin() -> Iterator[StandIn]:
    d = f"/run/sriov-native-{uuid.uuid4().hex[:8]}"
    os.makedirs(d, mode=0o700)
    agent = StandIn(os.path.join(d, "agent.sock"))
    try:
        yield agent
    finally:
        agent.close()
        subprocess.run(["rm", "-rf", d])


def config_for(tmp_path: Any, sock: str, extra: str = "") -> str:
    path = tmp_path / "config.yaml"
    path.write_text(f"# a comment\nagent_socket: {sock}   # the stand-in\n{extra}")
    return str(path)


def run(argv: List[str], data: bytes = b"", env: Optional[dict] = None,
        cwd: str = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([HOOK, *argv], input=data, capture_output=True, timeout=60,
                          cwd=cwd, env={**os.environ, **(env or {})})


STATE = json.dumps({"ociVersion": "1.0.2", "id": "n1", "status": "creating",
                    "bundle": "/nonexistent"}).encode()


def test_requests_are_byte_for_byte_the_python_clients(standin: StandIn, tmp_path: Any) -> None:
    cfg = config_for(tmp_path, standin.path)
    cases = [(["--config", cfg, "prestart"], STATE),
             ([f"--config={cfg}", "poststop"], b""),
             (["-c", cfg, "createRuntime", "extra arg", ""], b"\x00\n{}\xff" * 1000)]
    for argv, data in cases:
        assert run(argv, data).returncode == 0
        want = client.encode_request(b"hook", cfg.encode(), [a.encode() for a in argv], data)
        assert standin.requests.pop() == want
    # A relative --config is made absolute (the agent has another cwd); no
    # --config: $SRIOV_HOOK_CONFIG.
    assert run(["--config", "config.yaml", "prestart"], STATE, cwd=str(tmp_path)).returncode == 0
    assert client.decode_request(standin.requests.pop())[1] == cfg.encode()
    assert run(["poststop"], STATE, env={"SRIOV_HOOK_CONFIG": cfg}).returncode == 0
    assert client.decode_request(standin.requests.pop())[1] == cfg.encode()


def test_answers_are_replayed_as_they_are(standin: StandIn, tmp_path: Any) -> None:
    cfg = config_for(tmp_path, standin.path)
    for status, out, err in ((0, b"", b""), (3, b"out\n", b"sriov-hook: no VF\n"),
                             (1, b"x" * 200_000, b"y" * 70_000)):
        standin.answer = client.encode_answer(b"done", status, out, err)
        r = run(["--config", cfg, "prestart"], STATE)
        assert (r.returncode, r.stdout, r.stderr) == (status, out, err)


def in_process_marker(tmp_path: Any, sock: str) -> str:
    """A config only the in-process CLI reads, and rejects with a YAML error
    ("config PATH: line N: ..."): that error shows who ran."""
    return config_for(tmp_path, sock, "pools: [unclosed\n")


@pytest.mark.parametrize("answer", [b"refuse", b"cut", b"hang up", b"garbage"])
def test_anything_but_an_answer_runs_in_process(standin: StandIn, tmp_path: Any,
                                                answer: bytes) -> None:
    cfg = in_process_marker(tmp_path, standin.path)
    whole = client.encode_answer(b"done", 0, b"from the agent\n", b"")
    standin.answer = {b"refuse": client.encode_answer(b"refuse", 1, b"", b"other config"),
                      b"cut": whole[:-3], b"hang up": None,
                      b"garbage": b"SRH1 done x 0 0\n"}[answer]
    r = run(["--config", cfg, "prestart"], STATE)
    assert len(standin.requests) == 1    # the agent was asked first
    assert r.returncode != 0 and r.stdout == b""
    assert r.stderr.startswith(f"sriov-hook: config {cfg}: line ".encode()), r.stderr
    assert r.stderr.count(b"\n") == 1    # one line, no traceback


def test_no_agent_runs_in_process_with_the_same_state(sim: Sim, tmp_path: Any) -> None:
    """The state already read goes back on stdin: the in-process hook sees it whole."""
    simhost.write_config(sim.host, extra={
        "agent_socket": f"/run/sriov-native-absent-{uuid.uuid4().hex[:6]}/a.sock"})
    cfg = sim.config
    bundle = tmp_path / "bundle-with-a-name-to-find"
    data = json.dumps({"id": "n2", "status": "creating", "bundle": str(bundle)}).encode()
    r = run(["--config", cfg, "prestart"], data)
    assert r.returncode != 0 and b"bundle-with-a-name-to-find" in r.stderr, r.stderr
    # Python's own client, in-process too, says the same.
    py = subprocess.run([sys.executable, "-m", "sriov_hook", "--config", cfg, "prestart"],
                        input=data, capture_output=True, cwd=ROOT)
    assert (r.returncode, r.stdout, r.stderr) == (py.returncode, py.stdout, py.stderr)


def test_other_commands_and_opt_out_never_ask_the_agent(standin: StandIn, tmp_path: Any) -> None:
    cfg = config_for(tmp_path, standin.path)
    r = run(["--version"])
    assert r.returncode == 0 and r.stdout.strip() == __version__.encode()
    assert run(["--config", cfg, "--help"]).stdout.startswith(b"usage: sriov-hook")
    marker = in_process_marker(tmp_path, standin.path)
    r = run(["--config", marker, "poststop"], STATE, env={client.ENV_NO_AGENT: "1"})
    assert r.returncode != 0 and r.stderr.startswith(f"sriov-hook: config {marker}: line ".encode())
    assert standin.requests == []


@pytest.mark.parametrize("line, found", [
    ("agent_socket: '{p}'  # quoted\n", True),
    ('agent_socket: "{p}"\n', True),
    ("agent_socket:{p}\n", True),
    ("agent_socket: {p} # trailing comment\n", True),
    ("agent_socket: relative/{p}\n", False),
    ("  agent_socket: {p}\n", False),           # nested: not the top-level key
    ("#agent_socket: {p}\n", False),
])
def test_the_socket_is_read_as_the_python_client_reads_it(standin: StandIn, tmp_path: Any,
                                                          line: str, found: bool) -> None:
    cfg = tmp_path / "config.yaml"
    # Where the agent is not found, the hook runs in-process: keep it in tmp_path.
    cfg.write_text(f"pools: []\nstate_dir: {tmp_path}/state\nlog_file: {tmp_path}/hook.log\n"
                   f"sysfs_root: {tmp_path}\n" + line.format(p=standin.path))
    assert (client.socket_path(str(cfg)) == standin.path) == found
    run(["--config", str(cfg), "poststop"], STATE)
    assert bool(standin.requests) == found


def test_the_bundle_directory_cannot_stand_in_for_the_hook(tmp_path: Any) -> None:
    """Runtimes run hooks in the bundle directory: a ``sriov_hook`` package planted
    there must not be what the in-process fallback imports (it runs as root)."""
    planted = tmp_path / "sriov_hook"
    planted.mkdir()
    marker = tmp_path / "imported"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (planted / "inprocess.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    r = run(["--version"], cwd=str(tmp_path), env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0 and r.stdout.strip() == __version__.encode(), r.stderr
    assert not marker.exists()
