"""PF driver behaviour for the simulated host, modelled at the netlink boundary.

The simulated PF is a veth, which has no VF ops, so without this the
PF-side code (admin MAC, VLAN, trust, their restore, the driver reload)
would only ever run in the lab. Here the hook process is started as
``python -m tests.pfmodel <hook args>``: it routes ``Netlink``'s VF calls
for the simulated PF (and MAC changes of its VF netdevs) to this model,
and KernelSim calls the model when a VF's driver probes. The model's state
is a JSON file shared by the hook processes and the test (flock).
Test-only: the product never imports this.

Behaviours, as the lab's real igb shows and the other drivers' sources say:

``igb``   a VF may not change its own MAC while the PF holds an admin MAC
          for it (EADDRNOTAVAIL), unless trusted; a zero MAC clears the
          admin MAC; the VF learns an admin MAC only when its driver probes
          (else it makes up a random one and reports it); no min_tx_rate
          (EINVAL), no link_state (EOPNOTSUPP).
``ixgbe`` as igb, but only a MAC *different* from the admin MAC is refused
          (EPERM).
``i40e``  as ixgbe, but an admin MAC reaches the VF's netdev at once (the PF
          resets the VF; i40e/iavf and mlx5 behave so).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional

ZERO = "00:00:00:00:00:00"
ENV = "SRIOV_TEST_PFMODEL"
DRIVERS = {"igb": "igbvf", "ixgbe": "ixgbevf", "i40e": "iavf"}   # PF -> VF driver


@dataclass
class VfState:
    mac: str                    # what the PF reports (IFLA_VF_MAC)
    admin: bool = False         # the MAC was set by the administrator
    vlan: int = 0
    qos: int = 0
    spoofchk: bool = True
    trust: bool = False
    link_state: str = "auto"
    min_tx_rate: int = 0
    max_tx_rate: int = 0


@dataclass
class ModelState:
    driver: str
    sysfs_root: str
    pf_bdf: str
    vfs: Dict[str, VfState]
    refuse_macs: List[str] = field(default_factory=list)
    refuse_zero: bool = False       # an old driver: clearing the admin MAC is EINVAL
    netdev_on_probe: bool = True    # False: the VF probes but no netdev comes
    rename_on_probe: bool = True    # the kernel names a reprobed VF anew (ethN)
    udev_dir: Optional[str] = None  # a simulated udev renames it later, then writes its db
    udev_delay: float = 0.4
    raced: bool = False             # the hook took the netdev before udev was done
    probes: int = 0
    uid: str = "m"

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "ModelState":
        data = dict(data)
        data["vfs"] = {k: VfState(**v) for k, v in data["vfs"].items()}
        return cls(**data)


class PfModel:
    """The state file plus the sysfs lookups both sides need."""

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def create(cls, path: str, driver: str, sysfs_root: str, pf_bdf: str, uid: str) -> "PfModel":
        model = cls(path)
        vfs = {}
        for name in os.listdir(os.path.join(sysfs_root, "bus/pci/devices", pf_bdf)):
            if name.startswith("virtfn"):
                bdf = os.path.basename(os.readlink(os.path.join(
                    sysfs_root, "bus/pci/devices", pf_bdf, name)))
                netdev = model._netdev(sysfs_root, bdf)
                mac = _ip_json("link", "show", "dev", netdev)[0]["address"] if netdev else ZERO
                vfs[name[len("virtfn"):]] = VfState(mac=mac)
        state = ModelState(driver=driver, sysfs_root=sysfs_root, pf_bdf=pf_bdf, vfs=vfs, uid=uid)
        with open(path, "w") as fh:
            json.dump(asdict(state), fh)
        return model

    # -- state ---------------------------------------------------------------
    @contextlib.contextmanager
    def edit(self) -> Iterator[ModelState]:
        with open(self.path, "r+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            state = ModelState.from_json(json.load(fh))
            yield state
            fh.seek(0)
            fh.truncate()
            json.dump(asdict(state), fh)

    def read(self) -> ModelState:
        with open(self.path) as fh:
            fcntl.flock(fh, fcntl.LOCK_SH)
            return ModelState.from_json(json.load(fh))

    def set(self, **kw: Any) -> None:
        with self.edit() as st:
            for k, v in kw.items():
                setattr(st, k, v)

    def vf(self, index: int) -> VfState:
        return self.read().vfs[str(index)]

    # -- sysfs -----------------------------------------------------------------
    @staticmethod
    def _dev(root: str, bdf: str, *parts: str) -> str:
        return os.path.join(root, "bus/pci/devices", bdf, *parts)

    def _netdev(self, root: str, bdf: str) -> Optional[str]:
        d = self._dev(root, bdf, "net")
        names = sorted(os.listdir(d)) if os.path.isdir(d) else []
        return names[0] if names else None

    def vf_index(self, st: ModelState, bdf: str) -> Optional[int]:
        try:
            if os.path.basename(os.readlink(self._dev(st.sysfs_root, bdf, "physfn"))) != st.pf_bdf:
                return None
        except OSError:
            return None
        for key in st.vfs:
            link = self._dev(st.sysfs_root, st.pf_bdf, f"virtfn{key}")
            if os.path.basename(os.readlink(link)) == bdf:
                return int(key)
        return None

    def pf_name(self, st: ModelState) -> Optional[str]:
        return self._netdev(st.sysfs_root, st.pf_bdf)

    # -- the driver's probe (called by KernelSim in the test process) --------------
    def on_probe(self, bdf: str, driver: str) -> None:
        with self.edit() as st:
            index = self.vf_index(st, bdf)
            if index is None or driver != DRIVERS[st.driver]:
                return
            st.probes += 1
            vf = st.vfs[str(index)]
            sysname = self._netdev(st.sysfs_root, bdf)
            if sysname is None:
                return
            name = host_name_of(st.uid, index)
            if not st.netdev_on_probe:
                # No netdev: out of sysfs, and out of sight by any old name.
                _park(st.sysfs_root, bdf, sysname)
                if name is not None:
                    _ip("link", "set", "dev", name, "name", f"h{st.uid}{index}")
                return
            if name is None:
                # The sim cannot make a new netdev: its veth is still in a
                # container (a VM runtime rebound it there); it comes home
                # with the hook, carrying what the VF would have now.
                return
            if not vf.admin:
                vf.mac = _random_mac()     # "Assigning random MAC address", reported to the PF
            _ip("link", "set", "dev", name, "down")
            _ip("link", "set", "dev", name, "address", vf.mac, "mtu", "1500")
            if st.rename_on_probe:
                name = _rename(st.sysfs_root, bdf, sysname, f"k{st.uid}{st.probes}", name)
            udev = st.udev_dir
            delay = st.udev_delay
            uid = st.uid
        if udev:
            threading.Thread(target=self._udev, args=(bdf, name, udev, delay, uid),
                             daemon=True).start()

    def sync_sysfs(self) -> None:
        """What the kernel's namespace-tagged sysfs shows after the hook
        renamed or moved a VF netdev: ``net/<name>`` on the host, nothing
        while it is in another netns. Names are found through the veth peer."""
        with self.edit() as st:
            for key in st.vfs:
                bdf = os.path.basename(os.readlink(self._dev(st.sysfs_root, st.pf_bdf,
                                                             f"virtfn{key}")))
                drv = os.path.join(self._dev(st.sysfs_root, bdf, "driver"))
                if not os.path.lexists(drv) or \
                        os.path.basename(os.readlink(drv)) != DRIVERS[st.driver]:
                    continue   # unbound: KernelSim parked its entry
                _sync_one(st.sysfs_root, bdf, host_name_of(st.uid, int(key)))

    def _udev(self, bdf: str, name: str, udev: str, delay: float, uid: str) -> None:
        """udev's part: some time later, the predictable name, then its db."""
        time.sleep(delay)
        st = self.read()
        final = f"u{uid}{st.probes}"
        links = _ip_json("link", "show", "dev", name)
        if not links:
            self.set(raced=True)     # someone moved or renamed it before udev was done
            return
        _rename(st.sysfs_root, bdf, name, final, name)
        index = _ip_json("link", "show", "dev", final)[0]["ifindex"]
        os.makedirs(os.path.join(udev, "data"), exist_ok=True)
        open(os.path.join(udev, "data", f"n{index}"), "w").close()


