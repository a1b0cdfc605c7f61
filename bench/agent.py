"""The agent's part of ``make bench``: hooks through the node agent against the Go
``host-device`` CNI plugin doing the same work, and the in-process hook against
an interpreter start, all interleaved in one loop (the machine's speed drifts; a
ratio is only fair between figures taken side by side).

The in-process hook no longer imports pyroute2 (rtnl.py speaks rtnetlink
itself), so its floors are an interpreter start and, for the record, the
``import pyroute2`` every hook paid before.

Same work: move a VF netdev into a network namespace, renamed, with one IPv4
address, up; then back to the host under its old name. The hook runs as a
runtime runs it: the installed ``sriov-hook`` script with the OCI state on
stdin. The plugin is Debian's containernetworking-plugins, static IPAM.

Each timed command starts only once the previous one's work is over: a
poststop the agent answered first still moves its VF home right after, and
that must not land inside the next measurement (it would slow the plugin).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from tests import simhost
from tests.conftest import Sim, netns_process

HOST_DEVICE = "/usr/lib/cni/host-device"
CNI_PATH = "/usr/lib/cni"
GNU_TIME = "/usr/bin/time"   # peak RSS of a child forked from a small process (see _peak_kb)


def _stats(xs: List[float]) -> Dict[str, float]:
    s = sorted(xs)

    def q(p: float) -> float:
        return s[min(len(s) - 1, int(round(p * (len(s) - 1))))]
    return {"p50": q(0.5), "p95": q(0.95), "p99": q(0.99), "max": s[-1], "n": len(s)}


def _peak_rss_kb(pid: int) -> Dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmHWM:", "VmRSS:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def _peak_kb(cmd: List[str], data: bytes, env: Optional[Dict[str, str]], tmp: str) -> int:
    """A command's own peak RSS. wait4() on a child of this (large) Python reports
    at least our own RSS: the child's maxrss starts as its forked copy of us. GNU
    time forks the command from a process of ~2 MB instead."""
    out = os.path.join(tmp, "rss")
    subprocess.run([GNU_TIME, "-f", "%M", "-o", out, *cmd], input=data, env=env,
                   capture_output=True, check=True)
    with open(out) as fh:
        return int(fh.read().split()[-1])


def _wait(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError("bench: the agent's release did not finish")
        time.sleep(0.002)


def measure(base: str, runs: int, run_cls: Any, hook_script: str, py: str, root: str,
            warmup: int = 5) -> Optional[Dict[str, Any]]:
    """The figures, or None (with the reason printed) when the plugin is missing."""
    if not os.access(HOST_DEVICE, os.X_OK):
        print(f"bench: {HOST_DEVICE} is missing (Debian containernetworking-plugins); "
              f"no agent figures", file=sys.stderr)
        return None
    sim = Sim(simhost.build(os.path.join(base, "agent"), nvfs=4), base)
    sock_dir = f"/run/sriov-bench-{sim.host.uid}"
    pf = sim.host.nics[0].pf
    # VFs 0-1 are the hook's; VF 3 is the plugin's (outside the pool).
    simhost.write_config(sim.host, pools=[{"name": "fast", "mode": "netdev",
                                           "pfs": [f"{pf}#0-1"]}],
                         extra={"agent_socket": f"{sock_dir}/agent.sock", "metrics_address": "",
                                "log_level": "info"})
    agent = subprocess.Popen([py, "-m", "sriov_hook", "--config", sim.config, "agent"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, cwd=root)
    try:
        _wait(lambda: os.path.exists(f"{sock_dir}/agent.sock"))
        time.sleep(0.5)
        # Live "containers" (a process in a netns of its own), as a runtime's
        # state names them: the agent's reclaimer leaves their VFs alone.
        with netns_process() as ctr_hook, netns_process() as ctr_go:
            return _loop(sim, agent.pid, runs, warmup, run_cls, hook_script, py,
                         ctr_hook.pid, ctr_go.pid)
    finally:
        agent.terminate()
        agent.wait()
        sim.cleanup()
        subprocess.run(["rm", "-rf", sock_dir])


def _loop(sim: Sim, agent_pid: int, runs: int, warmup: int, run_cls: Any, hook: str,
          py: str, pid_hook: int, pid_go: int) -> Dict[str, Any]:
    bundle = sim.bundle(json.dumps([{"pool": "fast", "ips": ["10.98.0.2/24"]}]))
    go_conf = json.dumps({"cniVersion": "0.4.0", "name": "bench", "type": "host-device",
                          "device": sim.vfs[3].ifname,
                          "ipam": {"type": "static",
                                   "addresses": [{"address": "10.98.0.3/24"}]}}).encode()
    go_env = {**os.environ, "CNI_CONTAINERID": "bench", "CNI_NETNS": f"/proc/{pid_go}/ns/net",
              "CNI_IFNAME": "net1", "CNI_PATH": CNI_PATH}
    local_env = {**os.environ, "SRIOV_HOOK_NO_AGENT": "1"}
    rec_dir = os.path.join(sim.host.state_dir, "reservations")
    names = ("agent prestart", "go ADD", "agent poststop", "go DEL",
             "in-process prestart", "in-process poststop", "python start", "import pyroute2",
             "agent round trip (no annotation)")
    bare = sim.bundle(None)
    got: Dict[str, List[Any]] = {n: [] for n in names}

    def state(cid: str, status: str) -> bytes:
        return json.dumps({"ociVersion": "1.0.2", "id": cid, "status": status,
                           "bundle": bundle, "pid": pid_hook}).encode()

    def released() -> bool:
        return not [n for n in os.listdir(rec_dir) if n.endswith(".json")]

    for i in range(warmup + runs):
        cid = f"a{i}"
        timed = [
            ("agent prestart", [hook, "--config", sim.config, "prestart"],
             state(cid, "creating"), None),
            ("go ADD", [HOST_DEVICE], go_conf, {**go_env, "CNI_COMMAND": "ADD"}),
            ("agent poststop", [hook, "--config", sim.config, "poststop"],
             state(cid, "stopped"), None),
            ("go DEL", [HOST_DEVICE], go_conf, {**go_env, "CNI_COMMAND": "DEL"}),
            ("in-process prestart", [hook, "--config", sim.config, "prestart"],
             state(f"l{i}", "creating"), local_env),
            ("in-process poststop", [hook, "--config", sim.config, "poststop"],
             state(f"l{i}", "stopped"), local_env),
            ("python start", [py, "-c", "pass"], b"", None),
            ("import pyroute2", [py, "-c", "import pyroute2"], b"", None),
            ("agent round trip (no annotation)", [hook, "--config", sim.config, "prestart"],
             json.dumps({"id": cid, "bundle": bare, "pid": pid_hook}).encode(), None),
        ]
        for name, cmd, data, env in timed:
            r = run_cls(cmd, data, env)
            if name == "agent poststop":
                _wait(released)   # its VF goes home after the answer: not in the next figure
            if i >= warmup:
                got[name].append(r)
    out: Dict[str, Any] = {n: _stats([r.wall for r in got[n]]) for n in names}
    out["agent_rss_kb"] = _peak_rss_kb(agent_pid)
    if os.access(GNU_TIME, os.X_OK):
        peaks: Dict[str, List[int]] = {"client": [], "go": []}
        for i in range(3):
            peaks["client"].append(_peak_kb([hook, "--config", sim.config, "prestart"],
                                            state(f"m{i}", "creating"), None, sim.tmp))
            peaks["go"].append(_peak_kb([HOST_DEVICE], go_conf,
                                        {**go_env, "CNI_COMMAND": "ADD"}, sim.tmp))
            peaks["client"].append(_peak_kb([hook, "--config", sim.config, "poststop"],
                                            state(f"m{i}", "stopped"), None, sim.tmp))
            _wait(released)
            peaks["go"].append(_peak_kb([HOST_DEVICE], go_conf,
                                        {**go_env, "CNI_COMMAND": "DEL"}, sim.tmp))
        out["client_max_rss_kb"] = max(peaks["client"])
        out["go_max_rss_kb"] = max(peaks["go"])
    out["ratios"] = {
        "prestart / go ADD": out["agent prestart"]["p50"] / out["go ADD"]["p50"],
        "poststop / go DEL": out["agent poststop"]["p50"] / out["go DEL"]["p50"],
        "in-process prestart / python start":
            out["in-process prestart"]["p50"] / out["python start"]["p50"],
        "in-process poststop / python start":
            out["in-process poststop"]["p50"] / out["python start"]["p50"],
        "in-process prestart / go ADD":
            out["in-process prestart"]["p50"] / out["go ADD"]["p50"],
    }
    return out


def targets(fig: Dict[str, Any]) -> List[Dict[str, Any]]:
    r = fig["ratios"]
    rows = [("agent prestart p50 / Go host-device ADD p50", r["prestart / go ADD"], 1.0, "x"),
            ("agent poststop p50 / Go host-device DEL p50", r["poststop / go DEL"], 1.0, "x"),
            ]
    if "client_max_rss_kb" in fig:
        rows.append(("thin client peak RSS (MB)", fig["client_max_rss_kb"] / 1024, 15, "MB"))
    return [{"target": name, "value": round(v, 3), "limit": lim, "unit": unit, "met": v <= lim}
            for name, v, lim, unit in rows]


def render(fig: Dict[str, Any]) -> List[str]:
    ms = 1000.0
    lines = ["", "through the agent vs the Go host-device plugin (interleaved, same work):",
             f"{'measurement':<44}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"]
    for name in ("agent prestart", "go ADD", "agent poststop", "go DEL",
                 "agent round trip (no annotation)", "in-process prestart",
                 "in-process poststop", "python start", "import pyroute2"):
        s = fig[name]
        lines.append(f"{name:<44}{s['p50'] * ms:>9.1f}{s['p99'] * ms:>9.1f}{s['max'] * ms:>9.1f}")
    rss = fig["agent_rss_kb"]
    lines.append(f"agent RSS {rss.get('VmRSS', 0) / 1024:.1f} MB (peak "
                 f"{rss.get('VmHWM', 0) / 1024:.1f} MB)" + (
                     f"; thin client peak {fig['client_max_rss_kb'] / 1024:.1f} MB; Go plugin "
                     f"peak {fig['go_max_rss_kb'] / 1024:.1f} MB" if "client_max_rss_kb" in fig
                     else ""))
    lines += [f"  {k}: {v:.2f}" for k, v in fig["ratios"].items()]
    return lines
