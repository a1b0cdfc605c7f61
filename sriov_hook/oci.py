"""The OCI state on stdin and the bundle's config.json.

Parsing is lenient where runtimes differ (Kata sends empty ``ociVersion``
and ``status``; runc's poststop has no ``pid``; old runtimes send
``bundlePath``) and strict where safety needs it (ids become file names,
the bundle is a path we open as root).
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from .errors import StateError
from .jsonbound import TooDeep, loads as bounded_loads

MAX_STATE_BYTES = 1 << 20
MAX_SPEC_BYTES = 16 << 20
# Nesting refused before the JSON decoder runs (jsonbound.py). The state is
# flat plus annotations; a runtime spec nests ~6 deep (linux.seccomp.syscalls
# [].args[]), so these leave a wide margin and stay far from the decoder's
# recursion limit.
MAX_STATE_DEPTH = 32
MAX_SPEC_DEPTH = 64
# runc: ^[\w+-\.]+$ ; we also bound the length, since ids name our files.
_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$")
# A Kubernetes namespace: a DNS-1123 label.
_K8S_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class CriRuntime:
    """A CRI runtime that writes its own annotations into every container's
    spec *after* the pod's, so a pod's author cannot set them: the only keys
    whose values the hook believes (README, "Which annotations the hook
    trusts"). ``marker`` is a key only this runtime writes (with
    ``marker_value``, if that is fixed); it tells which runtime made the spec.
    Under podman, runc, crun or Docker whoever starts the container writes
    every annotation, so none is trusted there."""

    name: str
    marker: str
    marker_value: Optional[str]
    sandbox_key: str
    namespace_key: str

    def marked(self, annotations: Dict[str, str]) -> bool:
        if self.marker not in annotations:
            return False
        return self.marker_value is None or annotations[self.marker] == self.marker_value


CRI_RUNTIMES = (
    # CRI-O: the pod's annotations first, then its own (io.container.manager,
    # the sandbox id), then the kubelet's container labels, which carry
    # io.kubernetes.pod.namespace.
    CriRuntime("CRI-O", "io.container.manager", "cri-o",
               "io.kubernetes.cri-o.SandboxID", "io.kubernetes.pod.namespace"),
    # containerd's CRI plugin: the allow-listed pod annotations first
    # (pod_annotations), then its own io.kubernetes.cri.* keys. It never sets
    # io.kubernetes.pod.namespace: a pod could, through a wide allow-list.
    CriRuntime("containerd", "io.kubernetes.cri.container-type", None,
               "io.kubernetes.cri.sandbox-id", "io.kubernetes.cri.sandbox-namespace"),
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
    def runtime(self) -> Optional[CriRuntime]:
        """The CRI runtime that made this spec, or None (podman, runc, ...).

        Refuses a spec marked by two of them: one mark was written by the
        container's owner, and nothing says which."""
        found = [rt for rt in CRI_RUNTIMES if rt.marked(self.annotations)]
        if len(found) > 1:
            raise StateError(
                "the container's annotations carry the marks of two runtimes ("
                + ", ".join(f"{rt.marker} for {rt.name}" for rt in found)
                + "); one was set by its owner, so no sandbox id or namespace is trusted")
        return found[0] if found else None

    @property
    def sandbox_id(self) -> Optional[str]:
        """The pod sandbox id, only from the key the CRI runtime that made the
        spec sets itself; None outside a CRI runtime (the container is then a
        sandbox of its own)."""
        rt = self.runtime
        if rt is None:
            return None
        val = self.annotations.get(rt.sandbox_key)
        if not valid_id(val):
            raise StateError(f"{rt.sandbox_key} is missing or not a valid id, though "
                             f"{rt.marker} says {rt.name} made this container")
        return val

    @property
    def k8s_namespace(self) -> Optional[str]:
        """The Kubernetes namespace, from the key the CRI runtime itself sets;
        None when no CRI runtime vouches for one."""
        rt = self.runtime
        if rt is None:
            return None
        val = self.annotations.get(rt.namespace_key)
        if val is None or not _K8S_NAMESPACE.match(val):
            raise StateError(f"{rt.namespace_key} is missing or not a Kubernetes namespace, "
                             f"though {rt.marker} says {rt.name} made this container")
        return val

    def netns_path(self) -> str:
        """Path of the container's network namespace, as seen by the runtime."""
        linux = self.spec.get("linux")
        namespaces = (linux.get("namespaces") if isinstance(linux, dict) else None) or []
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
        data = bounded_loads(raw.decode("utf-8"), MAX_STATE_DEPTH)
    except TooDeep as err:
        raise StateError(f"state on stdin {err}; refused unparsed") from None
    except ValueError as err:   # UnicodeDecodeError is one too
        raise StateError(f"state on stdin is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise StateError("state on stdin must be a JSON object")
    cid = data.get("id")
    if not isinstance(cid, str) or not valid_id(cid):
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
        spec = bounded_loads(raw.decode("utf-8"), MAX_SPEC_DEPTH)
    except TooDeep as err:
        raise StateError(f"{path} {err}; refused unparsed") from None
    except ValueError as err:
        raise StateError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(spec, dict):
        raise StateError(f"{path} must hold a JSON object")
    ann = dict(_annotations(spec.get("annotations"), f"{path} annotations"))
    ann.update(state.annotations)
    return Container(state=state, spec=spec, annotations=ann)