def peer_name(uid: str, vf: int) -> str:
    """The bridge end of VF ``vf``'s veth (simhost names it; it never moves)."""
    return f"sw{uid}0x{vf}"


def host_name_of(uid: str, vf: int) -> Optional[str]:
    """The VF's veth end, if it is in the host netns (found through its peer:
    names change, the pairing does not)."""
    peer = _ip_json("link", "show", "dev", peer_name(uid, vf))
    if not peer or "link_netnsid" in peer[0]:
        return None
    return str(peer[0].get("link")) if peer[0].get("link") else None


def _random_mac() -> str:
    octets = [0x02] + [random.randint(0, 255) for _ in range(5)]
    return ":".join(f"{o:02x}" for o in octets)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _ip_json(*args: str) -> List[Dict[str, Any]]:
    p = subprocess.run(["ip", "-j", *args], capture_output=True, text=True)
    return json.loads(p.stdout) if p.returncode == 0 and p.stdout.strip() else []


def _rename(root: str, bdf: str, old: str, new: str, real: str) -> str:
    """Rename the netdev ``real`` and its sysfs entry ``old`` to ``new``."""
    _ip("link", "set", "dev", real, "name", new)
    dev = os.path.join(root, "bus/pci/devices", bdf)
    os.rename(os.path.join(dev, "net", old), os.path.join(dev, "net", new))
    cls = os.path.join(root, "class/net")
    if os.path.lexists(os.path.join(cls, old)):
        os.unlink(os.path.join(cls, old))
    target = os.path.relpath(os.path.join(os.path.realpath(dev), "net", new), cls)
    os.symlink(target, os.path.join(cls, new))
    return new


