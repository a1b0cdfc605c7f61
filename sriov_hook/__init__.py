"""sriov-hook: an OCI runtime hook that hands SR-IOV VFs to containers."""
__version__ = "0.1.0"
