"""Kubernetes: the kubelet device plugin the agent serves, and what it asks kubelet.

deviceplugin.py      the device plugin API v1beta1 (one resource per pool), over grpcio
devices.py           a pool's VFs as the plugin sees them: health, and packing by PF and NUMA
holdings.py          which VFs kubelet handed to pods, and the reclaim from kubelet's view
podresources.py      the PodResources API v1 client (which pod holds which device)
*.proto              the two kubelet APIs, same packages, services and field numbers
*_pb2*.py           generated from them by grpcio-tools (make protos), committed

Imported only by the agent when ``device_plugin: true``: never on a hook's path.
"""
import os

# Before grpc is first imported: its fork handlers start gRPC threads again in a
# forked child, and the agent's hooks fork children that setns() into a
# container's mount namespace (mountns.run_in), which the kernel refuses to a
# multi-threaded process (EINVAL). Forced, not defaulted: the hooks need it off.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"
