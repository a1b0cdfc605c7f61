"""``python -m sriov_hook``: the thin client first; it loads the full CLI only to run in-process."""
import sys

from .client import main

sys.exit(main())
