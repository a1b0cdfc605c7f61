"""The node agent (``sriov-hook agent``): hooks served from one long-lived process.

server.py  the unix socket, peer checks, config reloads, dispatch to cli.run()
reclaim.py releases the VFs of containers that died without a poststop
metrics.py Prometheus metrics (prometheus-client)
query.py   what ``sriov-hook status`` asks a running agent
"""
