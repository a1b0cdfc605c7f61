"""make lab: boot a QEMU guest with an emulated Intel 82576 (igb, real SR-IOV),
run the project's lab tests inside it against real sysfs and netlink, and
report pytest's closing line. Exit non-zero on any failure, on a guest that
never reports, or on a timeout.

The guest shares the host's / over 9p and chroots there, so it runs the
host's own Python venv, runc, iproute2 and dpdk-testpmd; its /run and /tmp
are guest-private tmpfs. Results come back through lab/cache/results/.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.join(HERE, "cache")
RESULTS = os.path.join(CACHE, "results")
sys.path.insert(0, HERE)

import initramfs  # noqa: E402


def qemu_cmd(accel: str, kernel: str, initrd: str, append: str) -> List[str]:
    cpu = "max" if accel == "tcg" else "host"
    # LAB_QEMU_TRACE=igb_* writes QEMU's trace events to lab/cache/qemu-trace.log.
    trace = os.environ.get("LAB_QEMU_TRACE")
    extra = ["-trace", f"enable={trace},file={os.path.join(CACHE, 'qemu-trace.log')}"] \
        if trace else []
    return ["qemu-system-x86_64"] + extra + [
        "-accel", "tcg,thread=multi" if accel == "tcg" else "kvm",
        "-cpu", cpu, "-m", "2048", "-smp", "2",
        "-machine", "q35,kernel-irqchip=split",
        "-device", "intel-iommu,intremap=on,caching-mode=on",
        "-nographic", "-no-reboot",
        "-netdev", "user,id=n0,restrict=on",
        "-device", "igb,netdev=n0,id=pf0",
        # A second igb below a PCIe switch whose downstream port has no ACS:
        # the PF and its VFs then share one IOMMU group, so a VF of it is
        # never viable for VFIO while the PF sits on igb.
        "-netdev", "user,id=n1,restrict=on",
        "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1",
        "-device", "x3130-upstream,id=up1,bus=rp1",
        "-device", "xio3130-downstream,id=dn1,bus=up1,chassis=2,slot=0",
        "-device", "igb,netdev=n1,bus=dn1,id=pf1",
        "-virtfs", "local,path=/,mount_tag=host,security_model=passthrough,id=hostfs",
        "-kernel", kernel, "-initrd", initrd,
        "-append", f"console=ttyS0 intel_iommu=on iommu=pt quiet panic=-1 {append}",
    ]


def boot(accel: str, kernel: str, initrd: str, append: str, timeout: float, log: str,
         until: Optional[str] = None) -> "tuple[Optional[int], str]":
    """Run the guest; return (qemu rc or None on timeout, console text)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(qemu_cmd(accel, kernel, initrd, append), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        rc: Optional[int] = None
        while time.monotonic() < deadline:
            rc = proc.poll()
            if rc is not None:
                break
            if until and until in open(log, errors="replace").read():
                break
            time.sleep(0.5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, open(log, errors="replace").read()


def pick_accel(kernel: str, initrd: str) -> str:
    """KVM if a nested guest really runs here, else TCG. Decided once, cached."""
    cached = os.path.join(CACHE, "accel")
    if os.path.exists(cached):
        return open(cached).read().strip()
    accel = "tcg"
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        _, text = boot("kvm", kernel, initrd, "sriov_lab_probe=1", 25,
                       os.path.join(CACHE, "kvm-probe.log"), until="SRIOV-LAB: booted")
        if "SRIOV-LAB: booted" in text:
            accel = "kvm"
    with open(cached, "w") as fh:
        fh.write(accel)
    return accel


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout", type=float, default=330)
    ap.add_argument("-k", default="", help="pytest -k expression for the guest")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("lab: needs root (apt-get, QEMU with 9p passthrough)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    subprocess.run(["bash", os.path.join(HERE, "setup.sh")], check=True)
    initrd = initramfs.build(CACHE)
    kdir = os.path.join(CACHE, "kernel")
    ver = initramfs.kernel_version(kdir)
    kernel = os.path.join(kdir, "boot", f"vmlinuz-{ver}")
    accel = pick_accel(kernel, initrd)
    shutil.rmtree(RESULTS, ignore_errors=True)
    os.makedirs(RESULTS)
    if args.k:
        with open(os.path.join(RESULTS, "k"), "w") as fh:
            fh.write(args.k)
    console = os.path.join(CACHE, "console.log")
    print(f"lab: booting {ver} under QEMU ({accel}); console in {console}", flush=True)
    rc, text = boot(accel, kernel, initrd, f"sriov_lab={ROOT}", args.timeout, console,
                    until=None)
    took = time.monotonic() - t0
    log = os.path.join(RESULTS, "pytest.log")
    if rc is None:
        print(f"lab: FAILED: timed out after {args.timeout:.0f}s", file=sys.stderr)
        _tail(log)
        return 1
    if "SRIOV-LAB: done" not in text or not os.path.exists(os.path.join(RESULTS, "rc")):
        print("lab: FAILED: the guest never reported (see the console log)", file=sys.stderr)
        sys.stderr.write(text[-3000:])
        return 1
    _tail(log, 40)
    test_rc = int(open(os.path.join(RESULTS, "rc")).read().strip() or 1)
    print(f"lab: guest tests exited {test_rc}; whole lab took {took:.0f}s")
    return 0 if test_rc == 0 else 1


def _tail(path: str, n: int = 15) -> None:
    if os.path.exists(path):
        lines = open(path, errors="replace").read().splitlines()
        print("\n".join(lines[-n:]))


if __name__ == "__main__":
    sys.exit(main())
