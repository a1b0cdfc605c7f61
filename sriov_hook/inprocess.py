"""``python -m sriov_hook.inprocess``: the full CLI in this process, never through the agent.

The compiled client (native/sriov-hook.c) runs this when the agent cannot
answer, with the state it already read back on stdin, and for every command
that is not a hook stage.
"""
import sys

from .cli import main

sys.exit(main())
