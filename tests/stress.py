"""Concurrency, crash and hostile-input stress on the simulated host.

``make stress`` runs this with the full sizes and writes docs/stress.md;
``tests/test_reliability.py`` runs the same phases smaller.

Phases:
  burst    N "containers" (``unshare --net`` processes) run prestart at once
           against a pool of N/2 VFs, then all run poststop at once
  random   start/stop/kill+gc in random concurrent batches, for C cycles
  faults   every named crash point of prestart and poststop, in every mode,
           SIGKILLed, then recovered by poststop or gc
  hostile  the corpus of malformed/hostile inputs
  podman   N podman containers (runc and crun) that fail in random ways:
           a missing entrypoint, the hook killed at a random point, a
           normal run; podman and crun run no poststop after a failed
           create, so nothing but the next prestart can take a leaked VF
           back. Then every VF of the pool must go to a new container.
Invariants (tests/invariants.py) are checked after every batch.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sriov_hook import faults  # noqa: E402
from tests import corpus, invariants, simhost  # noqa: E402
from tests.conftest import Sim, start_netns_process  # noqa: E402
from tests.kernelsim import KernelSim  # noqa: E402


@dataclass
class Figures:
    cycles: int = 0
    max_concurrency: int = 0
    fault_points: int = 0
    fault_points_recovered: int = 0
    fault_details: List[str] = field(default_factory=list)
    hostile_inputs: int = 0
    hostile_rejected: int = 0
    vfs_leaked: int = 0
    podman_runs: int = 0
    podman_failed_creates: int = 0
    podman_vfs_leaked: int = 0
    double_reservations: int = 0
    invariant_checks: int = 0
    problems: List[str] = field(default_factory=list)
    seconds: float = 0.0


def _hook_cmd(sim: Sim, stage: str) -> List[str]:
    return [sys.executable, "-m", "sriov_hook", "--config", sim.config, stage]


def run_many(sim: Sim, jobs: List[Tuple[str, Dict[str, Any]]],
             env: Optional[Dict[str, str]] = None) -> List[Tuple[int, str]]:
    """Start every hook first, then feed them: they really run at once."""
    procs = []
    for stage, state in jobs:
        p = subprocess.Popen(_hook_cmd(sim, stage), stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                             env=env)
        procs.append((p, json.dumps(state).encode()))
    for p, data in procs:
        try:
            p.stdin.write(data)  # type: ignore[union-attr]
            p.stdin.close()  # type: ignore[union-attr]
        except BrokenPipeError:
            pass
    return [(p.wait(timeout=120), p.stderr.read().decode()) for p, _ in procs]  # type: ignore


class Fleet:
    """'Containers': processes in a fresh netns each, the pid in their state."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.procs: Dict[str, subprocess.Popen] = {}
        self.bundles: Dict[str, str] = {}

    def start(self, cid: str, annotation: str = "fast") -> Dict[str, Any]:
        p = start_netns_process(3600)
        self.procs[cid] = p
        self.bundles[cid] = self.sim.bundle(annotation)
        return {"ociVersion": "1.0.2", "id": cid, "status": "creating", "pid": p.pid,
                "bundle": self.bundles[cid]}

    def stop_state(self, cid: str) -> Dict[str, Any]:
        return {"ociVersion": "1.0.2", "id": cid, "status": "stopped",
                "bundle": self.bundles.get(cid, "/nonexistent")}

    def kill(self, cid: str) -> None:
        p = self.procs.pop(cid, None)
        if p is not None:
            p.kill()
            p.wait()

    def netns(self) -> Dict[str, str]:
        return {cid: str(p.pid) for cid, p in self.procs.items()}

    def cleanup(self) -> None:
        for cid in list(self.procs):
            self.kill(cid)


def _check(sim: Sim, fig: Figures, fleet: Optional[Fleet], where: str,
           live: Optional[List[str]] = None) -> None:
    problems = invariants.check(sim, live_owners=live,
                                owner_netns=fleet.netns() if fleet else None)
    fig.invariant_checks += 1
    fig.double_reservations += invariants.double_reservations(problems)
    fig.problems += [f"{where}: {p}" for p in problems]


