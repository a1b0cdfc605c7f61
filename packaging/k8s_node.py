"""Put sriov-hook on a Kubernetes node: ``make k8s-install``.

Exactly ``make install`` (packaging/install.py: the release venv, the commands,
the hooks.d files CRI-O reads, the systemd units with the agent), then what a
Kubernetes node needs on top:

- a config just written from the example gets ``device_plugin: true``, so the
  agent unit serves the kubelet device plugin API (an existing config is never
  touched: the line to add is printed instead);
- the CDI spec directory the agent writes to, and the engines read.

Runs from the source tree with the standard library only, like install.py.
Undo it with ``make uninstall``.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import install  # noqa: E402  (packaging/install.py, beside this file)

K8S_BLOCK = """
# Kubernetes node (make k8s-install): the agent serves the kubelet device plugin
# API, one resource per pool (sriov-hook.io/<pool>), and writes per-VF CDI specs.
device_plugin: true
# device_plugin_dir: /var/lib/kubelet/device-plugins
# pod_resources_socket: /var/lib/kubelet/pod-resources/kubelet.sock
# cdi_dir: /var/run/cdi
"""
CDI_DIR = "/var/run/cdi"


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    status = install.main(["install"] + args)
    if status != 0:
        return status
    root = os.path.abspath(_value(args, "--root") or "/")
    layout = install.Layout(root=root, confdir=_value(args, "--confdir") or install.Layout.confdir)
    man = install.Manifest.load(layout.manifest)
    if man is not None and man.config_created and not _has_key(layout.config, "device_plugin"):
        with open(layout.config, "a") as fh:
            fh.write(K8S_BLOCK)
        install.say(f"{layout.config}: device_plugin: true (the agent serves kubelet)")
    elif not _has_key(layout.config, "device_plugin"):
        install.say(f"kept {layout.config}: add 'device_plugin: true' for the device plugin")
    cdi_dir = layout.at(CDI_DIR)
    os.makedirs(cdi_dir, mode=0o755, exist_ok=True)
    install.say(f"CDI specs go to {cdi_dir}; see deploy/README.md for CRI-O and containerd")
    return 0


def _value(args: List[str], name: str) -> Optional[str]:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _has_key(path: str, key: str) -> bool:
    try:
        with open(path) as fh:
            return any(line.startswith(f"{key}:") for line in fh)
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
