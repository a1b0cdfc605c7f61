"""Pure parsing and validation: selectors, annotation, config, OCI state."""
from __future__ import annotations

import json
import os

import pytest

from sriov_hook import config, oci, request
from sriov_hook.errors import ConfigError, RequestError, StateError, UnknownPool
from sriov_hook.pci import normalize_bdf, parse_selector

# -- selectors -----------------------------------------------------------------


@pytest.mark.parametrize("text,pf,idx", [
    ("ens1f0", "ens1f0", [0, 1, 2, 3, 4, 5, 6, 7]),
    ("ens1f0#0-3", "ens1f0", [0, 1, 2, 3]),
    ("ens1f0#0,2-3,7", "ens1f0", [0, 2, 3, 7]),
    ("0000:3B:00.0#1", "0000:3b:00.0", [1]),
    ("3b:00.0#5-6", "0000:3b:00.0", [5, 6]),
    ("p#0-3,2-5", "p", [0, 1, 2, 3, 4, 5]),
])
def test_selector_ok(text: str, pf: str, idx: list) -> None:
    sel = parse_selector(text)
    assert sel.pf == pf
    assert list(sel.indices(8)) == idx


def test_selector_vf0_is_real() -> None:
    sel = parse_selector("ens1f0#0")
    assert list(sel.indices(4)) == [0]
    assert sel.allows(0) and not sel.allows(1)


@pytest.mark.parametrize("text", ["", "ens1f0#", "ens1f0#3-1", "ens1f0#a", "ens1f0#99999",
                                  "x" * 16, "bad/name", "0000:3b:00.8", 7, None])
def test_selector_bad(text: object) -> None:
    with pytest.raises(ValueError):
        parse_selector(text)


def test_normalize_bdf() -> None:
    assert normalize_bdf("3b:02.1") == "0000:3b:02.1"
    with pytest.raises(ValueError):
        normalize_bdf("0000:3b:20.1")  # slot > 0x1f


# -- annotation ----------------------------------------------------------------


def test_short_form_defaults() -> None:
    reqs = request.parse("fast")
    assert [(r.pool, r.interface) for r in reqs] == [("fast", "net1")]
    reqs = request.parse("fast@eth9, slow, fast")
    assert [(r.pool, r.interface) for r in reqs] == [("fast", "eth9"), ("slow", "net1"),
                                                     ("fast", "net2")]


def test_defaults_skip_explicit_names() -> None:
    reqs = request.parse("a, a@net1")
    assert [r.interface for r in reqs] == ["net2", "net1"]


def test_long_form_full() -> None:
    text = json.dumps([{"pool": "fast", "interface": "data0", "mac": "02:AA:bb:cc:dd:ee",
                        "vlan": 100, "mtu": 9000, "ips": ["10.0.0.2/24", "fd00::2/64"],
                        "gateway": "10.0.0.1",
                        "routes": [{"dst": "10.1.0.0/16", "via": "10.0.0.254"}, "10.2.0.0/16"]}])
    (r,) = request.parse(text)
    assert r.interface == "data0" and r.vf.mac == "02:aa:bb:cc:dd:ee" and r.vf.vlan == 100
    assert [str(i) for i in r.ips] == ["10.0.0.2/24", "fd00::2/64"]
    assert str(r.gateway) == "10.0.0.1"
    assert [(str(x.dst), str(x.via) if x.via else None) for x in r.routes] == [
        ("10.1.0.0/16", "10.0.0.254"), ("10.2.0.0/16", None)]


