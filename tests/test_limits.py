"""Input limits: nesting and sizes bounded before the JSON decoder runs,
interface names by the kernel's own rules, the ``namespaces`` pool key."""
from __future__ import annotations

import json
import os
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from sriov_hook import config, jsonbound, oci, request
from sriov_hook.errors import ConfigError, RequestError, StateError
from sriov_hook.pci import ifname_problem, parse_selector
from tests.conftest import Sim
from tests.test_netdev import one_line_error


def real_depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((real_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((real_depth(v) for v in value.values()), default=0)
    return 0


# Strings full of what could fool a bracket counter: brackets, quotes, backslashes.
_tricky = st.text(alphabet='[]{}"\\/ab\u00e9\n', max_size=12)
_json = st.recursive(st.none() | st.booleans() | st.integers() | _tricky,
                     lambda kids: st.lists(kids, max_size=4)
                     | st.dictionaries(_tricky, kids, max_size=4), max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(_json, st.booleans())
def test_depth_is_exact_on_any_json(value: Any, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert jsonbound.depth(text) == real_depth(value)


def test_depth_scan_is_linear_on_bombs() -> None:
    """Each 16 MiB bomb is measured, and refused, without recursing (a
    quadratic scan would not finish here)."""
    for bomb in ("[" * (16 << 20), '"' + '\\"' * (4 << 20), "[]," * (5 << 20)):
        assert jsonbound.depth(bomb, stop_above=64) >= 0
    with pytest.raises(jsonbound.TooDeep):
        jsonbound.loads("[" * (16 << 20), 64)


@pytest.mark.parametrize("text,needle", [
    ("[" * 10000, "nests deeper than 6 levels"),
    ('{"a":' * 3000, "nests deeper than 6 levels"),
    ('[{"pool":"fast","routes":[[[[[[]]]]]]}]', "nests deeper than 6 levels"),
    ('[{"pool":"fast","vlan":' + "1" * 41 + "}]", "more than 40 digits"),
    ('[{"pool":"fast","mtu":' + "9" * 4400 + "}]", "more than 40 digits"),
])
def test_annotation_bombs_are_refused_unparsed(text: str, needle: str) -> None:
    with pytest.raises(RequestError, match=needle):
        request.parse(text)


def test_the_deepest_real_annotation_still_parses() -> None:
    text = json.dumps([{"pool": "fast", "ips": ["10.0.0.2/24"],
                        "routes": [{"dst": "10.1.0.0/16", "via": "10.0.0.1"}]}])
    assert request.parse(text)[0].routes[0].via is not None


def test_state_and_spec_bombs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StateError, match="state on stdin nests deeper than 32 levels"):
        oci.parse_state(b'{"id":"a","bundle":"/b","x":' + b"[" * 200000 + b"]" * 200000 + b"}")
    bundle = str(tmp_path)
    with open(os.path.join(bundle, "config.json"), "wb") as fh:
        fh.write(b'{"annotations":{"a":"b"},"x":' + b"{\"k\":" * 100 + b"1" + b"}" * 101)
    state = oci.parse_state(json.dumps({"id": "a", "bundle": bundle}).encode())
    with pytest.raises(StateError, match="nests deeper than 64 levels"):
        oci.load_container(state)


@pytest.mark.root
def test_deep_annotation_is_one_line_not_an_internal_error(sim: Sim) -> None:
    """'[' * 10000 used to end in a RecursionError ("internal error")."""
    r = sim.prestart("deep", sim.bundle("[" * 10000, sim.netns()))
    one_line_error(r, "nests deeper than 6 levels")
    assert "internal error" not in r.stderr
    sim.assert_clean()


@pytest.mark.parametrize("name,why", [
    ("net%d", "'%'"), ("%", "'%'"), ("a%sb", "'%'"), ("all", "refused by the kernel"),
    ("default", "refused by the kernel"), ("a:b", "':'"), ("a b", "whitespace"),
])
def test_ifnames_the_kernel_would_not_take_literally(name: str, why: str) -> None:
    assert why in (ifname_problem(name) or "")
    with pytest.raises(RequestError, match="interface"):
        request.parse(f"fast@{name}")


def test_pf_names_follow_the_same_rules() -> None:
    with pytest.raises(ValueError, match="'%'"):
        parse_selector("ens%d#0-3")
    text = b"pools: [{name: p, pfs: ['ens%d']}]\n"
    with pytest.raises(ConfigError, match=r"pools\[0\]\.pfs\[0\]"):
        config.parse(text)
    with pytest.raises(ConfigError, match="numvfs"):
        config.parse(b"numvfs: {'eth%d': 4}\npools: [{name: p, pfs: [eth0]}]\n")


@pytest.mark.parametrize("value,ok", [
    (["ns-a", "kube-system"], True), ([], False), ("ns-a", False), (["NS-A"], False),
    (["a" * 64], False), (["-a"], False), (["a_b"], False), ([7], False),
])
def test_namespaces_pool_key(value: Any, ok: bool) -> None:
    text = json.dumps({"pools": [{"name": "p", "pfs": ["eth0"], "namespaces": value}]}).encode()
    if ok:
        assert config.parse(text).pools["p"].namespaces == frozenset(value)
    else:
        with pytest.raises(ConfigError, match=r"pools\[0\]\.namespaces"):
            config.parse(text)
    assert config.parse(b"pools: [{name: p, pfs: [eth0]}]\n").pools["p"].namespaces is None