def phase_burst(sim: Sim, n: int, fig: Figures) -> None:
    fleet = Fleet(sim)
    try:
        states = [fleet.start(f"b{i}") for i in range(n)]
        res = run_many(sim, [("prestart", s) for s in states])
        fig.max_concurrency = max(fig.max_concurrency, n)
        won = [s["id"] for s, (rc, _) in zip(states, res) if rc == 0]
        lost = [err for rc, err in res if rc != 0]
        if len(won) != len(sim.vfs):
            fig.problems.append(f"burst: {len(won)} winners for {len(sim.vfs)} VFs")
        bad = [e for e in lost if "exhausted" not in e and "stayed locked" not in e]
        fig.problems += [f"burst: loser said {e.strip()!r}" for e in bad[:3]]
        _check(sim, fig, fleet, "burst/prestart", live=list(fleet.procs))
        for cid in list(fleet.procs):
            fleet.kill(cid)
        res = run_many(sim, [("poststop", fleet.stop_state(s["id"])) for s in states])
        fig.problems += [f"burst poststop rc={rc}: {e.strip()}" for rc, e in res if rc != 0][:3]
        _check(sim, fig, None, "burst/poststop", live=[])
        fig.cycles += 2 * n
    finally:
        fleet.cleanup()


def phase_random(sim: Sim, cycles: int, fig: Figures, seed: int = 7) -> None:
    rng = random.Random(seed)
    fleet = Fleet(sim)
    live: List[str] = []
    gone_without_poststop: List[str] = []
    n = 0
    try:
        done = 0
        while done < cycles:
            batch: List[Tuple[str, Dict[str, Any]]] = []
            stoppable = list(live)   # a container never starts and stops in one batch
            for _ in range(rng.randint(1, 8)):
                r = rng.random()
                if r < 0.5 or not stoppable:
                    n += 1
                    cid = f"r{n}"
                    batch.append(("prestart", fleet.start(cid)))
                    live.append(cid)
                    continue
                cid = stoppable.pop(rng.randrange(len(stoppable)))
                live.remove(cid)
                fleet.kill(cid)
                if r < 0.9:
                    batch.append(("poststop", fleet.stop_state(cid)))
                else:   # the runtime died: no poststop, gc must reclaim
                    gone_without_poststop.append(cid)
            if gone_without_poststop and rng.random() < 0.3:
                batch.append(("gc", {}))
                gone_without_poststop.clear()
            fig.max_concurrency = max(fig.max_concurrency, len(batch))
            results = run_many(sim, [(st, s) for st, s in batch if st != "gc"])
            if any(st == "gc" for st, _ in batch):
                subprocess.run(_hook_cmd(sim, "gc"), capture_output=True, cwd=ROOT)
            for (stage, state), (rc, err) in zip([b for b in batch if b[0] != "gc"], results):
                if stage == "prestart" and rc != 0:
                    if "exhausted" not in err and "stayed locked" not in err:
                        fig.problems.append(f"random prestart {state['id']}: {err.strip()}")
                    fleet.kill(state["id"])
                    live.remove(state["id"])
                    # runc runs poststop after a failed create: so do we.
                    run_many(sim, [("poststop", fleet.stop_state(state["id"]))])
                elif rc != 0:
                    fig.problems.append(f"random {stage} {state.get('id')}: {err.strip()}")
            done += len(batch)
            _check(sim, fig, fleet, f"random@{done}",
                   live=live if not gone_without_poststop else None)
        fig.cycles += done
        for cid in live:
            fleet.kill(cid)
        run_many(sim, [("poststop", fleet.stop_state(c)) for c in live])
        subprocess.run(_hook_cmd(sim, "gc"), capture_output=True, cwd=ROOT)
        _check(sim, fig, None, "random/end", live=[])
    finally:
        fleet.cleanup()


