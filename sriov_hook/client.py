"""The thin hook client: hand a stage to the node agent, else run it in-process.

The runtime starts this for every container, so the fast path imports only
``_socket`` beyond what the interpreter has loaded anyway: not pyroute2,
PyYAML, ``re``, ``json``, nor even ``socket`` (enum and selectors: ~6.6 ms).
It forwards argv, the raw state bytes and the resolved config path; the agent
parses them with the same code as the in-process path and sends back the
exit status and both output streams, which are replayed as they are.

It runs the command in-process, exactly as without an agent, when the socket
is absent or refuses the connection, when the agent refuses the request (it
serves another config, or its own config no longer loads), or when the agent
accepted the request and died before answering: the records on disk let the
in-process path finish or roll back whatever the agent had started.

This module is also the wire format, so the agent imports it (never the
other way round):

    request  b"SRH1 <len> <len> ...\\n" + fields: op, config path, argv..., stdin
    answer   b"SRH1 <kind> <status> <len out> <len err>\\n" + out + err
             kind: b"done" (replay it) or b"refuse" (run in-process)
"""
from __future__ import annotations

import os
import sys

# typing imports re, collections and contextlib (~5 ms): only the type checker reads it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional, Tuple

    Answer = Tuple[bytes, int, bytes, bytes]

MAGIC = b"SRH1"
STAGES = ("prestart", "createRuntime", "poststop")
DEFAULT_CONFIG = "/etc/sriov-hook/config.yaml"       # as config.DEFAULT_PATH
DEFAULT_SOCKET = "/run/sriov-hook/agent.sock"        # as config.DEFAULT_AGENT_SOCKET
MAX_STATE = 1 << 20   # oci.MAX_STATE_BYTES: one byte more still gets its "larger than" error
MAX_CONFIG_SCAN = 1 << 20
ANSWER_TIMEOUT = 120.0   # a safety net only: runtimes bound their hooks themselves
ENV_NO_AGENT = "SRIOV_HOOK_NO_AGENT"   # "1": always in-process (benchmarks, debugging)


# -- the wire format -----------------------------------------------------------------
def encode_request(op: bytes, config: bytes, argv: List[bytes], stdin: bytes) -> bytes:
    fields = [op, config, *argv, stdin]
    head = MAGIC + b" " + b" ".join(b"%d" % len(f) for f in fields) + b"\n"
    return head + b"".join(fields)


def decode_request(data: bytes) -> Tuple[bytes, bytes, List[bytes], bytes]:
    """(op, config path, argv, stdin); ValueError if malformed."""
    head, sep, body = data.partition(b"\n")
    words = head.split(b" ")
    if not sep or words[0] != MAGIC or len(words) < 4:
        raise ValueError("not a sriov-hook request")
    sizes = [int(w) for w in words[1:]]
    if any(n < 0 for n in sizes) or sum(sizes) != len(body):
        raise ValueError("request fields do not add up")
    fields, at = [], 0
    for n in sizes:
        fields.append(body[at:at + n])
        at += n
    return fields[0], fields[1], fields[2:-1], fields[-1]


def encode_answer(kind: bytes, status: int, out: bytes, err: bytes) -> bytes:
    return b"%s %s %d %d %d\n" % (MAGIC, kind, status, len(out), len(err)) + out + err


def decode_answer(data: bytes) -> "Optional[Answer]":
    """(kind, status, out, err), or None for a missing or cut-off answer."""
    head, sep, body = data.partition(b"\n")
    words = head.split(b" ")
    if not sep or len(words) != 5 or words[0] != MAGIC:
        return None
    try:
        status, n_out, n_err = int(words[2]), int(words[3]), int(words[4])
    except ValueError:
        return None
    if n_out + n_err != len(body):
        return None
    return words[1], status, body[:n_out], body[n_out:]


# -- the client ------------------------------------------------------------------------
def scan_argv(argv: List[str]) -> Tuple[Optional[str], Optional[str]]:
    """(``--config`` value, command) as cli._parse reads them; command None on --help.

    Only a hint for routing: the agent parses argv again with the real parser.
    """
    config: Optional[str] = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-c", "--config"):
            if i + 1 >= len(argv):
                return config, None
            config = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg in ("-h", "--help"):
            return config, None
        else:
            return config, arg
        i += 1
    return config, None


def resolve_config(cli_path: Optional[str]) -> str:
    """config.resolve_path, made absolute (the agent has another cwd)."""
    path = cli_path or os.environ.get("SRIOV_HOOK_CONFIG") or DEFAULT_CONFIG
    return path if path.startswith("/") else os.path.join(os.getcwd(), path)


def socket_path(config_path: str) -> str:
    """The config's top-level ``agent_socket``, read without a YAML parser.

    A guess is safe: the agent serves only requests naming its own config,
    so a socket read wrongly here costs a refused connection, never a wrong
    answer.
    """
    try:
        with open(config_path, "rb") as fh:
            text = fh.read(MAX_CONFIG_SCAN)
    except OSError:
        return DEFAULT_SOCKET
    for line in text.split(b"\n"):
        if not line.startswith(b"agent_socket:"):
            continue
        value = line[len(b"agent_socket:"):].strip()
        if value[:1] in (b'"', b"'"):
            value = value[1:].partition(value[:1])[0]
        else:
            value = value.partition(b" #")[0].strip()
        if value.startswith(b"/"):
            return value.decode("utf-8", "surrogateescape")
    return DEFAULT_SOCKET


def ask(path: str, request: bytes, timeout: float = ANSWER_TIMEOUT) -> "Optional[Answer]":
    """The agent's answer; None when there is no agent to ask, or it died mid-way."""
    import _socket
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        try:
            sock.connect(path)
        except OSError:     # absent, refused, not ours to open: run in-process
            return None
        sock.settimeout(timeout)
        try:
            sock.sendall(request)
            sock.shutdown(_socket.SHUT_WR)
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except TimeoutError:
            raise
        except OSError:     # reset: the agent died
            return None
        return decode_answer(b"".join(chunks))
    finally:
        sock.close()


def main() -> int:
    argv = sys.argv[1:]
    config, cmd = scan_argv(argv)
    if cmd not in STAGES or os.environ.get(ENV_NO_AGENT) == "1":
        return in_process(argv, None)
    data = sys.stdin.buffer.read(MAX_STATE + 1)
    path = resolve_config(config)
    request = encode_request(b"hook", path.encode("utf-8", "surrogateescape"),
                             [a.encode("utf-8", "surrogateescape") for a in argv], data)
    sock = socket_path(path)
    try:
        answer = ask(sock, request)
    except TimeoutError:
        sys.stderr.write(f"sriov-hook: the agent at {sock} did not answer within "
                         f"{ANSWER_TIMEOUT:g}s\n")
        return 1
    if answer is None or answer[0] != b"done":
        return in_process(argv, data)
    _, status, out, err = answer
    sys.stdout.buffer.write(out)
    sys.stderr.buffer.write(err)
    return status


def in_process(argv: List[str], data: Optional[bytes]) -> int:
    """The full command line in this process, exactly as with no agent."""
    from sriov_hook import cli
    return cli.main(argv, data)


if __name__ == "__main__":
    sys.exit(main())
