"""Apply a CDI device to an OCI spec the way a CDI-aware engine does (test-only).

podman, CRI-O and containerd resolve ``vendor/class=name`` against the spec
files in their CDI directories and merge the device's ``containerEdits`` into
the container's config.json before the runtime starts: env (a key replaces an
earlier one), device nodes (with a devices-cgroup rule), mounts and hooks
(appended to the named stage). This does the same for a runc bundle, so a test
can run exactly what Allocate handed kubelet.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Dict, List


def find(cdi_dir: str, qualified: str) -> Dict[str, Any]:
    """The containerEdits of ``vendor/class=name`` among the specs in ``cdi_dir``."""
    kind, _, name = qualified.partition("=")
    found: List[Dict[str, Any]] = []
    for path in sorted(glob.glob(os.path.join(cdi_dir, "*.json"))):
        with open(path) as fh:
            spec = json.load(fh)
        if spec.get("kind") != kind:
            continue
        found += [d["containerEdits"] for d in spec.get("devices", []) if d.get("name") == name]
    assert len(found) == 1, f"{qualified}: {len(found)} devices in {cdi_dir}"
    return found[0]


def apply(config: str, edits: Dict[str, Any]) -> None:
    """Merge one device's edits into the bundle's config.json."""
    with open(config) as fh:
        spec = json.load(fh)
    process = spec.setdefault("process", {})
    env = {e.partition("=")[0]: e for e in process.get("env", [])}
    for item in edits.get("env", []):
        env[item.partition("=")[0]] = item
    process["env"] = list(env.values())
    linux = spec.setdefault("linux", {})
    for node in edits.get("deviceNodes", []):
        st = os.stat(node.get("hostPath", node["path"]))
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        linux.setdefault("devices", []).append({"path": node["path"], "type": "c",
                                                 "major": major, "minor": minor,
                                                 "fileMode": 0o666, "uid": 0, "gid": 0})
        linux.setdefault("resources", {}).setdefault("devices", []).append(
            {"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"})
    for mount in edits.get("mounts", []):
        spec.setdefault("mounts", []).append({
            "destination": mount["containerPath"], "source": mount["hostPath"],
            "type": mount.get("type", "bind"), "options": mount.get("options", [])})
    for hook in edits.get("hooks", []):
        entry = {k: v for k, v in hook.items() if k != "hookName"}
        spec.setdefault("hooks", {}).setdefault(hook["hookName"], []).append(entry)
    with open(config, "w") as fh:
        json.dump(spec, fh, indent=1)