FAULT_POOLS = [
    {"name": "fast", "mode": "netdev", "pfs": None, "range": "0-1"},
    {"name": "kata", "mode": "kata", "pfs": None, "range": "2-3"},
    {"name": "vm", "mode": "vfio", "pfs": None, "range": "4-5"},
    {"name": "dp", "mode": "dpdk", "pfs": None, "range": "6-7", "hugepages": "8M"},
]


def fault_pools(sim: Sim) -> List[Dict[str, Any]]:
    pf = sim.host.nics[0].pf
    out = []
    for p in FAULT_POOLS:
        q = {k: v for k, v in p.items() if k not in ("pfs", "range")}
        q["pfs"] = [f"{pf}#{p['range']}"]
        out.append(q)
    return out


def phase_faults(sim: Sim, fig: Figures) -> None:
    """Kill the hook at each named point, in each mode; recover; check."""
    env = dict(os.environ)
    n = 0
    for pool in FAULT_POOLS:
        for stage, points in (("prestart", faults.PRESTART + faults.RECORD),
                              ("poststop", faults.POSTSTOP)):
            for point in points:
                n += 1
                cid = f"f{n}"
                ns = sim.netns() if pool["mode"] in ("netdev", "kata") else None
                bundle = sim.bundle(pool["name"], ns)
                state = {"ociVersion": "1.0.2", "id": cid, "status": "creating", "bundle": bundle}
                stop = {**state, "status": "stopped"}
                env[faults.ENV] = point if stage == "prestart" else ""
                rc, err = run_many(sim, [("prestart", state)], env=env)[0]
                if stage == "poststop":
                    if rc != 0:
                        fig.problems.append(f"fault {pool['mode']}/{point}: prestart {err}")
                        continue
                    env[faults.ENV] = point
                    rc, err = run_many(sim, [("poststop", stop)], env=env)[0]
                if rc != -9:
                    # This mode never reaches that point: just clean up.
                    env[faults.ENV] = ""
                    run_many(sim, [("poststop", stop)], env=env)
                    continue
                fig.fault_points += 1
                env[faults.ENV] = ""
                # Recover: alternately the next poststop, or gc (owner gone).
                if n % 2:
                    rc2, err2 = run_many(sim, [("poststop", stop)], env=env)[0]
                else:
                    if ns:  # the container is gone: its named netns with it
                        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
                    p = subprocess.run(_hook_cmd(sim, "gc"), capture_output=True, text=True,
                                       cwd=ROOT, env=env)
                    rc2, err2 = p.returncode, p.stderr
                before = len(fig.problems)
                if rc2 != 0:
                    fig.problems.append(f"fault {pool['mode']}/{stage}/{point}: recovery rc={rc2} "
                                        f"{err2.strip()}")
                _check(sim, fig, None, f"fault {pool['mode']}/{stage}/{point}", live=[])
                if len(fig.problems) == before:
                    fig.fault_points_recovered += 1
                    fig.fault_details.append(f"{pool['mode']}/{stage}/{point}")
    env.pop(faults.ENV, None)


def phase_hostile(sim: Sim, fig: Figures) -> None:
    with corpus.Environment(sim) as env:
        for case in corpus.cases():
            _hostile_case(sim, fig, env, case)


