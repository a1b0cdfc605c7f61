"""sriov-dpdk: userspace driver binding and hugepages for DPDK containers."""
