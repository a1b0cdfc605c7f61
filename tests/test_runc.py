"""Real runc containers (Debian runc + busybox rootfs) with the hook in config.json."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Iterator

import pytest

from tests.conftest import HOOK, Sim
from tests.containers import Runc, hook_entry, runc_bundle

pytestmark = [pytest.mark.root, pytest.mark.runc,
              pytest.mark.skipif(shutil.which("runc") is None, reason="runc not installed")]



@pytest.fixture
def runc(tmp_path) -> Iterator[Runc]:  # type: ignore[no-untyped-def]
    r = Runc(f"/run/sriov-test-runc-{uuid.uuid4().hex[:8]}")
    yield r
    r.cleanup()


def hooks(sim: Sim) -> dict:
    return {"prestart": [hook_entry(HOOK, sim.config, "prestart")],
            "poststop": [hook_entry(HOOK, sim.config, "poststop")]}


def test_container_sees_configured_vf_and_gives_it_back(sim: Sim, runc: Runc, tmp_path) -> None:  # type: ignore
    ann = json.dumps([{"pool": "fast", "ips": ["10.20.0.2/24"], "mac": "02:00:00:aa:00:01",
                       "mtu": 1450, "gateway": "10.20.0.1"}])
    script = ("ip -o addr show dev net1; cat /sys/class/net/net1/address;"
              " cat /sys/class/net/net1/mtu; ip route")
    bundle = runc_bundle(str(tmp_path / "b1"), ["sh", "-c", script],
                         {"sriov-hook.io/networks": ann}, hooks(sim))
    cid = f"sriov-{uuid.uuid4().hex[:8]}"
    out = runc.run(cid, bundle)
    assert out.returncode == 0, out.stderr
    assert "inet 10.20.0.2/24" in out.stdout
    assert "02:00:00:aa:00:01" in out.stdout
    assert "\n1450\n" in out.stdout
    assert "default via 10.20.0.1 dev net1" in out.stdout
    # runc ran poststop on its way out: the VF is home and free.
    sim.assert_clean()
    log = open(sim.host.log_file).read()
    assert f"cid={cid}" in log and "stage=poststop" in log


def test_failing_prestart_refuses_the_container(make_sim, runc: Runc, tmp_path) -> None:  # type: ignore
    sim = make_sim(nvfs=1)
    a = runc_bundle(str(tmp_path / "a"), ["sleep", "30"], {"sriov-hook.io/networks": "fast"},
                    hooks(sim))
    b = runc_bundle(str(tmp_path / "b"), ["true"], {"sriov-hook.io/networks": "fast"},
                    hooks(sim))
    ca, cb = f"sa-{uuid.uuid4().hex[:8]}", f"sb-{uuid.uuid4().hex[:8]}"
    assert runc.start_detached(ca, a).returncode == 0
    out = runc.run(cb, b)
    assert out.returncode != 0
    assert "sriov-hook: pool fast is exhausted" in out.stderr
    # The first container still has its VF.
    got = runc.exec(ca, "ip", "-o", "link", "show", "net1")
    assert got.returncode == 0 and "net1" in got.stdout
    assert runc.delete(ca).returncode == 0
    sim.assert_clean()


def test_detached_container_killed_then_deleted(sim: Sim, runc: Runc, tmp_path) -> None:  # type: ignore
    bundle = runc_bundle(str(tmp_path / "d"), ["sleep", "300"],
                         {"sriov-hook.io/networks": "fast@eth7"}, hooks(sim))
    cid = f"sd-{uuid.uuid4().hex[:8]}"
    assert runc.start_detached(cid, bundle).returncode == 0
    assert "eth7" in runc.exec(cid, "ip", "-o", "link", "show", "eth7").stdout
    # The container dies first; only the pin keeps its netns (and the VF).
    import subprocess
    subprocess.run(["runc", "--root", runc.root, "kill", cid, "KILL"], check=True)
    import time
    time.sleep(0.3)
    assert runc.delete(cid).returncode == 0
    sim.assert_clean()
