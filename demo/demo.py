#!/usr/bin/env python3
"""make demo: two busybox containers under runc, each handed a VF by sriov-hook,
ping each other through the simulated NIC's embedded switch.

``--agent`` (make demo-agent): the same through the node agent, whose metrics
are then read with curl.

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


def start_agent(host: simhost.SimHost, uid: str) -> "tuple[subprocess.Popen, str]":
    """Point the config at a private agent socket and metrics port; start the agent."""
    import socket as socketmod
    with socketmod.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics = f"127.0.0.1:{s.getsockname()[1]}"
    simhost.write_config(host, extra={"agent_socket": f"/run/sriov-demo-{uid}/agent.sock",
                                      "metrics_address": metrics})
    step("Starting the node agent: sriov-hook agent (foreground; systemd runs it as a service)")
    print(f"$ {HOOK} --config {host.config} agent &", flush=True)
    proc = subprocess.Popen([HOOK, "--config", host.config, "agent"])
    import time
    for _ in range(200):
        if os.path.exists(f"/run/sriov-demo-{uid}/agent.sock"):
            break
        time.sleep(0.05)
    time.sleep(0.3)
    return proc, metrics


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (netns, veth, runc)", file=sys.stderr)
        return 1
    with_agent = "--agent" in sys.argv[1:]
    uid = uuid.uuid4().hex[:6]
    work = tempfile.mkdtemp(prefix=f"sriov-demo-{uid}-")
    runc = Runc(f"/run/sriov-demo-runc-{uid}")
    host = None
    agent: "subprocess.Popen | None" = None
    ok = False
    try:
        step("Building a simulated SR-IOV NIC: 1 PF, 4 VFs, a bridge as its embedded switch")
        host = simhost.build(os.path.join(work, "host"), nvfs=4, uid=uid)
        nic = host.nics[0]
        print(f"PF {nic.pf} ({nic.pf_bdf}), switch {nic.bridge}, VFs: "
              + ", ".join(f"{v.ifname} ({v.bdf})" for v in nic.vfs))
        if with_agent:
            agent, metrics = start_agent(host, uid)
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
        if agent is not None:
            step(f"The hooks above ran in the agent (pid={agent.pid}); its metrics, with curl")
            show(["sh", "-c", f"curl -s http://{metrics}/metrics | grep '^sriov_hook_' "
                              "| grep -v '_bucket{'"])
            show([HOOK, *cfg, "status"])
        ok = True
        return 0
    finally:
        step("Cleaning up")
        if agent is not None:
            agent.terminate()
            agent.wait()
        runc.cleanup()
        if host is not None:
            simhost.teardown(host)
        subprocess.run(["rm", "-rf", work, f"/run/sriov-demo-{uid}"])
        print("demo " + ("PASSED" if ok else "FAILED"))


if __name__ == "__main__":
    sys.exit(main())
