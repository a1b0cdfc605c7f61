"""make bench: what the hook costs on the critical path, against its floors.

Every figure is a whole-process invocation on the simulated SR-IOV host
(fake PCI sysfs, veth VFs, real netns), timed side by side with its floors
in the same run, since absolute times on these machines drift:

  floors      python -c pass; python -c "import pyroute2"; the same netlink
              work done by iproute2 alone (bench/iproute2_floor.sh)
  latency     prestart/poststop in netdev (address + MTU + route), vfio, dpdk
  scale       prestart with 8 VFs vs 1,024 VFs (4 PFs x 256) in the pool
  concurrency 64 prestarts at once against 64 VFs: total wall
  memory      peak RSS of one invocation
  agent       hooks through the node agent vs the Go host-device CNI plugin, and
              the in-process hook vs an interpreter start, interleaved (bench/agent.py)

Writes bench/results.json and, with the 'bench' extra (matplotlib), a PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import agent as agent_bench  # noqa: E402
from tests import simhost  # noqa: E402
from tests.conftest import Sim  # noqa: E402
from tests.kernelsim import KernelSim  # noqa: E402

PY = sys.executable
HOOK = [PY, "-m", "sriov_hook"]
HOOK_SCRIPT = os.path.join(os.path.dirname(PY), "sriov-hook")   # what runtimes run
FLOOR_SH = os.path.join(ROOT, "bench", "iproute2_floor.sh")


class Run:
    """One child process: wall time, CPU time and peak RSS from wait4()."""

    def __init__(self, cmd: List[str], stdin: bytes = b"", env: Optional[Dict[str, str]] = None):
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, cwd=ROOT, env=env)
        assert p.stdin is not None and p.stderr is not None
        p.stdin.write(stdin)
        p.stdin.close()
        err = p.stderr.read()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        self.wall = time.perf_counter() - t0
        self.cpu = ru.ru_utime + ru.ru_stime
        self.rss_kb = ru.ru_maxrss
        self.rc = p.returncode
        self.err = err.decode(errors="replace")
        if self.rc != 0:
            raise RuntimeError(f"{' '.join(cmd[-2:])} failed: {self.err.strip()}")


def stats(xs: List[float]) -> Dict[str, float]:
    s = sorted(xs)

    def q(p: float) -> float:
        return s[min(len(s) - 1, int(round(p * (len(s) - 1))))]
    return {"p50": q(0.5), "p95": q(0.95), "max": s[-1], "n": len(s)}


def hook_cycle(sim: Sim, ann: str, ns: Optional[str], runs: int, warmup: int = 3,
               pid: Optional[int] = None) -> Tuple[List[Run], List[Run]]:
    bundle = sim.bundle(ann, ns)
    pre, post = [], []
    for i in range(warmup + runs):
        state = {"ociVersion": "1.0.2", "id": f"bench{i}", "status": "creating", "bundle": bundle}
        if pid:
            state["pid"] = pid
        a = Run(HOOK + ["--config", sim.config, "prestart"], json.dumps(state).encode())
        b = Run(HOOK + ["--config", sim.config, "poststop"],
                json.dumps({**state, "status": "stopped"}).encode())
        if i >= warmup:
            pre.append(a)
            post.append(b)
    return pre, post


def floors(sim: Sim, runs: int) -> Dict[str, List[Run]]:
    out: Dict[str, List[Run]] = {"python -c pass": [], "import pyroute2": [], "iproute2 script": []}
    ns = sim.netns()
    vf = sim.vfs[-1].ifname
    for i in range(runs + 3):
        r1 = Run([PY, "-c", "pass"])
        r2 = Run([PY, "-c", "import pyroute2"])
        r3 = Run(["bash", FLOOR_SH, vf, ns])
        if i >= 3:
            out["python -c pass"].append(r1)
            out["import pyroute2"].append(r2)
            out["iproute2 script"].append(r3)
    return out


def concurrency(base: str, n: int) -> Dict[str, float]:
    sim = Sim(simhost.build(os.path.join(base, "conc"), nvfs=n), base)
    try:
        nss = [sim.netns() for _ in range(n)]
        # Single-invocation CPU time, measured sequentially first.
        pre, _ = hook_cycle(sim, "fast", nss[0], runs=8)
        cpu = stats([r.cpu for r in pre])["p50"]
        procs = []
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        for i, ns in enumerate(nss):
            state = {"id": f"c{i}", "bundle": sim.bundle("fast", ns)}
            p = subprocess.Popen(HOOK + ["--config", sim.config, "prestart"],
                                 stdin=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
            procs.append((p, json.dumps(state).encode()))
        for p, data in procs:
            p.stdin.write(data)  # type: ignore[union-attr]
            p.stdin.close()  # type: ignore[union-attr]
        rcs = [p.wait() for p, _ in procs]
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_sum = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        assert all(rc == 0 for rc in rcs), [p.stderr.read() for p, _ in procs][:2]  # type: ignore
        for i in range(n):
            Run(HOOK + ["--config", sim.config, "poststop"],
                json.dumps({"id": f"c{i}", "bundle": "/x"}).encode())
        cores = os.cpu_count() or 1
        return {"n": n, "wall": wall, "cpu_one": cpu, "cores": cores,
                "ideal": n * cpu / cores, "ratio": wall / (n * cpu / cores),
                "cpu_sum": cpu_sum, "cpu_per_hook_concurrent": cpu_sum / n,
                "utilisation": cpu_sum / (wall * cores)}
    finally:
        sim.cleanup()


def floor_concurrency(n: int) -> Dict[str, float]:
    """The same measure for the floor itself: n x `import pyroute2` at once."""
    seq = [Run([PY, "-c", "import pyroute2"]).cpu for _ in range(8)]
    cpu = stats(seq)["p50"]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    procs = [subprocess.Popen([PY, "-c", "import pyroute2"]) for _ in range(n)]
    for p in procs:
        p.wait()
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_sum = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    cores = os.cpu_count() or 1
    return {"n": n, "wall": wall, "cpu_one": cpu, "ratio": wall / (n * cpu / cores),
            "cpu_per_proc_concurrent": cpu_sum / n}


def scale(base: str, runs: int) -> Dict[str, Dict[str, float]]:
    out = {}
    ann = json.dumps([{"pool": "fast", "ips": ["10.99.0.2/24"], "mtu": 1400}])
    for label, npfs, nvfs in (("8 VFs", 1, 8), ("1024 VFs", 4, 256)):
        host = simhost.build(os.path.join(base, f"scale{npfs}"), nvfs=nvfs, npfs=npfs,
                             netdev_vfs=4)
        sim = Sim(host, base)
        try:
            pre, _ = hook_cycle(sim, ann, sim.netns(), runs)
            out[label] = stats([r.wall for r in pre])
        finally:
            sim.cleanup()
    return out


def modes(base: str, runs: int) -> Dict[str, Dict[str, Dict[str, float]]]:
    sim = Sim(simhost.build(os.path.join(base, "modes"), nvfs=4), base)
    ks = KernelSim(simhost.fake_sysfs(sim.host), sim.host.dev_dir)
    pf = sim.host.nics[0].pf
    simhost.write_config(sim.host, pools=[
        {"name": "vm", "mode": "vfio", "pfs": [f"{pf}#0-1"]},
        {"name": "dp", "mode": "dpdk", "pfs": [f"{pf}#2-3"], "hugepages": "8M"}])
    out = {}
    try:
        for mode, pool in (("vfio", "vm"), ("dpdk", "dp")):
            pre, post = hook_cycle(sim, pool, None, runs)
            out[mode] = {"prestart": stats([r.wall for r in pre]),
                         "poststop": stats([r.wall for r in post])}
    finally:
        ks.stop()
        sim.cleanup()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--agent-runs", type=int, default=100)
    ap.add_argument("--agent-only", action="store_true", help="only the agent's figures")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results.json"))
    args = ap.parse_args()
    if args.agent_only:
        with tempfile.TemporaryDirectory(prefix=f"sriov-bench-{uuid.uuid4().hex[:6]}-") as base:
            fig = agent_bench.measure(base, args.agent_runs, Run, HOOK_SCRIPT, PY, ROOT)
        if fig is None:
            return 1
        print("\n".join(agent_bench.render(fig)))
        for t in agent_bench.targets(fig):
            print(f"  [{'MET ' if t['met'] else 'MISS'}] {t['target']}: {t['value']} "
                  f"(limit {t['limit']} {t['unit']})")
        return 0
    res: Dict[str, Any] = {"machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                                       "kernel": platform.release()},
                           "runs": args.runs, "when": time.strftime("%Y-%m-%d %H:%M")}
    with tempfile.TemporaryDirectory(prefix=f"sriov-bench-{uuid.uuid4().hex[:6]}-") as base:
        sim = Sim(simhost.build(os.path.join(base, "main"), nvfs=4), base)
        try:
            fl = floors(sim, args.runs)
            ann = json.dumps([{"pool": "fast", "ips": ["10.98.0.2/24"], "mtu": 1400,
                               "routes": [{"dst": "10.97.0.0/16", "via": "10.98.0.1"}]}])
            pre, post = hook_cycle(sim, ann, sim.netns(), args.runs)
        finally:
            sim.cleanup()
        res["floors"] = {k: stats([r.wall for r in v]) for k, v in fl.items()}
        res["netdev"] = {"prestart": stats([r.wall for r in pre]),
                         "poststop": stats([r.wall for r in post])}
        res["memory_kb"] = {"prestart_max_rss": max(r.rss_kb for r in pre),
                            "poststop_max_rss": max(r.rss_kb for r in post),
                            "import_pyroute2_max_rss": max(r.rss_kb for r in fl["import pyroute2"])}
        res["modes"] = modes(base, max(10, args.runs // 3))
        res["scale"] = scale(base, max(10, args.runs // 2))
        res["concurrency"] = concurrency(base, args.concurrency)
        res["agent"] = agent_bench.measure(base, args.agent_runs, Run, HOOK_SCRIPT, PY, ROOT)
        res["floor_concurrency"] = floor_concurrency(args.concurrency)
    res["lab_dpdk"] = lab_figures()
    res["targets"] = targets(res)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=2)
    print(render(res))
    plot(res, os.path.join(os.path.dirname(args.out), "results.png"))
    return 0


def lab_figures() -> Optional[Dict[str, Any]]:
    """bind+unbind vs dpdk-devbind.py, measured inside the SR-IOV lab if it ran."""
    path = os.path.join(ROOT, "lab", "cache", "results", "bench-dpdk.json")
    if os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    return None


def lab_breakdown(lab: Dict[str, Any]) -> List[str]:
    """Where a lab bind and unbind spend their time (test_8 in tests/lab)."""
    if "kernel_bind_s" not in lab:
        return []
    site = lab["python_site_s"]
    lines = ["", "lab (TCG guest, 9p root): sriov-dpdk vs dpdk-devbind.py, median of 3",
             f"{'phase':<10}{'sriov-dpdk s':>14}{'devbind s':>11}{'kernel s':>10}"
             f"{'python start s':>16}{'ours beyond':>13}"]
    for phase in ("bind", "unbind"):
        ours, dev, kern = lab[f"ours_{phase}_s"], lab[f"devbind_{phase}_s"], lab[f"kernel_{phase}_s"]
        lines.append(f"{phase:<10}{ours:>14.3f}{dev:>11.3f}{kern:>10.3f}{site:>16.3f}"
                     f"{ours - kern - site:>13.3f}")
    lines.append(f"python start: {lab['python_bare_s']:.3f} s bare (-I -S), {site:.3f} s with "
                 f"site; 'ours beyond' is sriov-dpdk's imports and work under TCG")
    return lines


def targets(res: Dict[str, Any]) -> List[Dict[str, Any]]:
    floor = res["floors"]["import pyroute2"]["p50"]
    t = []

    def add(name: str, value: float, limit: float, unit: str = "x") -> None:
        t.append({"target": name, "value": round(value, 3), "limit": limit, "unit": unit,
                  "met": value <= limit})
    add("netdev prestart p50 / import-pyroute2 p50", res["netdev"]["prestart"]["p50"] / floor, 1.3)
    add("netdev poststop p50 / import-pyroute2 p50", res["netdev"]["poststop"]["p50"] / floor, 1.3)
    sc = res["scale"]
    add("prestart p50 at 1024 VFs / at 8 VFs", sc["1024 VFs"]["p50"] / sc["8 VFs"]["p50"], 1.2)
    add("64 concurrent prestarts: wall / (64 x CPU / cores)", res["concurrency"]["ratio"], 1.3)
    add("peak RSS per invocation (MB)", res["memory_kb"]["prestart_max_rss"] / 1024, 50, "MB")
    if res.get("agent"):
        t += agent_bench.targets(res["agent"])
    lab = res.get("lab_dpdk")
    if lab:
        t.append({"target": "lab: dpdk-devbind.py time / sriov-dpdk time (bind+unbind)",
                  "value": round(lab["ratio"], 2), "limit": 5, "unit": "x (at least)",
                  "met": lab["ratio"] >= 5})
        if "bind_ratio" in lab:
            t.append({"target": "lab: the same, bind to vfio-pci alone",
                      "value": round(lab["bind_ratio"], 2), "limit": 5, "unit": "x (at least)",
                      "met": lab["bind_ratio"] >= 5})
    else:
        t.append({"target": "lab: bind+unbind >= 5x faster than dpdk-devbind.py",
                  "value": None, "limit": 5, "unit": "x", "met": None})
    return t


def render(res: Dict[str, Any]) -> str:
    ms = 1000.0
    lines = [f"sriov-hook bench: {res['machine']['cores']} cores, Python "
             f"{res['machine']['python']}, {res['runs']} runs after 3 warm-up runs", "",
             f"{'measurement':<44}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}"]

    def row(name: str, s: Dict[str, float]) -> None:
        lines.append(f"{name:<44}{s['p50'] * ms:>9.1f}{s['p95'] * ms:>9.1f}{s['max'] * ms:>9.1f}")
    for k, v in res["floors"].items():
        row(f"floor: {k}", v)
    row("netdev prestart (addr, MTU, route)", res["netdev"]["prestart"])
    row("netdev poststop", res["netdev"]["poststop"])
    for mode, v in res["modes"].items():
        row(f"{mode} prestart (simulated bind)", v["prestart"])
        row(f"{mode} poststop", v["poststop"])
    for k, v in res["scale"].items():
        row(f"prestart, pool of {k}", v)
    c = res["concurrency"]
    lines += ["", f"{c['n']} concurrent prestarts: wall {c['wall'] * ms:.0f} ms; one prestart "
              f"uses {c['cpu_one'] * ms:.1f} ms CPU; ideal on {c['cores']} cores "
              f"{c['ideal'] * ms:.0f} ms",
              f"  under concurrency each prestart used {c['cpu_per_hook_concurrent'] * ms:.1f} ms "
              f"CPU; cores busy {c['utilisation'] * 100:.0f}% of the wall time",
              f"peak RSS: prestart {res['memory_kb']['prestart_max_rss'] / 1024:.1f} MB, "
              f"import pyroute2 alone {res['memory_kb']['import_pyroute2_max_rss'] / 1024:.1f} MB",
              f"control: {res['floor_concurrency']['n']} x `import pyroute2` at once: wall / "
              f"(n x CPU / cores) = {res['floor_concurrency']['ratio']:.2f}; CPU per process "
              f"{res['floor_concurrency']['cpu_one'] * ms:.0f} ms alone, "
              f"{res['floor_concurrency']['cpu_per_proc_concurrent'] * ms:.0f} ms when crowded",
              ]
    if res.get("agent"):
        lines += agent_bench.render(res["agent"])
    if res.get("lab_dpdk"):
        lines += lab_breakdown(res["lab_dpdk"])
    lines += ["", "targets:"]
    for t in res["targets"]:
        mark = {True: "MET ", False: "MISS", None: "n/a "}[t["met"]]
        val = "-" if t["value"] is None else t["value"]
        lines.append(f"  [{mark}] {t['target']}: {val} (limit {t['limit']} {t['unit']})")
    return "\n".join(lines)


def plot(res: Dict[str, Any], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install '.[bench]')")
        return
    names, p50, p95 = [], [], []
    for k, v in res["floors"].items():
        names.append(k); p50.append(v["p50"] * 1e3); p95.append(v["p95"] * 1e3)  # noqa: E702
    for k in ("prestart", "poststop"):
        names.append(f"netdev {k}"); p50.append(res["netdev"][k]["p50"] * 1e3)  # noqa: E702
        p95.append(res["netdev"][k]["p95"] * 1e3)
    for mode, v in res["modes"].items():
        names.append(f"{mode} prestart"); p50.append(v["prestart"]["p50"] * 1e3)  # noqa: E702
        p95.append(v["prestart"]["p95"] * 1e3)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    y = range(len(names))
    ax.barh(list(y), p95, color="#c9d6ea", label="p95")
    ax.barh(list(y), p50, color="#3b6db3", label="p50")
    ax.set_yticks(list(y))
    ax.set_yticklabels(names)
    ax.invert_yaxis()
    ax.set_xlabel("ms per invocation (whole process)")
    ax.set_title("sriov-hook vs its floors")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
