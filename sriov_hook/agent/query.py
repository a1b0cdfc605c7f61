"""What ``sriov-hook status`` asks a running agent (over the hook socket)."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

from .. import client
from ..config import Config


def summary(cfg: Config) -> Optional[Dict[str, Any]]:
    """The agent's figures, or None when no agent serves this config's socket."""
    request = client.encode_request(b"summary", os.path.abspath(cfg.path).encode(), [], b"")
    answer = client.ask(cfg.agent_socket, request, timeout=5.0)
    if answer is None or answer[0] != b"done" or answer[1] != 0:
        return None
    try:
        data = json.loads(answer[2])
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def describe(data: Dict[str, Any]) -> str:
    """One line for the status table."""
    up = time.time() - float(data.get("since", time.time()))
    where = f", metrics on {data['metrics']}" if data.get("metrics") else ""
    return (f"agent: pid {data.get('pid')}, up {up:.0f}s, {data.get('requests', 0)} hook(s) "
            f"served, {data.get('failures', 0)} failed, {data.get('reclaimed', 0)} VF(s) "
            f"reclaimed{where}")
