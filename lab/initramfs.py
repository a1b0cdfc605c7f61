"""Build the lab guest's initramfs: Debian's busybox-static, the kernel modules
the lab needs (decompressed, in load order), and an /init that shares the
host's / over 9p, chroots there and runs the lab tests with the host's own
Python, runc, iproute2 and dpdk-testpmd.
"""
from __future__ import annotations

import glob
import lzma
import os
import shutil
import subprocess
import sys

# Load order, dependencies first (this order booted here).
MODULES = ["dca", "i2c-algo-bit", "igb", "igbvf", "irqbypass", "vfio", "vfio_iommu_type1",
           "vfio-pci-core", "vfio-pci", "netfs", "9pnet", "9pnet_virtio", "9p", "veth",
           "bridge", "stp", "llc", "uio", "uio_pci_generic"]

INIT = r"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do
  [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko 2>/dev/null
done
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
project=$(arg sriov_lab)
echo "SRIOV-LAB: booted, kernel $(uname -r)"
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose host /host || {
  echo "SRIOV-LAB: cannot mount the host share"; poweroff -f; }
for d in proc sys dev; do mount --rbind /$d /host/$d; done
# cgroup v1, as this project's hosts use (runc/podman with devices.allow).
mount -t tmpfs -o mode=755 cgroup /host/sys/fs/cgroup
for c in $(awk 'NR>1 && $4==1 {print $1}' /proc/cgroups); do
  mkdir -p /host/sys/fs/cgroup/$c
  mount -t cgroup -o $c cgroup /host/sys/fs/cgroup/$c 2>/dev/null || rmdir /host/sys/fs/cgroup/$c
done
# Guest-private /run (runc state, netns, pins). /tmp stays the host's: the
# project may live there; the tests get TMPDIR under /run (lab/guest.sh).
mount -t tmpfs -o mode=755 tmpfs /host/run
mkdir -p /host/dev/hugepages /host/run/netns
echo "SRIOV-LAB: running tests in $project"
case " $(cat /proc/cmdline) " in *" sriov_lab_probe=1 "*) poweroff -f;; esac
chroot /host /bin/sh -c "cd $project && exec lab/guest.sh"
echo "SRIOV-LAB: done rc=$?"
poweroff -f
"""


def kernel_version(kdir: str) -> str:
    vers = os.listdir(os.path.join(kdir, "lib/modules"))
    if len(vers) != 1:
        raise SystemExit(f"lab: expected one kernel under {kdir}/lib/modules, got {vers}")
    return vers[0]


def find_module(kdir: str, ver: str, name: str) -> str:
    want = {name.replace("-", "_"), name.replace("_", "-")}
    for path in glob.glob(os.path.join(kdir, "lib/modules", ver, "kernel", "**", "*.ko*"),
                          recursive=True):
        base = os.path.basename(path).split(".ko")[0]
        if base in want:
            return path
    raise SystemExit(f"lab: module {name} not found in the guest kernel")


def build(cache: str) -> str:
    kdir = os.path.join(cache, "kernel")
    ver = kernel_version(kdir)
    out = os.path.join(cache, f"initramfs-{ver}.cpio.gz")
    if os.path.exists(out):
        return out
    root = os.path.join(cache, "initramfs.d")
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "proc", "sys", "dev", "lib/modules", "host"):
        os.makedirs(os.path.join(root, d))
    shutil.copy2("/bin/busybox", os.path.join(root, "bin/busybox"))
    for app in subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True,
                              check=True).stdout.split():
        if app != "busybox":
            os.symlink("busybox", os.path.join(root, "bin", app))
    order = []
    for name in MODULES:
        src = find_module(kdir, ver, name)
        dst = os.path.join(root, "lib/modules", f"{name}.ko")
        data = open(src, "rb").read()
        if src.endswith(".xz"):
            data = lzma.decompress(data)
        with open(dst, "wb") as fh:
            fh.write(data)
        order.append(name)
    with open(os.path.join(root, "modules.order"), "w") as fh:
        fh.write("\n".join(order) + "\n")
    with open(os.path.join(root, "init"), "w") as fh:
        fh.write(INIT)
    os.chmod(os.path.join(root, "init"), 0o755)
    tmp = out + ".tmp"
    subprocess.run(f"cd {root} && find . | cpio -o -H newc --quiet | gzip -1 > {tmp}",
                   shell=True, check=True)
    os.rename(tmp, out)
    shutil.rmtree(root)
    return out


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(
        os.path.abspath(__file__)), "cache")))
