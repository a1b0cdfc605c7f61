"""The kubelet PodResources API v1: which pod's containers hold which devices.

The supported way to learn what kubelet handed out (its checkpoint file is an
internal format and is never read here). The socket is re-dialled on every
listing: kubelet recreates it (a new inode) when it restarts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Set, Tuple

import grpc

from . import podresources_pb2 as pb
from . import podresources_pb2_grpc as pb_grpc

TIMEOUT = 5.0


@dataclass(frozen=True)
class Listing:
    """One List() answer: resource name -> the device IDs some pod holds, with where
    each is held (``namespace/pod/container``), and the socket's identity."""

    held: Dict[str, Set[str]] = field(default_factory=dict)
    where: Dict[Tuple[str, str], str] = field(default_factory=dict)
    socket_id: Tuple[int, int] = (0, 0)

    def holds(self, resource: str, device: str) -> bool:
        return device in self.held.get(resource, set())


def socket_id(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def list_held(path: str, timeout: float = TIMEOUT) -> Optional[Listing]:
    """Ask kubelet; None when it cannot be asked (no socket, kubelet down, an error)."""
    ident = socket_id(path)
    if ident is None:
        return None
    channel = grpc.insecure_channel(f"unix://{path}")
    try:
        answer = pb_grpc.PodResourcesListerStub(channel).List(
            pb.ListPodResourcesRequest(), timeout=timeout)
    except grpc.RpcError:
        return None
    finally:
        channel.close()
    held: Dict[str, Set[str]] = {}
    where: Dict[Tuple[str, str], str] = {}
    for pod in answer.pod_resources:
        for container in pod.containers:
            for dev in container.devices:
                held.setdefault(dev.resource_name, set()).update(dev.device_ids)
                for device_id in dev.device_ids:
                    where[(dev.resource_name, device_id)] = \
                        f"{pod.namespace}/{pod.name}/{container.name}"
    return Listing(held, where, ident)