def _hostile_case(sim: Sim, fig: Figures, env: corpus.Environment, case: corpus.Case) -> None:
    fig.hostile_inputs += 1
    ns = sim.netns()
    bundle = sim.bundle(case.annotation if case.annotation is not None else "fast", ns)
    if case.spec is not None:
        with open(os.path.join(bundle, "config.json"), "wb") as fh:
            fh.write(case.spec if isinstance(case.spec, bytes) else json.dumps(case.spec).encode())
    if case.setup:
        case.setup(bundle)
    with env.running(case, bundle) as extra:
        if isinstance(case.state, bytes):
            data: Any = case.state
        else:
            data = {"ociVersion": "1.0.2", "id": f"h{fig.hostile_inputs}", "status": "creating",
                    "bundle": bundle, **extra, **(case.state or {})}
            data = {k: v for k, v in data.items() if v is not None}
        r = sim.hook("prestart", state=data, timeout=30)
    lines = r.stderr.strip().splitlines()
    ok = (r.rc != 0 and len(lines) == 1 and lines[0].startswith("sriov-hook: ")
          and (case.needle is None or case.needle in lines[0])
          and "Traceback" not in r.stderr and sim.records() == [])
    problems = invariants.check(sim, live_owners=[]) + env.problems()
    if ok and not problems:
        fig.hostile_rejected += 1
    else:
        fig.problems.append(f"hostile {case.name!r}: rc={r.rc} stderr={r.stderr[:200]!r} "
                            f"{problems[:2]}")


PODMAN = ["podman", "run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024",
          "--ulimit", "nproc=1024:1024"]


def phase_podman(sim: Sim, n: int, fig: Figures, seed: int = 11) -> None:
    """Failed creates under podman on runc and crun; no gc is ever run."""
    from tests.containers import CRUN_WRAP, rootfs_tar, shared_mount
    from tests.test_podman import render_hooks
    rnd = random.Random(seed)
    shared_mount(os.path.join(sim.host.state_dir, "netns"))   # crun's pins reach the host
    tag = f"localhost/sriov-stress:{uuid.uuid4().hex[:8]}"
    tar = rootfs_tar(os.path.join(sim.host.dir, "rootfs.tar"))
    subprocess.run(["podman", "import", tar, tag], check=True, capture_output=True)
    hooks: Dict[str, str] = {}

    def hooks_for(point: str) -> str:
        if point not in hooks:
            d = render_hooks(os.path.join(sim.host.dir, f"hooks-{len(hooks)}"), sim.config)
            for name in os.listdir(d):
                with open(os.path.join(d, name)) as fh:
                    spec = json.load(fh)
                if point and "poststop" not in spec["stages"]:
                    spec["hook"]["env"].append(f"{faults.ENV}={point}")
                with open(os.path.join(d, name), "w") as fh:
                    json.dump(spec, fh)
            hooks[point] = d
        return hooks[point]

    def run(runtime: str, point: str, args: List[str], keep: bool = False) -> "Tuple[int, str]":
        name = f"st{uuid.uuid4().hex[:8]}"
        cmd = (CRUN_WRAP if runtime == "crun" else []) + PODMAN + [
            "--runtime", runtime, "--name", name, "--hooks-dir", hooks_for(point),
            "--annotation", "sriov-hook.io/networks=fast"] + (["-d"] if keep else []) \
            + [tag] + args
        try:
            return subprocess.run(cmd, capture_output=True, timeout=120).returncode, name
        finally:
            if not keep:
                remove(runtime, name)

    def remove(runtime: str, name: str) -> None:
        subprocess.run((CRUN_WRAP if runtime == "crun" else []) +
                       ["podman", "rm", "-f", "-t", "0", name], capture_output=True)
    points = [p for p in faults.PRESTART if ":" in p or p == "record_written"]
    try:
        for _ in range(n):
            runtime = rnd.choice(["runc", "crun"])
            kind = rnd.choice(["entrypoint", "killed", "ok"])
            point = rnd.choice(points) if kind == "killed" else ""
            args = ["/no/such/entrypoint"] if kind == "entrypoint" else ["true"]
            rc, _ = run(runtime, point, args)
            fig.podman_runs += 1
            if rc != 0:
                fig.podman_failed_creates += 1
        # Every VF must go to a new container, all held at once, with no gc in
        # between: what a failed create left is reclaimed by the prestart that
        # needs it.
        holders = [run("runc", "", ["sleep", "120"], keep=True) for _ in sim.vfs]
        fig.podman_vfs_leaked = sum(1 for rc, _ in holders if rc != 0)
        for _, name in holders:
            remove("runc", name)
        _check(sim, fig, None, "podman failed creates", live=[])
    finally:
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)


