"""Hostile and malformed inputs: OCI state, bundle config.json, annotation.

Each case is fed to ``sriov-hook prestart`` on the simulated host and must
end with exit != 0, one ``sriov-hook:`` line, no traceback, no state change.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

A = "sriov-hook.io/networks"


@dataclass
class Case:
    name: str
    # state: bytes, or a dict merged over a valid state; "{bundle}" is filled in
    state: Any = None
    spec: Any = None            # config.json content (dict or raw bytes); None: valid spec
    annotation: Optional[str] = None
    setup: Optional[Callable[[str], None]] = None   # gets the bundle dir
    extra: Dict[str, Any] = field(default_factory=dict)


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
    return out
