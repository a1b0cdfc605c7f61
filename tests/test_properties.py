"""Property tests (hypothesis) over every parser that takes outside input.

Whatever the input, a parser either returns a well-formed value or raises
its typed HookError subclass; nothing else escapes.
"""
from __future__ import annotations

import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sriov_hook import config, oci, request
from sriov_hook.errors import ConfigError, RequestError, StateError
from sriov_hook.pci import IFNAMSIZ, parse_selector

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                           max_leaves=12)
KEYS = ["pool", "pci", "interface", "mac", "vlan", "qos", "mtu", "ips", "gateway", "routes",
        "spoofchk", "trust", "min_tx_rate", "max_tx_rate", "link_state"]


@SETTINGS
@given(st.text(max_size=200))
def test_annotation_text_never_escapes(text: str) -> None:
    try:
        reqs = request.parse(text)
    except RequestError:
        return
    for r in reqs:
        raw = r.interface.encode()
        assert 0 < len(raw) < IFNAMSIZ and "/" not in r.interface and r.interface not in (".", "..")
        assert not any(c.isspace() for c in r.interface)
    assert len({r.interface for r in reqs}) == len(reqs)


@SETTINGS
@given(st.lists(st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6), max_size=4))
def test_annotation_long_form_never_escapes(items: list) -> None:
    try:
        reqs = request.parse(json.dumps(items))
    except RequestError:
        return
    for r in reqs:
        if r.vf.vlan is not None:
            assert 0 <= r.vf.vlan <= 4094
        if r.vf.mac is not None:
            assert int(r.vf.mac[:2], 16) & 1 == 0 and r.vf.mac != "00:00:00:00:00:00"
        if r.mtu is not None:
            assert 68 <= r.mtu <= 65535


@SETTINGS
@given(st.one_of(st.binary(max_size=300),
                 st.dictionaries(st.sampled_from(["id", "bundle", "bundlePath", "pid", "status",
                                                  "annotations", "ociVersion"]),
                                 json_values, max_size=7).map(lambda d: json.dumps(d).encode())))
def test_state_never_escapes(raw: bytes) -> None:
    try:
        s = oci.parse_state(raw)
    except StateError:
        return
    assert oci.valid_id(s.id) and s.bundle.startswith("/")
    assert s.pid is None or s.pid > 0


@SETTINGS
@given(st.text(alphabet=string.ascii_letters + string.digits + "#-,:._/ ", max_size=40))
def test_selector_never_escapes(text: str) -> None:
    try:
        sel = parse_selector(text)
    except ValueError:
        return
    idx = list(sel.indices(64))
    assert idx == sorted(set(idx)) and all(0 <= i < 64 for i in idx)
    assert all(sel.allows(i) for i in idx)
    assert parse_selector(str(sel)) == sel   # round trip


@SETTINGS
@given(json_values)
def test_config_never_escapes(raw: object) -> None:
    try:
        config._build(raw, "/x.yaml")
    except ConfigError as err:
        assert str(err).startswith("config /x.yaml")


@SETTINGS
@given(st.text(max_size=300))
def test_config_yaml_text_never_escapes(text: str) -> None:
    try:
        config.parse(text.encode(), "/y.yaml")
    except ConfigError as err:
        assert str(err).startswith("config /y.yaml")