@pytest.mark.parametrize("value,needle", [
    ("", "empty"),
    ("[", "not valid JSON"),
    ("[]", "non-empty"),
    ("[1]", "JSON object"),
    ('[{"interface":"net1"}]', "pool"),
    ('[{"pool":"p","bogus":1}]', "unknown key"),
    ('[{"pool":"p","mac":"01:00:00:00:00:01"}]', "multicast"),
    ('[{"pool":"p","mac":"00:00:00:00:00:00"}]', "all-zero"),
    ('[{"pool":"p","mac":"zz:00:00:00:00:01"}]', "not a MAC"),
    ('[{"pool":"p","vlan":4095}]', "0..4094"),
    ('[{"pool":"p","vlan":"10"}]', "integer"),
    ('[{"pool":"p","vlan":true}]', "integer"),
    ('[{"pool":"p","qos":8}]', "0..7"),
    ('[{"pool":"p","mtu":67}]', "68..65535"),
    ('[{"pool":"p","ips":["10.0.0.1"]}]', "CIDR"),
    ('[{"pool":"p","ips":["10.0.0.300/24"]}]', "not a valid CIDR"),
    ('[{"pool":"p","ips":["224.0.0.1/24"]}]', "unicast"),
    ('[{"pool":"p","routes":[{"dst":"10.0.0.1/8"}]}]', "network CIDR"),
    ('[{"pool":"p","gateway":"10.0.0.1"}]', "no address of its family"),
    ('[{"pool":"p","interface":"a-very-long-name0"}]', "at most 15"),
    ('[{"pool":"p","interface":"a/b"}]', "'/'"),
    ('[{"pool":"p","interface":"a b"}]', "whitespace"),
    ('[{"pool":"p","interface":".."}]', ". or .."),
    ('[{"pool":"p","interface":"lo"}]', "reserved"),
    ('[{"pool":"p","interface":"n1"},{"pool":"p","interface":"n1"}]', "also used"),
    ("p@", "must not be empty"),
    ("../etc", "pool name"),
])
def test_annotation_rejects(value: str, needle: str) -> None:
    with pytest.raises(RequestError) as exc:
        request.parse(value)
    assert needle in str(exc.value)


def test_annotation_size_limit() -> None:
    with pytest.raises(RequestError, match="larger than"):
        request.parse("p," * 10000)


# -- config ------------------------------------------------------------------


def _cfg(text: str) -> config.Config:
    return config.parse(text.encode(), "/etc/x.yaml")


def test_config_minimal_defaults() -> None:
    c = _cfg("pools: [{name: fast, pfs: ['ens1f0#0-3']}]")
    assert c.sysfs_root == "/sys" and c.state_dir == "/var/lib/sriov-hook"
    pool = c.pool("fast")
    assert pool.mode == "netdev" and str(pool.pfs[0]) == "ens1f0#0-3"
    assert pool.allow == frozenset({"mac", "mtu"})
    with pytest.raises(UnknownPool, match="configured: fast"):
        c.pool("nope")


@pytest.mark.parametrize("text,key", [
    ("pools: []", "pools"),
    ("pools: [{name: a, pfs: [x], mode: magic}]", "pools[0].mode"),
    ("pools: [{name: a, pfs: ['x#9-1']}]", "pools[0].pfs[0]"),
    ("pools: [{name: a, pfs: [x], vlan: 5000}]", "pools[0].vlan"),
    ("pools: [{name: a, pfs: [x], spoofchk: 'yes'}]", "pools[0].spoofchk"),
    ("pools: [{name: a, pfs: [x], colour: red}]", "pools[0].colour"),
    ("pools: [{name: a, pfs: [x]}, {name: a, pfs: [y]}]", "pools[1].name"),
    ("pools: [{name: a, pfs: [x]}, {name: b, pfs: [x]}]", "pools.b.pfs"),
    ("state_dir: relative\npools: [{name: a, pfs: [x]}]", "state_dir"),
    ("lock_timeout: -1\npools: [{name: a, pfs: [x]}]", "lock_timeout"),
    ("bogus: 1\npools: [{name: a, pfs: [x]}]", "bogus"),
    ("pools: [{name: a, pfs: [x], allow: [everything]}]", "pools[0].allow"),
    ("pools: [{name: a, pfs: [x], vlans: ['10-5']}]", "pools[0].vlans"),
])
def test_config_errors_name_file_and_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _cfg(text)
    msg = str(exc.value)
    assert msg.startswith("config /etc/x.yaml:") and key in msg


def test_config_yaml_syntax_error_has_line() -> None:
    with pytest.raises(ConfigError, match=r"config /etc/x.yaml: line \d+: "):
        _cfg("pools:\n  - {name: a\n")


def test_policy() -> None:
    c = _cfg("pools: [{name: a, pfs: [x], vlan: 7, allow: [mac, vlan], vlans: [10, '20-30'],"
             " max_per_container: 1}]")
    (r,) = request.apply_policy(c, request.parse('[{"pool":"a","vlan":25}]'))
    assert r.vf.vlan == 25
    (r,) = request.apply_policy(c, request.parse("a"))
    assert r.vf.vlan == 7  # pool default
    with pytest.raises(RequestError, match="not allowed"):
        request.apply_policy(c, request.parse('[{"pool":"a","vlan":11}]'))
    with pytest.raises(RequestError, match="does not let containers set trust"):
        request.apply_policy(c, request.parse('[{"pool":"a","trust":true}]'))
    with pytest.raises(RequestError, match="at most 1"):
        request.apply_policy(c, request.parse("a,a"))