def _sync_one(root: str, bdf: str, real: Optional[str]) -> None:
    dev = os.path.join(root, "bus/pci/devices", bdf)
    net, away = os.path.join(dev, "net"), os.path.join(dev, ".net-away")
    shown = sorted(os.listdir(net)) if os.path.isdir(net) else []
    hidden = sorted(os.listdir(away)) if os.path.isdir(away) else []
    cls = os.path.join(root, "class/net")
    for name in shown:
        if name != real:
            if os.path.lexists(os.path.join(cls, name)):
                os.unlink(os.path.join(cls, name))
            os.makedirs(away, exist_ok=True)
            os.rename(os.path.join(net, name), os.path.join(away, name))
    if real is not None and real not in shown:
        os.makedirs(net, exist_ok=True)
        src = os.path.join(away, hidden[0]) if hidden else None
        if src is not None:
            os.rename(src, os.path.join(net, real))
        else:
            os.makedirs(os.path.join(net, real))
        target = os.path.relpath(os.path.join(os.path.realpath(dev), "net", real), cls)
        os.symlink(target, os.path.join(cls, real))


def _park(root: str, bdf: str, name: str) -> None:
    dev = os.path.join(root, "bus/pci/devices", bdf)
    os.makedirs(os.path.join(dev, ".net-unbound"), exist_ok=True)
    os.rename(os.path.join(dev, "net", name), os.path.join(dev, ".net-unbound", name))
    cls = os.path.join(root, "class/net", name)
    if os.path.lexists(cls):
        os.unlink(cls)


