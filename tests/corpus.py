"""Hostile and malformed inputs: OCI state, bundle config.json, annotation,
the container's other annotations (sandbox ids, namespaces) and its image.

Each case is fed to ``sriov-hook prestart`` on the simulated host and must
end with exit != 0, one ``sriov-hook:`` line (holding ``needle``, when the
case names the reason it must be refused for), no traceback, no state
change. Cases beyond the plain netdev pool run inside an ``Environment``:
extra pools (dpdk, kata, one restricted to a Kubernetes namespace), the
kernel simulator for dpdk binds, a stand-in container whose rootfs is laid
out as the case says, and a host directory the layouts aim at, which must
stay as it was.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

if TYPE_CHECKING:
    from tests.conftest import Sim
    from tests.kernelsim import KernelSim

A = "sriov-hook.io/networks"
CRIO = {"io.container.manager": "cri-o"}                      # CRI-O's own mark
CONTAINERD = {"io.kubernetes.cri.container-type": "container"}   # containerd's


@dataclass
class Case:
    name: str
    # state: bytes, or a dict merged over a valid state; "{bundle}" is filled in
    state: Any = None
    spec: Any = None            # config.json content (dict or raw bytes); None: valid spec
    annotation: Optional[str] = None
    setup: Optional[Callable[[str], None]] = None   # gets the bundle dir
    extra: Dict[str, Any] = field(default_factory=dict)
    annotations: Dict[str, str] = field(default_factory=dict)   # added to the valid spec's
    layout: Optional[str] = None   # a hostile rootfs (tests/standin.py), run as a dpdk container
    needle: Optional[str] = None   # what the one line must say


def _ann(value: Any) -> Case:
    text = value if isinstance(value, str) else json.dumps(value)
    return Case(name=f"annotation {text[:40]!r}", annotation=text)


def _symlink_config(bundle: str) -> None:
    os.unlink(os.path.join(bundle, "config.json"))
    os.symlink("/etc/hostname", os.path.join(bundle, "config.json"))


def _fifo_config(bundle: str) -> None:
    os.unlink(os.path.join(bundle, "config.json"))
    os.mkfifo(os.path.join(bundle, "config.json"))


def cases() -> List[Case]:
    big = "x" * (2 << 20)
    out: List[Case] = [
        # --- OCI state --------------------------------------------------------
        Case("state: empty", state=b""),
        Case("state: broken JSON", state=b'{"id": "a", "bundle": '),
        Case("state: JSON list", state=b"[]"),
        Case("state: JSON string", state=b'"hello"'),
        Case("state: NUL bytes", state=b"\x00\x00\x00"),
        Case("state: invalid UTF-8", state=b'{"id": "\xff\xfe"}'),
        Case("state: huge", state=b'{"id": "a", "pad": "' + big.encode() + b'"}'),
        Case("state: id missing", state={"id": None}),
        Case("state: id number", state={"id": 42}),
        Case("state: id traversal", state={"id": "../../etc/passwd"}),
        Case("state: id with slash", state={"id": "a/b"}),
        Case("state: id too long", state={"id": "a" * 500}),
        Case("state: id unicode", state={"id": "cont\u200bainer"}),
        Case("state: id newline", state={"id": "a\nb"}),
        Case("state: bundle missing", state={"bundle": None}),
        Case("state: bundle relative", state={"bundle": "relative/dir"}),
        Case("state: bundle number", state={"bundle": 7}),
        Case("state: bundle with NUL", state={"bundle": "/tmp/a\u0000b"}),
        Case("state: bundle points elsewhere (/etc)", state={"bundle": "/etc"}),
        Case("state: bundle points at /proc/self", state={"bundle": "/proc/self"}),
        Case("state: bundle does not exist", state={"bundle": "/nonexistent/bundle"}),
        Case("state: pid negative", state={"pid": -5}),
        Case("state: pid string", state={"pid": "1"}),
        Case("state: pid float", state={"pid": 1.5}),
        Case("state: pid huge", state={"pid": 1 << 40}),
        Case("state: pid bool", state={"pid": True}),
        Case("state: status number", state={"status": 3}),
        Case("state: annotations list", state={"annotations": ["a"]}),
        Case("state: annotation value number", state={"annotations": {A: 5}}),
        Case("state: annotation overrides with garbage", state={"annotations": {A: "[{"}}),
        # --- bundle config.json -------------------------------------------------
        Case("spec: not JSON", spec=b"not json"),
        Case("spec: JSON list", spec=b"[1, 2]"),
        Case("spec: empty file", spec=b""),
        Case("spec: invalid UTF-8", spec=b'{"a": "\xff"}'),
        Case("spec: annotations not a map", spec={"annotations": "x"}),
        Case("spec: annotation not a string", spec={"annotations": {A: ["fast"]}}),
        Case("spec: host network (no netns)", spec={"annotations": {A: "fast"},
                                                    "linux": {"namespaces": [{"type": "pid"}]}}),
        Case("spec: netns path relative", spec={"annotations": {A: "fast"}, "linux": {
            "namespaces": [{"type": "network", "path": "var/run/netns/x"}]}}),
        Case("spec: netns path not a netns", spec={"annotations": {A: "fast"}, "linux": {
            "namespaces": [{"type": "network", "path": "/etc/passwd"}]}}),
        Case("spec: netns path missing", spec={"annotations": {A: "fast"}, "linux": {
            "namespaces": [{"type": "network", "path": "/run/netns/does-not-exist"}]}}),
        Case("spec: netns is the host's", spec={"annotations": {A: "fast"}, "linux": {
            "namespaces": [{"type": "network", "path": "/proc/1/ns/net"}]}}),
        Case("spec: config.json is a symlink", setup=_symlink_config),
        Case("spec: config.json is a FIFO", setup=_fifo_config),
        # --- annotation ----------------------------------------------------------
        _ann(""),
        _ann("   "),
        _ann("[{"),
        _ann("nosuchpool"),
        _ann("fast,nosuchpool"),
        _ann("../../etc"),
        _ann("fast@"),
        _ann("fast@a/b"),
        _ann("fast@.."),
        _ann("fast@lo"),
        _ann("fast@eth0:1"),
        _ann("fast@" + "n" * 16),
        _ann("fast@n\u00e9t1"),
        _ann("fast@net1,fast@net1"),
        _ann("fast\u202e@net1"),
        _ann([]),
        _ann([1]),
        _ann([{"pool": "fast", "unknown": 1}]),
        _ann([{"pool": 5}]),
        _ann([{"pool": "fast", "mac": "ff:ff:ff:ff:ff:ff"}]),
        _ann([{"pool": "fast", "mac": "00:00:00:00:00:00"}]),
        _ann([{"pool": "fast", "mac": "02:00:00:00:00:0g"}]),
        _ann([{"pool": "fast", "mac": "02-00-00-00-00-01"}]),
        _ann([{"pool": "fast", "vlan": -1}]),
        _ann([{"pool": "fast", "vlan": 4095}]),
        _ann([{"pool": "fast", "vlan": 1e3}]),
        _ann([{"pool": "fast", "qos": 9}]),
        _ann([{"pool": "fast", "mtu": 10 ** 12}]),
        _ann([{"pool": "fast", "mtu": "1500"}]),
        _ann([{"pool": "fast", "ips": "10.0.0.1/24"}]),
        _ann([{"pool": "fast", "ips": ["10.0.0.1/33"]}]),
        _ann([{"pool": "fast", "ips": ["::1/128"]}]),
        _ann([{"pool": "fast", "ips": ["10.0.0.1/24"] * 2}]),
        _ann([{"pool": "fast", "ips": [f"10.0.{i}.1/24" for i in range(100)]}]),
        _ann([{"pool": "fast", "gateway": "not-an-ip", "ips": ["10.0.0.2/24"]}]),
        _ann([{"pool": "fast", "gateway": "fd00::1", "ips": ["10.0.0.2/24"]}]),
        _ann([{"pool": "fast", "routes": [{"dst": "10.0.0.0/8", "via": "fd00::1"}]}]),
        _ann([{"pool": "fast", "routes": [{"dst": "10.0.0.0/8", "dev": "eth0"}]}]),
        _ann([{"pool": "fast", "routes": "10.0.0.0/8"}]),
        _ann([{"pool": "fast", "interface": 7}]),
        _ann([{"pool": "fast", "pci": "../../../../etc"}]),
        _ann([{"pool": "fast", "pci": "0000:ff:1f.7"}]),
        _ann([{"pool": "fast", "vlan": 10}]),          # policy: vlan not allowed
        _ann([{"pool": "fast", "trust": True}]),       # policy: trust not allowed
        _ann([{"pool": "fast", "spoofchk": False}]),   # policy
        _ann([{"pool": "fast", "max_tx_rate": 100}]),  # policy
        _ann(",".join(["fast"] * 17)),                 # too many
        _ann("fast," * 4 + "fast"),                    # above max_per_container
        _ann("f" * 20000),                             # size limit
    ]
    return out + _limits() + _names() + _trust() + _images()


def _needle(case: Case, needle: str) -> Case:
    case.needle = needle
    return case


def _limits() -> List[Case]:
    """Nesting and sizes, refused before the JSON decoder recurses."""
    deep = "nests deeper than"
    return [
        _needle(_ann("[" * 10000), deep),
        _needle(_ann('{"a":' * 3000), deep),
        _needle(_ann("[" * 7 + "]" * 7), deep),
        _needle(_ann('[{"pool":"fast","routes":' + "[" * 60 + "]" * 60 + "}]"), deep),
        _needle(_ann('["' + "[" * 5000 + '"]'), "must be a JSON object"),   # brackets in a string
        _needle(_ann('[{"pool":"fast","vlan":' + "9" * 50 + "}]"), "more than 40 digits"),
        _needle(_ann('[{"pool":"fast","mtu":' + "1" * 4500 + "}]"), "more than 40 digits"),
        _needle(_ann('[{"pool":"fast","mtu":1e400}]'), "mtu: must be an integer"),
        _needle(_ann([{"pool": "f" * 15000}]), "pool: required"),
        _needle(_ann([{"pool": "fast", "mac": "0" * 15000}]), "is not a MAC"),
        _needle(_ann([{"pool": "fast", "ips": ["1" * 15000]}]), "CIDR"),
        _needle(_ann([{"pool": "fast", "ips": ["10.0.0.2/24"], "gateway": "9" * 15000}]),
                "gateway"),
        _needle(_ann([{"pool": "fast", "routes": [{"dst": "1" * 15000}]}]), "dst"),
        _needle(Case("state: nested 100000 deep",
                     state=b'{"id":"a","x":' + b"[" * 100000 + b"]" * 100000 + b"}"), deep),
        _needle(Case("state: objects nested 40 deep",
                     state=b'{"id":"a","x":' + b'{"a":' * 40 + b"1" + b"}" * 41), deep),
        _needle(Case("spec: nested 1000000 deep", spec=b"[" * 1000000), deep),
        _needle(Case("spec: annotations nested 100 deep",
                     spec=b'{"annotations":{"x":' + b"[" * 100 + b"]" * 100 + b"}}"), deep),
        _needle(Case("spec: a 5000-digit number", spec=b'{"ociVersion":' + b"7" * 5000 + b"}"),
                "more than 40 digits"),
    ]


def _names() -> List[Case]:
    """Interface names the kernel would take as a pattern, or refuse."""
    pattern = "'%' (a kernel name pattern)"
    return [
        _needle(_ann("fast@net%d"), pattern),
        _needle(_ann("fast@%"), pattern),
        _needle(_ann("fast@%s%d"), pattern),
        _needle(_ann([{"pool": "fast", "interface": "eth%d"}]), pattern),
        _needle(_ann("fast@all"), "refused by the kernel"),
        _needle(_ann("fast@default"), "refused by the kernel"),
    ]


def _trust() -> List[Case]:
    """Sandbox ids and namespaces from keys no runtime vouches for (oci.CRI_RUNTIMES)."""
    two = "marks of two runtimes"
    kata = "kata"
    return [
        _needle(Case("sandbox: both runtimes' marks", annotation=kata,
                     annotations={**CRIO, **CONTAINERD,
                                  "io.kubernetes.cri-o.SandboxID": "victim",
                                  "io.kubernetes.cri.sandbox-id": "victim"}), two),
        _needle(Case("sandbox: CRI-O mark, id a path", annotation=kata,
                     annotations={**CRIO, "io.kubernetes.cri-o.SandboxID": "../../etc"}),
                "not a valid id"),
        _needle(Case("sandbox: CRI-O mark, empty id", annotation=kata,
                     annotations={**CRIO, "io.kubernetes.cri-o.SandboxID": ""}),
                "not a valid id"),
        _needle(Case("sandbox: containerd mark, CRI-O's key only", annotation=kata,
                     annotations={**CONTAINERD, "io.kubernetes.cri-o.SandboxID": "victim"}),
                "io.kubernetes.cri.sandbox-id is missing"),
        _needle(Case("namespace: no runtime vouches", annotation="nsonly",
                     annotations={"io.kubernetes.pod.namespace": "ns-a"}),
                "not made by a CRI runtime"),
        _needle(Case("namespace: podman's mark", annotation="nsonly",
                     annotations={"io.container.manager": "libpod",
                                  "io.kubernetes.pod.namespace": "ns-a"}),
                "not made by a CRI runtime"),
        _needle(Case("namespace: CRI-O, another namespace", annotation="nsonly",
                     annotations={**CRIO, "io.kubernetes.pod.namespace": "ns-b"}),
                "does not admit Kubernetes namespace ns-b"),
        _needle(Case("namespace: containerd, pod's own key", annotation="nsonly",
                     annotations={**CONTAINERD, "io.kubernetes.pod.namespace": "ns-a",
                                  "io.kubernetes.cri.sandbox-namespace": "ns-b"}),
                "does not admit Kubernetes namespace ns-b"),
        _needle(Case("namespace: containerd, none set", annotation="nsonly",
                     annotations={**CONTAINERD, "io.kubernetes.pod.namespace": "ns-a"}),
                "io.kubernetes.cri.sandbox-namespace is missing"),
        _needle(Case("namespace: CRI-O, not a namespace", annotation="nsonly",
                     annotations={**CRIO, "io.kubernetes.pod.namespace": "NS-A/.."}),
                "not a Kubernetes namespace"),
        _needle(Case("namespace: both runtimes' marks", annotation="nsonly",
                     annotations={**CRIO, **CONTAINERD, "io.kubernetes.pod.namespace": "ns-a",
                                  "io.kubernetes.cri.sandbox-namespace": "ns-a"}), two),
    ]


def _images() -> List[Case]:
    """dpdk containers whose image links its paths elsewhere (tests/standin.py)."""
    from tests import standin
    return [_needle(Case(f"image: {name}", annotation='[{"pool":"dp"}]', layout=name),
                    "in the container is a symlink")
            for name in sorted(standin.LAYOUTS)]


# -- what the cases beyond the plain pool need -------------------------------------------------
class Environment:
    """Extra pools, the kernel simulator, a host directory to aim at; and the
    per-case checks that nothing outside the simulated host's state changed."""

    def __init__(self, sim: "Sim") -> None:
        self.sim = sim
        self.host = f"/tmp/sriov-corpus-{uuid.uuid4().hex[:8]}"
        self._config = b""
        self._ks: "Optional[KernelSim]" = None
        self._before: Dict[str, bytes] = {}
        self._pages: Tuple[int, ...] = ()

    def __enter__(self) -> "Environment":
        import yaml
        from tests import simhost, standin
        from tests.kernelsim import KernelSim
        with open(self.sim.config, "rb") as fh:
            self._config = fh.read()
        cfg = yaml.safe_load(self._config)
        pf = self.sim.host.nics[0].pf
        cfg["pools"] = [p for p in cfg["pools"] if p["name"] not in ("dp", "kata", "nsonly")] + [
            {"name": "dp", "mode": "dpdk", "pfs": [f"{pf}#0-1"], "hugepages": "8M"},
            {"name": "kata", "mode": "kata", "pfs": [f"{pf}#2"]},
            {"name": "nsonly", "mode": "netdev", "pfs": [f"{pf}#3"], "namespaces": ["ns-a"]}]
        with open(self.sim.config, "w") as fh:
            yaml.safe_dump(cfg, fh, sort_keys=False)
        self._ks = KernelSim(simhost.fake_sysfs(self.sim.host), self.sim.host.dev_dir)
        os.makedirs(self.host)
        with open(os.path.join(self.host, "keep"), "w") as fh:
            fh.write("host data\n")
        self._before = standin.snapshot(self.host)
        self._pages = self._hugepages()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ks is not None:
            self._ks.stop()
        with open(self.sim.config, "wb") as fh:
            fh.write(self._config)
        shutil.rmtree(self.host, ignore_errors=True)

    def _hugepages(self) -> Tuple[int, ...]:
        out = []
        for d in ("kernel/mm/hugepages", "devices/system/node/node0/hugepages"):
            base = os.path.join(self.sim.host.sysfs_root, d, "hugepages-2048kB")
            for f in ("nr_hugepages", "free_hugepages"):
                with open(os.path.join(base, f)) as fh:
                    out.append(int(fh.read()))
        return tuple(out)

    @contextlib.contextmanager
    def running(self, case: Case, bundle: str) -> Iterator[Dict[str, Any]]:
        """Prepare ``bundle`` for ``case``; yield what its state needs (a pid)."""
        from tests import standin
        if case.annotations:
            path = os.path.join(bundle, "config.json")
            with open(path) as fh:
                spec = json.load(fh)
            spec["annotations"].update(case.annotations)
            with open(path, "w") as fh:
                json.dump(spec, fh)
        if case.layout is None:
            yield {}
            return
        rootfs = os.path.join(bundle, "rootfs")   # the spec's default root.path
        for d in ("etc", "run", "dev", "tmp"):
            os.makedirs(os.path.join(rootfs, d))
        standin.plant(rootfs, standin.LAYOUTS[case.layout], self.host)
        with standin.container() as proc:
            yield {"pid": proc.pid}

    def problems(self) -> List[str]:
        from tests import standin
        out = []
        if standin.snapshot(self.host) != self._before:
            out.append(f"{self.host} (outside every rootfs) changed")
        if os.path.exists("/etc/sriov-hook"):
            out.append("/etc/sriov-hook appeared on the host")
        if self._hugepages() != self._pages:
            out.append(f"hugepage counts changed: {self._pages} -> {self._hugepages()}")
        return out
