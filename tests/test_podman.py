"""Debian's podman with --hooks-dir pointing at a rendered copy of hooks.d/."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import uuid
from typing import Iterator, List

import pytest

from tests.conftest import HOOK, ROOT, Sim
from tests.containers import rootfs_tar

pytestmark = [pytest.mark.root, pytest.mark.podman,
              pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed")]

# This sandbox's podman needs explicit ulimits; and once crun is installed
# podman picks it by default, which refuses this host's hybrid cgroups
# outside a private mount namespace (tests/containers.py podman_crun).
PODMAN_RUN = ["podman", "run", "--rm", "--network", "none", "--runtime", "runc",
              "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def render_hooks(dest: str, config: str, hook: str = HOOK) -> str:
    """Copy hooks.d/, pointing at ``hook`` (this venv's) and the test config."""
    os.makedirs(dest)
    for src in glob.glob(os.path.join(ROOT, "hooks.d", "*.json")):
        with open(src) as fh:
            spec = json.load(fh)
        spec["hook"]["path"] = hook
        spec["hook"]["env"] = [e for e in spec["hook"]["env"]
                               if not e.startswith("SRIOV_HOOK_CONFIG=")]
        spec["hook"]["env"].append(f"SRIOV_HOOK_CONFIG={config}")
        with open(os.path.join(dest, os.path.basename(src)), "w") as fh:
            json.dump(spec, fh)
    return dest


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Iterator[str]:  # type: ignore[no-untyped-def]
    tag = f"localhost/sriov-hook-test:{uuid.uuid4().hex[:8]}"
    tar = rootfs_tar(str(tmp_path_factory.mktemp("img") / "rootfs.tar"))
    subprocess.run(["podman", "import", tar, tag], check=True, capture_output=True)
    yield tag
    subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)


def annotation(value: str) -> str:
    """podman parses --annotation as CSV: quote it, or commas and quotes split it."""
    text = f"sriov-hook.io/networks={value}"
    return '"' + text.replace('"', '""') + '"'


def podman(args: List[str], name: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(PODMAN_RUN + ["--name", name] + args, capture_output=True,
                              text=True, timeout=120)
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True)


def test_podman_annotation_triggers_hook(sim: Sim, image: str, tmp_path) -> None:  # type: ignore
    hooks = render_hooks(str(tmp_path / "hooks.d"), sim.config)
    ann = json.dumps([{"pool": "fast", "ips": ["10.30.0.5/24"], "mac": "02:00:00:bb:00:05"}])
    name = f"sriov-{uuid.uuid4().hex[:8]}"
    out = podman(["--hooks-dir", hooks, "--annotation", annotation(ann), image,
                  "sh", "-c", "ip -o addr show dev net1; cat /sys/class/net/net1/address"], name)
    assert out.returncode == 0, out.stderr
    assert "inet 10.30.0.5/24" in out.stdout
    assert "02:00:00:bb:00:05" in out.stdout
    sim.assert_clean()  # podman ran poststop itself, with no pid


def test_podman_without_annotation_does_not_run_hook(sim: Sim, image: str, tmp_path) -> None:  # type: ignore
    hooks = render_hooks(str(tmp_path / "hooks.d"), sim.config)
    name = f"sriov-{uuid.uuid4().hex[:8]}"
    out = podman(["--hooks-dir", hooks, image, "sh", "-c", "ls /sys/class/net"], name)
    assert out.returncode == 0, out.stderr
    assert "net1" not in out.stdout
    assert not os.path.exists(sim.host.log_file)


def test_podman_refused_when_pool_exhausted(make_sim, image: str, tmp_path) -> None:  # type: ignore
    sim = make_sim(nvfs=1)
    hooks = render_hooks(str(tmp_path / "hooks.d"), sim.config)
    name = f"sriov-{uuid.uuid4().hex[:8]}"
    out = podman(["--hooks-dir", hooks, "--annotation", annotation("fast,fast"),
                  image, "true"], name)
    assert out.returncode != 0
    assert "sriov-hook: pool fast is exhausted" in out.stderr
    sim.assert_clean()