def test_config_env_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SRIOV_HOOK_CONFIG", "/from/env.yaml")
    assert config.resolve_path(None) == "/from/env.yaml"
    assert config.resolve_path("/cli.yaml") == "/cli.yaml"
    monkeypatch.delenv("SRIOV_HOOK_CONFIG")
    assert config.resolve_path(None) == "/etc/sriov-hook/config.yaml"


# -- OCI state -----------------------------------------------------------------


def test_state_lenient_kata_shape() -> None:
    s = oci.parse_state(b'{"ociVersion":"","status":"","id":"abc","pid":42,"bundle":"/b"}')
    assert (s.id, s.pid, s.status, s.bundle) == ("abc", 42, "", "/b")


def test_state_legacy_bundle_path() -> None:
    assert oci.parse_state(b'{"id":"a","bundlePath":"/x/y/"}').bundle == "/x/y"


@pytest.mark.parametrize("raw,needle", [
    (b"not json", "not valid JSON"),
    (b"[]", "JSON object"),
    (b'{"id":"a"}', "no bundle"),
    (b'{"id":"a","bundle":"rel"}', "absolute"),
    (b'{"bundle":"/b"}', "id"),
    (b'{"id":"../x","bundle":"/b"}', "id"),
    (b'{"id":"a","bundle":"/b","pid":-1}', "pid"),
    (b'{"id":"a","bundle":"/b","pid":"1"}', "pid"),
    (b'{"id":"a","bundle":"/b","annotations":{"k":1}}', "annotations"),
])
def test_state_rejects(raw: bytes, needle: str) -> None:
    with pytest.raises(StateError, match=needle):
        oci.parse_state(raw)


def test_container_merges_annotations_and_finds_netns(tmp_path: "os.PathLike[str]") -> None:
    spec = {"annotations": {"a": "spec", "b": "spec"},
            "linux": {"namespaces": [{"type": "network"}]}}
    (tmp_path / "config.json").write_text(json.dumps(spec))  # type: ignore[operator]
    st = oci.State(id="c", bundle=str(tmp_path), pid=77, annotations={"b": "state"})
    c = oci.load_container(st)
    assert c.annotations == {"a": "spec", "b": "state"}
    assert c.netns_path() == "/proc/77/ns/net"
    st.pid = None
    with pytest.raises(StateError, match="no pid"):
        c.netns_path()
    c.spec["linux"]["namespaces"] = [{"type": "pid"}]
    with pytest.raises(StateError, match="host network namespace"):
        c.netns_path()


def test_container_refuses_symlinked_config(tmp_path: "os.PathLike[str]") -> None:
    (tmp_path / "real.json").write_text("{}")  # type: ignore[operator]
    os.symlink(tmp_path / "real.json", tmp_path / "config.json")  # type: ignore[operator]
    with pytest.raises(StateError, match="cannot open"):
        oci.load_container(oci.State(id="c", bundle=str(tmp_path)))


def test_config_cache_follows_edits_and_is_revalidated(tmp_path) -> None:  # type: ignore
    cfg_path = tmp_path / "c.yaml"
    cache = str(tmp_path / "cache")
    cfg_path.write_text("pools: [{name: a, pfs: [x]}]\n")
    assert list(config.load(str(cfg_path), cache).pools) == ["a"]
    assert os.listdir(cache)                      # cached after it validated
    assert list(config.load(str(cfg_path), cache).pools) == ["a"]   # from the cache
    cfg_path.write_text("pools: [{name: bb, pfs: [x]}]\n")          # edited: new key
    assert list(config.load(str(cfg_path), cache).pools) == ["bb"]
    # A cache entry is validated like fresh YAML: tampering can't smuggle values in.
    entry = os.path.join(cache, os.listdir(cache)[0])
    data = json.load(open(entry))
    data["raw"]["pools"][0]["mode"] = "teleport"
    json.dump(data, open(entry, "w"))
    with pytest.raises(ConfigError, match="pools\\[0\\].mode"):
        config.load(str(cfg_path), cache)
    cfg_path.write_text("pools: [{name: bb, pfs: [x], mode: nope}]\n")
    with pytest.raises(ConfigError):
        config.load(str(cfg_path), cache)


def test_every_journal_step_has_an_undo() -> None:
    """A step kind without an undo function would leave its change behind on release."""
    from sriov_hook import hook, journal
    assert set(hook._UNDO) == set(journal.KINDS)
    for kind in journal.KINDS:
        assert callable(hook._undo_fn(kind))