# -- the hook's side: the netlink boundary ------------------------------------------
def install(path: str) -> None:
    """Route the simulated PF's VF calls through the model (in the hook process)."""
    from sriov_hook import rtnl
    from sriov_hook.netlink import Netlink, VfInfo
    IFLA_LINK, IFLA_LINK_NETNSID = 5, 37   # the veth peer, and whether it is in another netns

    model = PfModel(path)
    real_vf_info, real_set_vf, real_set_link = Netlink.vf_info, Netlink.set_vf, Netlink.set_link

    def fail(nl: Netlink, what: str, code: int) -> None:
        def kernel() -> None:
            raise rtnl.RtnlError(code)
        nl._call(what, kernel)

    def vf_of_link(nl: Netlink, st: ModelState, index: int) -> Optional[int]:
        """Which VF of the model a link is, through its veth peer."""
        try:
            msg = nl._rt.get_link(index=index)
        except rtnl.RtnlError:
            return None
        link_attr = msg.attrs.get(IFLA_LINK)
        peer_index = rtnl.u32_value(link_attr) if link_attr else None
        if not peer_index or IFLA_LINK_NETNSID in msg.attrs:
            return None
        peer = nl.link_by_index(peer_index)
        for key in st.vfs:
            if peer is not None and peer.name == peer_name(st.uid, int(key)):
                return int(key)
        return None

    def is_model_pf(nl: Netlink, st: ModelState, pf_index: int) -> bool:
        name = model.pf_name(st)
        link = nl.link(name) if name else None
        return link is not None and link.index == pf_index

    def vf_info(nl: Netlink, pf_index: int, vf: int) -> Optional[VfInfo]:
        st = model.read()
        if not is_model_pf(nl, st, pf_index):
            return real_vf_info(nl, pf_index, vf)
        v = st.vfs.get(str(vf))
        if v is None:
            return None
        return VfInfo(vf=vf, mac=v.mac, vlan=v.vlan, qos=v.qos, spoofchk=v.spoofchk,
                      trust=v.trust, link_state=v.link_state,
                      min_tx_rate=v.min_tx_rate, max_tx_rate=v.max_tx_rate)

    def set_vf(nl: Netlink, pf_index: int, vf: int, **attrs: Any) -> None:
        if not is_model_pf(nl, model.read(), pf_index):
            return real_set_vf(nl, pf_index, vf, **attrs)
        for key, val in attrs.items():
            what = f"set VF {vf} {key}={val} on PF #{pf_index}"
            push: Optional[str] = None
            with model.edit() as st:
                v = st.vfs[str(vf)]
                code = _apply(st, v, key, val)
                if code == 0 and key == "mac" and val != ZERO and st.driver == "i40e":
                    push = host_name_of(st.uid, vf)
            if code:
                fail(nl, what, code)
            if push is not None:    # the PF resets the VF: it takes the MAC at once
                link = nl.link(push)
                if link is not None:
                    real_set_link(nl, link.index, address=val)

    def set_link(nl: Netlink, index: int, **attrs: Any) -> None:
        mac = attrs.get("address")
        if mac is not None:
            st = model.read()
            vf = vf_of_link(nl, st, index)
            if vf is not None:
                v = st.vfs[str(vf)]
                refused = v.admin and not v.trust and (st.driver == "igb" or mac.lower() != v.mac)
                if refused:
                    code = errno.EADDRNOTAVAIL if st.driver == "igb" else errno.EPERM
                    fail(nl, f"set link #{index} address={mac}", code)
                real_set_link(nl, index, **attrs)
                with model.edit() as st2:
                    st2.vfs[str(vf)].mac = mac.lower()   # the VF reports its MAC to the PF
                return
        real_set_link(nl, index, **attrs)

    real_move = Netlink.move

    def move(nl: Netlink, index: int, target_fd: int, ifname: str) -> None:
        try:
            real_move(nl, index, target_fd, ifname)
        finally:
            model.sync_sysfs()

    def set_link_synced(nl: Netlink, index: int, **attrs: Any) -> None:
        try:
            set_link(nl, index, **attrs)
        finally:
            if "ifname" in attrs:
                model.sync_sysfs()

    Netlink.move = move                  # type: ignore[method-assign]
    Netlink.vf_info = vf_info            # type: ignore[method-assign]
    Netlink.set_vf = set_vf              # type: ignore[method-assign]
    Netlink.set_link = set_link_synced   # type: ignore[method-assign]


def _apply(st: ModelState, v: VfState, key: str, val: Any) -> int:
    """One VF setting as the driver takes it; an errno if it refuses."""
    if key == "mac":
        mac = str(val).lower()
        if mac in st.refuse_macs:
            return errno.EINVAL
        if mac == ZERO:
            if st.refuse_zero:
                return errno.EINVAL
            v.admin, v.mac = False, ZERO
        else:
            v.admin, v.mac = True, mac
    elif key == "vlan":
        v.vlan, v.qos = val
    elif key == "rate":
        if st.driver == "igb" and val[0]:
            return errno.EINVAL
        v.min_tx_rate, v.max_tx_rate = val
    elif key == "link_state":
        if st.driver == "igb":
            return errno.EOPNOTSUPP
        v.link_state = val
    elif key in ("spoofchk", "trust"):
        setattr(v, key, bool(val))
    else:
        return errno.EOPNOTSUPP
    return 0


def main() -> int:
    install(os.environ[ENV])
    from sriov_hook.cli import main as cli_main
    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
