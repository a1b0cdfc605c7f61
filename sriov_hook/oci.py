"""The OCI state on stdin and the bundle's config.json.

Parsing is lenient where runtimes differ (Kata sends empty ``ociVersion``
and ``status``; runc's poststop has no ``pid``; old runtimes send
``bundlePath``) and strict where safety needs it (ids become file names,
the bundle is a path we open as root).
"""
from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from .errors import StateError

MAX_STATE_BYTES = 1 << 20
MAX_SPEC_BYTES = 16 << 20
# runc: ^[\w+-\.]+$ ; we also bound the length, since ids name our files.
_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$")
SANDBOX_ANNOTATIONS = (
    "io.kubernetes.cri-o.SandboxID",
    "io.kubernetes.cri.sandbox-id",
    "io.katacontainers.pkg.oci.sandbox_id",
)


@dataclass
class State:
    id: str
    bundle: str
    pid: Optional[int] = None
    status: str = ""
    annotations: Dict[str, str] = field(default_factory=dict)


@dataclass
class Container:
    """State merged with the bundle's spec: what the hook acts on."""

    state: State
    spec: Dict[str, Any]
    annotations: Dict[str, str]

    @property
    def id(self) -> str:
        return self.state.id

    @property
    def sandbox_id(self) -> Optional[str]:
        for key in SANDBOX_ANNOTATIONS:
            val = self.annotations.get(key)
            if val and valid_id(val):
                return val
        return None

    def netns_path(self) -> str:
        """Path of the container's network namespace, as seen by the runtime."""
        linux = self.spec.get("linux") if isinstance(self.spec.get("linux"), dict) else {}
        namespaces = linux.get("namespaces") or []
        netns = None
        if isinstance(namespaces, list):
            for ns in namespaces:
                if isinstance(ns, dict) and ns.get("type") == "network":
                    netns = ns
        if netns is None:
            raise StateError("the container shares the host network namespace; "
                             "it needs a network namespace of its own for a VF")
        path = netns.get("path")
        if path:
            if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
                raise StateError("linux.namespaces network path must be an absolute path")
            return path
        if self.state.pid is None:
            raise StateError("state has no pid and the spec names no network namespace path")
        return f"/proc/{self.state.pid}/ns/net"


def valid_id(text: object) -> bool:
    return isinstance(text, str) and bool(_ID.match(text))


def parse_state(raw: bytes) -> State:
    if len(raw) > MAX_STATE_BYTES:
        raise StateError(f"state on stdin is larger than {MAX_STATE_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise StateError(f"state on stdin is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise StateError("state on stdin must be a JSON object")
    cid = data.get("id")
    if not valid_id(cid):
        raise StateError("state id is missing or not a valid container id "
                         "([A-Za-z0-9_][A-Za-z0-9_.+-]*, at most 128 chars)")
    bundle = data.get("bundle") or data.get("bundlePath")
    if not isinstance(bundle, str) or not bundle:
        raise StateError("state has no bundle (nor bundlePath)")
    if not os.path.isabs(bundle) or "\0" in bundle:
        raise StateError("state bundle must be an absolute path")
    pid = data.get("pid")
    if pid in (None, 0):
        pid = None
    elif isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 1 << 22:
        raise StateError("state pid must be a positive integer")
    status = data.get("status") or ""
    if not isinstance(status, str):
        raise StateError("state status must be a string")
    ann = _annotations(data.get("annotations"), "state annotations")
    return State(id=cid, bundle=os.path.normpath(bundle), pid=pid, status=status,
                 annotations=ann)


def _annotations(raw: Any, where: str) -> Dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise StateError(f"{where} must map strings to strings")
    return raw


def load_container(state: State) -> Container:
    """Read ``<bundle>/config.json`` and merge the state's annotations over its own."""
    path = os.path.join(state.bundle, "config.json")
    try:
        # O_NOFOLLOW on the last component: the bundle is the runtime's and a
        # config.json that is a symlink elsewhere is not what it handed us.
        # O_NONBLOCK: a FIFO planted as config.json must not hang the hook.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise StateError(f"cannot open bundle config {path}: {err.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StateError(f"bundle config {path} is not a regular file")
    try:
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(MAX_SPEC_BYTES + 1)
    except OSError as err:
        raise StateError(f"cannot read {path}: {err.strerror}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise StateError(f"{path} is larger than {MAX_SPEC_BYTES} bytes")
    try:
        spec = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise StateError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(spec, dict):
        raise StateError(f"{path} must hold a JSON object")
    ann = dict(_annotations(spec.get("annotations"), f"{path} annotations"))
    ann.update(state.annotations)
    return Container(state=state, spec=spec, annotations=ann)
