#!/usr/bin/env python3
"""make demo: two busybox containers under runc, each handed a VF by sriov-hook,
ping each other through the simulated NIC's embedded switch.

The simulated SR-IOV host (fake PCI sysfs + veth VFs on a bridge) is the
test fixture from tests/simhost.py; the hook, runc and the netns are real.
Everything made here is removed at the end, even on failure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests import simhost  # noqa: E402
from tests.containers import Runc, hook_entry, runc_bundle  # noqa: E402

HOOK = os.path.join(os.path.dirname(sys.executable), "sriov-hook")


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def show(cmd: list) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(proc.stdout + proc.stderr)
    return proc


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (netns, veth, runc)", file=sys.stderr)
        return 1
    uid = uuid.uuid4().hex[:6]
    work = tempfile.mkdtemp(prefix=f"sriov-demo-{uid}-")
    runc = Runc(f"/run/sriov-demo-runc-{uid}")
    host = None
    ok = False
    try:
        step("Building a simulated SR-IOV NIC: 1 PF, 4 VFs, a bridge as its embedded switch")
        host = simhost.build(os.path.join(work, "host"), nvfs=4, uid=uid)
        nic = host.nics[0]
        print(f"PF {nic.pf} ({nic.pf_bdf}), switch {nic.bridge}, VFs: "
              + ", ".join(f"{v.ifname} ({v.bdf})" for v in nic.vfs))
        print(f"config: {host.config}")
        print(open(host.config).read())
        cfg = ["--config", host.config]
        hooks = {"prestart": [hook_entry(HOOK, host.config, "prestart")],
                 "poststop": [hook_entry(HOOK, host.config, "poststop")]}
        names = {}
        for n, addr in ((1, "10.77.0.1/24"), (2, "10.77.0.2/24")):
            ann = json.dumps([{"pool": "fast", "ips": [addr], "mtu": 1400}])
            bundle = runc_bundle(os.path.join(work, f"c{n}"), ["sleep", "600"],
                                 {"sriov-hook.io/networks": ann}, hooks)
            cid = f"demo{n}-{uid}"
            names[n] = cid
            step(f"runc run --detach {cid}   (annotation sriov-hook.io/networks={ann})")
            proc = runc.start_detached(cid, bundle)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            show(["runc", "--root", runc.root, "exec", cid, "ip", "-o", "addr", "show", "net1"])

        step("sriov-hook status (containers running)")
        show([HOOK, *cfg, "status"])

        step("Container 1 pings container 2 over their VFs")
        ping = show(["runc", "--root", runc.root, "exec", names[1], "ping", "-c", "3", "-W", "2",
                     "10.77.0.2"])
        if ping.returncode != 0:
            print("ping failed", file=sys.stderr)
            return 1

        step("Stopping both containers (runc runs the poststop hook)")
        for cid in names.values():
            subprocess.run(["runc", "--root", runc.root, "kill", cid, "KILL"], check=True)
        import time
        time.sleep(0.5)
        for cid in names.values():
            show(["runc", "--root", runc.root, "delete", cid])

        step("sriov-hook status (containers gone: every VF free and home)")
        show([HOOK, *cfg, "status"])
        show(["ip", "-br", "link", "show", "master", nic.bridge])

        step(f"The hook's step log ({host.log_file})")
        with open(host.log_file) as fh:
            lines = [ln for ln in fh if " INFO " in ln]
        sys.stdout.write("".join(lines[-14:]))
        ok = True
        return 0
    finally:
        step("Cleaning up")
        runc.cleanup()
        if host is not None:
            simhost.teardown(host)
        subprocess.run(["rm", "-rf", work])
        print("demo " + ("PASSED" if ok else "FAILED"))


if __name__ == "__main__":
    sys.exit(main())
