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
        # QEMU 10.0.x registers a PF's VF BARs before pcie_sriov_pf_init_vf_bar()
        # and loses any it places above 4 GB (fixed upstream in 2e54e5fda779,
        # "pcie_sriov: Fix broken MMIO accesses from SR-IOV VFs", QEMU 10.1.2).
        # The VFs' mailbox to their PF is then dead: no carrier, and PF-side
        # settings that "work" only because the VF never asks. With no 64-bit
        # PCI hole every BAR lands below 4 GB; harmless where QEMU is fixed.
        "-global", "q35-pcihost.pci-hole64-size=0",
        "-nographic", "-no-reboot",
        # Both NICs' wires on one QEMU hub: a frame a VF of PF0 sends out of
        # the port arrives on PF1's port, like two NICs cabled to one switch.
        "-netdev", "hubport,id=n0,hubid=0",
        "-device", "igb,netdev=n0,id=pf0",
        # A second igb below a PCIe switch whose downstream port has no ACS:
        # the PF and its VFs then share one IOMMU group, so a VF of it is
        # never viable for VFIO while the PF sits on igb.
        "-netdev", "hubport,id=n1,hubid=0",
        "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1",
        "-device", "x3130-upstream,id=up1,bus=rp1",
        "-device", "xio3130-downstream,id=dn1,bus=up1,chassis=2,slot=0",
        "-device", "igb,netdev=n1,bus=dn1,id=pf1",
        "-virtfs", "local,path=/,mount_tag=host,security_model=passthrough,id=hostfs",
        "-kernel", kernel, "-initrd", initrd,
        "-append", f"console=ttyS0 intel_iommu=on iommu=pt quiet panic=-1 {append}",
    ]


STARTED = "SRIOV-LAB: running tests"
START_WITHIN = 150.0   # seconds from QEMU start to the tests starting; ~20 s is usual


def boot(accel: str, kernel: str, initrd: str, append: str, timeout: float, log: str,
         until: Optional[str] = None) -> "tuple[Optional[int], str]":
    """Run the guest; return (qemu rc or None on timeout, console text).

    A guest that has not started the tests within START_WITHIN is given up
    early (TCG sometimes stalls a boot: CPU stall messages, no progress).
    """
    with open(log, "w") as out:
        proc = subprocess.Popen(qemu_cmd(accel, kernel, initrd, append), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        t0 = time.monotonic()
        deadline = t0 + timeout
        rc: Optional[int] = None
        while time.monotonic() < deadline:
            rc = proc.poll()
            if rc is not None:
                break
            console = open(log, errors="replace").read()
            if until and until in console:
                break
            if STARTED not in console and time.monotonic() - t0 > START_WITHIN:
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
    ap.add_argument("--timeout", type=float, default=600)
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
    rc, text = boot(accel, kernel, initrd, f"sriov_lab={ROOT}", args.timeout, console)
    if STARTED not in text:
        # No test has run yet, so booting again changes no result.
        print("lab: the guest stalled before the tests started (seen about once in 17 "
              "TCG boots); booting again", flush=True)
        rc, text = boot(accel, kernel, initrd, f"sriov_lab={ROOT}", args.timeout, console)
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
    traffic = os.path.join(RESULTS, "traffic.txt")
    if os.path.exists(traffic):
        print("lab: what crossed the wire (lab/cache/results/traffic.txt):")
        print(open(traffic, errors="replace").read().rstrip())
    test_rc = int(open(os.path.join(RESULTS, "rc")).read().strip() or 1)
    print(f"lab: guest tests exited {test_rc}; whole lab took {took:.0f}s")
    return 0 if test_rc == 0 else 1


def _tail(path: str, n: int = 15) -> None:
    if os.path.exists(path):
        lines = open(path, errors="replace").read().splitlines()
        print("\n".join(lines[-n:]))


if __name__ == "__main__":
    sys.exit(main())
