"""A kubelet-protocol peer for the device plugin tests, built from the project's protos.

It plays the kubelet's side of two APIs, over real unix sockets and grpcio:
- ``Registration`` on ``<dir>/kubelet.sock``: records every RegisterRequest;
- the device plugin client: GetDevicePluginOptions, a ListAndWatch reader
  thread, GetPreferredAllocation and Allocate, as kubelet calls them;
- ``PodResourcesLister`` on its own socket, answering List from ``pods``;
- ``restart()``: what a new kubelet does, delete every socket in the
  directory, then serve ``kubelet.sock`` again.

Test-only. Everything it starts is stopped by ``close()``.
"""
from __future__ import annotations

import os
import queue
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import grpc

from sriov_hook.k8s import deviceplugin_pb2 as dp
from sriov_hook.k8s import deviceplugin_pb2_grpc as dp_grpc
from sriov_hook.k8s import podresources_pb2 as pr
from sriov_hook.k8s import podresources_pb2_grpc as pr_grpc

WAIT = 30.0   # a bound on waiting for what happens in well under a second


class _Registration(dp_grpc.RegistrationServicer):  # type: ignore[misc]
    def __init__(self, peer: "Kubelet") -> None:
        self.peer = peer

    def Register(self, request: Any, context: Any) -> Any:
        self.peer.registrations.put(request)
        return dp.Empty()


class _PodResources(pr_grpc.PodResourcesListerServicer):  # type: ignore[misc]
    def __init__(self, peer: "Kubelet") -> None:
        self.peer = peer

    def List(self, request: Any, context: Any) -> Any:
        self.peer.lists += 1
        out = []
        with self.peer.lock:
            pods = dict(self.peer.pods)
        for (namespace, name), containers in sorted(pods.items()):
            out.append(pr.PodResources(name=name, namespace=namespace, containers=[
                pr.ContainerResources(name=cname, devices=[
                    pr.ContainerDevices(resource_name=res, device_ids=ids)
                    for res, ids in sorted(devices.items())])
                for cname, devices in sorted(containers.items())]))
        return pr.ListPodResourcesResponse(pod_resources=out)


class Watch:
    """A ListAndWatch stream read in a thread, each update queued."""

    def __init__(self, channel: Any) -> None:
        self.updates: "queue.Queue[List[Tuple[str, str, List[int]]]]" = queue.Queue()
        self._call = dp_grpc.DevicePluginStub(channel).ListAndWatch(dp.Empty())
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for answer in self._call:
                self.updates.put([(d.ID, d.health, [n.ID for n in d.topology.nodes])
                                  for d in answer.devices])
        except grpc.RpcError:
            pass   # cancelled, or the plugin went away

    def until(self, check: Any, what: str) -> List[Tuple[str, str, List[int]]]:
        """The first update (queued or to come) for which ``check`` holds."""
        deadline = time.monotonic() + WAIT
        while True:
            try:
                got = self.updates.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no ListAndWatch update with {what}") from None
            if check(got):
                return got

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(timeout=WAIT)


class Kubelet:
    def __init__(self, plugin_dir: str, pod_resources: str) -> None:
        self.dir = plugin_dir
        self.pod_resources = pod_resources
        self.registrations: "queue.Queue[Any]" = queue.Queue()
        self.pods: Dict[Tuple[str, str], Dict[str, Dict[str, List[str]]]] = {}
        self.lock = threading.Lock()
        self.lists = 0
        self._servers: List[Any] = []
        self._channels: List[Any] = []
        self._watches: List[Watch] = []
        os.makedirs(plugin_dir, exist_ok=True)
        os.makedirs(os.path.dirname(pod_resources), exist_ok=True)
        self._serve_registration()
        server = grpc.server(ThreadPoolExecutor(max_workers=4))
        pr_grpc.add_PodResourcesListerServicer_to_server(_PodResources(self), server)
        server.add_insecure_port(f"unix://{pod_resources}")
        server.start()
        self._servers.append(server)

    @property
    def socket(self) -> str:
        return os.path.join(self.dir, "kubelet.sock")

    def _serve_registration(self) -> None:
        server = grpc.server(ThreadPoolExecutor(max_workers=4))
        dp_grpc.add_RegistrationServicer_to_server(_Registration(self), server)
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self._servers.append(server)

    def registered(self) -> Any:
        """The next RegisterRequest (waits for it)."""
        try:
            return self.registrations.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError("the plugin did not register") from None

    def restart(self) -> None:
        """A new kubelet: its old Registration server gone, every socket in the
        directory deleted, then kubelet.sock served again."""
        self._servers[0].stop(0).wait()
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        self._servers[0] = grpc.server(ThreadPoolExecutor(max_workers=4))
        dp_grpc.add_RegistrationServicer_to_server(_Registration(self), self._servers[0])
        self._servers[0].add_insecure_port(f"unix://{self.socket}")
        self._servers[0].start()

    # -- the plugin, as kubelet calls it ---------------------------------------------
    def plugin(self, endpoint: str) -> Any:
        channel = grpc.insecure_channel(f"unix://{os.path.join(self.dir, endpoint)}")
        self._channels.append(channel)
        return channel

    def watch(self, endpoint: str) -> Watch:
        watch = Watch(self.plugin(endpoint))
        self._watches.append(watch)
        return watch

    def options(self, endpoint: str) -> Any:
        return dp_grpc.DevicePluginStub(self.plugin(endpoint)).GetDevicePluginOptions(
            dp.Empty(), timeout=WAIT)

    def preferred(self, endpoint: str, available: List[str], must: List[str],
                  size: int) -> List[str]:
        answer = dp_grpc.DevicePluginStub(self.plugin(endpoint)).GetPreferredAllocation(
            dp.PreferredAllocationRequest(container_requests=[
                dp.ContainerPreferredAllocationRequest(
                    available_deviceIDs=available, must_include_deviceIDs=must,
                    allocation_size=size)]), timeout=WAIT)
        return list(answer.container_responses[0].deviceIDs)

    def allocate(self, endpoint: str, ids: List[str]) -> Any:
        """One container's Allocate; its ContainerAllocateResponse."""
        answer = dp_grpc.DevicePluginStub(self.plugin(endpoint)).Allocate(
            dp.AllocateRequest(container_requests=[dp.ContainerAllocateRequest(devices_ids=ids)]),
            timeout=WAIT)
        return answer.container_responses[0]

    def hold(self, namespace: str, pod: str, container: str,
             devices: Optional[Dict[str, List[str]]]) -> None:
        """What PodResources lists for a pod (None: the pod is gone)."""
        with self.lock:
            if devices is None:
                self.pods.pop((namespace, pod), None)
            else:
                self.pods[(namespace, pod)] = {container: devices}

    def close(self) -> None:
        for watch in self._watches:
            watch.close()
        for channel in self._channels:
            channel.close()
        for server in self._servers:
            server.stop(0).wait()
        for path in (self.socket, self.pod_resources):
            if os.path.lexists(path):
                os.unlink(path)