def leaked(sim: Sim) -> int:
    recs = invariants.records(sim)
    return len(recs) + sum(1 for vf in sim.vfs if invariants.link_info(vf.ifname) is None)


def run(base: str, n: int = 64, cycles: int = 300, do_faults: bool = True,
        do_hostile: bool = True, podman_runs: int = 40) -> Figures:
    fig = Figures()
    t0 = time.monotonic()
    sim = Sim(simhost.build(os.path.join(base, "burst"), nvfs=n // 2), base)
    try:
        simhost.write_config(sim.host, extra={"lock_timeout": 30})
        phase_burst(sim, n, fig)
        phase_random(sim, cycles, fig)
        if do_hostile:
            phase_hostile(sim, fig)
        fig.vfs_leaked += leaked(sim)
    finally:
        sim.cleanup()
    if do_faults:
        fsim = Sim(simhost.build(os.path.join(base, "faults"), nvfs=8), base)
        ks = KernelSim(simhost.fake_sysfs(fsim.host), fsim.host.dev_dir)
        try:
            simhost.write_config(fsim.host, pools=fault_pools(fsim))
            phase_faults(fsim, fig)
            fig.vfs_leaked += leaked(fsim)
        finally:
            ks.stop()
            fsim.cleanup()
    if podman_runs:
        psim = Sim(simhost.build(os.path.join(base, "podman"), nvfs=4), base)
        try:
            phase_podman(psim, podman_runs, fig)
            fig.vfs_leaked += leaked(psim)
        finally:
            psim.cleanup()
    fig.seconds = time.monotonic() - t0
    return fig


def report(fig: Figures) -> str:
    rows = [("cycles run (hook invocations in burst + random phases)", fig.cycles),
            ("largest concurrency held (hooks at once)", fig.max_concurrency),
            ("fault-injection points hit", fig.fault_points),
            ("... each recovered to a clean state", fig.fault_points_recovered),
            ("hostile inputs", fig.hostile_inputs),
            ("... each rejected, one line, no state change", fig.hostile_rejected),
            ("invariant checks", fig.invariant_checks),
            ("podman runs (runc and crun) that failed in random ways", fig.podman_runs),
            ("... of which the create failed (no poststop ran)", fig.podman_failed_creates),
            ("... VFs leaked after them (no gc run)", fig.podman_vfs_leaked),
            ("VFs leaked", fig.vfs_leaked),
            ("double reservations", fig.double_reservations),
            ("problems", len(fig.problems)),
            ("wall time (s)", f"{fig.seconds:.0f}")]
    out = ["| figure | value |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--containers", type=int, default=64)
    ap.add_argument("--cycles", type=int, default=300)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "stress.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix=f"sriov-stress-{uuid.uuid4().hex[:6]}-") as base:
        fig = run(base, args.containers, args.cycles)
    table = report(fig)
    print(table)
    for p in fig.problems[:20]:
        print("PROBLEM:", p)
    ok = not fig.problems and fig.vfs_leaked == 0 and fig.double_reservations == 0 \
        and fig.podman_vfs_leaked == 0 \
        and fig.fault_points == fig.fault_points_recovered \
        and fig.hostile_inputs == fig.hostile_rejected
    with open(args.out, "w") as fh:
        fh.write("# Stress figures\n\nProduced by `make stress` (`python -m tests.stress`) on the "
                 f"simulated SR-IOV host: {args.containers} containers against "
                 f"{args.containers // 2} VFs, then {args.cycles} random start/stop/kill cycles, "
                 "every crash point in every mode, the hostile corpus, and podman (on runc "
                 "and crun) containers failing in random ways with no gc. Machine: "
                 f"{os.cpu_count()} cores.\n\n{table}\n\nCrash points recovered:\n\n"
                 + "\n".join(f"- `{d}`" for d in fig.fault_details) + "\n\n"
                 + ("Result: **pass**\n" if ok else "Result: **FAIL**\n"))
    print("stress " + ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
