"""A real install of the package (packaging/install.py) into a staging root, for tests.

The wheelhouse is built once per session with ``pip wheel`` (the same
command as ``make wheel``); each install is a fresh venv under the root, so
the tests exercise what an operator gets, not the development checkout.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import pytest

from tests.conftest import ROOT

INSTALLER = os.path.join(ROOT, "packaging", "install.py")


def build_wheelhouse(dest: str) -> str:
    """As ``make wheel``: setuptools' stale build/ output cleared first."""
    build = os.path.join(ROOT, "build")
    for stale in [os.path.join(build, "lib"), *glob.glob(os.path.join(build, "bdist.*")),
                  *glob.glob(os.path.join(build, "scripts-*"))]:
        shutil.rmtree(stale, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q",
                           "--disable-pip-version-check", "-w", dest, ROOT],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dest


@dataclass
class Installed:
    """Paths of an install under ``root``, as the installer lays them out by default."""

    root: str
    wheelhouse: str

    def at(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def bin(self, name: str) -> str:
        return self.at(f"/usr/local/bin/{name}")

    @property
    def config(self) -> str:
        return self.at("/etc/sriov-hook/config.yaml")

    @property
    def hooks_dir(self) -> str:
        return self.at("/usr/share/containers/oci/hooks.d")

    @property
    def manifest(self) -> Dict[str, Any]:
        with open(self.at("/opt/sriov-hook/manifest.json")) as fh:
            data: Dict[str, Any] = json.load(fh)
        return data

    def installer(self, action: str, *args: str) -> subprocess.CompletedProcess[str]:
        extra: List[str] = ["--wheelhouse", self.wheelhouse] if action == "install" else []
        return subprocess.run([sys.executable, INSTALLER, action, "--root", self.root,
                               *extra, *args], capture_output=True, text=True, timeout=600)

    def install(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = self.installer("install", *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    def uninstall(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = self.installer("uninstall", *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    def hook(self, *args: str, config: Optional[str] = None,
             **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.bin("sriov-hook"), "--config", config or self.config, *args],
                              capture_output=True, text=True, timeout=120, **kw)

    def files(self) -> List[str]:
        """Every non-directory under the root, relative to it."""
        out = []
        for dirpath, _, names in os.walk(self.root):
            out += [os.path.relpath(os.path.join(dirpath, n), self.root) for n in names]
        return sorted(out)

    def dirs(self) -> List[str]:
        return sorted(os.path.relpath(d, self.root) for d, _, _ in os.walk(self.root)
                      if d != self.root)


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: Any) -> str:
    # Each test module importing this fixture gets its own copy of it: the
    # wheelhouse itself is built once per session, in the session's base temp.
    dest = os.path.join(str(tmp_path_factory.getbasetemp()), "wheelhouse")
    if not os.path.exists(os.path.join(dest, ".complete")):
        build_wheelhouse(dest)
        open(os.path.join(dest, ".complete"), "w").close()
    return dest


@pytest.fixture(scope="module")
def installed(wheelhouse: str, tmp_path_factory: Any) -> Iterator[Installed]:
    """One install shared by a module's tests (its config is theirs to rewrite)."""
    inst = Installed(str(tmp_path_factory.mktemp("root")), wheelhouse)
    inst.install()
    yield inst
    inst.installer("uninstall", "--purge")
